"""Meta- and pre-aggregators: rules that wrap an inner rule.

ctma, nnm, nnm+ctma, bucketing, clip and arc, each a body ``(inner, x, key,
*, f, **options) -> (aggregate, diagnostics)`` and a public builder; the
table at the end registers them (:data:`ftjax.aggregators.core.META_AGGREGATORS`).
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

from ftjax.kernels import rows

from ftjax.aggregators import maths
from ftjax.aggregators.core import META_AGGREGATORS, Aggregator, RuleFn, _info, _meta
from ftjax.aggregators.core import _above, _any, _half

PyTree = Any

# --------------------------------------------------------------------------
# Meta- and pre-aggregators: (inner, x, key, *, f, **options) -> (aggregate, diagnostics)
# --------------------------------------------------------------------------


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
  w = maths.num_rows(x)
  if getattr(inner, "knows_distances", False):
    # No distance pass follows, so x0 needs no barrier (whose conditional
    # made ctma(krum) slower).
    x0, diag, r = inner.with_distances(x, key)
  else:
    # The centre feeds the distance pass over the rows: its own computation.
    x0, diag = rows.isolate(lambda v: inner(v, key), x)
    r = maths.row_sqdist(x, x0)
  if keep_ties:
    kept = r <= jnp.sort(r)[w - f - 1]
    scale = jnp.full((w,), 1.0 / (w - f))
    out = jax.tree.map(lambda v, c: c + rows.weighted_sum(v - c, scale, kept), x, x0)
    return out, maths.merge(diag, {"ctma_kept": kept})
  idx = maths.smallest_indices(r, w - f)
  kept = jnp.zeros(w, bool).at[idx].set(True)
  return maths.mean_of(x, idx), maths.merge(diag, {"ctma_kept": kept})


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
  w = maths.num_rows(updates)
  dist, finite = maths.pairwise_sqdist(updates, f)
  # -1 on the diagonal: x_i is always among its own neighbours, even when
  # other rows coincide with it.
  dist = jnp.where(jnp.eye(w, dtype=bool), -1.0, dist)
  # The selection matrix: row i holds 1/(W - f) at the columns of its
  # neighbours; the mixed rows are one product of it with the rows.
  weights = jnp.where(rows.smallest_mask(dist, w - f), 1.0 / (w - f), 0.0).astype(dist.dtype)

  return jax.tree.map(lambda leaf: rows.mix(leaf, weights, finite, keep_masked=True), updates)


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
  w = maths.num_rows(x)
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
  finite = maths.row_finite(x)
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
  y, clipped = maths.clip_rows(x, jnp.asarray(tau))
  agg, diag = inner(y, key)
  return agg, maths.merge(diag, {"clip_clipped": clipped})


def _arc(inner: RuleFn, x, key, *, f):
  """Adaptive robust clipping (Allouah et al., 2024) before A.

  With k = floor(2 (f/W) (W - f)), every row is clipped to the norm of the
  (k+1)-th largest, so the k largest rows are clipped.
  """
  w = maths.num_rows(x)
  k = int(2 * f * (w - f) // w)
  norms = jnp.sqrt(maths.row_sqdist(x))
  tau = jnp.sort(norms)[::-1][min(k, w - 1)]
  y, clipped = maths.clip_rows(x, tau)
  agg, diag = inner(y, key)
  return agg, maths.merge(diag, {"arc_clipped": clipped})



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




META_AGGREGATORS.update({
    "ctma": _info(ctma, _ctma, _above, _half, "W > 2f", meta=True),
    "nnm": _info(nnm, _nnm, _above, _half, "W > 2f", meta=True),
    "nnm+ctma": _info(nnm_ctma, _nnm_ctma, _above, _half, "W > 2f", meta=True),
    "bucketing": _info(bucketing, _bucketing, _any, lambda f, o: 4 * f, "W >= 4f (f <= W/4)",
                       stochastic=True, meta=True,
                       rows_after=lambda n, f, o: -(-n // _bucket_size(n, f, o["bucket_size"]))),
    "clip": _info(clip, _clip, _any, _any, "any W", meta=True),
    "arc": _info(arc, _arc, _any, _half, "W > 2f", meta=True),
})

