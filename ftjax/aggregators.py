"""Robust aggregators: base rules, meta- and pre-aggregators over worker rows.

An aggregator reduces W worker updates to one. Updates are any pytree whose
leaves share a leading worker axis W (e.g. a params pytree stacked by
``jax.vmap``); norms and distances are global over all leaves, and nothing is
flattened into one big matrix. Build one from a spec string::

    agg = make_aggregator("ctma(cwtm)", f=4, num_workers=17)
    aggregate, diagnostics = agg(updates, key)      # works under jit and vmap

Spec grammar: ``rule`` or ``meta(spec)``, nested freely, e.g. ``"cwtm"``,
``"ctma(cwtm)"``, ``"bucketing(cwmed)"``, ``"nnm+ctma(cwtm)"``, ``"clip(gm)"``,
``"arc(ctma(cwtm))"``. Names are resolved through :data:`AGGREGATORS`,
:data:`META_AGGREGATORS` and :data:`ALIASES` (``rfa`` = ``gm``).

Faulty rows. A worker may send NaN or +-inf. Distance-based rules treat a row
with any non-finite coordinate as infinitely far away; coordinate-wise rules
order NaN as +inf and trim it like any extreme value; means that should drop a
row skip it through ``jnp.where`` (``0 * inf`` would be NaN). With at most f
such rows every rule here except ``avg`` returns a finite output. ``avg`` is
the plain mean and is not robust.

Cost. Coordinate-wise rules use a sorting network fused into one elementwise
loop (see :mod:`ftjax.selection`); ``nnm`` and ``krum`` use one W x W Gram
matrix of rows centred at the coordinate-wise median, so float32 keeps small
distances between large vectors that share a common component. Distances to a
point (``ctma``, ``gm``, clipping) are computed directly from ``x - center``
in one read (:func:`ftjax.selection.row_sqdist`), and means of selected rows
(``ctma``, ``multikrum``) read only the selected rows.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax.experimental import aggregating as optax_aggregating

from ftjax import selection

PyTree = Any
Diagnostics = dict[str, jax.Array]
# (rows, key) -> (aggregate, diagnostics); rows is a pytree stacked on W.
_RuleFn = Callable[[PyTree, Optional[jax.Array]], tuple[PyTree, Diagnostics]]


# --------------------------------------------------------------------------
# Pytree helpers (global over leaves, no flattening)
# --------------------------------------------------------------------------


def _num_rows(x: PyTree) -> int:
  return jax.tree.leaves(x)[0].shape[0]


def _row_sqdist(x: PyTree, center: PyTree | None = None) -> jax.Array:
  """Squared distance of every row to ``center`` (or squared norm), [W].

  NaN (a non-finite row, or inf - inf) is mapped to +inf so that a faulty row
  is infinitely far from everything.
  """
  centers = [None] * len(jax.tree.leaves(x)) if center is None else jax.tree.leaves(center)
  total = None
  for leaf, c in zip(jax.tree.leaves(x), centers):
    part = selection.row_sqdist(leaf, c)
    total = part if total is None else total + part
  return total


def _row_finite(x: PyTree) -> jax.Array:
  """bool [W]: True for rows whose squared norm is finite.

  A finite row whose squared norm overflows counts as non-finite too; it is
  then treated as infinitely far away, which is what such a row deserves.
  """
  return jnp.isfinite(_row_sqdist(x))


def _weighted_sum(x: PyTree, weights: jax.Array, mask: jax.Array | None = None) -> PyTree:
  return jax.tree.map(lambda leaf: selection.weighted_row_sum(leaf, weights, mask), x)


def _masked_mean(x: PyTree, mask: jax.Array, denominator=None) -> PyTree:
  """Mean of the rows where ``mask``; divides by ``denominator`` if given."""
  if denominator is None:
    denominator = jnp.maximum(jnp.sum(mask), 1)
  weights = jnp.where(mask, 1.0, 0.0) / denominator
  return _weighted_sum(x, weights, mask)


def _smallest_indices(values: jax.Array, k: int) -> jax.Array:
  """Ascending indices of exactly ``k`` smallest entries, ties to the lowest index."""
  return jnp.sort(jnp.argsort(values, stable=True)[:k])


def _mean_of_rows(x: PyTree, idx: jax.Array) -> PyTree:
  """Mean of the rows ``idx`` (int [k], static k), reading only those rows.

  Each row is fetched by a dynamic index inside one fused sum, so the other
  rows (possibly NaN) are never read: at W=65, d=1e6 this is 3x faster than a
  masked sum over all rows. Rows are scaled by 1/k before they are added, as
  :func:`_masked_mean` does.
  """
  k = idx.shape[0]
  if k > selection.UNROLL_MAX_ROWS:
    return _masked_mean(x, jnp.zeros(_num_rows(x), bool).at[idx].set(True), k)

  def leaf_mean(leaf):
    scale = jnp.asarray(1.0 / k, leaf.dtype)
    return selection.sum_rows(
        [scale * jax.lax.dynamic_index_in_dim(leaf, idx[t], keepdims=False) for t in range(k)])

  return jax.tree.map(leaf_mean, x)


def _clip_rows(x: PyTree, tau: jax.Array) -> tuple[PyTree, jax.Array]:
  """Scales every row to norm at most ``tau``; a non-finite row becomes zero.

  A row of infinite norm has no direction to keep, so zero is the only clipped
  value that stays finite.
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


