"""Robust aggregators: base rules, meta- and pre-aggregators over worker rows.

An aggregator reduces W worker updates to one. Updates are any pytree whose
leaves share a leading worker axis W (e.g. a params pytree stacked by
``jax.vmap``); norms and distances are global over all leaves, and nothing is
flattened into one big matrix. Rules compose as functions::

    rule = ctma(cwtm(f=4))
    aggregate, diagnostics = rule(updates, key)      # works under jit and vmap

Base rules: :func:`avg`, :func:`cwmed`, :func:`cwtm`, :func:`meamed`,
:func:`gm`, :func:`krum`, :func:`multikrum`, :func:`centered_clipping`.
Meta- and pre-aggregators wrap any rule: :func:`ctma`, :func:`nnm`,
:func:`nnm_ctma`, :func:`bucketing`, :func:`clip`, :func:`arc`; they also wrap
a user-written function (see :func:`rule`), e.g. ``ctma(my_fn, f=2)``.

The same rules have a string spelling for configs and the command line::

    rule = make_aggregator("ctma(cwtm)", f=4, num_workers=17)

Spec grammar: ``rule`` or ``meta(spec)``, nested freely, e.g. ``"cwtm"``,
``"ctma(cwtm)"``, ``"bucketing(cwmed)"``, ``"nnm+ctma(cwtm)"``, ``"clip(gm)"``,
``"arc(ctma(cwtm))"``. Names are resolved through :data:`AGGREGATORS`,
:data:`META_AGGREGATORS` and :data:`ALIASES` (``rfa`` = ``gm``); the default
options of every rule are its builder's keyword defaults, listed in
:data:`DEFAULT_OPTIONS`.

Faulty rows. A worker may send NaN or +-inf. Distance-based rules treat a row
with any non-finite coordinate as infinitely far away; coordinate-wise rules
order NaN as +inf and trim it like any extreme value; means that should drop a
row skip it (``0 * inf`` would be NaN). With at most f such rows every rule
here except ``avg`` returns a finite output. ``avg`` is the plain mean and is
not robust.

Kernels. The rules are written in plain JAX over the worker-axis primitives of
:mod:`ftjax.kernels.rows` (means, order statistics, trimmed sums, row
distances, Gram matrices, fusion barriers). An aggregator's ``kernels`` field
chooses their implementation while it runs (see :mod:`ftjax.kernels`). Every
sum over coordinates goes through ``rows.sqdist``, ``rows.gram`` or
``rows.coordinate_sum``, so the same rules run on coordinate slices of the
rows, one per device (``ftjax.sharding.shard_aggregator``).
"""
from __future__ import annotations

import dataclasses
import inspect
import types
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from optax.experimental import aggregating as optax_aggregating

from ftjax import kernels as kernels_lib
from ftjax.kernels import rows

PyTree = Any
Diagnostics = dict[str, jax.Array]
# (rows, key) -> (aggregate, diagnostics); rows is a pytree stacked on W.
RuleFn = Callable[[PyTree, Optional[jax.Array]], tuple[PyTree, Diagnostics]]


# --------------------------------------------------------------------------
# Pytree maths (global over leaves, no flattening)
# --------------------------------------------------------------------------


def _num_rows(x: PyTree) -> int:
  return jax.tree.leaves(x)[0].shape[0]


def _row_sqdist(x: PyTree, center: PyTree | None = None) -> jax.Array:
  """Squared distance of every row to ``center`` (or squared norm), [W].

  Summed over the leaves; a non-finite row (or inf - inf) is +inf away.
  """
  return rows.sqdist(x, center)


def _row_finite(x: PyTree) -> jax.Array:
  """bool [W]: True for rows whose squared norm is finite.

  A finite row whose squared norm overflows counts as non-finite too; it is
  then treated as infinitely far away, which is what such a row deserves.
  """
  return jnp.isfinite(_row_sqdist(x))


def _weighted_sum(x: PyTree, weights: jax.Array, mask: jax.Array | None = None) -> PyTree:
  return jax.tree.map(lambda leaf: rows.weighted_sum(leaf, weights, mask), x)


def _masked_mean(x: PyTree, mask: jax.Array) -> PyTree:
  """Mean of the rows where ``mask`` (the others may hold NaN)."""
  weights = jnp.where(mask, 1.0, 0.0) / jnp.maximum(jnp.sum(mask), 1)
  return _weighted_sum(x, weights, mask)


def _mean_of(x: PyTree, idx: jax.Array) -> PyTree:
  return jax.tree.map(lambda leaf: rows.mean_of(leaf, idx), x)


def _smallest_indices(values: jax.Array, k: int) -> jax.Array:
  """Ascending indices of exactly ``k`` smallest entries, ties to the lowest index."""
  return jnp.sort(jnp.argsort(values, stable=True)[:k])


