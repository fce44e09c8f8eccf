"""Order statistics over the leading worker axis (re-exported by :mod:`ftjax.kernels.rows`).

* :func:`order_statistics`: ``jnp.sort(x, 0)[r]`` for each rank r.
* :func:`trimmed_sum`: ``jnp.sort(x, 0)[lo:hi + 1].sum(0)``.
* :func:`sort`: ``jnp.sort(x, 0)``, every rank.

NaN is ordered as +inf, so a NaN is trimmed like any extreme value. The plain
versions sort; the CPU versions are described in :mod:`ftjax.kernels.rows`.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from ftjax.kernels._base import _cpu, nan_to_posinf, sum_rows

# Above this many rows the sorting network's compile time outweighs its speed.
NETWORK_MAX_ROWS = 80
# Radix select works on [W, chunk] blocks of about this many bytes (cache-sized).
RADIX_CHUNK_BYTES = 1 << 18
# Radix select packs three counts (each < _PACK_BASE) into one int32 sum.
_PACK_BASE = 512
# Packed sums one counting pass of the radix select adds in its one reduction:
# the digit width is the widest whose trials fit (docs/benchmarks/select_digits.md).
MAX_PACKED_SUMS = 3


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
  if lo == hi:  # one value kept: one rank's select takes wider digits, fewer passes
    return order_statistics(x, [lo])[0]
  w = x.shape[0]
  flat = nan_to_posinf(x).reshape(w, -1)

  def fn(block):  # block [c, W]
    keys = _float_keys(block)
    k_lo, k_hi = _radix_select(keys, [lo, hi])
    v_lo, v_hi = _key_floats(k_lo), _key_floats(k_hi)
    zero = jnp.zeros((), block.dtype)
    between = (keys > k_lo[:, None]) & (keys < k_hi[:, None])
    # One variadic reduction: the kept values strictly between the two bounds,
    # #(<= v_lo) and #(< v_hi) (packed into one int32 sum below _PACK_BASE rows).
    le = (keys <= k_lo[:, None]).astype(jnp.int32)
    lt = (keys < k_hi[:, None]).astype(jnp.int32)
    packed = keys.shape[1] < _PACK_BASE
    terms = (jnp.where(between, block, zero),) + ((le + lt * _PACK_BASE,) if packed else (le, lt))
    sums = jax.lax.reduce(terms, (zero,) + (jnp.int32(0),) * (len(terms) - 1),
                          lambda a, b: tuple(u + v for u, v in zip(a, b)), (1,))
    inner = sums[0]
    le_lo, lt_hi = (sums[1] % _PACK_BASE, sums[1] // _PACK_BASE) if packed else sums[1:]
    # Copies of v_lo sit at sorted positions [#(<v_lo), #(<=v_lo)); all of
    # them below lo are trimmed. Likewise copies of v_hi above hi.
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


def _digit_bits(num_ranks: int, w: int) -> int:
  """Bits of the key each counting pass settles, for ``num_ranks`` ranks of W rows.

  A pass with b bits counts 2^b - 1 trial keys per rank; the counts are packed
  (three to an int32 below ``_PACK_BASE`` rows, else one) and added in one
  variadic reduction of at most ``MAX_PACKED_SUMS`` sums, which costs much
  less than as many separate sums (docs/benchmarks/select_digits.md). The
  widest digit that fits: 3 bits for one rank, 2 for two or three, 1 for
  more; at W >= 512 (one count per sum) 2 bits for one rank, 1 for more.
  """
  per_sum = 3 if w < _PACK_BASE else 1
  bits = 1
  while bits < 8 and -(-num_ranks * (2 ** (bits + 1) - 1) // per_sum) <= MAX_PACKED_SUMS:
    bits += 1
  return bits


def _packed_counts(keys: jax.Array, trials: Sequence[jax.Array]) -> list[jax.Array]:
  """``#(keys < t)`` along the last axis of ``keys`` [c, W] for each trial t [c].

  The indicators are packed into int32 sums (three per sum when W < _PACK_BASE)
  and all sums are one variadic ``lax.reduce``: XLA:CPU then reads the block
  once for all of them.
  """
  w = keys.shape[1]
  per_sum = 3 if w < _PACK_BASE else 1
  groups = [trials[i:i + per_sum] for i in range(0, len(trials), per_sum)]
  codes = tuple(sum((keys < t[:, None]).astype(jnp.int32) * (_PACK_BASE ** i)
                    for i, t in enumerate(g)) for g in groups)
  sums = jax.lax.reduce(codes, tuple(jnp.int32(0) for _ in codes),
                        lambda a, b: tuple(u + v for u, v in zip(a, b)), (1,))
  return [(total // (_PACK_BASE ** i)) % _PACK_BASE if per_sum > 1 else total
          for g, total in zip(groups, sums) for i in range(len(g))]


def _radix_select(keys: jax.Array, ranks: Sequence[int]) -> list[jax.Array]:
  """Keys of the ``ranks``-th smallest along the last axis of ``keys`` [c, W].

  Greedy from the top bit, b bits (one digit) per counting pass: t is the
  largest key with #{key < t} <= r, which is the key of the r-th smallest
  value. For the next digit d of t the pass counts the keys below
  ``t | v << shift`` for v = 1 .. 2^b - 1; the counts grow with v, so the
  digit is the number of trials whose count is <= r. All ranks and trials
  share each pass's one variadic reduction (:func:`_packed_counts`); the
  worker axis is minor here, the axis XLA:CPU reduces along fastest.
  """
  bits = _digit_bits(len(ranks), keys.shape[1])

  def digit_pass(ts, shift, b):
    steps = [jnp.left_shift(jnp.uint32(v), shift) for v in range(1, 2 ** b)]
    counts = _packed_counts(keys, [t | s for t in ts for s in steps])
    out = []
    for i, (t, r) in enumerate(zip(ts, ranks)):
      digit = sum((c <= r).astype(jnp.uint32) for c in counts[i * len(steps):(i + 1) * len(steps)])
      out.append(t | jnp.left_shift(digit, shift))
    return tuple(out)

  ts = tuple(jnp.zeros(keys.shape[:1], jnp.uint32) for _ in ranks)
  full = 32 // bits
  ts = jax.lax.fori_loop(
      0, full, lambda p, t: digit_pass(t, (32 - bits * (p + 1)).astype(jnp.uint32), bits), ts)
  if 32 % bits:
    ts = digit_pass(ts, jnp.uint32(0), 32 % bits)
  return list(ts)


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

