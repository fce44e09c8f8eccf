"""Pytree maths shared by the rules: global over the leaves, nothing flattened.

Every function takes rows stacked on a leading worker axis W; a row with a
non-finite coordinate is infinitely far from every other row.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ftjax.kernels import rows

PyTree = Any
Diagnostics = dict[str, jax.Array]

# --------------------------------------------------------------------------
# Pytree maths (global over leaves, no flattening)
# --------------------------------------------------------------------------


def num_rows(x: PyTree) -> int:
  return jax.tree.leaves(x)[0].shape[0]


def row_sqdist(x: PyTree, center: PyTree | None = None) -> jax.Array:
  """Squared distance of every row to ``center`` (or squared norm), [W].

  Summed over the leaves; a non-finite row (or inf - inf) is +inf away.
  """
  return rows.sqdist(x, center)


def row_finite(x: PyTree) -> jax.Array:
  """bool [W]: True for rows whose squared norm is finite.

  A finite row whose squared norm overflows counts as non-finite too; it is
  then treated as infinitely far away, which is what such a row deserves.
  """
  return jnp.isfinite(row_sqdist(x))


def weighted_sum(x: PyTree, weights: jax.Array, mask: jax.Array | None = None) -> PyTree:
  return jax.tree.map(lambda leaf: rows.weighted_sum(leaf, weights, mask), x)


def masked_mean(x: PyTree, mask: jax.Array) -> PyTree:
  """Mean of the rows where ``mask`` (the others may hold NaN)."""
  weights = jnp.where(mask, 1.0, 0.0) / jnp.maximum(jnp.sum(mask), 1)
  return weighted_sum(x, weights, mask)


def mean_of(x: PyTree, idx: jax.Array) -> PyTree:
  return jax.tree.map(lambda leaf: rows.mean_of(leaf, idx), x)


def smallest_indices(values: jax.Array, k: int) -> jax.Array:
  """Ascending indices of exactly ``k`` smallest entries, ties to the lowest index."""
  return jnp.sort(jnp.argsort(values, stable=True)[:k])


def median(leaf: jax.Array, lower: bool = False) -> jax.Array:
  """Coordinate-wise median; for even W the midpoint of the middle two (or the lower)."""
  w = leaf.shape[0]
  if lower or w % 2:
    return rows.order_statistics(leaf, [(w - 1) // 2])[0]
  a, b = rows.order_statistics(leaf, [w // 2 - 1, w // 2])
  return (a + b) * jnp.asarray(0.5, leaf.dtype)


def clip_rows(x: PyTree, tau: jax.Array) -> tuple[PyTree, jax.Array]:
  """Scales every row to norm at most ``tau``; a non-finite row becomes zero.

  A row of infinite norm has no direction to keep, so zero is the only clipped
  value that stays finite.

  Returns:
    (clipped rows, bool [W] rows that were scaled or zeroed).
  """
  norms = jnp.sqrt(row_sqdist(x))
  finite = jnp.isfinite(norms)
  clipped = finite & (norms > tau)
  scale = jnp.where(clipped, tau / jnp.where(clipped, norms, 1.0), 1.0)

  def clip_leaf(leaf):
    shape = (leaf.shape[0],) + (1,) * (leaf.ndim - 1)
    keep = finite.reshape(shape)
    return jnp.where(keep, leaf * scale.reshape(shape).astype(leaf.dtype),
                     jnp.zeros((), leaf.dtype))

  return jax.tree.map(clip_leaf, x), clipped | ~finite


def pairwise_sqdist(x: PyTree, f: int) -> tuple[jax.Array, jax.Array]:
  """Pairwise squared distances |x_i - x_j|^2 [W, W] and the finite rows, bool [W].

  Through one Gram matrix of the rows centred at the coordinate-wise median c
  of the first min(W, 2f + 1) rows (:func:`ftjax.kernels.rows.pairwise_sqdist`).
  With at most f faulty rows those hold a majority of honest ones, so every
  coordinate of c lies within the honest rows' values and the float32
  rounding stays relative to their spread, whatever the faulty rows hold;
  it reads 2f + 1 rows instead of W. A pair involving a non-finite row is
  +inf apart; the diagonal is 0.
  """
  k = min(num_rows(x), 2 * f + 1)

  def center(v):
    med = jax.tree.map(lambda leaf: median(leaf[:k]), v)
    # More than f faulty rows can make the median infinite; any finite centre
    # gives the same distances.
    return jax.tree.map(lambda m: jnp.where(jnp.isfinite(m), m, jnp.zeros((), m.dtype)), med)

  # The median feeds every block's centring: its own computation.
  return rows.pairwise_sqdist(x, rows.isolate(center, x))


def init_point(x: PyTree, init: str) -> PyTree:
  """Starting point of gm and centred clipping: zero, the finite rows' mean, or cwmed."""
  if init == "zero":
    return jax.tree.map(lambda l: jnp.zeros(l.shape[1:], l.dtype), x)
  if init == "mean":  # of the finite rows: one NaN row must not poison it
    return masked_mean(x, row_finite(x))
  return jax.tree.map(median, x)



def weiszfeld(x: PyTree, z: PyTree, *, iters: int, nu: float, tol: float | None,
              max_iters: int, prior: jax.Array | None = None) -> tuple[PyTree, Diagnostics]:
  """Smoothed Weiszfeld iterations from ``z``: z <- sum_i b_i x_i / sum_i b_i.

  b_i = p_i / max(|z - x_i|, nu), with p_i = 1 (``prior`` None) or ``prior[i]``
  (per-row weights >= 0, the weighted geometric median's); a row of non-finite
  distance or of prior 0 gets b_i = 0 and is skipped. ``iters`` steps when
  ``tol`` is None, else steps until one moves less than ``tol`` (at most
  ``max_iters``), with ``gm_iters`` in the diagnostics.
  """

  def step(x, z):
    dist = jnp.sqrt(row_sqdist(x, z))
    ok = jnp.isfinite(dist)
    if prior is None:
      beta = jnp.where(ok, 1.0 / jnp.maximum(dist, nu), 0.0)
    else:
      ok = ok & (prior > 0)
      beta = jnp.where(ok, prior / jnp.maximum(dist, nu), 0.0)
    return weighted_sum(x, beta / jnp.sum(beta), ok)

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


def krum_neighbours(w: int, f: int, num_neighbours: int | None = None) -> int:
  """The nearest other rows a Krum score sums: ``num_neighbours``, or W - f - 1 (the
  original program's count; Blanchard et al. 2017 sum W - f - 2), at most W - 1."""
  k = w - f - 1 if num_neighbours is None else num_neighbours
  return max(0, min(k, w - 1))


def krum_scores(dist: jax.Array, f: int, num_neighbours: int | None = None) -> jax.Array:
  """Krum score per row: sum of squared distances to its nearest others (krum_neighbours)."""
  w = dist.shape[0]
  others = jnp.where(jnp.eye(w, dtype=bool), jnp.inf, dist)
  return rows.smallest_sum(others, krum_neighbours(w, f, num_neighbours))


def sqdist_to_combination(dist: jax.Array, weights: jax.Array, finite: jax.Array) -> jax.Array:
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



def merge(inner: Diagnostics, outer: Diagnostics) -> Diagnostics:
  out = dict(inner)
  for k, v in outer.items():
    while k in out:  # nested copies of one meta-aggregator keep every entry
      k = "outer_" + k
    out[k] = v
  return out


