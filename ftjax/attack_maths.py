"""What the attacks share: tree arithmetic (norms global over the leaves) and constants."""

from __future__ import annotations

import math
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.kernels import rows as rows_lib

PyTree = Any

# The inverse golden ratio, the shrink factor of golden-section search.
INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0

# The original program's IPM eps: ipm's default, and a scale optimal_ipm always tries.
IPM_REFERENCE_EPS = 0.5


def alie_z(num_workers: int, num_byzantine: int) -> float:
  """The ALIE scale of "A little is enough" (Baruch et al., 2019): ``z = Phi^{-1}((m - f - s) / (m - f))``.

  With ``s = floor(m / 2 + 1) - f`` and Phi the standard normal CDF; 1.2206 for
  m = 17, f = 8.

  Args:
    num_workers: m, all workers (honest and Byzantine).
    num_byzantine: f.

  Returns:
    z as a Python float.

  Raises:
    ValueError: when the counts are invalid or the quantile falls outside
      (0, 1), where the formula has no finite value.
  """
  for what, v in (("num_workers", num_workers), ("num_byzantine", num_byzantine)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise ValueError(f"{what} must be an integer, got {v!r}.")
  m, f = int(num_workers), int(num_byzantine)
  if not 0 <= f < m:
    raise ValueError(f"Need 0 <= num_byzantine < num_workers, got m={m}, f={f}.")
  s = math.floor(m / 2 + 1) - f
  q = (m - f - s) / (m - f)
  if not 0.0 < q < 1.0:
    raise ValueError(
        f"The ALIE formula gives the quantile (m - f - s)/(m - f) = {q:.4g} for m={m}, f={f}, "
        "outside (0, 1); pass an explicit z, e.g. make_attack('alie', z=1.0).")
  return statistics.NormalDist().inv_cdf(q)


def acc_dtype(tree: PyTree):
  """Accumulate norms in float64 when the tree is float64, else float32."""
  if any(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(tree)):
    return jnp.float64
  return jnp.float32


def empty_rows(honest: PyTree) -> PyTree:
  return jax.tree.map(lambda h: jnp.zeros((0,) + h.shape[1:], h.dtype), honest)


def mean(rows: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), rows)


def std(rows: PyTree) -> PyTree:
  # ddof=1: ALIE estimates the spread of the honest distribution from H samples.
  return jax.tree.map(lambda x: jnp.std(x, axis=0, ddof=1), rows)


def sq_norm(tree: PyTree, acc) -> jax.Array:
  return rows_lib.coordinate_sum(
      sum(jnp.sum(jnp.square(x.astype(acc))) for x in jax.tree.leaves(tree)))


def repeat(row: PyTree, f: int) -> PyTree:
  return jax.tree.map(lambda x: jnp.broadcast_to(x[None], (f,) + x.shape), row)


def along(base: PyTree, direction: PyTree, scale: jax.Array) -> PyTree:
  """``base + scale * direction`` leaf by leaf, in the leaves' dtypes."""
  return jax.tree.map(lambda b, d: (b + scale.astype(d.dtype) * d).astype(d.dtype),
                      base, direction)
