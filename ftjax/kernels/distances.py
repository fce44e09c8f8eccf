"""Reductions over coordinates: row distances, Gram matrices, pairwise distances.

Re-exported by :mod:`ftjax.kernels.rows`. What each primitive computes (its
plain version):

* :func:`sqdist`: ``sum((x[i] - center)**2)`` for every row i.
* :func:`gram`: ``y @ y.T`` for ``y`` [W, n].
* :func:`pairwise_sqdist`: ``|x_i - x_j|^2`` for every pair of rows, from one
  Gram matrix of the rows centred on a point.
* :func:`mix`: ``m @ x``, the combinations of the rows with the weights of
  ``m`` [V, W] (the mixing step of nearest-neighbour mixing).
* :func:`smallest_mask`: True at each row's k smallest entries of a distance
  matrix, ties to the lower column (``argsort(v, 1, stable=True)[:, :k]`` as a
  mask; nearest-neighbour mixing's neighbourhoods).
* :func:`smallest_sum`: ``sort(v, 1)[:, :k].sum(1)``, the sum of each row's k
  smallest entries (Krum's scores).
* :func:`coordinate_sum`: the identity on a sum over coordinates; its
  ``psum`` over the devices when the coordinates are sharded.

They take pytrees as well as arrays (distances are global over all leaves,
each leaf contributing its own partial sum; no leaves are concatenated) and are
the only primitives that see every coordinate: under
:func:`ftjax.kernels.shard_coordinates` they add the devices' partial results
with one ``psum``.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ftjax import kernels as kernels_lib
from ftjax.kernels._base import UNROLL_MAX_ROWS, _cpu, nan_to_posinf, sum_rows
from ftjax.kernels.select import NETWORK_MAX_ROWS, order_statistics

PyTree = Any

# sqdist: column slices of SQDIST_SLICE columns, added in groups of SQDIST_GROUP
# (a group's stretch of the centre stays in cache); rows longer than
# SQDIST_MAX_SLICES slices (compile time) are cut into SQDIST_LONG_SLICES long
# slices instead.
SQDIST_SLICE = 16384
SQDIST_GROUP = 16
SQDIST_MAX_SLICES = 64
SQDIST_LONG_SLICES = 16
# gram, pairwise_sqdist, mix: one product per block of columns of about
# GRAM_BLOCK_BYTES of rows (at least GRAM_MIN_BLOCK columns), centred or masked
# right before its product while it is in cache. XLA:CPU's product of a short,
# very wide matrix runs well below its matmul rate; cache-sized blocks run
# near it. Up to GRAM_UNROLL blocks are written out; longer rows loop over
# groups of GRAM_UNROLL blocks (compile time grows with every block written out).
GRAM_BLOCK_BYTES = 1 << 19
GRAM_MIN_BLOCK = 256
GRAM_UNROLL = 16
# mix: rows of at most this many bytes take one product; below it the blocks'
# copies cost more than their cache locality saves
# (docs/benchmarks/distance_profile.md).
MIX_BLOCK_MIN_BYTES = 1 << 25


def coordinate_sum(partial: jax.Array) -> jax.Array:
  """Completes a sum over coordinates.

  ``partial`` holds a sum over the coordinates this device sees. Under
  :func:`ftjax.kernels.shard_coordinates` those are one slice of them and the
  result is the ``psum`` of every device's partial sum over the mesh axis;
  otherwise ``partial`` is the whole sum and is returned as it is.
  """
  axis = kernels_lib.coordinate_axis()
  return partial if axis is None else jax.lax.psum(partial, axis)


def sqdist(x: PyTree, center: PyTree | None = None) -> jax.Array:
  """Squared Euclidean norm of every row of ``x - center``, summed over the leaves.

  ``x`` is an array [W, ...] or a pytree of them (``center`` then has the same
  structure without the W axis); the distance is global over all leaves. Under
  :func:`ftjax.kernels.shard_coordinates` the leaves' partial sums are added
  over the devices with one ``psum`` (:func:`coordinate_sum`).

  The CPU version takes about one read of ``x``: rows are cut into column
  slices of ``SQDIST_SLICE`` columns; each group of ``SQDIST_GROUP``
  consecutive slices is squared and added elementwise into one
  [W, SQDIST_SLICE] partial sum (a fused, vectorised, multi-threaded loop), and
  only that, ``SQDIST_GROUP`` times smaller, is reduced. A group's stretch of
  ``center`` stays in cache while the W rows stream past it, so ``center`` is
  read about once rather than W times. Every slice is a few HLO instructions,
  so compile time grows with their number; above ``SQDIST_MAX_SLICES`` the row
  is cut into ``SQDIST_LONG_SLICES`` long slices instead (one group: ``center``
  is then read once per row, still faster than the plain reduction). Rows
  shorter than four slices take the plain reduction.

  Args:
    x: array [W, ...], or a pytree of them.
    center: array of shape ``x.shape[1:]`` (a pytree like ``x``), or None for
      squared norms.

  Returns:
    [W] squared distances in ``x.dtype``; NaN (a non-finite row, or
    inf - inf) is returned as +inf.
  """
  leaves = jax.tree.leaves(x)
  centers = [None] * len(leaves) if center is None else jax.tree.leaves(center)
  # Each leaf's sum is NaN-free (+inf at worst), so the psum cannot create a NaN.
  partial = functools.reduce(
      lambda a, b: a + b, [_leaf_sqdist(leaf, c) for leaf, c in zip(leaves, centers)])
  return nan_to_posinf(coordinate_sum(partial))


def _leaf_sqdist(x: jax.Array, center: jax.Array | None) -> jax.Array:
  """:func:`sqdist` of one leaf over the coordinates this device holds."""
  w = x.shape[0]
  flat = x.reshape(w, -1)
  c = None if center is None else center.reshape(-1)
  n = flat.shape[1]

  def squares(lo, hi):
    diff = flat[:, lo:hi] if c is None else flat[:, lo:hi] - c[lo:hi]
    return diff * diff

  if not _cpu() or n < 4 * SQDIST_SLICE:
    return nan_to_posinf(jnp.sum(squares(0, n), axis=1))
  if n // SQDIST_SLICE <= SQDIST_MAX_SLICES:
    k, group = SQDIST_SLICE, SQDIST_GROUP
  else:
    k, group = n // SQDIST_LONG_SLICES, SQDIST_LONG_SLICES
  num = n // k
  parts = []
  for lo in range(0, num, group):
    partial = sum_rows([squares(j * k, (j + 1) * k) for j in range(lo, min(num, lo + group))])
    # NaN -> +inf per partial sum. Without an operation between the adds and
    # the reduction, XLA moves the adds into the library kernel, which then
    # copies every slice.
    parts.append(jnp.sum(nan_to_posinf(partial), axis=1))
  if num * k < n:
    parts.append(jnp.sum(squares(num * k, n), axis=1))
  return nan_to_posinf(sum_rows(parts))


def gram(y: PyTree) -> jax.Array:
  """The Gram matrix ``y @ y.T`` of the rows of ``y`` [W, ...], summed over the leaves.

  ``y`` is an array or a pytree of them sharing the W axis; the matrix is
  global over all leaves. The CPU version sums one product per block of
  columns (:func:`_blocked_products`). Under
  :func:`ftjax.kernels.shard_coordinates` the partial matrices are added over
  the devices with one ``psum`` (:func:`coordinate_sum`).

  Args:
    y: array [W, ...] (flattened to [W, n]), or a pytree of them.

  Returns:
    [W, W] array in ``y.dtype``, at the highest matmul precision.
  """
  partial = functools.reduce(lambda a, b: a + b,
                             [_leaf_gram(l, None) for l in jax.tree.leaves(y)])
  return coordinate_sum(partial)


def pairwise_sqdist(x: PyTree, center: PyTree | None = None) -> tuple[jax.Array, jax.Array]:
  """Squared distances ``|x_i - x_j|^2`` between all rows, summed over the leaves.

  One Gram matrix G of the centred rows ``y_i = x_i - c`` (the sum of every
  leaf's own product; nothing is concatenated) gives
  ``D_ij = G_ii + G_jj - 2 G_ij``. Distances do not depend on c, but the
  rounding does: with unit roundoff u (2**-24 in float32) and n coordinates in
  all, every finite entry satisfies

    ``|D_ij - |x_i - x_j|^2| <= (n + 5) u (|y_i| + |y_j|)^2``  (to first order in u)

  (the centring's rounding, then each Gram entry's, then the two additions and
  the symmetrisation). A centre near the rows keeps ``|y_i|`` at the rows'
  spread instead of their distance from the origin, which is what float32
  needs when the rows share a large common component.

  The result is exactly symmetric with a zero diagonal. Identical rows get
  identical distances (so exact ties still break by index) as long as the
  product treats every row alike, as XLA:CPU's and the plain products do
  (tests/test_kernels_rows.py checks copies at the first, middle and last
  rows). A row holding NaN or inf, or whose ``|y_i|^2`` overflows, is
  infinitely far from every other row.

  Args:
    x: array [W, ...], or a pytree of them sharing the W axis.
    center: point like one row of ``x`` (same pytree structure, no W axis), or
      None for the mean of each coordinate's finite values. That mean is
      cheap but moved by far rows (one finite row at 1e38 makes every
      ``|y_i|^2`` overflow); callers facing faulty rows pass a robust centre.

  Returns:
    (dist [W, W] in ``x.dtype``, bool [W] finite rows).
  """
  leaves = jax.tree.leaves(x)
  centers = ([_finite_mean(l) for l in leaves] if center is None
             else jax.tree.leaves(center))
  g = coordinate_sum(functools.reduce(
      lambda a, b: a + b, [_leaf_gram(l, c) for l, c in zip(leaves, centers)]))
  sq = jnp.diagonal(g)
  finite = jnp.isfinite(sq)
  dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
  half = jnp.asarray(0.5, dist.dtype)
  dist = half * dist + half * dist.T  # exactly symmetric: addition commutes
  dist = jnp.where(finite[:, None] & finite[None, :], dist, jnp.inf)
  return jnp.where(jnp.eye(g.shape[0], dtype=bool), 0.0, dist).astype(g.dtype), finite


def _finite_mean(x: jax.Array) -> jax.Array:
  """Mean over the rows of each coordinate's finite values (non-finite ones count as 0)."""
  w = x.shape[0]
  scale = jnp.asarray(1.0 / w, x.dtype)
  terms = jnp.where(jnp.isfinite(x), x * scale, jnp.zeros((), x.dtype))
  if _cpu() and w <= UNROLL_MAX_ROWS:  # XLA:CPU reduces a leading axis slowly
    return sum_rows([terms[i] for i in range(w)])
  return jnp.sum(terms, axis=0)


def mix(x: jax.Array, m: jax.Array, mask: jax.Array | None = None,
        keep_masked: bool = False) -> jax.Array:
  """``m @ x``: row v of the result is ``sum_i m[v, i] * x[i]``.

  Rows with ``mask[i] == False`` are read as zeros, so they contribute nothing
  even when they hold NaN or inf; with ``keep_masked`` (V == W) they are also
  returned as they are instead of mixed. The CPU version takes one product up
  to ``MIX_BLOCK_MIN_BYTES`` of rows; above, a loop masks, multiplies and
  writes one cache-sized block of columns per step (``GRAM_UNROLL`` steps
  written out per loop iteration), with nothing copied but each block's result.

  Args:
    x: array [W, ...].
    m: [V, W] weights (cast to ``x.dtype``).
    mask: optional bool [W].
    keep_masked: return the masked rows unchanged (needs ``mask`` and V == W).

  Returns:
    Array [V, ...] like ``x``'s trailing shape, in ``x.dtype``.
  """
  w = x.shape[0]
  if keep_masked and (mask is None or m.shape[0] != w):
    raise ValueError(f"mix(keep_masked=True) needs a mask and a square [W, W] m; got "
                     f"m of shape {m.shape} for {w} rows and mask={mask is not None}.")
  flat = x.reshape(w, -1)
  m = m.astype(x.dtype)
  zero = jnp.zeros((), x.dtype)

  def product(block):
    if mask is None:
      return jnp.dot(m, block, precision=jax.lax.Precision.HIGHEST)
    mixed = jnp.dot(m, jnp.where(mask[:, None], block, zero), precision=jax.lax.Precision.HIGHEST)
    return jnp.where(mask[:, None], mixed, block) if keep_masked else mixed

  n = flat.shape[1]
  s = _block_width(w, x.dtype)
  if not _cpu() or n < 2 * s or flat.size * flat.dtype.itemsize <= MIX_BLOCK_MIN_BYTES:
    return product(flat).reshape((m.shape[0],) + x.shape[1:])
  blocks = n // s

  def body(i, out):
    block = jax.lax.dynamic_slice_in_dim(flat, i * s, s, axis=1)
    return jax.lax.dynamic_update_slice_in_dim(out, product(block), i * s, axis=1)

  out = jax.lax.fori_loop(0, blocks, body, jnp.zeros((m.shape[0], n), x.dtype),
                          unroll=min(GRAM_UNROLL, blocks))
  if blocks * s < n:
    out = jax.lax.dynamic_update_slice_in_dim(out, product(flat[:, blocks * s:]), blocks * s,
                                              axis=1)
  return out.reshape((m.shape[0],) + x.shape[1:])


def smallest_mask(values: jax.Array, k: int) -> jax.Array:
  """bool [R, C]: True at the ``k`` smallest entries of each row, ties to the lower column.

  The definition: the first ``k`` columns of each row's stable argsort (NaN
  ordered as +inf), as a mask. The CPU version finds each row's k-th smallest
  value t (``jax.lax.top_k`` of the shorter side up to ``NETWORK_MAX_ROWS``
  columns, the radix select of :func:`ftjax.kernels.rows.order_statistics`
  above) and keeps the entries below t and, in column order, as many entries
  equal to t as the k places left: the same entries as the stable sort, since
  both break ties by column, at the cost of a few elementwise passes instead of
  sorting every row.

  Args:
    values: [R, C] array, C >= k >= 1.
    k: entries kept per row.

  Returns:
    bool [R, C] with exactly ``k`` True entries per row.
  """
  r, c = values.shape
  v = nan_to_posinf(values)
  if not _cpu():
    order = jnp.argsort(v, axis=1, stable=True)[:, :k]
    return jnp.zeros((r, c), bool).at[jnp.arange(r)[:, None], order].set(True)
  if c > NETWORK_MAX_ROWS:
    t = order_statistics(v.T, [k - 1])[0]
  elif k <= c - k + 1:
    t = -jax.lax.top_k(-v, k)[0][:, -1]
  else:
    t = jax.lax.top_k(v, c - k + 1)[0][:, -1]
  below = v < t[:, None]
  tie = v == t[:, None]
  room = k - jnp.sum(below, axis=1, keepdims=True)
  return below | (tie & (jnp.cumsum(tie, axis=1) <= room))


def smallest_sum(values: jax.Array, k: int) -> jax.Array:
  """[R]: the sum of each row's ``k`` smallest entries (NaN as +inf; NaN sums as +inf).

  The definition sorts each row and adds its first k entries in that order.
  The CPU version adds the entries of :func:`smallest_mask` in column order
  instead: the same entries, so the two differ by rounding only (for entries
  of one sign, as distances are, each is within (k - 1) u times the sum of
  the k entries of the exact sum, u the unit roundoff). Rows holding the same values with zeros moved around (the
  rows of copies of one point in a distance matrix) still get bitwise equal
  sums, since adding 0 is exact.

  Args:
    values: [R, C] array, C >= k >= 0.
    k: entries added per row.

  Returns:
    [R] array in ``values.dtype``.
  """
  v = nan_to_posinf(values)
  if k == 0:
    return jnp.zeros(v.shape[:1], v.dtype)
  if not _cpu():
    return nan_to_posinf(jnp.sum(jnp.sort(v, axis=1)[:, :k], axis=1))
  return nan_to_posinf(jnp.sum(jnp.where(smallest_mask(v, k), v, jnp.zeros((), v.dtype)), axis=1))


def _block_width(w: int, dtype) -> int:
  """Columns per block: a power of two with about GRAM_BLOCK_BYTES of rows."""
  cols = max(1, GRAM_BLOCK_BYTES // (w * jnp.dtype(dtype).itemsize))
  return max(GRAM_MIN_BLOCK, 1 << (cols.bit_length() - 1))


def _leaf_gram(y: jax.Array, center: jax.Array | None) -> jax.Array:
  """``(y - center) @ (y - center).T`` of one leaf over the coordinates this device holds."""
  w = y.shape[0]
  y = y.reshape(w, -1)
  c = None if center is None else center.reshape(-1)
  n = y.shape[1]

  def product(lo, width):  # lo: a Python int or a traced index
    block = jax.lax.dynamic_slice_in_dim(y, lo, width, axis=1)
    if c is not None:
      block = block - jax.lax.dynamic_slice_in_dim(c, lo, width, axis=0)
    return jnp.dot(block, block.T, precision=jax.lax.Precision.HIGHEST)

  s = _block_width(w, y.dtype)
  if not _cpu() or n < 2 * s:
    return product(0, n)
  return _blocked_products(product, n, s, jnp.zeros((w, w), y.dtype))


def _blocked_products(product, n: int, s: int, zero: jax.Array) -> jax.Array:
  """Sum of ``product(lo, width)`` over blocks of ``s`` columns covering [0, n).

  Up to GRAM_UNROLL blocks are written out and added as a balanced tree;
  beyond that a loop adds groups of GRAM_UNROLL blocks, and the columns after
  the last full group are written out. The loop's running sum is compensated
  (Kahan), so that hundreds of groups add no more rounding than a few.
  """
  group = GRAM_UNROLL * s
  groups = n // group if n > group else 0
  total = zero
  if groups:
    def body(i, carry):
      acc, comp = carry
      term = sum_rows([product(i * group + j * s, s) for j in range(GRAM_UNROLL)]) - comp
      new = acc + term
      return new, (new - acc) - term

    total, _ = jax.lax.fori_loop(0, groups, body, (zero, zero))
  start = groups * group
  bounds = list(range(start, n, s)) + [n]
  parts = [product(lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])]
  return total + sum_rows(parts) if parts else total
