"""An :class:`~ftjax.aggregators.core.Aggregator` as an ``optax.experimental.aggregating``
aggregator (:meth:`~ftjax.aggregators.core.Aggregator.as_optax`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from optax.experimental import aggregating as optax_aggregating


class AggregatorState(NamedTuple):
  """State of :meth:`Aggregator.as_optax`."""
  key: jax.Array    # PRNG key; folded with the count for stochastic rules
  count: jax.Array  # int32 [], number of updates so far


def as_optax(agg, key: jax.Array | None = None) -> optax_aggregating.Aggregator:
  """``agg`` as an optax aggregator whose ``update`` returns ``((aggregate, diagnostics),
  state)``; each update folds its count into ``key`` (default ``jax.random.key(0)``)."""
  if key is None:
    key = jax.random.key(0)

  def init_fn(params):
    del params
    return AggregatorState(key=key, count=jnp.zeros([], jnp.int32))

  def update_fn(per_elt_updates, state, params=None, **extra_args):
    del params, extra_args
    aggregate, diagnostics = agg(per_elt_updates, jax.random.fold_in(state.key, state.count))
    return (aggregate, diagnostics), AggregatorState(key=state.key, count=state.count + 1)

  return optax_aggregating.Aggregator(init=init_fn, update=update_fn)
