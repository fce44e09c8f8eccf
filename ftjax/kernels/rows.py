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
* :func:`pairwise_sqdist`: ``|x_i - x_j|^2`` for every pair of rows.
* :func:`mix`: ``m @ x``, combinations of the rows.
* :func:`smallest_mask`: each row's k smallest entries of a matrix, as a mask;
  :func:`smallest_sum`: their sum.
* :func:`coordinate_sum`: the identity on a sum over coordinates; its
  ``psum`` over the devices when the coordinates are sharded.

The order statistics live in :mod:`ftjax.kernels.select` and the reductions
over coordinates in :mod:`ftjax.kernels.distances`; their public names are
reachable from here. The reductions over coordinates (:func:`sqdist`,
:func:`gram`, :func:`pairwise_sqdist`, :func:`coordinate_sum`) take pytrees as well as arrays and are the only ones
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
  keys and the key of the r-th smallest value is built digit by digit, one
  counting pass per digit over chunks of coordinates small enough to stay in
  cache. The counts reduce along the worker axis made minor inside each chunk,
  which XLA:CPU reduces far faster than a leading axis; the reductions, not
  the comparisons, bound those passes, so each pass packs the counts of all
  its trial keys three to an int32 and adds them in one variadic reduction,
  and the digit is as wide as ``MAX_PACKED_SUMS`` such sums allow (3 bits for
  one rank, 2 for two ranks at W < 512). A trimmed sum adds the values
  strictly between its two bounds and counts the bounds' copies in one more
  such reduction, without sorting. The crossover (``NETWORK_MAX_ROWS``) and
  the digit width are measured in docs/benchmarks/select.md. A full sort
  (:func:`sort`) above the network limit
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
  cache-sized block of columns, which XLA:CPU runs near its matmul rate
  (one long product runs well below it). Pairwise distances are one such
  Gram matrix of the rows centred block by block just before each product,
  ``|y_i|^2 + |y_j|^2 - 2 y_i.y_j`` with a stated error bound
  (:func:`pairwise_sqdist`), and the mixing step of nearest-neighbour mixing
  is the product of a selection matrix with the rows, masked block by block
  (:func:`mix`).
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

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ftjax import kernels as kernels_lib
from ftjax.kernels._base import (  # noqa: F401
    UNROLL_MAX_ROWS, _cpu, _row_shape, nan_to_posinf, sum_rows)
# The order statistics and the reductions over coordinates live in their own
# modules; their public names are reachable from here.
from ftjax.kernels.select import (  # noqa: F401
    NETWORK_MAX_ROWS, RADIX_CHUNK_BYTES, batcher_network, order_statistics, sort,
    sorted_rows, trimmed_sum)
from ftjax.kernels.distances import (  # noqa: F401
    coordinate_sum, gram, mix, pairwise_sqdist, smallest_mask, smallest_sum, sqdist)

PyTree = Any

# A plain mean is a matrix-vector product above this many rows: XLA:CPU's
# multithreaded product then reads the rows faster than one fused sum of them.
MEAN_UNROLL_MAX_ROWS = 128

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


def _matvec(weights: jax.Array, x: jax.Array) -> jax.Array:
  w = x.shape[0]
  out = jnp.dot(weights, x.reshape(w, -1), precision=jax.lax.Precision.HIGHEST)
  return out.reshape(x.shape[1:])


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
