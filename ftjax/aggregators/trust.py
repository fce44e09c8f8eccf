"""FLTrust (Cao, Fang, Liu and Gong, NDSS 2021): the rows weighed against the server's own update.

The server holds a small trusted set of examples and computes its own update
g0 every round (the round does this for a rule registered with
``server=True``, :attr:`ftjax.aggregators.Aggregator.needs_server`). Each row
g_i gets the trust score TS_i = max(0, cos(g_i, g0)), is rescaled to g0's
norm, and the aggregate is the trust-weighted mean

    sum_i TS_i (|g0| / |g_i|) g_i / sum_i TS_i.

A row with a non-finite coordinate, or of norm 0, has no direction: its score
is 0 and it takes no part in the sum. When every score is 0 (every row points
away from g0, or g0 is 0 or non-finite) the aggregate is 0: the server does not
move this round. Norms and inner products are global over the leaves (through
:mod:`ftjax.kernels.rows`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.aggregators import core as agg
from ftjax.aggregators import maths
from ftjax.kernels import rows


def trust_scores(x, server) -> tuple[jax.Array, jax.Array, jax.Array]:
  """FLTrust's scores ReLU(cos(g_i, g0)) [W], the rows' norms [W] and g0's norm [].

  A row that is non-finite or 0 gets score 0; so does every row when g0 is
  non-finite or 0.
  """
  w = maths.num_rows(x)
  norms = jnp.sqrt(maths.row_sqdist(x))
  g0_norm = jnp.sqrt(rows.coordinate_sum(sum(
      jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(server))))
  usable = jnp.isfinite(norms) & (norms > 0) & jnp.isfinite(g0_norm) & (g0_norm > 0)

  def partial(leaf, point):  # each row's inner product with g0 on this leaf
    safe = jnp.where(usable.reshape((w,) + (1,) * (leaf.ndim - 1)), leaf,
                     jnp.zeros((), leaf.dtype))
    return jnp.sum((safe * point[None]).reshape(w, -1), axis=1)

  dots = rows.coordinate_sum(sum(
      partial(leaf, point) for leaf, point in zip(jax.tree.leaves(x), jax.tree.leaves(server))))
  denominator = jnp.where(usable, norms * g0_norm, 1.0)
  scores = jnp.where(usable, jnp.maximum(dots / denominator, 0.0), 0.0)
  return scores, norms, g0_norm


def _fltrust(x, key, *, f, server=None):
  """FLTrust: the trust-weighted mean of the rows rescaled to the server update's norm."""
  del key, f
  scores, norms, g0_norm = trust_scores(x, server)
  total = jnp.sum(scores)
  used = scores > 0
  # TS_i |g0| / (|g_i| sum_j TS_j) per row; 0 for every row when every score is 0.
  weights = jnp.where(used, scores * g0_norm / (jnp.where(used, norms, 1.0)
                                                * jnp.where(total > 0, total, 1.0)), 0.0)
  out = maths.weighted_sum(x, weights, used)
  return out, {"fltrust_score": scores, "fltrust_used": used}


RULES = {
    "fltrust": dict(body=_fltrust, options={}, min_rows=1, robust_rows=1,
                    requirement="any W (the server's own update anchors the rows)",
                    server=True),
}
"""name -> body and :func:`ftjax.aggregators.register`'s arguments."""

agg.register_table(RULES)
