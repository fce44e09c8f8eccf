"""Order statistics and weighted sums over a small leading worker axis.

XLA on CPU is slow at the two primitives robust aggregation leans on: sorting
along the leading axis (``jnp.sort(x, axis=0)`` of a float32 [17, 1e6] array
takes about a second on the 2-core benchmark machine) and even reducing along
it (``x.sum(0)`` is ~50x slower than adding the rows one by one). Both are
avoided here for a static, moderate number of rows W:

* Sorting uses Batcher's odd-even merge network, a fixed list of
  compare-exchanges written as ``jnp.minimum``/``jnp.maximum`` on whole rows.
  XLA fuses the network into one elementwise loop and removes every comparator
  whose outputs the caller does not use, so asking for only the middle order
  statistics (trimmed mean, median) costs less than a full sort.
* Weighted sums over rows are unrolled into one fused elementwise expression,
  which reads every row once.
* Squared row norms and distances (:func:`row_sqdist`) add column slices
  elementwise before reducing, for the same reason.

Above ``NETWORK_MAX_ROWS`` (compile time grows with the network) order
statistics come from an exact radix select instead (:func:`order_statistics`,
:func:`trimmed_sum`): floats are mapped to order-preserving uint32 keys and the
key of the r-th smallest value is built bit by bit, 32 counting passes over the
rows, on chunks of coordinates small enough to stay in cache. ``jnp.sort`` is
kept only for callers that need every rank (:func:`sorted_rows`, i.e. meamed).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

# Above this many rows the network's compile time (3 s per leaf at W=65) outweighs
# its speed; see docs/benchmarks/aggregators.md.
NETWORK_MAX_ROWS = 80
# Radix select works on [W, chunk] blocks of about this many bytes (cache-sized).
RADIX_CHUNK_BYTES = 1 << 18
# Unrolled row sums compile in ~1 s per leaf at W=257 and still beat a masked
# matrix-vector product; beyond this a matvec keeps compile time bounded.
UNROLL_MAX_ROWS = 320
_PACK_BASE = 512
# row_sqdist: column slices of SQDIST_SLICE columns, added in groups of
# SQDIST_GROUP (a group's stretch of the centre, 1 MiB in float32, stays in
# cache); rows longer than SQDIST_MAX_SLICES slices (compile time) are cut into
# SQDIST_LONG_SLICES long slices instead.
SQDIST_SLICE = 16384
SQDIST_GROUP = 16
SQDIST_MAX_SLICES = 64
SQDIST_LONG_SLICES = 16


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


def nan_to_posinf(x: jax.Array) -> jax.Array:
  """Maps NaN to +inf so that order statistics push it to the top."""
  return jnp.where(jnp.isnan(x), jnp.array(jnp.inf, x.dtype), x)


def sorted_rows(x: jax.Array) -> list[jax.Array]:
  """Sorts ``x`` along its leading axis and returns the rows, smallest first.

  NaN is ordered as +inf, so a row of NaN counts as an extreme value.

  Args:
    x: array [W, ...] with a static W.

  Returns:
    A list of W arrays of shape ``x.shape[1:]``; entry ``j`` holds the j-th
    smallest value of every coordinate. Unused entries cost nothing under jit.
  """
  w = x.shape[0]
  if w > NETWORK_MAX_ROWS:
    s = jnp.sort(nan_to_posinf(x), axis=0)
    return [s[j] for j in range(w)]
  # Row by row: a whole-array select would be materialised as a [W, d] copy
  # whenever x has another consumer (ctma's distances).
  rows = [nan_to_posinf(x[j]) for j in range(w)]
  for a, b in batcher_network(w):
    rows[a], rows[b] = jnp.minimum(rows[a], rows[b]), jnp.maximum(rows[a], rows[b])
  return rows


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
  up to three ranks share one packed reduction (the reductions, not the
  comparisons, bound this loop: cwtm at W=257 ran 1.8x faster). The worker
  axis is minor here: XLA on CPU reduces along it far faster than
  along a leading axis (or than an unrolled sum of W slices, which also
  compiled for ~50 s at W=257).
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
  is minor, and stays in cache across the 32 passes of the radix select. The
  last n % c columns form one smaller chunk.
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


def _radix_ok(x: jax.Array) -> bool:
  return x.dtype == jnp.float32 and x.shape[0] > NETWORK_MAX_ROWS


def order_statistics(x: jax.Array, ranks: Sequence[int]) -> list[jax.Array]:
  """The ``ranks``-th smallest values along the leading axis, exact.

  NaN is ordered as +inf.

  Args:
    x: array [W, ...] with a static W.
    ranks: 0-based ranks in [0, W).

  Returns:
    One array of shape ``x.shape[1:]`` per rank.
  """
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
    lo, hi: 0-based ranks, 0 <= lo <= hi < W.

  Returns:
    Array of shape ``x.shape[1:]``.
  """
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


