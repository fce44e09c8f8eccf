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

Above ``NETWORK_MAX_ROWS`` (compile time grows with the network) the code falls
back to ``jnp.sort``, which is exact but slow on CPU.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

# Above this many rows the network's compile time (3 s per leaf at W=65) outweighs
# its speed; see docs/benchmarks/aggregators.md.
NETWORK_MAX_ROWS = 80
# Unrolled row sums compile in ~1 s per leaf at W=257 and still beat a masked
# matrix-vector product; beyond this a matvec keeps compile time bounded.
UNROLL_MAX_ROWS = 320


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
