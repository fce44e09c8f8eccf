"""Helpers shared by the rows primitives (:mod:`ftjax.kernels.rows`,
:mod:`ftjax.kernels.select`, :mod:`ftjax.kernels.distances`)."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from ftjax import kernels as kernels_lib

# Up to this many rows sums are unrolled; beyond, a matrix-vector product keeps
# compile time bounded.
UNROLL_MAX_ROWS = 320


def _cpu() -> bool:
  return kernels_lib.current() == "cpu"


def nan_to_posinf(x: jax.Array) -> jax.Array:
  """Maps NaN to +inf, so that order statistics push it to the top."""
  return jnp.where(jnp.isnan(x), jnp.array(jnp.inf, x.dtype), x)


def _row_shape(x: jax.Array) -> tuple[int, ...]:
  """Shape that broadcasts a [W] vector against ``x`` [W, ...]."""
  return (x.shape[0],) + (1,) * (x.ndim - 1)



def sum_rows(rows: Sequence[jax.Array]) -> jax.Array:
  """Adds a list of equally shaped arrays as a balanced tree (one fused pass).

  The building block of the CPU sums; it is the same maths on every backend.
  """
  rows = list(rows)
  while len(rows) > 1:  # A balanced tree keeps float32 rounding error at O(log W).
    rows = [rows[i] + rows[i + 1] if i + 1 < len(rows) else rows[i]
            for i in range(0, len(rows), 2)]
  return rows[0]

