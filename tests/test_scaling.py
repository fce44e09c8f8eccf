"""The chunked worker axis (workers.chunk): same round, bounded memory, the loop it allows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import data as data_lib
from ftjax import policy
from ftjax import round as round_lib
from ftjax import train
from test_kernels_layers import _conv_eqns, _plain_forward
from test_train import tiny_config

pytestmark = pytest.mark.slow  # minutes of compiling; CI runs it, -m "not slow" skips it


def _config(workers, byzantine, chunk, **overrides):
  # Every worker's gradient is computed under sign flipping.
  return tiny_config(**{"workers.num": workers, "workers.byzantine": byzantine,
                        "workers.chunk": chunk, "attack.name": "sf", **overrides})


def _dataset(shape, num_train=600, seed=0):
  rng = np.random.default_rng(seed)
  return data_lib.Dataset(
      name="random", train_images=rng.integers(0, 256, (num_train,) + shape, dtype=np.uint8),
      train_labels=rng.integers(0, 10, num_train).astype(np.int32),
      test_images=rng.integers(0, 256, (50,) + shape, dtype=np.uint8),
      test_labels=rng.integers(0, 10, 50).astype(np.int32), num_classes=10,
      mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1], augment="none")


def _run_rounds(config, rounds=3):
  setup = train.build(config)
  state = train.init_state(setup, config.seed)
  data = train.make_device_data(setup)
  state, metrics = train.make_chunk_fn(setup, "scan")(state, data, rounds).run(state, data)
  return jax.device_get((state, metrics))


@pytest.mark.parametrize("estimator", ["mu2sgd", "momentum"])
def test_chunked_round_equals_the_unchunked_one_in_float64(estimator):
  # W = 9 in chunks of 4: two scanned chunks and a remainder of one worker.
  with jax.enable_x64(True):
    runs = {chunk: _run_rounds(_config(9, 2, chunk, dtype="float64",
                                       **{"optim.estimator": estimator}))
            for chunk in (0, 4)}
  (s0, m0), (s4, m4) = runs[0], runs[4]
  for name in ("params", "batch_stats", "worker_state", "prev_params"):
    for a, b in zip(jax.tree.leaves(getattr(s0, name)), jax.tree.leaves(getattr(s4, name))):
      assert a.dtype in (np.float64, np.int32), name  # int32: the estimators' step counts
      np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12, err_msg=name)
  assert set(m0) == set(m4)
  for key in m0:
    np.testing.assert_allclose(m4[key], m0[key], rtol=1e-12, atol=1e-12, err_msg=key)


def test_chunked_gradients_equal_one_worker_at_a_time():
  # Against each worker's own value_and_grad, called worker by worker in Python.
  with jax.enable_x64(True):
    setup = train.build(_config(7, 1, 3, dtype="float64"))
    state = train.init_state(setup, 0)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(7, 4, 8, 8, 1)))
    y = jnp.asarray(rng.integers(0, 10, (7, 4)), jnp.int32)
    prev = jax.tree.map(lambda p: p + 0.01, state.params)
    keys = jax.vmap(lambda i: round_lib.model_key(state, i, 0))(jnp.arange(7))
    out, prev_grads, prev_stats = round_lib.make_worker_gradients(setup)(
        state.params, state.batch_stats, prev, x, y, keys)
    (loss, (logits, stats)), grads = out
    one = jax.jit(jax.value_and_grad(round_lib.make_loss_fn(setup.model), has_aux=True))
    for i in range(7):
      (l_i, (z_i, s_i)), g_i = one(state.params, state.batch_stats, x[i], y[i], keys[i])
      (_, (_, ps_i)), pg_i = one(prev, state.batch_stats, x[i], y[i], keys[i])
      np.testing.assert_allclose(loss[i], l_i, rtol=1e-12)
      np.testing.assert_allclose(logits[i], z_i, rtol=1e-12, atol=1e-12)
      for tree, want in ((grads, g_i), (stats, s_i), (prev_grads, pg_i), (prev_stats, ps_i)):
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(want)):
          np.testing.assert_allclose(a[i], b, rtol=1e-11, atol=1e-13)


def test_bad_chunk_is_refused_in_one_line():
  with pytest.raises(train.ConfigError, match=r"^workers.chunk must be an integer >= 0 .*-1\.$"):
    train.build(_config(5, 1, -1))
  c = _config(5, 1, None)
  del c.workers["chunk"]  # a config written before the field existed: all workers at once
  c.workers.chunk = 2.5   # a plain field, as a config file of one's own may set it
  with pytest.raises(train.ConfigError, match="workers.chunk must be an integer"):
    train.build(c)
  del c.workers["chunk"]
  assert train.build(c).loop == "scan"


def test_chunk_at_or_above_the_worker_count_is_the_unchunked_round():
  runs = [_run_rounds(_config(5, 1, chunk), rounds=2) for chunk in (None, 5)]
  for state, metrics in runs[1:]:
    for a, b in zip(jax.tree.leaves(runs[0][0].params), jax.tree.leaves(state.params)):
      np.testing.assert_array_equal(a, b)
    assert metrics["train_loss"] == runs[0][1]["train_loss"]


@pytest.mark.parametrize("chunk, friendly", [(0, False), (64, True), (32, True), (65, False),
                                             (None, True)])
def test_auto_loop_follows_the_chunk_past_64_workers(chunk, friendly):
  # 65 workers all computed: unchunked, the cpu weight gradients fall back to a grouped
  # convolution (slow in a loop body on XLA:CPU); in chunks of <= 64 every convolution of
  # the per-worker gradient is a plain forward one, so "auto" may scan. Unset (None), the
  # chunk is the CPU's choice: 16 past 64 workers.
  if jax.default_backend() != "cpu":
    pytest.skip("the rule is about XLA:CPU")
  setup = train.build(_config(65, 16, chunk, kernels="cpu", **{"model.name": "simple_mnist"}),
                      dataset=_dataset((12, 12, 1), num_train=65 * 4))
  state = jax.eval_shape(lambda: train.init_state(setup, 0))
  x = jax.ShapeDtypeStruct((65, 4, 12, 12, 1), jnp.float32)
  y = jax.ShapeDtypeStruct((65, 4), jnp.int32)
  keys = jax.ShapeDtypeStruct((65, 2), jnp.uint32)
  jaxpr = jax.make_jaxpr(round_lib.make_worker_gradients(setup))(
      state.params, state.batch_stats, state.prev_params, x, y, keys).jaxpr
  convs = _conv_eqns(jaxpr)
  assert convs
  assert all(_plain_forward(e) for e in convs) == friendly
  assert setup.loop == ("scan" if friendly else "host")


def test_unset_chunk_is_16_past_64_workers_with_cpu_kernels_and_explicit_values_win():
  if jax.default_backend() != "cpu":
    pytest.skip("the choice is XLA:CPU's")
  for workers, chunk, expected in [(65, None, 16), (64, None, 0), (17, None, 0), (257, None, 16),
                                   (65, 0, 0), (65, 32, 32), (9, 4, 4), (9, 9, 0), (9, 20, 0)]:
    assert policy.worker_chunk("auto", workers, chunk) == expected, (workers, chunk)
  assert policy.worker_chunk("plain", 65) == 0  # a loop body would hold the slow convolutions
  # The setup resolves it for the workers a device computes (all 65: sf sends its own).
  setup = train.build(_config(65, 1, None, **{"attack.name": "sf"}),
                      dataset=_dataset((4, 4, 1), num_train=65 * 8))
  assert setup.worker_chunk == 16