def _median(leaf: jax.Array, lower: bool = False) -> jax.Array:
  """Coordinate-wise median; for even W the midpoint of the middle two (or the lower)."""
  w = leaf.shape[0]
  if lower or w % 2:
    return rows.order_statistics(leaf, [(w - 1) // 2])[0]
  a, b = rows.order_statistics(leaf, [w // 2 - 1, w // 2])
  return (a + b) * jnp.asarray(0.5, leaf.dtype)


def _clip_rows(x: PyTree, tau: jax.Array) -> tuple[PyTree, jax.Array]:
  """Scales every row to norm at most ``tau``; a non-finite row becomes zero.

  A row of infinite norm has no direction to keep, so zero is the only clipped
  value that stays finite.

  Returns:
    (clipped rows, bool [W] rows that were scaled or zeroed).
  """
  norms = jnp.sqrt(_row_sqdist(x))
  finite = jnp.isfinite(norms)
  clipped = finite & (norms > tau)
  scale = jnp.where(clipped, tau / jnp.where(clipped, norms, 1.0), 1.0)

  def clip_leaf(leaf):
    shape = (leaf.shape[0],) + (1,) * (leaf.ndim - 1)
    keep = finite.reshape(shape)
    return jnp.where(keep, leaf * scale.reshape(shape).astype(leaf.dtype),
                     jnp.zeros((), leaf.dtype))

  return jax.tree.map(clip_leaf, x), clipped | ~finite


def _pairwise_sqdist(x: PyTree, f: int) -> tuple[jax.Array, jax.Array]:
  """Pairwise squared distances |x_i - x_j|^2 [W, W] and the finite rows, bool [W].

  Through one Gram matrix of the rows centred at the coordinate-wise median c
  of the first min(W, 2f + 1) rows (:func:`ftjax.kernels.rows.pairwise_sqdist`).
  With at most f faulty rows those hold a majority of honest ones, so every
  coordinate of c lies within the honest rows' values and the float32
  rounding stays relative to their spread, whatever the faulty rows hold;
  it reads 2f + 1 rows instead of W. A pair involving a non-finite row is
  +inf apart; the diagonal is 0.
  """
  k = min(_num_rows(x), 2 * f + 1)

  def center(v):
    med = jax.tree.map(lambda leaf: _median(leaf[:k]), v)
    # More than f faulty rows can make the median infinite; any finite centre
    # gives the same distances.
    return jax.tree.map(lambda m: jnp.where(jnp.isfinite(m), m, jnp.zeros((), m.dtype)), med)

  # The median feeds every block's centring: its own computation.
  return rows.pairwise_sqdist(x, rows.isolate(center, x))


def _init_point(x: PyTree, init: str) -> PyTree:
  """Starting point of gm and centred clipping: zero, the finite rows' mean, or cwmed."""
  if init == "zero":
    return jax.tree.map(lambda l: jnp.zeros(l.shape[1:], l.dtype), x)
  if init == "mean":  # of the finite rows: one NaN row must not poison it
    return _masked_mean(x, _row_finite(x))
  return jax.tree.map(_median, x)


# --------------------------------------------------------------------------
# Base rules: (x, key, *, f, **options) -> (aggregate, diagnostics)
# --------------------------------------------------------------------------


def _avg(x, key, *, f):
  del key, f
  return jax.tree.map(rows.mean, x), {}


def _cwmed(x, key, *, f, lower):
  del key, f
  return jax.tree.map(lambda leaf: _median(leaf, lower), x), {}


def _cwtm(x, key, *, f):
  """Per coordinate: drop the f smallest and f largest values, average the rest."""
  del key

  def trimmed_mean(leaf):
    w = leaf.shape[0]
    return rows.trimmed_sum(leaf, f, w - f - 1) / jnp.asarray(w - 2 * f, leaf.dtype)

  return jax.tree.map(trimmed_mean, x), {}


def _meamed(x, key, *, f):
  """Per coordinate, the mean of the W-f values closest to the median.

  Sorted values s_0 <= ... <= s_{W-1} with median m: the W-f closest to m form
  a window [k, k + W - f). The f dropped values are the f farthest among the
  bottom distances a_j = m - s_j and top distances b_j = s_{W-1-j} - m, both
  decreasing in j, so k = #{j < f : a_j > b_{f-1-j}} (b_{f-1-j} = s_{W-f+j}).
  An exact tie drops the upper value, which keeps the rule permutation
  invariant (a tie-break by worker index would not be).
  """
  del key

  def window_mean(leaf):
    w = leaf.shape[0]
    s = rows.sort(leaf)
    m = s[(w - 1) // 2] if w % 2 else (s[w // 2 - 1] + s[w // 2]) * jnp.asarray(0.5, leaf.dtype)
    k = sum(((m - s[j]) > (s[w - f + j] - m)).astype(jnp.int32) for j in range(f)) \
        if f else jnp.zeros(leaf.shape[1:], jnp.int32)
    # 0 <= k <= f: the window always holds s_f .. s_{W-f-1}; of the f lowest
    # values it keeps those at j >= k, of the f highest those at j < k + W - f.
    zero = jnp.zeros((), leaf.dtype)
    window = [s[j] for j in range(f, w - f)]
    window += [jnp.where(j >= k, s[j], zero) for j in range(f)]
    window += [jnp.where(j < k + (w - f), s[j], zero) for j in range(w - f, w)]
    return rows.sum_rows(window) / jnp.asarray(w - f, leaf.dtype)

  return jax.tree.map(window_mean, x), {}


def _gm(x, key, *, f, iters, nu, init, tol, max_iters):
  """Smoothed Weiszfeld: z <- sum_i b_i x_i / sum_i b_i, b_i = 1/max(|z - x_i|, nu)."""
  del key, f

  def step(x, z):
    dist = jnp.sqrt(_row_sqdist(x, z))
    ok = jnp.isfinite(dist)
    beta = jnp.where(ok, 1.0 / jnp.maximum(dist, nu), 0.0)
    return _weighted_sum(x, beta / jnp.sum(beta), ok)

  # Each point feeds the next distance pass over the rows: its own computation.
  z = rows.isolate(lambda v: _init_point(v, init), x)
  if tol is None:
    for _ in range(iters):
      z = rows.isolate(step, x, z)
    return z, {}

  def cond(carry):
    i, _, moved = carry
    return (i < max_iters) & (moved > tol)

  def body(carry):
    i, z, _ = carry
    new = step(x, z)
    moved = jnp.sqrt(rows.coordinate_sum(sum(jnp.sum(jnp.square(a - b)) for a, b in
                                             zip(jax.tree.leaves(new), jax.tree.leaves(z)))))
    return i + 1, new, moved

  dtype = jax.tree.leaves(x)[0].dtype
  i, z, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), z, jnp.asarray(jnp.inf, dtype)))
  return z, {"gm_iters": i}


def _krum_scores(dist: jax.Array, f: int) -> jax.Array:
  """Krum score per row: sum of squared distances to its W-f-1 nearest others."""
  w = dist.shape[0]
  others = jnp.where(jnp.eye(w, dtype=bool), jnp.inf, dist)
  nearest = jnp.sort(others, axis=1)[:, :w - f - 1]
  return rows.nan_to_posinf(jnp.sum(nearest, axis=1))


def _sqdist_to_combination(dist: jax.Array, weights: jax.Array, finite: jax.Array) -> jax.Array:
  """|x_i - sum_j w_j x_j|^2 for every row i, from the pairwise squared distances D.

  For weights summing to one, ``sum_j w_j D_ij - (1/2) sum_jl w_j w_l D_jl``
  (the variance decomposition around the weighted mean), so no pass over the
  rows is needed. For a single selected row k it is exactly column k of D.
  Rows of weight zero do not enter the sums (their +inf distances cannot turn
  into NaN). As with a distance pass, a non-finite row is +inf away, and
  every row is when a weighted row is non-finite.
  """
  used = weights > 0
  to_points = jnp.sum(jnp.where(used[None, :], weights[None, :] * dist, 0.0), axis=1)
  spread = 0.5 * jnp.sum(jnp.where(used, weights * to_points, 0.0))
  r = jnp.maximum(to_points - spread, 0.0)
  return jnp.where(finite & jnp.all(finite | ~used), r, jnp.inf)


def _multikrum_with_distances(x, key, *, f, num_selected):
  """multikrum, and every row's squared distance to its output (for ctma), from its Gram matrix."""
  del key
  w = _num_rows(x)
  m = w - f if num_selected is None else num_selected
  dist, finite = _pairwise_sqdist(x, f)
  idx = _smallest_indices(_krum_scores(dist, f), m)
  chosen = jnp.zeros(w, bool).at[idx].set(True)
  r = _sqdist_to_combination(dist, jnp.where(chosen, 1.0 / m, 0.0).astype(dist.dtype), finite)
  return _mean_of(x, idx), {"krum_selected": chosen}, r


def _multikrum(x, key, *, f, num_selected):
  """Mean of the num_selected rows (default W - f) with the smallest Krum scores."""
  out, diag, _ = _multikrum_with_distances(x, key, f=f, num_selected=num_selected)
  return out, diag


def _krum_with_distances(x, key, *, f):
  return _multikrum_with_distances(x, key, f=f, num_selected=1)


def _krum(x, key, *, f):
  return _multikrum(x, key, f=f, num_selected=1)


def centered_clip(updates: PyTree, center: PyTree, tau: float | None, iters: int = 1) -> PyTree:
  """Centred clipping (Karimireddy et al., 2021) around a given reference point.

  ``v <- v + mean_i clip_tau(x_i - v)``, ``iters`` times, starting at ``center``
  (e.g. the previous aggregate). A non-finite row contributes zero.

  A fixed radius lets f far rows move v by up to (f/W) * tau whatever the
  scale of the honest rows; ``tau=None`` takes, at every iteration, the median
  distance of the W rows to v, so that with f < W/2 faulty rows the radius is
  at most the largest honest distance and their pull stays on the honest
  rows' own scale.

  Args:
    updates: pytree stacked on a leading worker axis W.
    center: pytree without the W axis, the starting point v.
    tau: clipping radius (> 0), or None for the median distance to v.
    iters: number of clipping iterations (>= 1).

  Returns:
    The aggregate, same structure as ``center``.
  """
  w = _num_rows(updates)

  def step(updates, v):
    dist = jnp.sqrt(_row_sqdist(updates, v))
    ok = jnp.isfinite(dist)
    # Non-finite distances are +inf, so they sort last and the median is finite.
    radius = jnp.sort(dist)[(w - 1) // 2] if tau is None else tau
    scale = jnp.where(ok, jnp.minimum(1.0, radius / jnp.where(ok & (dist > 0), dist, 1.0)), 0.0)
    # v + mean_i s_i (x_i - v) = sum_i (s_i / W) x_i - (sum_i s_i / W) v + v
    moved = _weighted_sum(updates, scale / w, ok)
    total = jnp.sum(scale) / w
    return jax.tree.map(lambda m, c: m - total.astype(c.dtype) * c + c, moved, v)

  v = center
  for i in range(iters):
    # Each iterate but the last feeds the next distance pass: its own computation.
    v = step(updates, v) if i == iters - 1 else rows.isolate(step, updates, v)
  return v


def _centered_clipping(x, key, *, f, tau, iters, init):
  del key, f
  center = rows.isolate(lambda v: _init_point(v, init), x)
  return centered_clip(x, center, tau, iters), {}


# --------------------------------------------------------------------------
# Meta- and pre-aggregators: (inner, x, key, *, f, **options) -> (aggregate, diagnostics)
# --------------------------------------------------------------------------


def _merge(inner: Diagnostics, outer: Diagnostics) -> Diagnostics:
  out = dict(inner)
  for k, v in outer.items():
    while k in out:  # nested copies of one meta-aggregator keep every entry
      k = "outer_" + k
    out[k] = v
  return out


def _ctma(inner: RuleFn, x, key, *, f, keep_ties):
  """Centered Trimmed Meta Aggregator: x0 = A(x), then the mean of the W-f rows nearest x0.

  With ``keep_ties`` (the original program's variant) S holds every row at a
  distance up to the (W-f)-th smallest, ties at the cut-off included, and the
  result is ``x0 + (1/(W-f)) sum_{i in S} (x_i - x0)``.

  A rule that already knows every row's squared distance to its output
  (krum and multikrum, from their pairwise distances; see
  :meth:`Aggregator._apply_with_distances`) hands it over, and the distance
  pass over the rows is skipped.
  """
  w = _num_rows(x)
  if getattr(inner, "knows_distances", False):
    # No distance pass follows, so x0 needs no barrier (whose conditional
    # made ctma(krum) slower).
    x0, diag, r = inner.with_distances(x, key)
  else:
    # The centre feeds the distance pass over the rows: its own computation.
    x0, diag = rows.isolate(lambda v: inner(v, key), x)
    r = _row_sqdist(x, x0)
  if keep_ties:
    kept = r <= jnp.sort(r)[w - f - 1]
    scale = jnp.full((w,), 1.0 / (w - f))
    out = jax.tree.map(lambda v, c: c + rows.weighted_sum(v - c, scale, kept), x, x0)
    return out, _merge(diag, {"ctma_kept": kept})
  idx = _smallest_indices(r, w - f)
  kept = jnp.zeros(w, bool).at[idx].set(True)
  return _mean_of(x, idx), _merge(diag, {"ctma_kept": kept})


def nearest_neighbour_mix(updates: PyTree, f: int) -> PyTree:
  """Nearest Neighbour Mixing: row i becomes the mean of the W-f rows nearest x_i.

  x_i itself is always one of them; other ties go to the lowest index. A row
  with a non-finite coordinate is returned unchanged (its neighbourhood is
  meaningless, and the rule applied next treats it as faulty); finite rows
  never mix with it while at most f rows are faulty.

  Args:
    updates: pytree stacked on a leading worker axis W.
    f: number of Byzantine rows (0 <= f < W).

  Returns:
    The mixed rows, same structure, shapes and dtypes as ``updates``.
  """
  w = _num_rows(updates)
  dist, finite = _pairwise_sqdist(updates, f)
  # -1 on the diagonal: x_i is always among its own neighbours, even when
  # other rows coincide with it.
  dist = jnp.where(jnp.eye(w, dtype=bool), -1.0, dist)
  order = jnp.argsort(dist, axis=1, stable=True)[:, :w - f]
  # The selection matrix: row i holds 1/(W - f) at the columns of its
  # neighbours; the mixed rows are one product of it with the rows.
  weights = jnp.zeros((w, w), dist.dtype).at[jnp.arange(w)[:, None], order].set(1.0 / (w - f))

  def mix_leaf(leaf):
    shape = (w,) + (1,) * (leaf.ndim - 1)
    return jnp.where(finite.reshape(shape), rows.mix(leaf, weights, finite), leaf)

  return jax.tree.map(mix_leaf, updates)


def _nnm(inner: RuleFn, x, key, *, f):
  """A(nearest_neighbour_mix(x))."""
  return inner(nearest_neighbour_mix(x, f), key)


def _nnm_ctma(inner: RuleFn, x, key, *, f, keep_ties):
  """ctma centred at nnm(A)'s output, trimming the original rows."""
  return _ctma(lambda v, k: _nnm(inner, v, k, f=f), x, key, f=f, keep_ties=keep_ties)


def _bucket_size(w: int, f: int, bucket_size: int | None) -> int:
  if bucket_size is not None:
    return bucket_size
  return max(1, w // (2 * f)) if f else 1


def _bucketing(inner: RuleFn, x, key, *, f, bucket_size):
  """Random permutation, means of buckets of s consecutive rows, A(means).

  A bucket holding a non-finite row has a NaN mean, so the inner rule sees at
  most as many faulty rows as there are faulty workers.
  """
  if key is None:
    raise ValueError("bucketing is stochastic: call the aggregator with a PRNG key, "
                     "e.g. agg(updates, jax.random.key(0)).")
  w = _num_rows(x)
  s = _bucket_size(w, f, bucket_size)
  nb = -(-w // s)
  perm_key, inner_key = jax.random.split(key)
  perm = jax.random.permutation(perm_key, w)
  # Slot t of the permuted order belongs to bucket t // s; the last bucket may
  # be short, and its missing slots read row 0 with weight zero.
  slots = jnp.concatenate([perm, jnp.zeros(nb * s - w, perm.dtype)]).reshape(nb, s)
  sizes = jnp.minimum(s, w - s * jnp.arange(nb))                  # [nb]
  used = (jnp.arange(s)[None, :] < sizes[:, None])                # [nb, s]
  bucket = jnp.zeros(w, jnp.int32).at[perm].set(jnp.arange(w, dtype=jnp.int32) // s)
  finite = _row_finite(x)
  bad = jnp.any(used & ~finite[slots], axis=1)

  def bucket_means(leaf):
    # Each row is scaled by 1/size before the bucket's rows are added, so that
    # finite rows cannot overflow their sum; a bad bucket's mean is NaN anyway.
    scale = jnp.where(used & finite[slots], 1.0 / sizes[:, None], 0.0).astype(leaf.dtype)
    zero = jnp.zeros((), leaf.dtype)
    shape = (nb,) + (1,) * (leaf.ndim - 1)
    parts = []
    for j in range(s):  # s is small (W / 2f): one fused gather-and-add pass
      rows_j = jnp.take(leaf, slots[:, j], axis=0)
      parts.append(jnp.where(scale[:, j].reshape(shape) != 0,
                             rows_j * scale[:, j].reshape(shape), zero))
    means = rows.sum_rows(parts)
    return jnp.where(bad.reshape(shape), jnp.array(jnp.nan, leaf.dtype), means)

  agg, diag = inner(jax.tree.map(bucket_means, x), inner_key)
  # Per-bucket diagnostics are reported per worker (the worker's bucket).
  diag = {k: (v[bucket] if jnp.ndim(v) == 1 and v.shape[0] == nb else v)
          for k, v in diag.items()}
  return agg, diag


def _clip(inner: RuleFn, x, key, *, f, tau):
  """A applied to every row clipped to norm tau."""
  del f
  y, clipped = _clip_rows(x, jnp.asarray(tau))
  agg, diag = inner(y, key)
  return agg, _merge(diag, {"clip_clipped": clipped})


def _arc(inner: RuleFn, x, key, *, f):
  """Adaptive robust clipping (Allouah et al., 2024) before A.

  With k = floor(2 (f/W) (W - f)), every row is clipped to the norm of the
  (k+1)-th largest, so the k largest rows are clipped.
  """
  w = _num_rows(x)
  k = int(2 * f * (w - f) // w)
  norms = jnp.sqrt(_row_sqdist(x))
  tau = jnp.sort(norms)[::-1][min(k, w - 1)]
  y, clipped = _clip_rows(x, tau)
  agg, diag = inner(y, key)
  return agg, _merge(diag, {"arc_clipped": clipped})


# --------------------------------------------------------------------------
# The Aggregator
# --------------------------------------------------------------------------


class AggregatorState(NamedTuple):
  """State of :meth:`Aggregator.as_optax`."""
  key: jax.Array    # PRNG key; folded with the count for stochastic rules
  count: jax.Array  # int32 [], number of updates so far


@dataclasses.dataclass(frozen=True)
class Aggregator:
  """A robust aggregation rule: ``agg(updates, key=None) -> (aggregate, diagnostics)``.

  Built by the rule functions of this module (:func:`cwtm`, :func:`ctma`, ...,
  :func:`rule` for a user-written function) or by :func:`make_aggregator`.
  Equal aggregators (same rules, f, options, inner rule, kernel set and, for a
  user-written rule, the same function) compute the same thing, so an
  aggregator can be a static argument of ``jax.jit``.

  Attributes:
    name: the rule's name, e.g. ``"ctma"``; a user-written rule's own name.
    f: number of Byzantine workers tolerated.
    options: the rule's options, sorted ``(name, value)`` pairs (every option,
      defaults included; ``dict(agg.options)`` gives the mapping).
    inner: the wrapped rule of a meta- or pre-aggregator, else None.
    kernels: kernel set of the :mod:`ftjax.kernels.rows` primitives while this
      rule runs: ``"auto"`` (the enclosing choice, else the backend's),
      ``"plain"`` or ``"cpu"``.
    fn: a user-written rule's function (None for the built-in rules).
  """
  name: str
  f: int
  options: tuple[tuple[str, Any], ...] = ()
  inner: Optional[Aggregator] = None
  kernels: str = "auto"
  fn: Optional[Callable[..., Any]] = None

  def __post_init__(self):
    _check_f(self.f)
    kernels_lib.check(self.kernels)

  def __repr__(self) -> str:
    opts = {a.name: dict(a.options) for a in self._layers() if a.options}
    return f"Aggregator({self.spec!r}, f={self.f}, options={opts}, kernels={self.kernels!r})"

  @property
  def spec(self) -> str:
    """Canonical spelling, e.g. ``"ctma(cwtm)"``."""
    return self.name if self.inner is None else f"{self.name}({self.inner.spec})"

  @property
  def stochastic(self) -> bool:
    """Whether a call needs a PRNG key (bucketing anywhere in the rule)."""
    return any(a.fn is None and a.name == "bucketing" for a in self._layers())

  def with_kernels(self, name: str) -> Aggregator:
    """The same rule with kernel set ``name``.

    Inner rules whose kernel set is ``"auto"`` follow it.

    Args:
      name: ``"auto"``, ``"plain"`` or ``"cpu"``.

    Returns:
      The new :class:`Aggregator`.
    """
    return dataclasses.replace(self, kernels=kernels_lib.check(name))

  def _layers(self) -> list[Aggregator]:
    out, a = [], self
    while a is not None:
      out.append(a)
      a = a.inner
    return out

  def _apply(self, x: PyTree, key: jax.Array | None) -> tuple[PyTree, Diagnostics]:
    """The rule's body on validated rows, under this rule's kernel set."""
    with kernels_lib.use(self.kernels):
      if self.fn is not None:
        return _call_user_rule(self.fn, self.name, x, key)
      info = _TABLE[self.name]
      if self.inner is None:
        return info.body(x, key, f=self.f, **dict(self.options))
      return info.body(_InnerRule(self.inner), x, key, f=self.f, **dict(self.options))

  def _apply_with_distances(self, x: PyTree, key: jax.Array | None
                            ) -> tuple[PyTree, Diagnostics, jax.Array | None]:
    """:meth:`_apply`, plus every row's squared distance [W] to the aggregate, or None.

    The distances come from rules that compute them anyway (the pairwise
    distances of krum and multikrum); for any other rule they are None and a
    caller that needs them makes its own pass over the rows.
    """
    if not self._knows_distances():
      return (*self._apply(x, key), None)
    with kernels_lib.use(self.kernels):
      return _TABLE[self.name].with_distances(x, key, f=self.f, **dict(self.options))

  def _knows_distances(self) -> bool:
    """Whether :meth:`_apply_with_distances` returns distances (not None)."""
    return (self.fn is None and self.inner is None
            and _TABLE[self.name].with_distances is not None)

  def _rows_needed(self, num_workers: int, robust: bool) -> list[tuple[str, int, int, str]]:
    """(name, rows it sees, least rows it needs, condition) for each layer."""
    out, n = [], num_workers
    for a in self._layers():
      if a.fn is not None:
        out.append((a.name, n, 1, "any W"))
        continue
      info, opts = _TABLE[a.name], dict(a.options)
      need = (info.robust_rows if robust else info.min_rows)(a.f, opts)
      out.append((a.name, n, need, info.requirement))
      if a.name == "bucketing":
        n = -(-n // _bucket_size(n, a.f, opts["bucket_size"]))
    return out

  def _validate(self, num_workers: Any, robust: bool) -> None:
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
      raise ValueError(f"The number of workers must be an integer >= 1, got {num_workers!r}; "
                       f"pass updates with a non-empty leading worker axis.")
    for name, n, need, requirement in self._rows_needed(num_workers, robust):
      if n < need:
        where = "" if n == num_workers else (
            f" (bucketing leaves {n} bucket means out of {num_workers} workers; "
            f"lower options['bucketing']['bucket_size'])")
        raise ValueError(
            f"{self.spec!r} with f={self.f} cannot run on {n} rows{where}: {name} needs "
            f"{requirement}, i.e. at least {need} rows; lower f to fewer Byzantine workers or "
            f"use more workers.")

  def check(self, num_workers: int) -> None:
    """Refuses a worker count for which the rule is not robust to f faults.

    Args:
      num_workers: W, the number of rows the aggregator will see.

    Raises:
      ValueError: a sentence saying what to change (e.g. cwtm needs W > 2f,
        bucketing f <= W/4, krum W > 2f + 2).
    """
    self._validate(num_workers, robust=True)

  def __call__(self, updates: PyTree, key: jax.Array | None = None
               ) -> tuple[PyTree, dict[str, jax.Array]]:
    """Aggregates W worker rows.

    Args:
      updates: pytree whose leaves all share a leading worker axis W.
      key: PRNG key, required only by stochastic rules (bucketing).

    Returns:
      (aggregate with the W axis removed, same structure and dtypes;
      diagnostics dict of fixed-shape arrays, possibly empty).

    Raises:
      ValueError: before tracing, for empty input, mismatched leading axes,
        non-float leaves, or too few rows to compute the rule at all. The
        stricter robustness conditions are in :meth:`check`.
    """
    leaves = jax.tree.leaves(updates)
    if not leaves:
      raise ValueError("updates is empty: pass a pytree of arrays stacked on a worker axis.")
    bare = [l for l in leaves if not jnp.ndim(l)]
    if bare:
      raise ValueError(f"A leaf of updates has no worker axis (a {type(bare[0]).__name__} of "
                       f"shape ()); every leaf needs the workers on axis 0, [W, ...].")
    shapes = {jnp.shape(l)[0] for l in leaves}
    if len(shapes) != 1:
      raise ValueError(f"Every leaf of updates needs the same leading worker axis; got leading "
                       f"sizes {sorted(map(str, shapes))}. Stack the workers' updates on axis 0.")
    for l in leaves:
      if not jnp.issubdtype(jnp.result_type(l), jnp.floating):
        raise ValueError(f"Aggregators need floating-point updates, got {jnp.result_type(l)}; "
                         f"cast the updates to float32 or float64.")
    self._validate(shapes.pop(), robust=False)
    if self.stochastic and key is None:
      raise ValueError(f"{self.spec!r} is stochastic: pass a PRNG key, "
                       f"agg(updates, jax.random.key(seed)).")
    with kernels_lib.use(self.kernels):
      # The rows are computed once, not inside every pass over them.
      updates = rows.materialize(jax.tree.map(jnp.asarray, updates))
      return self._apply(updates, key)

  def as_optax(self, key: jax.Array | None = None) -> optax_aggregating.Aggregator:
    """Wraps the rule as an ``optax.experimental.aggregating.Aggregator``.

    Its ``update(per_worker_updates, state)`` returns
    ``((aggregate, diagnostics), state)``, the auxiliary-output convention of
    ``optax.experimental.aggregating.process(..., aggregator_has_aux=True)``,
    which passes the diagnostics on to the postprocessor as extra arguments::

      tx = aggregating.process(optax.identity(), rule.as_optax(), optax.sgd(0.1),
                               aggregator_has_aux=True)

    Args:
      key: PRNG key for stochastic rules (default ``jax.random.key(0)``); each
        update folds in its count.

    Returns:
      The optax aggregator; its state is an :class:`AggregatorState`.
    """
    if key is None:
      key = jax.random.key(0)

    def init_fn(params):
      del params
      return AggregatorState(key=key, count=jnp.zeros([], jnp.int32))

    def update_fn(per_elt_updates, state, params=None, **extra_args):
      del params, extra_args
      agg, diagnostics = self(per_elt_updates, jax.random.fold_in(state.key, state.count))
      return (agg, diagnostics), AggregatorState(key=state.key, count=state.count + 1)

    return optax_aggregating.Aggregator(init=init_fn, update=update_fn)


class _InnerRule:
  """The rule a meta-aggregator wraps, as a :data:`RuleFn`.

  Calling it runs the inner rule; ``with_distances`` also returns every row's
  squared distance to its output where the rule knows them (else None).
  """

  def __init__(self, agg: Aggregator):
    self._agg = agg

  def __call__(self, x: PyTree, key: jax.Array | None) -> tuple[PyTree, Diagnostics]:
    return self._agg._apply(x, key)

  def with_distances(self, x: PyTree, key: jax.Array | None
                     ) -> tuple[PyTree, Diagnostics, jax.Array | None]:
    return self._agg._apply_with_distances(x, key)

  @property
  def knows_distances(self) -> bool:
    """Whether ``with_distances`` returns the distances rather than None."""
    return self._agg._knows_distances()


def _takes_key(fn: Callable) -> bool:
  """Whether ``fn`` takes two positional arguments (updates, key)."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _call_user_rule(fn: Callable, name: str, x: PyTree, key) -> tuple[PyTree, Diagnostics]:
  if not _takes_key(fn):
    return fn(x), {}
  out = fn(x, key)
  if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
    raise ValueError(f"Rule {name!r} takes (updates, key), so it must return (aggregate, "
                     f"diagnostics dict); a function of updates alone may return the aggregate.")
  return out[0], dict(out[1])


# --------------------------------------------------------------------------
# Public rules
# --------------------------------------------------------------------------


def _check_f(f: Any) -> None:
  if not isinstance(f, int) or isinstance(f, bool) or f < 0:
    raise ValueError(f"f (the number of Byzantine workers) must be an integer >= 0, got {f!r}.")


def _base(name: str, f: int, **options) -> Aggregator:
  _check_f(f)
  for key, value in options.items():
    _check_option(name, key, value)
  return Aggregator(name=name, f=f, options=tuple(sorted(options.items())))


def _meta(name: str, inner: Union[Aggregator, Callable], f: int | None, **options) -> Aggregator:
  if not isinstance(inner, Aggregator):
    inner = rule(inner, f=0 if f is None else f)
  f = inner.f if f is None else f
  _check_f(f)
  for key, value in options.items():
    _check_option(name, key, value)
  return Aggregator(name=name, f=f, options=tuple(sorted(options.items())), inner=inner)


def rule(fn: Callable, f: int = 0, name: str | None = None) -> Aggregator:
  """Wraps a user-written rule as an :class:`Aggregator`.

  ``fn`` is either a function of the updates alone, ``updates -> aggregate``,
  or of two positional arguments, ``(updates, key) -> (aggregate,
  diagnostics)``. It can call the :mod:`ftjax.kernels.rows` primitives, which
  then run with the kernel set of the aggregator around it. Two wrappers of
  the same function (and f, name) are equal.

  Args:
    fn: the rule, over pytrees stacked on a leading worker axis.
    f: number of Byzantine workers it tolerates (what meta-aggregators that
      wrap it use by default).
    name: its name in :attr:`Aggregator.spec` (default ``fn.__name__``).

  Returns:
    The :class:`Aggregator`; ``fn`` itself when it already is one.
  """
  if isinstance(fn, Aggregator):
    return fn
  if not callable(fn):
    raise ValueError(f"A rule must be a function updates -> aggregate or (updates, key) -> "
                     f"(aggregate, diagnostics), got {fn!r}.")
  if name is None:
    name = getattr(fn, "__name__", type(fn).__name__)
  return Aggregator(name=str(name), f=f, fn=fn)


def avg(*, f: int = 0) -> Aggregator:
  """The coordinate-wise mean (not robust: one NaN row makes it NaN).

  Args:
    f: declared number of Byzantine workers (unused by the mean).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("avg", f)


def cwmed(lower: bool = False, *, f: int = 0) -> Aggregator:
  """The coordinate-wise median.

  Args:
    lower: for even W, the lower of the two middle values instead of their
      midpoint (the original program's median).
    f: number of Byzantine workers (robust for W > 2f).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("cwmed", f, lower=lower)


def cwtm(f: int) -> Aggregator:
  """The coordinate-wise trimmed mean.

  Per coordinate: order the W values along the worker axis, drop the f
  smallest and the f largest, average the W - 2f others.

  Args:
    f: values dropped at each end (needs W > 2f).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("cwtm", f)


def meamed(f: int) -> Aggregator:
  """Mean around the median (meamed).

  Per coordinate, the mean of the W - f values nearest the coordinate-wise
  median (an exact tie drops the upper value).

  Args:
    f: values dropped (robust for W > 2f).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("meamed", f)


def gm(iters: int = 3, nu: float = 0.1, init: str = "cwmed", tol: float | None = None,
       max_iters: int = 100, *, f: int = 0) -> Aggregator:
  """The geometric median by smoothed Weiszfeld iterations.

  z <- sum_i b_i x_i / sum_i b_i with b_i = 1 / max(|z - x_i|, nu); rows with
  a non-finite distance get weight zero.

  Args:
    iters: iterations when ``tol`` is None.
    nu: smoothing of the weights.
    init: starting point: ``"cwmed"`` (the coordinate-wise median), ``"mean"``
      (of the finite rows) or ``"zero"`` (the original program's).
    tol: if given, iterate until a step moves less than ``tol`` (at most
      ``max_iters`` steps); diagnostics then hold ``gm_iters``.
    max_iters: iteration cap with ``tol``.
    f: number of Byzantine workers (robust for W > 2f).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("gm", f, iters=iters, nu=nu, init=init, tol=tol, max_iters=max_iters)


def krum(f: int) -> Aggregator:
  """Krum: the row with the smallest Krum score.

  A row's score is its summed squared distance to its W - f - 1 nearest other
  rows.

  Args:
    f: number of Byzantine workers (needs W > 2f + 2).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("krum", f)


def multikrum(f: int, num_selected: int | None = None) -> Aggregator:
  """Multi-Krum: the mean of the ``num_selected`` rows with the smallest Krum scores.

  Args:
    f: number of Byzantine workers (needs W > 2f + 2).
    num_selected: rows averaged (None: W - f).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("multikrum", f, num_selected=num_selected)


def centered_clipping(tau: float | None = None, iters: int = 1, init: str = "cwmed", *,
                      f: int = 0) -> Aggregator:
  """Centred clipping: from a centre v, ``iters`` times v <- v + mean_i clip_tau(x_i - v).

  The defaults protect at any scale: the first centre is the coordinate-wise
  median and the radius the median distance of the rows to v (see
  :func:`centered_clip`); a fixed ``tau`` and ``init="mean"`` are the
  textbook choices, robust only when tau is small against the honest spread.

  Args:
    tau: clipping radius, or None for the median distance to the centre.
    iters: clipping iterations.
    init: first centre: ``"cwmed"``, ``"mean"`` (of the finite rows) or ``"zero"``.
    f: number of Byzantine workers (robust for W > 2f).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("centered_clipping", f, tau=tau, iters=iters, init=init)


def ctma(inner: Union[Aggregator, Callable], f: int | None = None,
         keep_ties: bool = False) -> Aggregator:
  """Centered Trimmed Meta Aggregator (Dahan & Levy, 2024).

  With x0 = A(x), the mean of the W - f rows nearest x0 (exactly W - f, ties
  to the lower index).

  Args:
    inner: the rule A (an :class:`Aggregator` or a function, see :func:`rule`).
    f: rows trimmed (default: the inner rule's f).
    keep_ties: the original program's variant: keep every row tied at the
      cut-off, ``x0 + (1/(W-f)) sum_{i kept} (x_i - x0)``.

  Returns:
    The :class:`Aggregator`.
  """
  return _meta("ctma", inner, f, keep_ties=keep_ties)


def nnm(inner: Union[Aggregator, Callable], f: int | None = None) -> Aggregator:
  """Nearest Neighbour Mixing, then A.

  A is applied to the rows each replaced by the mean of its W - f nearest rows
  (itself included); see :func:`nearest_neighbour_mix`.

  Args:
    inner: the rule A.
    f: number of Byzantine rows (default: the inner rule's f).

  Returns:
    The :class:`Aggregator`.
  """
  return _meta("nnm", inner, f)


def nnm_ctma(inner: Union[Aggregator, Callable], f: int | None = None,
             keep_ties: bool = False) -> Aggregator:
  """CTMA centred at nnm(A)'s output, trimming the original (unmixed) rows.

  Args:
    inner: the rule A.
    f: rows trimmed and mixing neighbourhood W - f (default: the inner rule's f).
    keep_ties: as in :func:`ctma`.

  Returns:
    The :class:`Aggregator`.
  """
  return _meta("nnm+ctma", inner, f, keep_ties=keep_ties)


def bucketing(inner: Union[Aggregator, Callable], f: int | None = None,
              bucket_size: int | None = None) -> Aggregator:
  """Bucketing, then A.

  Shuffles the rows with a fresh permutation from the key, averages buckets of
  s consecutive rows and applies A to the bucket means.

  Args:
    inner: the rule A.
    f: number of Byzantine workers (default: the inner rule's f; needs f <= W/4).
    bucket_size: s (None: floor(W / 2f)).

  Returns:
    The :class:`Aggregator`.
  """
  return _meta("bucketing", inner, f, bucket_size=bucket_size)


def clip(inner: Union[Aggregator, Callable], tau: float = 1.0, *,
         f: int | None = None) -> Aggregator:
  """Static clipping of every row to norm ``tau`` (a non-finite row to zero), then A.

  Args:
    inner: the rule A.
    tau: clipping radius.
    f: number of Byzantine workers (default: the inner rule's f).

  Returns:
    The :class:`Aggregator`.
  """
  return _meta("clip", inner, f, tau=tau)


def arc(inner: Union[Aggregator, Callable], f: int | None = None) -> Aggregator:
  """Adaptive Robust Clipping (Allouah et al., 2024), then A.

  With k = floor(2 (f/W) (W - f)), every row is clipped to the norm of the
  (k+1)-th largest row, so the k largest are clipped.

  Args:
    inner: the rule A.
    f: number of Byzantine workers (default: the inner rule's f).

  Returns:
    The :class:`Aggregator`.
  """
  return _meta("arc", inner, f)


# --------------------------------------------------------------------------
# Tables: names, options, validation
# --------------------------------------------------------------------------


class RuleInfo(NamedTuple):
  """A named rule: its builder, body, default options and row requirements."""
  build: Callable[..., Aggregator]     # the public rule function
  body: Callable[..., Any]             # ([inner,] x, key, *, f, **options) -> (aggregate, diag)
  options: Mapping[str, Any]           # option name -> default (the builder's defaults)
  min_rows: Callable[[int, Mapping[str, Any]], int]    # f, options -> least W computable
  robust_rows: Callable[[int, Mapping[str, Any]], int]  # least W it is meant for
  requirement: str                     # the robust condition, in words
  # Base rules only, optional: (x, key, *, f, **options) -> (aggregate, diag,
  # [W] squared distance of every row to the aggregate), for rules that know
  # those distances without another pass over the rows (ctma uses them).
  with_distances: Optional[Callable[..., Any]] = None


def _info(build, body, min_rows, robust_rows, requirement, with_distances=None) -> RuleInfo:
  # The builder's keyword defaults are the one source of each option's default.
  defaults = {name: p.default for name, p in inspect.signature(build).parameters.items()
              if name not in ("inner", "f")}
  return RuleInfo(build, body, types.MappingProxyType(defaults), min_rows, robust_rows,
                  requirement, with_distances)


def _half(f, o):
  return 2 * f + 1


def _any(f, o):
  return 1


def _above(f, o):
  return f + 1


AGGREGATORS: dict[str, RuleInfo] = {
    "avg": _info(avg, _avg, _any, _any, "any W"),
    "cwmed": _info(cwmed, _cwmed, _any, _half, "W > 2f"),
    "cwtm": _info(cwtm, _cwtm, _half, _half, "W > 2f"),
    "gm": _info(gm, _gm, _any, _half, "W > 2f"),
    "krum": _info(krum, _krum, lambda f, o: f + 2, lambda f, o: 2 * f + 3, "W > 2f + 2",
                  with_distances=_krum_with_distances),
    "multikrum": _info(multikrum, _multikrum,
                       lambda f, o: max(f + 2, o["num_selected"] or 0),
                       lambda f, o: max(2 * f + 3, o["num_selected"] or 0),
                       "W > 2f + 2 (and W >= num_selected)",
                       with_distances=_multikrum_with_distances),
    "centered_clipping": _info(centered_clipping, _centered_clipping, _any, _half, "W > 2f"),
    "meamed": _info(meamed, _meamed, _above, _half, "W > 2f"),
}
"""Base rules: name -> :class:`RuleInfo`."""

META_AGGREGATORS: dict[str, RuleInfo] = {
    "ctma": _info(ctma, _ctma, _above, _half, "W > 2f"),
    "nnm": _info(nnm, _nnm, _above, _half, "W > 2f"),
    "nnm+ctma": _info(nnm_ctma, _nnm_ctma, _above, _half, "W > 2f"),
    "bucketing": _info(bucketing, _bucketing, _any, lambda f, o: 4 * f, "W >= 4f (f <= W/4)"),
    "clip": _info(clip, _clip, _any, _any, "any W"),
    "arc": _info(arc, _arc, _any, _half, "W > 2f"),
}
"""Meta- and pre-aggregators (wrapping an inner rule): name -> :class:`RuleInfo`."""

_TABLE = {**AGGREGATORS, **META_AGGREGATORS}

DEFAULT_OPTIONS: Mapping[str, Mapping[str, Any]] = types.MappingProxyType(
    {name: info.options for name, info in _TABLE.items()})
"""Rule name -> option name -> default, for every rule (e.g. to write a config)."""

ALIASES: dict[str, str] = {"rfa": "gm"}
"""Other spellings accepted in specs and options."""

_INITS = ("zero", "mean", "cwmed")


def _canonical(name: str) -> str:
  name = name.strip().lower()
  return ALIASES.get(name, name)


def _parse(spec: str) -> list[str]:
  """'arc(ctma(cwtm))' -> ['arc', 'ctma', 'cwtm'] (outermost first)."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"Aggregator spec must be a non-empty string such as 'ctma(cwtm)', "
                     f"got {spec!r}.")
  names, rest = [], spec.replace(" ", "").lower()
  while "(" in rest:
    head, _, rest = rest.partition("(")
    if not rest.endswith(")"):
      raise ValueError(f"Unbalanced parentheses in aggregator spec {spec!r}; write e.g. "
                       f"'ctma(cwtm)'.")
    rest = rest[:-1]
    names.append(_canonical(head))
  names.append(_canonical(rest))
  if ")" in rest:
    raise ValueError(f"Unbalanced parentheses in aggregator spec {spec!r}.")
  for n in names[:-1]:
    if n not in META_AGGREGATORS:
      hint = " (it is a base rule; only the innermost name may be one)" if n in AGGREGATORS else ""
      raise ValueError(f"Unknown meta-aggregator {n!r} in spec {spec!r}{hint}; valid "
                       f"meta-aggregators: {sorted(META_AGGREGATORS)}.")
  if names[-1] not in AGGREGATORS:
    raise ValueError(f"Unknown aggregator {names[-1]!r} in spec {spec!r}; valid base rules: "
                     f"{sorted(AGGREGATORS)} (aliases {ALIASES}); meta-aggregators "
                     f"{sorted(META_AGGREGATORS)} wrap one, e.g. 'ctma(cwtm)'.")
  return names


def _check_option(rule_name: str, name: str, value: Any) -> None:
  def bad(what):
    raise ValueError(f"Option {rule_name}.{name}={value!r} is invalid: {what}.")

  is_int = isinstance(value, int) and not isinstance(value, bool)
  is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
  if name in ("lower", "keep_ties") and not isinstance(value, bool):
    bad("use True or False")
  if name in ("iters", "max_iters") and not (is_int and value >= 1):
    bad("use an integer >= 1")
  if name == "tau" and rule_name == "centered_clipping" and value is None:
    return  # the adaptive radius
  if name in ("nu", "tau") and not (is_num and value > 0):
    bad("use a positive number")
  if name == "tol" and value is not None and not (is_num and value > 0):
    bad("use a positive number, or None for a fixed number of iterations")
  if name in ("bucket_size", "num_selected") and value is not None and not (is_int and value >= 1):
    bad("use an integer >= 1, or None for the default")
  if name == "init" and value not in _INITS:
    bad(f"valid starting points are {list(_INITS)}")


def _resolve_options(options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict]:
  resolved = {name: dict(info.options) for name, info in _TABLE.items()}
  for raw_name, given in (options or {}).items():
    name = _canonical(raw_name)
    if name not in _TABLE:
      raise ValueError(f"Options given for unknown rule {raw_name!r}; valid names: "
                       f"{sorted(_TABLE)}.")
    if given is None:
      continue
    if not isinstance(given, Mapping):
      raise ValueError(f"Options for {raw_name!r} must be a mapping of option names to "
                       f"values, e.g. {{'{name}': {dict(_TABLE[name].options)}}}.")
    for key, value in given.items():
      if key not in _TABLE[name].options:
        raise ValueError(f"Unknown option {key!r} for {name!r}; valid options: "
                         f"{sorted(_TABLE[name].options) or 'none'}.")
      _check_option(name, key, value)
      resolved[name][key] = value
  return resolved


def make_aggregator(spec: str, f: int, *, num_workers: int | None = None,
                    options: Mapping[str, Mapping[str, Any]] | None = None,
                    kernels: str = "auto") -> Aggregator:
  """Builds an aggregator from its string spelling.

  ``make_aggregator("ctma(cwtm)", 4)`` equals ``ctma(cwtm(f=4))``: every layer
  gets ``f`` and its options.

  Args:
    spec: e.g. ``"cwtm"``, ``"ctma(cwtm)"``, ``"bucketing(cwmed)"``,
      ``"nnm+ctma(cwtm)"``, ``"arc(ctma(cwtm))"``; see :data:`AGGREGATORS`,
      :data:`META_AGGREGATORS` and :data:`ALIASES`.
    f: number of Byzantine workers to tolerate (integer >= 0).
    num_workers: if given, :meth:`Aggregator.check` runs for it.
    options: rule name -> keyword options, e.g.
      ``{"gm": {"iters": 3, "nu": 0.1, "init": "zero"}, "ctma": {"keep_ties": True}}``.
      Options of rules absent from ``spec`` are validated and ignored; missing
      ones take :data:`DEFAULT_OPTIONS`.
    kernels: kernel set of the primitives: ``"auto"``, ``"plain"`` or ``"cpu"``.

  Returns:
    The :class:`Aggregator`.

  Raises:
    ValueError: unknown names or options, bad option values, a bad f or kernel
      set, or (with ``num_workers``) a worker count the rule cannot handle.
  """
  _check_f(f)
  kernels_lib.check(kernels)
  names = _parse(spec)
  opts = _resolve_options(options)
  agg = AGGREGATORS[names[-1]].build(f=f, **opts[names[-1]])
  for name in reversed(names[:-1]):
    agg = META_AGGREGATORS[name].build(agg, f=f, **opts[name])
  agg = agg.with_kernels(kernels)
  if num_workers is not None:
    agg.check(num_workers)
  return agg