# _gram splits rows into at most this many column slices of at least
# _GRAM_MIN_SLICE columns.
_GRAM_SLICES = 16
_GRAM_MIN_SLICE = 16384


def _gram(y: jax.Array) -> jax.Array:
  """``y @ y.T`` for y [W, n], as a sum of one product per column slice.

  XLA on CPU multiplies a short, very wide matrix by its transpose about 2x
  slower in one dot (W=17, n=1e6: 63 ms) than in 16 dots over column slices
  (30 ms), which are also slightly more accurate in float32.
  """
  n = y.shape[1]
  s = max(1, min(_GRAM_SLICES, n // _GRAM_MIN_SLICE))
  bounds = [i * n // s for i in range(s + 1)]
  return selection.sum_rows([
      jnp.dot(y[:, lo:hi], y[:, lo:hi].T, precision=jax.lax.Precision.HIGHEST)
      for lo, hi in zip(bounds[:-1], bounds[1:])])


def _centered_gram(x: PyTree) -> tuple[jax.Array, PyTree, PyTree, jax.Array]:
  """Pairwise squared distances through one Gram matrix of centred rows.

  Rows are centred at the coordinate-wise median (robust to f far rows, unlike
  the mean) before the W x W Gram matrix is accumulated leaf by leaf, so
  ``|a|^2 + |b|^2 - 2 a.b`` does not cancel catastrophically in float32.

  Returns:
    (dist [W, W] with +inf for pairs involving a non-finite row and 0 on the
    diagonal, centred masked rows (pytree of [W, n_leaf] arrays), the centre,
    bool [W] finite rows).
  """
  w = _num_rows(x)
  finite = _row_finite(x)
  # In its own computation: fused into the [W, d] centring below, XLA redid
  # the median's sorting network once per row (krum 8.0 s at W=65, d=1e6).
  center = _isolated(lambda v, k: (jax.tree.map(_median_leaf, v), {}), x, None)[0]
  gram = None
  centred = []
  for leaf, c in zip(jax.tree.leaves(x), jax.tree.leaves(center)):
    y = jnp.where(finite[:, None], (leaf - c[None]).reshape(w, -1), jnp.zeros((), leaf.dtype))
    centred.append(y)
    g = _gram(y)
    gram = g if gram is None else gram + g
  sq = jnp.diagonal(gram)
  dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
  both = finite[:, None] & finite[None, :]
  dist = jnp.where(both, dist, jnp.inf)
  dist = jnp.where(jnp.eye(w, dtype=bool), 0.0, dist)
  centred = jax.tree.unflatten(jax.tree.structure(x), centred)
  return dist, centred, center, finite


# --------------------------------------------------------------------------
# Base rules
# --------------------------------------------------------------------------


def _median_leaf(leaf: jax.Array, lower: bool = False) -> jax.Array:
  w = leaf.shape[0]
  if lower or w % 2:
    return selection.order_statistics(leaf, [(w - 1) // 2])[0]
  a, b = selection.order_statistics(leaf, [w // 2 - 1, w // 2])
  return (a + b) * jnp.asarray(0.5, leaf.dtype)


def _avg(f: int) -> _RuleFn:
  del f

  def fn(x, key):
    del key
    w = _num_rows(x)
    return jax.tree.map(lambda l: selection.sum_rows([l[i] for i in range(w)]) / w, x), {}
  return fn


def _cwmed(f: int, lower: bool = False) -> _RuleFn:
  del f

  def fn(x, key):
    del key
    return jax.tree.map(lambda l: _median_leaf(l, lower), x), {}
  return fn


def _cwtm(f: int) -> _RuleFn:
  def trimmed(leaf):
    w = leaf.shape[0]
    return selection.trimmed_sum(leaf, f, w - f - 1) / jnp.asarray(w - 2 * f, leaf.dtype)

  def fn(x, key):
    del key
    return jax.tree.map(trimmed, x), {}
  return fn


def _meamed(f: int) -> _RuleFn:
  """Mean of the W-f values closest to the median, per coordinate.

  Sorted values s_0 <= ... <= s_{W-1}: the W-f closest to the median form a
  window [k, k + W - f). The f dropped values are the f farthest among the
  bottom distances a_j = m - s_j and top distances b_j = s_{W-1-j} - m, both
  decreasing in j, so k = #{j < f : a_j > b_{f-1-j}} (b_{f-1-j} = s_{W-f+j});
  an exact tie drops the upper value (which keeps the rule permutation
  invariant, unlike a tie-break by worker index).
  """
  def leaf_fn(leaf):
    w = leaf.shape[0]
    s = selection.sorted_rows(leaf)
    m = s[(w - 1) // 2] if w % 2 else (s[w // 2 - 1] + s[w // 2]) * jnp.asarray(0.5, leaf.dtype)
    k = sum((m - s[j] > s[w - f + j] - m).astype(jnp.int32) for j in range(f)) \
        if f else jnp.zeros(leaf.shape[1:], jnp.int32)
    zero = jnp.zeros((), leaf.dtype)
    terms = list(s[f:w - f])
    terms += [jnp.where(k <= j, s[j], zero) for j in range(f)]
    terms += [jnp.where(j < k + (w - f), s[j], zero) for j in range(w - f, w)]
    return selection.sum_rows(terms) / jnp.asarray(w - f, leaf.dtype)

  def fn(x, key):
    del key
    return jax.tree.map(leaf_fn, x), {}
  return fn


def _init_point(x: PyTree, init: str) -> PyTree:
  if init == "zero":
    return jax.tree.map(lambda l: jnp.zeros(l.shape[1:], l.dtype), x)
  if init == "mean":  # mean of the finite rows: one NaN row must not poison it
    return _masked_mean(x, _row_finite(x))
  # "cwmed", isolated so that its consumers cannot duplicate the network.
  return _isolated(lambda v, k: (jax.tree.map(_median_leaf, v), {}), x, None)[0]


def _gm(f: int, iters: int = 3, nu: float = 0.1, init: str = "zero",
        tol: float | None = None, max_iters: int = 100) -> _RuleFn:
  """Smoothed Weiszfeld: z <- sum_i b_i x_i / sum_i b_i, b_i = 1/max(|z-x_i|, nu)."""
  del f

  def step(x, z):
    dist = jnp.sqrt(_row_sqdist(x, z))
    ok = jnp.isfinite(dist)
    beta = jnp.where(ok, 1.0 / jnp.maximum(dist, nu), 0.0)
    return _weighted_sum(x, beta / jnp.sum(beta), ok)

  def fn(x, key):
    del key
    z = _own_computation(lambda v: _init_point(v, init), x)
    if tol is None:
      for _ in range(iters):  # static T: unrolled
        z = _own_computation(step, x, z)
      return z, {}

    def cond(carry):
      i, _, moved = carry
      return (i < max_iters) & (moved > tol)

    def body(carry):
      i, z, _ = carry
      new = step(x, z)
      moved = jnp.sqrt(sum(jnp.sum(jnp.square(a - b)) for a, b in
                           zip(jax.tree.leaves(new), jax.tree.leaves(z))))
      return i + 1, new, moved

    dtype = jax.tree.leaves(x)[0].dtype
    i, z, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), z, jnp.asarray(jnp.inf, dtype)))
    return z, {"gm_iters": i}
  return fn


def _krum_scores(dist: jax.Array, f: int) -> jax.Array:
  """Krum score per row: sum of squared distances to its W-f-1 nearest others."""
  w = dist.shape[0]
  others = jnp.where(jnp.eye(w, dtype=bool), jnp.inf, dist)
  nearest = jnp.sort(others, axis=1)[:, :w - f - 1]
  return selection.nan_to_posinf(jnp.sum(nearest, axis=1))


def _multikrum(f: int, num_selected: int | None = None) -> _RuleFn:
  def fn(x, key):
    del key
    w = _num_rows(x)
    m = w - f if num_selected is None else num_selected
    dist, _, _, _ = _centered_gram(x)
    idx = _smallest_indices(_krum_scores(dist, f), m)
    chosen = jnp.zeros(w, bool).at[idx].set(True)
    return _mean_of_rows(x, idx), {"krum_selected": chosen}
  return fn


def _krum(f: int) -> _RuleFn:
  return _multikrum(f, num_selected=1)


def centered_clip(updates: PyTree, center: PyTree, tau: float, iters: int = 1) -> PyTree:
  """Centred clipping (Karimireddy et al., 2021) around a given reference point.

  ``v <- v + mean_i clip_tau(x_i - v)``, ``iters`` times, starting at ``center``
  (e.g. the previous aggregate). A non-finite row contributes zero.

  Args:
    updates: pytree stacked on a leading worker axis W.
    center: pytree without the W axis, the starting point v.
    tau: clipping radius (> 0).
    iters: number of clipping iterations (>= 1).

  Returns:
    The aggregate, same structure as ``center``.
  """
  w = _num_rows(updates)

  def step(updates, v):
    dist = jnp.sqrt(_row_sqdist(updates, v))
    ok = jnp.isfinite(dist)
    scale = jnp.where(ok, jnp.minimum(1.0, tau / jnp.where(ok & (dist > 0), dist, 1.0)), 0.0)
    # sum_i s_i (x_i - v) = sum_i s_i x_i - (sum_i s_i) v
    moved = _weighted_sum(updates, scale / w, ok)
    total = jnp.sum(scale) / w
    return jax.tree.map(lambda m, c: m - total.astype(c.dtype) * c + c, moved, v)

  v = center
  for i in range(iters):
    # Each iterate feeds the next distance pass; the last one is returned.
    v = step(updates, v) if i == iters - 1 else _own_computation(step, updates, v)
  return v


def _centered_clipping(f: int, tau: float = 10.0, iters: int = 1, init: str = "mean") -> _RuleFn:
  del f

  def fn(x, key):
    del key
    center = _own_computation(lambda v: _init_point(v, init), x)
    return centered_clip(x, center, tau, iters), {}
  return fn


# --------------------------------------------------------------------------
# Meta- and pre-aggregators (each wraps an inner rule)
# --------------------------------------------------------------------------


def _ctma(inner: _RuleFn, f: int, keep_ties: bool = False) -> _RuleFn:
  """Centered Trimmed Meta Aggregator: mean of the W-f rows nearest to A(x).

  Cost: A's own pass(es), one read of x for the distances
  (:func:`selection.row_sqdist`) and one read of the W-f kept rows, i.e.
  about 2.5 reads of x on top of A. Folding the distances into a
  coordinate-wise A's pass (one loop computing A(x)_j and accumulating
  (x_ij - A(x)_j)^2) would save one read, but XLA on CPU does not build it:
  sibling reductions are not fused (each recomputes A's sorting network) and
  a variadic reduction is emitted as scalar code (8x slower than A alone).
  ``|x_i|^2 - 2 x_i.A(x) + |A(x)|^2`` would need the same passes and cancels
  in float32 for rows with a large common component.
  """
  def fn(x, key):
    x0, diag = _isolated(inner, x, key)
    w = _num_rows(x)
    r = _row_sqdist(x, x0)
    if keep_ties:  # reference quirk: every row tied at the cut-off stays in
      cutoff = jnp.sort(r)[w - f - 1]
      kept = r <= cutoff
      return _masked_mean(x, kept, w - f), _merge(diag, {"ctma_kept": kept})
    idx = _smallest_indices(r, w - f)
    kept = jnp.zeros(w, bool).at[idx].set(True)
    return _mean_of_rows(x, idx), _merge(diag, {"ctma_kept": kept})
  return fn


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
  dist, centred, center, finite = _centered_gram(updates)
  # -1 on the diagonal: x_i is always among its own neighbours, even when
  # other rows coincide with it.
  dist = jnp.where(jnp.eye(w, dtype=bool), -1.0, dist)
  order = jnp.argsort(dist, axis=1, stable=True)[:, :w - f]
  mix = jnp.zeros((w, w), dist.dtype).at[jnp.arange(w)[:, None], order].set(1.0 / (w - f))

  def mix_leaf(leaf, y, c):
    # Rows of ``mix`` sum to one, so mixing centred rows and adding the centre
    # back gives the mixed original rows without the cancellation.
    mixed = (jnp.dot(mix.astype(y.dtype), y, precision=jax.lax.Precision.HIGHEST)
             .reshape(leaf.shape) + c[None])
    shape = (w,) + (1,) * (leaf.ndim - 1)
    return jnp.where(finite.reshape(shape), mixed, leaf)

  return jax.tree.map(mix_leaf, updates, centred, center)


def _nnm(inner: _RuleFn, f: int) -> _RuleFn:
  """Nearest Neighbour Mixing then A: A(nearest_neighbour_mix(x))."""
  def fn(x, key):
    return inner(nearest_neighbour_mix(x, f), key)
  return fn


def _own_computation(fn: Callable, *args):
  """``fn(*args)`` as its own XLA computation (both branches of one cond), see _isolated.

  For points that feed a distance pass (gm's iterates, centered clipping's
  centre): XLA on CPU otherwise fuses the weighted row sum that makes the
  point into every column slice of the next distance computation and
  recomputes it there, once per row (gm at W=65: ~1 s instead of ~10 ms per
  iteration at d=2e5).
  """
  first = jax.tree.leaves(args[0])[0]
  pred = jnp.isnan(first.reshape(-1)[0])
  return jax.lax.cond(pred, fn, fn, *args)


def _isolated(rule: _RuleFn, x: PyTree, key) -> tuple[PyTree, Diagnostics]:
  """Runs ``rule`` as its own XLA computation (both branches of one cond).

  When a sorting network's output has further consumers (ctma's distances),
  XLA on CPU splits the network into ~20 fusions that each write a full row,
  and ctma(cwtm) cost 15x cwtm. A cond branch is fused on its own, keeping the
  network one loop; the predicate depends on the data so XLA cannot fold it.
  Under vmap the cond becomes a select and both (identical) branches run.
  """
  first = jax.tree.leaves(x)[0]
  pred = jnp.isnan(first.reshape(-1)[0])
  return jax.lax.cond(pred, lambda v: rule(v, key), lambda v: rule(v, key), x)


def _nnm_ctma(inner: _RuleFn, f: int, keep_ties: bool = False) -> _RuleFn:
  """ctma centred at nnm(A)'s output, trimming the original rows."""
  return _ctma(_nnm(inner, f), f, keep_ties)


def _bucket_size(w: int, f: int, bucket_size: int | None) -> int:
  if bucket_size is not None:
    return bucket_size
  return max(1, w // (2 * f)) if f else 1


def _bucketing(inner: _RuleFn, f: int, bucket_size: int | None = None) -> _RuleFn:
  """Random permutation, means of buckets of s consecutive rows, A(means)."""
  def fn(x, key):
    if key is None:
      raise ValueError("bucketing is stochastic: call the aggregator with a PRNG key, "
                       "e.g. agg(updates, jax.random.key(0)).")
    w = _num_rows(x)
    s = _bucket_size(w, f, bucket_size)
    nb = -(-w // s)
    perm_key, inner_key = jax.random.split(key)
    perm = jax.random.permutation(perm_key, w)
    bucket_of_slot = jnp.arange(w, dtype=jnp.int32) // s
    sizes = jnp.bincount(bucket_of_slot, length=nb)
    bucket = jnp.zeros(w, jnp.int32).at[perm].set(bucket_of_slot)  # worker -> bucket
    finite = _row_finite(x)
    member = bucket[None, :] == jnp.arange(nb)[:, None]             # [nb, W]
    bad = jnp.any(member & ~finite[None, :], axis=1)
    weights = jnp.where(member, 1.0 / sizes[:, None], 0.0)

    def means(leaf):
      out = [selection.weighted_row_sum(leaf, weights[b], member[b] & finite) for b in range(nb)]
      out = jnp.stack(out)
      shape = (nb,) + (1,) * (leaf.ndim - 1)
      return jnp.where(bad.reshape(shape), jnp.array(jnp.nan, leaf.dtype), out)

    agg, diag = inner(jax.tree.map(means, x), inner_key)
    # Per-bucket diagnostics are reported per worker (the worker's bucket).
    diag = {k: (v[bucket] if jnp.ndim(v) == 1 and v.shape[0] == nb else v)
            for k, v in diag.items()}
    return agg, diag
  return fn


def _clip(inner: _RuleFn, f: int, tau: float = 1.0) -> _RuleFn:
  """Static clipping of every row to norm tau before A."""
  del f

  def fn(x, key):
    y, clipped = _clip_rows(x, jnp.asarray(tau))
    agg, diag = inner(y, key)
    return agg, _merge(diag, {"clip_clipped": clipped})
  return fn


def _arc(inner: _RuleFn, f: int) -> _RuleFn:
  """Adaptive robust clipping (Allouah et al., 2024) before A.

  With k = floor(2 (f/W) (W - f)), every row is clipped to the norm of the
  (k+1)-th largest, so the k largest rows are clipped.
  """
  def fn(x, key):
    w = _num_rows(x)
    k = int(2 * f * (w - f) // w)
    norms = jnp.sqrt(_row_sqdist(x))
    tau = jnp.sort(norms)[::-1][min(k, w - 1)]
    y, clipped = _clip_rows(x, tau)
    agg, diag = inner(y, key)
    return agg, _merge(diag, {"arc_clipped": clipped})
  return fn


def _merge(inner: Diagnostics, outer: Diagnostics) -> Diagnostics:
  out = dict(inner)
  for k, v in outer.items():
    while k in out:  # nested copies of one meta-aggregator keep every entry
      k = "outer_" + k
    out[k] = v
  return out


# --------------------------------------------------------------------------
# Tables: names, options, validation
# --------------------------------------------------------------------------


class _Rule(NamedTuple):
  build: Callable[..., Any]             # (f, **options) or (inner, f, **options)
  options: Mapping[str, Any]            # option name -> default
  min_rows: Callable[[int, Mapping[str, Any]], int]   # f, options -> least W computable
  robust_rows: Callable[[int, Mapping[str, Any]], int]  # least W it is meant for
  requirement: str                      # the robust condition, in words


def _half(f, o):
  return 2 * f + 1


def _any(f, o):
  return 1


AGGREGATORS: dict[str, _Rule] = {
    "avg": _Rule(_avg, {}, _any, _any, "any W"),
    "cwmed": _Rule(_cwmed, {"lower": False}, _any, _half, "W > 2f"),
    "cwtm": _Rule(_cwtm, {}, _half, _half, "W > 2f"),
    "gm": _Rule(_gm, {"iters": 3, "nu": 0.1, "init": "zero", "tol": None, "max_iters": 100},
                _any, _half, "W > 2f"),
    "krum": _Rule(_krum, {}, lambda f, o: f + 2, lambda f, o: 2 * f + 3, "W > 2f + 2"),
    "multikrum": _Rule(_multikrum, {"num_selected": None},
                       lambda f, o: max(f + 2, o["num_selected"] or 0),
                       lambda f, o: max(2 * f + 3, o["num_selected"] or 0),
                       "W > 2f + 2 (and W >= num_selected)"),
    "centered_clipping": _Rule(_centered_clipping, {"tau": 10.0, "iters": 1, "init": "mean"},
                               _any, _half, "W > 2f"),
    "meamed": _Rule(_meamed, {}, lambda f, o: f + 1, _half, "W > 2f"),
}
"""Base rules: name -> builder, default options and row requirements."""

META_AGGREGATORS: dict[str, _Rule] = {
    "ctma": _Rule(_ctma, {"keep_ties": False}, lambda f, o: f + 1, _half, "W > 2f"),
    "nnm": _Rule(_nnm, {}, lambda f, o: f + 1, _half, "W > 2f"),
    "nnm+ctma": _Rule(_nnm_ctma, {"keep_ties": False}, lambda f, o: f + 1, _half, "W > 2f"),
    "bucketing": _Rule(_bucketing, {"bucket_size": None}, _any,
                       lambda f, o: 4 * f, "W >= 4f (f <= W/4)"),
    "clip": _Rule(_clip, {"tau": 1.0}, _any, _any, "any W"),
    "arc": _Rule(_arc, {}, _any, _half, "W > 2f"),
}
"""Meta- and pre-aggregators: name -> builder (wrapping an inner rule)."""

ALIASES: dict[str, str] = {"rfa": "gm"}
"""Other spellings accepted in specs and options."""

_GM_INITS = ("zero", "mean", "cwmed")


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


def _check_option(rule: str, name: str, value: Any) -> None:
  def bad(what):
    raise ValueError(f"Option {rule}.{name}={value!r} is invalid: {what}.")

  is_int = isinstance(value, int) and not isinstance(value, bool)
  is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
  if name in ("lower", "keep_ties") and not isinstance(value, bool):
    bad("use True or False")
  if name in ("iters", "max_iters") and not (is_int and value >= 1):
    bad("use an integer >= 1")
  if name in ("nu", "tau") and not (is_num and value > 0):
    bad("use a positive number")
  if name == "tol" and value is not None and not (is_num and value > 0):
    bad("use a positive number, or None for a fixed number of iterations")
  if name in ("bucket_size", "num_selected") and value is not None and not (is_int and value >= 1):
    bad("use an integer >= 1, or None for the default")
  if name == "init" and value not in _GM_INITS:
    bad(f"valid starting points are {list(_GM_INITS)}")


def _resolve_options(options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict]:
  tables = {**AGGREGATORS, **META_AGGREGATORS}
  resolved = {name: dict(rule.options) for name, rule in tables.items()}
  for raw_name, given in (options or {}).items():
    name = _canonical(raw_name)
    if name not in tables:
      raise ValueError(f"Options given for unknown rule {raw_name!r}; valid names: "
                       f"{sorted(tables)}.")
    if given is None:
      continue
    if not isinstance(given, Mapping):
      raise ValueError(f"Options for {raw_name!r} must be a mapping of option names to "
                       f"values, e.g. {{'{name}': {dict(tables[name].options)}}}.")
    for key, value in given.items():
      if key not in tables[name].options:
        raise ValueError(f"Unknown option {key!r} for {name!r}; valid options: "
                         f"{sorted(tables[name].options) or 'none'}.")
      _check_option(name, key, value)
      resolved[name][key] = value
  return resolved


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


class AggregatorState(NamedTuple):
  """State of :meth:`Aggregator.as_optax`."""
  key: jax.Array    # PRNG key; folded with the count for stochastic rules
  count: jax.Array  # int32 [], number of updates so far


@dataclasses.dataclass(frozen=True)
class Aggregator:
  """A robust aggregator built by :func:`make_aggregator`.

  Attributes:
    spec: canonical spelling, e.g. ``"ctma(cwtm)"``.
    f: number of Byzantine workers tolerated.
  """
  spec: str
  f: int
  _names: tuple[str, ...] = dataclasses.field(repr=False, compare=False)
  _options: Mapping[str, Mapping[str, Any]] = dataclasses.field(repr=False, compare=False)
  _fn: _RuleFn = dataclasses.field(repr=False, compare=False)

  @property
  def stochastic(self) -> bool:
    """Whether a call needs a PRNG key (bucketing anywhere in the spec)."""
    return "bucketing" in self._names

  def _rows_needed(self, num_workers: int, robust: bool) -> list[tuple[str, int, int, str]]:
    """(name, rows it sees, least rows it needs, condition) for each layer."""
    out, rows = [], num_workers
    for name in self._names:
      rule = AGGREGATORS.get(name) or META_AGGREGATORS[name]
      opts = self._options[name]
      need = (rule.robust_rows if robust else rule.min_rows)(self.f, opts)
      out.append((name, rows, need, rule.requirement))
      if name == "bucketing":
        s = _bucket_size(rows, self.f, opts["bucket_size"])
        rows = -(-rows // s)
    return out

  def _validate(self, num_workers: Any, robust: bool) -> None:
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
      raise ValueError(f"The number of workers must be an integer >= 1, got {num_workers!r}; "
                       f"pass updates with a non-empty leading worker axis.")
    for name, rows, need, requirement in self._rows_needed(num_workers, robust):
      if rows < need:
        where = "" if rows == num_workers else (
            f" (bucketing leaves {rows} bucket means out of {num_workers} workers; "
            f"lower options['bucketing']['bucket_size'])")
        raise ValueError(
            f"{self.spec!r} with f={self.f} cannot run on {rows} rows{where}: {name} needs "
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
    shapes = {jnp.shape(l)[0] if jnp.ndim(l) else None for l in leaves}
    if len(shapes) != 1 or None in shapes:
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
    updates = jax.tree.map(jnp.asarray, updates)
    return self._fn(updates, key)

  def as_optax(self, key: jax.Array | None = None) -> optax_aggregating.Aggregator:
    """Wraps the rule as an ``optax.experimental.aggregating.Aggregator``.

    Args:
      key: PRNG key for stochastic rules; each update folds in its count.

    Returns:
      An aggregator whose ``update(per_worker_updates, state)`` returns the
      aggregate (diagnostics are dropped) and the next state.
    """
    if key is None:
      key = jax.random.key(0)

    def init_fn(params):
      del params
      return AggregatorState(key=key, count=jnp.zeros([], jnp.int32))

    def update_fn(per_elt_updates, state, params=None, **extra_args):
      del params, extra_args
      agg, _ = self(per_elt_updates, jax.random.fold_in(state.key, state.count))
      return agg, AggregatorState(key=state.key, count=state.count + 1)

    return optax_aggregating.Aggregator(init=init_fn, update=update_fn)


def make_aggregator(spec: str, f: int, *, num_workers: int | None = None,
                    options: Mapping[str, Mapping[str, Any]] | None = None) -> Aggregator:
  """Builds an aggregator from a spec string.

  Args:
    spec: e.g. ``"cwtm"``, ``"ctma(cwtm)"``, ``"bucketing(cwmed)"``,
      ``"nnm+ctma(cwtm)"``, ``"arc(ctma(cwtm))"``; see :data:`AGGREGATORS`,
      :data:`META_AGGREGATORS` and :data:`ALIASES`.
    f: number of Byzantine workers to tolerate (integer >= 0).
    num_workers: if given, :meth:`Aggregator.check` runs for it.
    options: rule name -> keyword options, e.g.
      ``{"gm": {"iters": 3, "nu": 0.1, "init": "zero"}, "ctma": {"keep_ties": True}}``.
      Options of rules absent from ``spec`` are validated and ignored.

  Returns:
    The :class:`Aggregator`.

  Raises:
    ValueError: unknown names or options, bad option values, a bad f, or (with
      ``num_workers``) a worker count the rule cannot handle.
  """
  if not isinstance(f, int) or isinstance(f, bool) or f < 0:
    raise ValueError(f"f (the number of Byzantine workers) must be an integer >= 0, got {f!r}.")
  names = _parse(spec)
  opts = _resolve_options(options)
  fn = AGGREGATORS[names[-1]].build(f, **opts[names[-1]])
  for name in reversed(names[:-1]):
    fn = META_AGGREGATORS[name].build(fn, f, **opts[name])
  canonical = names[-1]
  for name in reversed(names[:-1]):
    canonical = f"{name}({canonical})"
  agg = Aggregator(spec=canonical, f=f, _names=tuple(names), _options=opts, _fn=fn)
  if num_workers is not None:
    agg.check(num_workers)
  return agg
