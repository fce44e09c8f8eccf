"""The model's random stream (dropout): one key per worker, round and local step,
derived from the run's key, so runs with dropout stay reproducible and resumable."""

import jax
import numpy as np
import pytest

from ftjax import round as round_lib
from ftjax import round_data
from ftjax import train
from tests.test_train import tiny_config


def _rows(setup, state, keys_state):
  """The computed workers' rows at ``state``, with the model keys of ``keys_state``."""
  data = train.make_device_data(setup)
  x, y = round_data.minibatches(setup, state, data,
                                round_lib.sample_chunk(setup, state, data, 1)[0])
  rows, _, _ = jax.jit(round_lib.make_local_updates(setup))(
      (state.params, state.batch_stats, None),
      (x, y, state.worker_state, round_lib.model_keys(setup, keys_state)))
  return rows


def test_model_keys_differ_per_worker_round_and_local_step():
  setup = train.build(tiny_config(**{"federated.local_steps": 3, "optim.estimator": "momentum",
                                     "model.name": "mlp"}))
  state = train.init_state(setup, 1)
  keys = [np.asarray(round_lib.model_keys(setup, state._replace(step=s))) for s in (0, 1)]
  assert keys[0].shape == (setup.num_computed, 3, 2)
  flat = np.concatenate([k.reshape(-1, 2) for k in keys])
  assert len({tuple(k) for k in flat}) == len(flat) == 2 * setup.num_computed * 3
  other_seed = np.asarray(round_lib.model_keys(setup, train.init_state(setup, 2)))
  assert not np.array_equal(other_seed, keys[0])


def test_dropout_draws_from_the_rounds_key():
  """With dropout the workers' rows follow the model keys; without it they ignore them."""
  for name, dropout in (("torch_mnist", True), ("mlp", False)):
    setup = train.build(tiny_config(**{"model.name": name, "optim.estimator": "sgd"}))
    state = train.init_state(setup, 1)
    same = _rows(setup, state, state)
    again = _rows(setup, state, state)
    other = _rows(setup, state, state._replace(step=state.step + 1))
    for a, b, c in zip(jax.tree.leaves(same), jax.tree.leaves(again), jax.tree.leaves(other)):
      np.testing.assert_array_equal(a, b)
      assert (not np.array_equal(a, c)) == dropout, name


@pytest.mark.slow  # three runs, each compiled: about a minute on two cores
def test_runs_with_dropout_repeat_and_resume_exactly(tmp_path):
  """A run of 4 rounds and a run of 2 resumed to 4, same seed: the same parameters."""
  c = tiny_config(**{"model.name": "torch_mnist", "num_steps": 4, "eval_every": 2})
  whole = train.train_and_evaluate(c, str(tmp_path / "whole")).state
  half = tiny_config(**{"model.name": "torch_mnist", "num_steps": 2, "eval_every": 2})
  train.train_and_evaluate(half, str(tmp_path / "parts"))
  resumed = train.train_and_evaluate(c, str(tmp_path / "parts")).state  # resumes at step 2
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