def row_sqdist(x: jax.Array, center: jax.Array | None = None) -> jax.Array:
  """Squared Euclidean norm of every row of ``x - center``, at about one read.

  XLA on CPU hands a row reduction ``sum((x - c)**2, axis=1)`` to a
  single-threaded library kernel that takes as long as 2-5 reads of ``x``.
  Instead, rows are cut into column slices of ``SQDIST_SLICE`` columns; each
  group of ``SQDIST_GROUP`` consecutive slices is squared and added
  elementwise into one [W, SQDIST_SLICE] partial sum (a fused, vectorised,
  multi-threaded loop), and only that, ``SQDIST_GROUP`` times smaller, is
  reduced. A group's stretch of ``center`` stays in cache while the W rows
  stream past it, so ``center`` is read about once rather than W times.

  Every slice is a few HLO instructions, so compile time grows with the
  number of slices; above ``SQDIST_MAX_SLICES`` the row is cut into
  ``SQDIST_LONG_SLICES`` long slices instead (one group: ``center`` is then
  read once per row, still faster than the plain reduction).

  Args:
    x: array [W, ...].
    center: array of shape ``x.shape[1:]``, or None for squared norms.

  Returns:
    [W] squared distances in ``x.dtype``; NaN (a non-finite row, or
    inf - inf) is returned as +inf.
  """
  w = x.shape[0]
  flat = x.reshape(w, -1)
  c = None if center is None else center.reshape(-1)
  n = flat.shape[1]

  def squares(lo, hi):
    diff = flat[:, lo:hi] if c is None else flat[:, lo:hi] - c[lo:hi]
    return diff * diff

  if n < 4 * SQDIST_SLICE:  # too short to be worth slicing
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


def sum_rows(rows: Sequence[jax.Array]) -> jax.Array:
  """Adds a list of equally shaped arrays pairwise (one fused pass)."""
  rows = list(rows)
  while len(rows) > 1:  # A balanced tree keeps float32 rounding error at O(log W).
    rows = [rows[i] + rows[i + 1] if i + 1 < len(rows) else rows[i]
            for i in range(0, len(rows), 2)]
  return rows[0]


def weighted_row_sum(x: jax.Array, weights: jax.Array,
                     mask: jax.Array | None = None) -> jax.Array:
  """``sum_i weights[i] * x[i]`` over the leading axis, skipping masked rows.

  Rows with ``mask[i] == False`` contribute exactly zero even when they hold
  NaN or inf (a plain product would give ``0 * inf = nan``).

  Args:
    x: array [W, ...].
    weights: [W] weights (cast to ``x.dtype``).
    mask: optional bool [W]; False rows are skipped.

  Returns:
    Array of shape ``x.shape[1:]`` and dtype ``x.dtype``.
  """
  w = x.shape[0]
  weights = weights.astype(x.dtype)
  if w <= UNROLL_MAX_ROWS:
    terms = [weights[i] * x[i] for i in range(w)]
    if mask is not None:
      zero = jnp.zeros((), x.dtype)
      terms = [jnp.where(mask[i], t, zero) for i, t in enumerate(terms)]
    return sum_rows(terms)
  flat = x.reshape(w, -1)
  if mask is not None:
    flat = jnp.where(mask[:, None], flat, jnp.zeros((), x.dtype))
  return jnp.dot(weights, flat, precision=jax.lax.Precision.HIGHEST).reshape(x.shape[1:])
