"""Weighted avg, cwmed, cwtm, gm and ctma: rules that take a nonnegative weight per worker.

Called through the :class:`~ftjax.aggregators.core.Aggregator` of the unweighted
rule, ``rule(updates, key, weights=w)`` with ``w`` of shape [W]: the spec's
layers must all have a weighted version (:data:`WEIGHTED_BASE`,
:data:`WEIGHTED_META`; :func:`check` says which one does not). Weights may sum
to anything positive; only their ratios matter. Each body below receives them
as given, in the rows' float type (integer counts stay exact there, so the
cumulative sums of cwmed and cwtm meet T/2 exactly when they should).

Definitions (per coordinate for cwmed and cwtm, with the values sorted
s_1 <= ... <= s_W, their weights u_k and cumulative weights C_k = u_1 + ... +
u_k, C_0 = 0, T = C_W):

* avg: sum_i w_i x_i / sum_i w_i.
* cwmed: the midpoint of the lower weighted median (s_k at the first k with
  C_k >= T/2) and the upper one (the first k with C_k > T/2); they differ
  only when some C_k is exactly T/2. ``lower=True`` takes the lower one.
* cwtm: a weight mass c = (f/W) T is trimmed from each end: s_k keeps
  max(0, min(C_k, T - c) - max(C_{k-1}, c)) of its weight (a value at a
  boundary keeps part of it), and the result is the mean of the values under
  the weights kept.
* gm: smoothed Weiszfeld with b_i = w_i / max(|z - x_i|, nu), started at the
  weighted cwmed, the weighted mean of the finite rows, or zero.
* ctma(A): with x0 = A_w(x), the rows sorted by distance to x0 (ties to the
  lower index) keep the weight mass K = (1 - f/W) T from the nearest on, the
  row at the boundary keeping part of its weight; the result is the mean of
  the rows under the weights kept.

With equal weights every formula reduces to the unweighted rule. The call then
returns the unweighted rule's own computation (one ``lax.cond`` on the weights),
so equal weights give the unweighted result bit for bit rather than up to
rounding. Faulty rows follow the unweighted rules: coordinate-wise rules order
NaN as +inf and trim it like any large value, distance rules put a non-finite row
infinitely far away, and a row of weight 0 never enters a sum, even when it
holds NaN.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import kernels as kernels_lib
from ftjax.kernels import rows

from ftjax.aggregators import maths

PyTree = Any
Diagnostics = dict[str, jax.Array]


# --------------------------------------------------------------------------
# Per-coordinate helpers: the values sorted with their weights
# --------------------------------------------------------------------------


def _sorted_with_cumulative(leaf: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The values sorted along the worker axis and their cumulative weights C_k, [W, ...].

  NaN sorts (and reads) as +inf, as in the unweighted order statistics. Values
  tied with each other may carry their weights in either order, which changes
  no result below (a tie's values are equal).
  """
  mass = jnp.broadcast_to(v.reshape((-1,) + (1,) * (leaf.ndim - 1)), leaf.shape)
  values, mass = jax.lax.sort((rows.nan_to_posinf(leaf), mass), dimension=0, num_keys=1)
  return values, jnp.cumsum(mass, axis=0)


def weighted_median_leaf(leaf: jax.Array, v: jax.Array, lower: bool = False) -> jax.Array:
  """Coordinate-wise weighted median of ``leaf`` [W, ...] under weights ``v`` [W]."""
  values, cum = _sorted_with_cumulative(leaf, v)
  total = cum[-1]

  def first(crossed):  # the value at the first rank where ``crossed`` (true at the last)
    return jnp.take_along_axis(values, jnp.argmax(crossed, axis=0)[None], axis=0)[0]

  lo = first(2 * cum >= total)
  if lower:
    return lo
  return (lo + first(2 * cum > total)) * jnp.asarray(0.5, leaf.dtype)


