"""Primitives over the leading worker axis of an array ``x`` [W, ...].

What each primitive computes (its plain version, in ``jax.numpy``):

* :func:`mean`: ``jnp.mean(x, 0)``.
* :func:`weighted_sum`: ``sum_i weights[i] * x[i]``, rows with
  ``mask[i] == False`` contributing exactly zero (even when they hold NaN or
  inf, where ``0 * inf`` would be NaN).
* :func:`mean_of`: ``jnp.mean(x[idx], 0)``, the mean of the selected rows.
* :func:`order_statistics`: ``jnp.sort(x, 0)[r]`` for each rank r.
* :func:`trimmed_sum`: ``jnp.sort(x, 0)[lo:hi + 1].sum(0)``.
* :func:`sort`: ``jnp.sort(x, 0)``, every rank.
* :func:`sqdist`: ``sum((x[i] - center)**2)`` for every row i.
* :func:`gram`: ``y @ y.T`` for ``y`` [W, n].
* :func:`coordinate_sum`: the identity on a sum over coordinates; its
  ``psum`` over the devices when the coordinates are sharded.

The reductions over coordinates (:func:`sqdist`, :func:`gram`,
:func:`coordinate_sum`) take pytrees as well as arrays and are the only ones
that see every coordinate: under :func:`ftjax.kernels.shard_coordinates` they
add the devices' partial results with one ``psum``, and every other primitive
works coordinate by coordinate, so rules written over them run unchanged on
coordinate slices.
* :func:`isolate`: ``fn(*args)``.
* :func:`materialize`: the identity.

:func:`sum_rows` (a balanced sum of a list of arrays) and
:func:`nan_to_posinf` are plain helpers, the same on every backend.

Order statistics order NaN as +inf, so a NaN is trimmed like any extreme
value; squared distances return NaN (a non-finite row, or inf - inf) as +inf,
so a faulty row is infinitely far from everything.

Each primitive reads :func:`ftjax.kernels.current` when it is called and runs
its plain version or its XLA:CPU version. The CPU versions compute the same
values (exactly for the order statistics; up to float rounding for sums) in
the form XLA:CPU runs fast, because XLA:CPU is slow at the two operations
robust aggregation leans on, sorting along a leading axis and reducing along
it:

* Order statistics up to ``NETWORK_MAX_ROWS`` rows come from Batcher's odd-even
  merge network, a fixed list of compare-exchanges written as
  ``jnp.minimum``/``jnp.maximum`` on whole rows. XLA fuses the network into one
  elementwise loop and removes every comparator whose outputs are not used, so
  a median or a trimmed mean costs less than a full sort. Above that many rows
  the network's compile time outweighs its speed, and float32 order statistics
  come from an exact radix select: floats are mapped to order-preserving uint32
  keys and the key of the r-th smallest value is built bit by bit, with
  counting passes over chunks of coordinates small enough to stay in cache.
  The counts reduce along the worker axis made minor inside each chunk, which
  XLA:CPU reduces far faster than a leading axis; several ranks' counts are
  packed into one integer sum, since the reductions, not the comparisons,
  bound those passes. A full sort (:func:`sort`) above the network limit
  sorts the floats' order-preserving integer keys with the worker axis minor,
  which XLA:CPU does several times faster than it sorts the floats.
* Sums over rows are unrolled into one fused elementwise expression that reads
  every row once, added as a balanced tree (float32 rounding error O(log W)).
  XLA:CPU's reduction along a leading axis is many times slower. Above
  ``UNROLL_MAX_ROWS`` rows the unrolled sum's compile time grows too large, and
  a matrix-vector product is used instead; a plain mean switches earlier
  (``MEAN_UNROLL_MAX_ROWS``), where the multithreaded product reads many rows
  faster than the fused sum does. The mean of selected rows fetches
  each selected row by a dynamic index inside that fused sum, so the other rows
  (possibly NaN) are never read.
* Squared row distances add column slices elementwise before reducing: XLA:CPU
  hands a row reduction ``sum((x - c)**2, axis=1)`` to a single-threaded
  library kernel that takes several reads of ``x``; see :func:`sqdist`.
* A Gram matrix of a short, very wide matrix is a sum of one product per
  column slice, which XLA:CPU runs faster than one long product and which is
  also slightly more accurate in float32.
* Fusion barriers. When a sorting network's output has further consumers (a
  distance pass to it), XLA:CPU splits the network into many fusions that each
  write a full row, or fuses it into a consumer and recomputes it there once
  per row; the same happens to a weighted row sum that makes a point fed to a
  distance pass. :func:`isolate` runs such a producer as its own XLA
  computation: both branches of a ``lax.cond`` on a data-dependent predicate,
  which XLA neither folds nor fuses across (``lax.optimization_barrier`` does
  not stop the recomputation). Under ``vmap`` the cond becomes a select and
  both identical branches run, so it belongs outside vmapped code. On
  coordinate slices the devices agree on the predicate through one scalar
  ``psum``, so the barrier holds there too.
  :func:`materialize` is an ``optimization_barrier`` on an aggregator's input:
  without it XLA fuses the computation that produced the rows (an estimator,
  an attack) into the selection network and recomputes it there.

Every CPU version falls back to the plain one for shapes where it does not
help (short rows for distances and Gram matrices). The plain versions are the
definitions and what runs on GPU and TPU.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ftjax import kernels as kernels_lib

PyTree = Any

# Above this many rows the sorting network's compile time outweighs its speed.
NETWORK_MAX_ROWS = 80
# Radix select works on [W, chunk] blocks of about this many bytes (cache-sized).
RADIX_CHUNK_BYTES = 1 << 18
# Up to this many rows sums are unrolled; beyond, a matrix-vector product keeps
# compile time bounded.
UNROLL_MAX_ROWS = 320
# A plain mean is a matrix-vector product above this many rows: XLA:CPU's
# multithreaded product then reads the rows faster than one fused sum of them.
MEAN_UNROLL_MAX_ROWS = 128
# Radix select packs the counts of up to three ranks (each < _PACK_BASE) into one sum.
_PACK_BASE = 512
# sqdist: column slices of SQDIST_SLICE columns, added in groups of SQDIST_GROUP
# (a group's stretch of the centre stays in cache); rows longer than
# SQDIST_MAX_SLICES slices (compile time) are cut into SQDIST_LONG_SLICES long
# slices instead.
SQDIST_SLICE = 16384
SQDIST_GROUP = 16
SQDIST_MAX_SLICES = 64
SQDIST_LONG_SLICES = 16
# gram: at most GRAM_SLICES column slices of at least GRAM_MIN_SLICE columns.
GRAM_SLICES = 16
GRAM_MIN_SLICE = 16384


def _cpu() -> bool:
  return kernels_lib.current() == "cpu"


def nan_to_posinf(x: jax.Array) -> jax.Array:
  """Maps NaN to +inf, so that order statistics push it to the top."""
  return jnp.where(jnp.isnan(x), jnp.array(jnp.inf, x.dtype), x)


def _row_shape(x: jax.Array) -> tuple[int, ...]:
  """Shape that broadcasts a [W] vector against ``x`` [W, ...]."""
  return (x.shape[0],) + (1,) * (x.ndim - 1)


# --------------------------------------------------------------------------
# Means and weighted sums
# --------------------------------------------------------------------------


def mean(x: jax.Array) -> jax.Array:
  """Mean of the rows of ``x`` [W, ...]: ``jnp.mean(x, 0)``.

  Args:
    x: array [W, ...].

  Returns:
    Array of shape ``x.shape[1:]`` and dtype ``x.dtype``.
  """
  if not _cpu():
    return jnp.mean(x, axis=0)
  w = x.shape[0]
  if w <= MEAN_UNROLL_MAX_ROWS:
    return sum_rows([x[i] for i in range(w)]) / w
  return _matvec(jnp.full((w,), 1.0 / w, x.dtype), x)


def weighted_sum(x: jax.Array, weights: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """``sum_i weights[i] * x[i]`` over the leading axis, skipping masked rows.

  Rows with ``mask[i] == False`` contribute exactly zero even when they hold
  NaN or inf.

  Args:
    x: array [W, ...].
    weights: [W] weights (cast to ``x.dtype``).
    mask: optional bool [W]; False rows are skipped.

  Returns:
    Array of shape ``x.shape[1:]`` and dtype ``x.dtype``.
  """
  w = x.shape[0]
  weights = weights.astype(x.dtype)
  zero = jnp.zeros((), x.dtype)
  if not _cpu():
    terms = weights.reshape(_row_shape(x)) * x
    if mask is not None:
      terms = jnp.where(mask.reshape(_row_shape(x)), terms, zero)
    return jnp.sum(terms, axis=0)
  if w <= UNROLL_MAX_ROWS:
    terms = [weights[i] * x[i] for i in range(w)]
    if mask is not None:
      terms = [jnp.where(mask[i], t, zero) for i, t in enumerate(terms)]
    return sum_rows(terms)
  if mask is not None:
    x = jnp.where(mask.reshape(_row_shape(x)), x, zero)
  return _matvec(weights, x)


def mean_of(x: jax.Array, idx: jax.Array) -> jax.Array:
  """Mean of the rows ``idx`` of ``x``: ``jnp.mean(x[idx], 0)``.

  Only the selected rows are read, so the others may hold NaN or inf.

  Args:
    x: array [W, ...].
    idx: int [k] distinct row indices, static k >= 1.

  Returns:
    Array of shape ``x.shape[1:]`` and dtype ``x.dtype``.
  """
  if not _cpu():
    return jnp.mean(x[idx], axis=0)
  k = idx.shape[0]
  if k > UNROLL_MAX_ROWS:
    mask = jnp.zeros(x.shape[0], bool).at[idx].set(True)
    return weighted_sum(x, jnp.where(mask, 1.0 / k, 0.0), mask)
  # Rows are scaled by 1/k before they are added, as weighted_sum does.
  scale = jnp.asarray(1.0 / k, x.dtype)
  return sum_rows([scale * jax.lax.dynamic_index_in_dim(x, idx[t], keepdims=False)
                   for t in range(k)])


def sum_rows(rows: Sequence[jax.Array]) -> jax.Array:
  """Adds a list of equally shaped arrays as a balanced tree (one fused pass).

  The building block of the CPU sums; it is the same maths on every backend.
  """
  rows = list(rows)
  while len(rows) > 1:  # A balanced tree keeps float32 rounding error at O(log W).
    rows = [rows[i] + rows[i + 1] if i + 1 < len(rows) else rows[i]
            for i in range(0, len(rows), 2)]
  return rows[0]


def _matvec(weights: jax.Array, x: jax.Array) -> jax.Array:
  w = x.shape[0]
  out = jnp.dot(weights, x.reshape(w, -1), precision=jax.lax.Precision.HIGHEST)
  return out.reshape(x.shape[1:])


# --------------------------------------------------------------------------
# Order statistics
# --------------------------------------------------------------------------


def order_statistics(x: jax.Array, ranks: Sequence[int]) -> list[jax.Array]:
  """The ``ranks``-th smallest values along the leading axis, exact.

  NaN is ordered as +inf.

  Args:
    x: array [W, ...] with a static W.
    ranks: 0-based ranks in [0, W).

  Returns:
    One array of shape ``x.shape[1:]`` per rank.
  """
  if not _cpu():
    s = jnp.sort(nan_to_posinf(x), axis=0)
    return [s[r] for r in ranks]
  if not _radix_ok(x):
    rows = sorted_rows(x)
    return [rows[r] for r in ranks]
  w = x.shape[0]
  flat = nan_to_posinf(x).reshape(w, -1)

  def fn(block):
    return [_key_floats(k) for k in _radix_select(_float_keys(block), ranks)]

  return [o.reshape(x.shape[1:]) for o in _by_chunks(fn, flat, len(ranks))]


def trimmed_sum(x: jax.Array, lo: int, hi: int) -> jax.Array:
  """Sum of the ``lo``-th to ``hi``-th smallest values (inclusive), per coordinate.

  NaN is ordered as +inf. Only the kept values are added, so far-away trimmed
  values cannot cost precision.

  Args:
    x: array [W, ...] with a static W.
    lo: 0-based rank of the smallest value kept.
    hi: 0-based rank of the largest value kept, ``lo <= hi < W``.

  Returns:
    Array of shape ``x.shape[1:]``.
  """
  if not _cpu():
    return jnp.sum(jnp.sort(nan_to_posinf(x), axis=0)[lo:hi + 1], axis=0)
  if not _radix_ok(x):
    return sum_rows(sorted_rows(x)[lo:hi + 1])
  w = x.shape[0]
  flat = nan_to_posinf(x).reshape(w, -1)

  def fn(block):  # block [c, W]
    keys = _float_keys(block)
    k_lo, k_hi = _radix_select(keys, [lo, hi])
    v_lo, v_hi = _key_floats(k_lo), _key_floats(k_hi)
    zero = jnp.zeros((), block.dtype)
    between = (keys > k_lo[:, None]) & (keys < k_hi[:, None])
    inner = jnp.sum(jnp.where(between, block, zero), axis=1)
    # Copies of v_lo sit at sorted positions [#(<v_lo), #(<=v_lo)); all of
    # them below lo are trimmed. Likewise copies of v_hi above hi.
    le_lo = jnp.sum((keys <= k_lo[:, None]).astype(jnp.int32), axis=1)
    lt_hi = jnp.sum((keys < k_hi[:, None]).astype(jnp.int32), axis=1)
    n_lo = jnp.where(k_lo == k_hi, hi - lo + 1, le_lo - lo)
    n_hi = jnp.where(k_lo == k_hi, 0, hi + 1 - lt_hi)
    part_lo = jnp.where(n_lo > 0, n_lo.astype(block.dtype) * v_lo, zero)
    part_hi = jnp.where(n_hi > 0, n_hi.astype(block.dtype) * v_hi, zero)
    return [inner + part_lo + part_hi]

  return _by_chunks(fn, flat, 1)[0].reshape(x.shape[1:])


def sort(x: jax.Array) -> jax.Array:
  """``x`` sorted along its leading axis, NaN ordered as +inf.

  For rules that need every rank; :func:`order_statistics` and
  :func:`trimmed_sum` cost less for a few ranks. On the CPU set the result
  stacks the network's rows: use it row by row (``s[j]``), which XLA maps back
  onto the network's outputs; an operation on the whole stacked array
  materialises it, and the network is then no longer one fused loop.

  Args:
    x: array [W, ...] with a static W.

  Returns:
    Array like ``x``; entry ``j`` holds the j-th smallest value of every
    coordinate.
  """
  if not _cpu():
    return jnp.sort(nan_to_posinf(x), axis=0)
  if x.shape[0] > NETWORK_MAX_ROWS:
    return _key_sort(nan_to_posinf(x))
  return jnp.stack(sorted_rows(x))


def _key_sort(x: jax.Array) -> jax.Array:
  """``jnp.sort(x, 0)`` for NaN-free floats, as a sort of integer keys.

  XLA:CPU sorts integers several times faster than floats (its float
  comparator orders NaN and signed zeros), and faster along the minor axis.
  The keys are the floats' bits with the magnitude bits of negative values
  flipped, an order-preserving map that is undone exactly after the sort.
  """
  ints = {jnp.dtype(jnp.float32): jnp.int32, jnp.dtype(jnp.float64): jnp.int64}
  if x.dtype not in ints:
    return jnp.sort(x, axis=0)
  itype = ints[x.dtype]
  flip = jnp.asarray(jnp.iinfo(itype).max, itype)

  def order_keys(v):  # an involution: it maps keys back to bits too
    return jnp.where(v < 0, v ^ flip, v)

  w = x.shape[0]
  keys = order_keys(jax.lax.bitcast_convert_type(x, itype)).reshape(w, -1)
  keys = jnp.sort(keys.T, axis=1).T
  return jax.lax.bitcast_convert_type(order_keys(keys), x.dtype).reshape(x.shape)


@functools.lru_cache(maxsize=None)
def batcher_network(n: int) -> tuple[tuple[int, int], ...]:
  """Compare-exchange pairs of Batcher's odd-even merge sort for ``n`` wires.

  Built for the next power of two and restricted to wires below ``n``: wires
  at or above ``n`` behave like +inf inputs, which never move down, so dropping
  their comparators leaves a valid network for ``n`` inputs.

  Args:
    n: number of wires (rows to sort), at least 1.

  Returns:
    Pairs ``(a, b)`` with ``a < b``; after applying each in order
    (``lo -> a``, ``hi -> b``) the wires hold their values in ascending order.
  """
  size = 1
  while size < n:
    size *= 2
  pairs = []
  p = 1
  while p < size:
    k = p
    while k >= 1:
      for j in range(k % p, size - k, 2 * k):
        for i in range(min(k, size - j - k)):
          a, b = i + j, i + j + k
          if a // (2 * p) == b // (2 * p) and b < n:
            pairs.append((a, b))
      k //= 2
    p *= 2
  return tuple(pairs)


def sorted_rows(x: jax.Array) -> list[jax.Array]:
  """The CPU sort: the rows of ``x`` sorted along its leading axis, smallest first.

  Up to ``NETWORK_MAX_ROWS`` rows through Batcher's network (unused outputs
  cost nothing under jit), above through ``jnp.sort``. NaN is ordered as +inf.

  Args:
    x: array [W, ...] with a static W.

  Returns:
    A list of W arrays of shape ``x.shape[1:]``.
  """
  w = x.shape[0]
  if w > NETWORK_MAX_ROWS:
    s = _key_sort(nan_to_posinf(x))
    return [s[j] for j in range(w)]
  # Row by row: a whole-array select would be materialised as a [W, d] copy
  # whenever x has another consumer (a distance pass).
  rows = [nan_to_posinf(x[j]) for j in range(w)]
  for a, b in batcher_network(w):
    rows[a], rows[b] = jnp.minimum(rows[a], rows[b]), jnp.maximum(rows[a], rows[b])
  return rows


def _radix_ok(x: jax.Array) -> bool:
  return x.dtype == jnp.float32 and x.shape[0] > NETWORK_MAX_ROWS


def _float_keys(x: jax.Array) -> jax.Array:
  """Order-preserving uint32 keys of float32 values (NaN must be gone)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _key_floats(k: jax.Array) -> jax.Array:
  """Inverse of :func:`_float_keys`."""
  positive = (k >> 31) == 1
  bits = jnp.where(positive, k & jnp.uint32(0x7FFFFFFF), ~k)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _radix_select(keys: jax.Array, ranks: Sequence[int]) -> list[jax.Array]:
  """Keys of the ``ranks``-th smallest along the last axis of ``keys`` [c, W].

  Greedy from the top bit: t is the largest key with #{key < t} <= r, which is
  the key of the r-th smallest value. All ranks share each counting pass, and
  up to three ranks share one packed reduction: the reductions, not the
  comparisons, bound this loop. The worker axis is minor here, the axis
  XLA:CPU reduces along fastest.
  """
  w = keys.shape[1]
  # Up to three ranks share one reduction per bit: their counts (each <= W <
  # _PACK_BASE) are packed into one int32 sum and unpacked after it.
  packed = 1 < len(ranks) <= 3 and w < _PACK_BASE

  def body(b, ts):
    bit = jnp.left_shift(jnp.uint32(1), (31 - b).astype(jnp.uint32))
    trials = [t | bit for t in ts]
    if packed:
      code = sum((keys < trial[:, None]).astype(jnp.int32) * (_PACK_BASE ** i)
                 for i, trial in enumerate(trials))
      total = jnp.sum(code, axis=1)
      counts = [(total // (_PACK_BASE ** i)) % _PACK_BASE for i in range(len(trials))]
    else:
      counts = [jnp.sum((keys < trial[:, None]).astype(jnp.int32), axis=1) for trial in trials]
    return tuple(jnp.where(below <= r, trial, t)
                 for t, trial, below, r in zip(ts, trials, counts, ranks))

  init = tuple(jnp.zeros(keys.shape[:1], jnp.uint32) for _ in ranks)
  if len(ranks) == 1 and w < _PACK_BASE:
    # One rank: two bits per pass, the counts of the three trial keys packed
    # into one reduction (16 reductions instead of 32).
    (r,) = ranks

    def two_bits(b, ts):
      (t,) = ts
      shift = (30 - 2 * b).astype(jnp.uint32)
      hi = jnp.left_shift(jnp.uint32(2), shift)
      lo = jnp.left_shift(jnp.uint32(1), shift)
      t_lo, t_hi, t_both = t | lo, t | hi, t | hi | lo
      code = ((keys < t_lo[:, None]).astype(jnp.int32)
              + (keys < t_hi[:, None]).astype(jnp.int32) * _PACK_BASE
              + (keys < t_both[:, None]).astype(jnp.int32) * _PACK_BASE ** 2)
      total = jnp.sum(code, axis=1)
      c_lo, c_hi, c_both = (total % _PACK_BASE, (total // _PACK_BASE) % _PACK_BASE,
                            total // _PACK_BASE ** 2)
      # Greedy on the high bit, then the low one (counts grow with the key).
      return (jnp.where(c_both <= r, t_both, jnp.where(
          c_hi <= r, t_hi, jnp.where(c_lo <= r, t_lo, t))),)

    return list(jax.lax.fori_loop(0, 16, two_bits, init))
  return list(jax.lax.fori_loop(0, 32, body, init))


def _by_chunks(fn, x: jax.Array, num_out: int) -> list[jax.Array]:
  """Applies ``fn`` ([c, W] -> ``num_out`` arrays [c]) over chunks of columns.

  ``x`` is [W, n]; each chunk is transposed (in cache) so that the worker axis
  is minor, and stays in cache across the passes of the radix select. The last
  n % c columns form one smaller chunk.
  """
  w, n = x.shape
  c = max(64, min(n, RADIX_CHUNK_BYTES // (4 * w)))
  full = n // c
  outs = [jnp.zeros((n,), x.dtype) for _ in range(num_out)]
  if full:
    def body(i, acc):
      block = jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)
      res = fn(block.T)
      return tuple(jax.lax.dynamic_update_slice_in_dim(a, r, i * c, axis=0)
                   for a, r in zip(acc, res))
    outs = list(jax.lax.fori_loop(0, full, body, tuple(outs)))
  if n % c:
    res = fn(x[:, full * c:].T)
    outs = [a.at[full * c:].set(r) for a, r in zip(outs, res)]
  return outs


# --------------------------------------------------------------------------
# Distances and Gram matrices
# --------------------------------------------------------------------------


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
  global over all leaves. The CPU version sums one product per column slice
  (at most ``GRAM_SLICES`` slices of at least ``GRAM_MIN_SLICE`` columns).
  Under :func:`ftjax.kernels.shard_coordinates` the partial matrices are added
  over the devices with one ``psum`` (:func:`coordinate_sum`).

  Args:
    y: array [W, ...] (flattened to [W, n]), or a pytree of them.

  Returns:
    [W, W] array in ``y.dtype``, at the highest matmul precision.
  """
  partial = functools.reduce(lambda a, b: a + b, [_leaf_gram(l) for l in jax.tree.leaves(y)])
  return coordinate_sum(partial)


def _leaf_gram(y: jax.Array) -> jax.Array:
  """:func:`gram` of one leaf over the coordinates this device holds."""
  w = y.shape[0]
  y = y.reshape(w, -1)
  n = y.shape[1]
  s = max(1, min(GRAM_SLICES, n // GRAM_MIN_SLICE)) if _cpu() else 1
  bounds = [i * n // s for i in range(s + 1)]
  return sum_rows([
      jnp.dot(y[:, lo:hi], y[:, lo:hi].T, precision=jax.lax.Precision.HIGHEST)
      for lo, hi in zip(bounds[:-1], bounds[1:])])


# --------------------------------------------------------------------------
# Fusion barriers
# --------------------------------------------------------------------------


def isolate(fn: Callable[..., PyTree], *args: PyTree) -> PyTree:
  """``fn(*args)``; on the CPU set, as its own XLA computation.

  For producers whose output feeds further passes over the rows (a sorting
  network feeding a distance pass, a point fed to the next distance pass): on
  the CPU set ``fn`` becomes both branches of a ``lax.cond`` whose predicate
  depends on the data (the first entry of ``args[0]`` is NaN), so XLA can
  neither fold it nor fuse across it. Under
  :func:`ftjax.kernels.shard_coordinates` the predicate is that of any
  device, made common by one scalar ``psum`` over the axis. Under ``vmap``
  both branches run.

  Args:
    fn: function of ``args``.
    *args: pytrees; the first one must hold at least one non-empty array.

  Returns:
    ``fn(*args)``.
  """
  if not _cpu():
    return fn(*args)
  first = jax.tree.leaves(args[0])[0]
  pred = jnp.isnan(jnp.reshape(first, -1)[0])
  axis = kernels_lib.coordinate_axis()
  if axis is not None:
    # Each device sees its own slice, so its own predicate; devices taking
    # different branches would wait at different collectives inside fn.
    pred = jax.lax.psum(pred.astype(jnp.int32), axis) > 0
  return jax.lax.cond(pred, fn, fn, *args)


def materialize(tree: PyTree) -> PyTree:
  """``tree``; on the CPU set behind ``jax.lax.optimization_barrier``.

  An aggregator's input passes through it, so that XLA computes the rows once
  instead of fusing their producer into the passes over them.

  Args:
    tree: any pytree of arrays.

  Returns:
    The same values.
  """
  if not _cpu():
    return tree
  return jax.lax.optimization_barrier(tree)
