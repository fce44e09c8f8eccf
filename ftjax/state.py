"""The whole state of a run, its initial value, and the run's random streams.

Every random draw of a run comes from its root key folded with a purpose
(``build.KEY_*``: initialisation, data, augmentation, attack, aggregator,
client sampling, the model's own randomness) and then with the round, so a
resumed run draws what the uninterrupted one would have drawn.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ftjax.build import KEY_INIT, KEY_MODEL, Setup

PyTree = Any


class TrainState(NamedTuple):
  """The whole state of a run; a pytree of arrays."""
  step: jax.Array          # int32 []: rounds done so far
  params: PyTree           # the query point x_t (the evaluated model)
  prev_params: PyTree      # x_{t-1} for mu2sgd's second gradient; () otherwise
  batch_stats: PyTree      # BatchNorm running statistics ({} without BatchNorm)
  server_state: PyTree     # server optax state (holds the anchor w_t for mu2sgd)
  worker_state: PyTree     # estimator states stacked on a leading axis [num_computed]
  rng: jax.Array           # uint32 key data of the run's root key
  aggregator_state: PyTree = ()  # a stateful rule's state across rounds; () for the others


def purpose_key(state: TrainState, purpose: int) -> jax.Array:
  """The run's key for one purpose (build.KEY_*)."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), purpose)


def model_key(state: TrainState, worker, local_step) -> jax.Array:
  """uint32 [2]: the key data of one worker's model randomness (dropout) at one local step
  of this round, ``fold_in(fold_in(fold_in(model_key, step), worker), local_step)``: a
  function of the run's seed and the round, so a resumed run draws what the
  uninterrupted one would have drawn. The server's own update (:func:`server_update`)
  is worker W."""
  key = jax.random.fold_in(purpose_key(state, KEY_MODEL), state.step)
  return jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, worker), local_step))


def model_keys(setup: Setup, state: TrainState) -> jax.Array:
  """uint32 [W', K, 2]: :func:`model_key` of every computed worker and local step."""
  steps = jnp.arange(setup.federated.local_steps)
  return jax.vmap(lambda i: jax.vmap(lambda k: model_key(state, i, k))(steps))(
      jnp.arange(setup.num_computed))


def init_state(setup: Setup, seed: int) -> TrainState:
  """Initial state: model init, estimator and server states, root key."""
  root = jax.random.key(seed)
  sample = jnp.zeros((1,) + setup.dataset.train_images.shape[1:], setup.dtype)
  variables = setup.model.init(jax.random.fold_in(root, KEY_INIT), sample, train=False)
  params = variables["params"]
  worker_state = jax.vmap(setup.worker_tx.init, in_axes=None,
                          axis_size=setup.num_computed)(params)
  return TrainState(
      step=jnp.zeros([], jnp.int32), params=params,
      prev_params=jax.tree.map(jnp.array, params) if setup.needs_prev else (),
      batch_stats=variables.get("batch_stats", {}), server_state=setup.server_tx.init(params),
      worker_state=worker_state, rng=jax.random.key_data(root),
      aggregator_state=setup.aggregator.init_state(params))


def init_states(setup: Setup, seeds) -> TrainState:
  """:func:`init_state` for several seeds, stacked on a leading runs axis [R]."""
  return jax.vmap(lambda seed: init_state(setup, seed))(jnp.asarray(seeds))