def _mass_inside(cum: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """The part of each interval (C_{k-1}, C_k] (C_{-1} = 0) inside (lo, hi), along axis 0.

  With F(C) = min(max(C, lo), hi) it is F(C_k) - F(C_{k-1}); the parts add up to
  hi - lo when 0 <= lo <= hi <= C_last.
  """
  inside = jnp.clip(cum, lo, hi)
  first = jnp.broadcast_to(jnp.clip(jnp.zeros((), cum.dtype), lo, hi), inside[:1].shape)
  return inside - jnp.concatenate([first, inside[:-1]])


def weighted_trimmed_mean_leaf(leaf: jax.Array, v: jax.Array, f: int) -> jax.Array:
  """Coordinate-wise weighted trimmed mean: a mass (f/W) T trimmed from each end.

  Value k keeps the part of its interval (C_{k-1}, C_k] inside (c, T - c).
  """
  values, cum = _sorted_with_cumulative(leaf, v)
  total = cum[-1]
  cut = total * f / leaf.shape[0]
  kept = _mass_inside(cum, cut, total - cut)
  # A trimmed value may be +inf: it is left out, not multiplied by zero.
  terms = jnp.where(kept > 0, kept * values, jnp.zeros((), values.dtype))
  return (jnp.sum(terms, axis=0) / jnp.sum(kept, axis=0)).astype(leaf.dtype)


def _masked_weighted_mean(x: PyTree, v: jax.Array, mask: jax.Array) -> PyTree:
  """sum_i v_i x_i / sum_i v_i over the rows where ``mask`` (the others may hold NaN)."""
  used = mask & (v > 0)
  mass = jnp.where(used, v, 0)
  return maths.weighted_sum(x, mass / jnp.where(jnp.any(used), jnp.sum(mass), 1), used)


# --------------------------------------------------------------------------
# Weighted bodies: (x, v, *, f, **options) -> (aggregate, diagnostics)
# --------------------------------------------------------------------------


def _avg(x, v, *, f):
  del f
  return maths.weighted_sum(x, v / jnp.sum(v), v > 0), {}


def _cwmed(x, v, *, f, lower):
  del f
  return jax.tree.map(lambda leaf: weighted_median_leaf(leaf, v, lower), x), {}


def _cwtm(x, v, *, f):
  return jax.tree.map(lambda leaf: weighted_trimmed_mean_leaf(leaf, v, f), x), {}


def _init_point(x: PyTree, v: jax.Array, init: str) -> PyTree:
  """The weighted counterpart of :func:`maths.init_point`."""
  if init == "zero":
    return maths.init_point(x, init)
  if init == "mean":
    return _masked_weighted_mean(x, v, maths.row_finite(x))
  return jax.tree.map(lambda leaf: weighted_median_leaf(leaf, v), x)


def _gm(x, v, *, f, iters, nu, init, tol, max_iters):
  del f
  z = rows.isolate(lambda x_, v_: _init_point(x_, v_, init), x, v)
  return maths.weiszfeld(x, z, iters=iters, nu=nu, tol=tol, max_iters=max_iters, prior=v)


def _ctma(inner: Callable, x, v, *, f, keep_ties):
  if keep_ties:
    raise ValueError("Weighted ctma has no keep_ties variant (the original program's tie "
                     "quirk); build ctma with keep_ties=False to pass weights.")
  w = maths.num_rows(x)
  # The centre feeds the distance pass over the rows: its own computation.
  x0, diag = rows.isolate(inner, x, v)
  order = jnp.argsort(maths.row_sqdist(x, x0), stable=True)  # non-finite rows last
  cum = jnp.cumsum(v[order])
  near = _mass_inside(cum, jnp.zeros((), cum.dtype), cum[-1] * (w - f) / w)
  kept = jnp.zeros_like(near).at[order].set(near)
  out = maths.weighted_sum(x, kept / jnp.sum(kept), kept > 0)
  return out, maths.merge(diag, {"ctma_kept": kept > 0})


WEIGHTED_BASE: dict[str, Callable[..., Any]] = {
    "avg": _avg, "cwmed": _cwmed, "cwtm": _cwtm, "gm": _gm}
"""Base rules with a weighted version: name -> body ``(x, v, *, f, **options)``."""

WEIGHTED_META: dict[str, Callable[..., Any]] = {"ctma": _ctma}
"""Meta-aggregators with a weighted version: name -> body ``(inner, x, v, *, f, **options)``,
``inner(x, v) -> (aggregate, diagnostics)`` the weighted inner rule."""


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def check(agg) -> None:
  """Refuses an aggregator with a layer that has no weighted version.

  Args:
    agg: an :class:`~ftjax.aggregators.core.Aggregator`.

  Raises:
    ValueError: one sentence naming the layer and the weighted rules.
  """
  a = agg
  while a is not None:
    table = WEIGHTED_BASE if a.inner is None else WEIGHTED_META
    if a.fn is not None or a.name not in table:
      raise ValueError(
          f"{agg.spec!r} cannot take per-worker weights: {a.name!r} has no weighted version; "
          f"weighted rules are {', '.join(WEIGHTED_BASE)}, optionally inside "
          f"{', '.join(WEIGHTED_META)} (e.g. 'ctma(cwtm)').")
    a = a.inner


def checked_weights(weights: Any, num_workers: int, dtype: Any) -> jax.Array:
  """``weights`` as ``dtype`` [W]; NaN everywhere for invalid weights.

  Weights must be finite, nonnegative and not all zero. Concrete weights that
  are not are refused here; traced ones (under jit) make the aggregate NaN.
  """
  w = jnp.asarray(weights)
  if w.shape != (num_workers,):
    raise ValueError(f"weights must have shape [W] = ({num_workers},), one per worker row, "
                     f"got shape {tuple(w.shape)}.")
  if not isinstance(w, jax.core.Tracer):
    host = np.asarray(w, np.float64)
    if not (np.all(np.isfinite(host)) and np.all(host >= 0) and host.sum() > 0):
      raise ValueError(f"weights must be finite, nonnegative and not all zero, got "
                       f"{host.tolist()}.")
  w = w.astype(dtype)
  valid = jnp.all(jnp.isfinite(w)) & jnp.all(w >= 0) & (jnp.max(w) > 0)
  return jnp.where(valid, w, jnp.nan)


def _weighted(agg, x: PyTree, v: jax.Array) -> tuple[PyTree, Diagnostics]:
  """The weighted formula of every layer of ``agg``, under its kernel set."""
  with kernels_lib.use(agg.kernels):
    options = dict(agg.options)
    if agg.inner is None:
      return WEIGHTED_BASE[agg.name](x, v, f=agg.f, **options)
    return WEIGHTED_META[agg.name](lambda x_, v_: _weighted(agg.inner, x_, v_), x, v,
                                   f=agg.f, **options)


def apply(agg, x: PyTree, key: jax.Array | None, weights: Any) -> tuple[PyTree, Diagnostics]:
  """``agg`` on validated rows ``x`` with per-worker ``weights``.

  Equal weights run the unweighted rule itself (``agg``'s own body), any
  others the weighted formulas. Known weights choose in Python; traced ones
  through one ``lax.cond``, so under ``jit`` only one of them runs (under
  ``vmap`` both do, and a select picks).
  """
  check(agg)
  # The weights' sums in the rows' widest float type, at least float32.
  dtype = functools.reduce(jnp.promote_types, [l.dtype for l in jax.tree.leaves(x)],
                           jnp.dtype(jnp.float32))
  v = checked_weights(weights, maths.num_rows(x), dtype)
  equal = jnp.all(v == v[0])
  unweighted = lambda x_, v_: agg._apply(x_, key)  # pylint: disable=protected-access
  formulas = lambda x_, v_: _weighted(agg, x_, v_)
  if not isinstance(equal, jax.core.Tracer):
    return (unweighted if bool(equal) else formulas)(x, v)
  return jax.lax.cond(equal, unweighted, formulas, x, v)
