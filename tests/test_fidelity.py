"""The original program's quirks as options: schedule floors and sequential BatchNorm statistics.

Each is checked against an independent computation: hand-computed schedule
values, and plain NumPy (or a Python loop over one stateful model, as the
original runs it) for the running statistics.
"""

import inspect

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from ftjax import data as data_lib
from ftjax import estimators
from ftjax import models
from ftjax import optim
from ftjax import train

pytestmark = pytest.mark.slow  # minutes of compiling; CI runs it, -m "not slow" skips it


def _optim_config(**overrides):
  c = default.get_config().optim
  c.update(overrides)
  return c


# --------------------------------------------------------------------------
# Schedule floors.


def test_beta_floor_alone_is_unrounded():
  ts = np.arange(1, 301)
  got = np.asarray(estimators.mu2sgd_beta(jnp.asarray(ts), None, False, beta_min=0.01))
  np.testing.assert_allclose(got, np.maximum(1.0 / ts, 0.01), rtol=1e-6)
  # 1/3 is kept as it is (the rounding would give 0.333); from t = 101 on, 0.01.
  assert got[2] == pytest.approx(1 / 3, rel=1e-6) and got[2] != pytest.approx(0.333, rel=1e-6)
  assert got[99] == pytest.approx(0.01) and got[150] == pytest.approx(0.01)
  assert got[98] == pytest.approx(1 / 99, rel=1e-6)


def test_beta_floor_on_top_of_rounding_and_of_a_fixed_beta():
  got = np.asarray(estimators.mu2sgd_beta(jnp.arange(1, 101), None, True, beta_min=0.05))
  np.testing.assert_allclose(got, np.maximum(np.maximum(np.round(1 / np.arange(1, 101), 3),
                                                        0.01), 0.05), atol=1e-7)
  assert float(estimators.mu2sgd_beta(jnp.asarray(7), 0.2, False, beta_min=0.3)) == (
      pytest.approx(0.3))
  # No floor: bitwise the paper's schedule.
  assert float(estimators.mu2sgd_beta(jnp.asarray(400), None, False)) == np.float32(1 / 400)


def test_gamma_floor_alone_is_unrounded():
  # alpha_t = t: gamma_t = t / (t (t + 1) / 2) = 2 / (t + 1).
  g = lambda t, **kw: float(optim.anytime_gamma(jnp.asarray(t), jnp.asarray(t * (t + 1) / 2.0),
                                                None, False, **kw))
  assert g(300, gamma_min=0.01) == pytest.approx(0.01)           # 2/301 = 0.00664
  assert g(100, gamma_min=0.01) == pytest.approx(2 / 101, rel=1e-6)  # 0.0198, not rounded to 0.02
  assert g(199, gamma_min=0.01) == pytest.approx(0.01)           # 2/200 = 0.01 exactly
  assert g(250) == pytest.approx(2 / 251, rel=1e-6)


def test_mu2sgd_with_beta_floor_against_numpy_recursion():
  tx = estimators.mu2sgd(beta_min=0.4)
  rng = np.random.default_rng(0)
  g, gp = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  state = tx.init(jnp.zeros(3))
  d = None
  for t in range(1, 6):
    out, state = tx.update(jnp.asarray(g[t - 1], jnp.float32), state,
                           prev_grads=jnp.asarray(gp[t - 1], jnp.float32))
    beta = max(1.0 / t, 0.4)
    d = g[0] if t == 1 else g[t - 1] + (1 - beta) * (d - gp[t - 1])
    np.testing.assert_allclose(out, d, rtol=1e-5, atol=1e-6)


def test_server_with_gamma_floor_against_numpy_recursion():
  c = _optim_config(gamma_min=0.3, lr=0.5)
  tx = optim.make_server_optimizer(c)
  x = jnp.asarray([1.0, -2.0])
  state = tx.init(x)
  w_np, x_np = np.array([1.0, -2.0]), np.array([1.0, -2.0])
  aggregates = np.random.default_rng(4).normal(size=(8, 2))
  for t, a in enumerate(aggregates, start=1):
    updates, state = tx.update(jnp.asarray(a, jnp.float32), state, x)
    x = x + updates
    # 2/(t+1): 1, 0.667, 0.5, 0.4, 0.333, then 0.286, 0.25, 0.222 are floored to 0.3.
    gamma = max(2.0 / (t + 1), 0.3)
    w_np = w_np - 0.5 * a
    x_np = (1 - gamma) * x_np + gamma * w_np
    np.testing.assert_allclose(x, x_np, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, match", [
    (dict(beta_min=-0.1), "optim.beta_min must be a number between 0 and 1"),
    (dict(beta_min=1.5), "optim.beta_min must be a number between 0 and 1"),
    (dict(beta_min=0.01, estimator="momentum"), "beta_min floors mu2sgd"),
])
def test_bad_beta_floor_is_refused(overrides, match):
  with pytest.raises(ValueError, match=match):
    estimators.make_estimator(_optim_config(**overrides))


@pytest.mark.parametrize("overrides, match", [
    (dict(gamma_min=2.0), "optim.gamma_min must be a number between 0 and 1"),
    (dict(gamma_min=0.01, estimator="sgd"), "gamma_min floors mu2sgd"),
])
def test_bad_gamma_floor_is_refused(overrides, match):
  with pytest.raises(ValueError, match=match):
    optim.make_server_optimizer(_optim_config(**overrides))


def test_floors_build_from_a_config_without_the_fields():
  # An optim section written before the fields existed keeps the paper's schedules.
  c = ml_collections.ConfigDict({k: v for k, v in _optim_config().items()
                                 if k not in ("beta_min", "gamma_min")})
  estimators.make_estimator(c)
  optim.make_server_optimizer(c)


def test_default_config_echoes_the_library_defaults():
  c = default.get_config()
  assert c.optim.beta_min == inspect.signature(estimators.mu2sgd).parameters["beta_min"].default
  assert c.optim.gamma_min == inspect.signature(
      optim.anytime_averaging).parameters["gamma_min"].default
  assert c.optim.beta_min == 0.0 and c.optim.gamma_min == 0.0  # the paper's schedules
  assert c.model.batch_stats == "honest_mean" == models.BATCH_STATS_MODES[0]


# --------------------------------------------------------------------------
# Sequential BatchNorm statistics.


def _numpy_ema(s0, batches, m):
  s = np.array(s0, np.float64)
  for b in batches:
    s = (1 - m) * s + m * b
  return s


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_fold_batch_stats_equals_the_ema_loop(dtype, rtol):
  rng = np.random.default_rng(1)
  old = {"l": {"mean": rng.normal(size=3), "var": rng.uniform(0.5, 2, size=3)}}
  passes = {"l": {"mean": rng.normal(size=(7, 3)), "var": rng.uniform(0.5, 2, size=(7, 3))}}
  with jax.enable_x64(dtype == np.float64):
    cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)
    got = models.fold_batch_stats(cast(old), cast(passes), 0.1)
    for name in ("mean", "var"):
      assert got["l"][name].dtype == dtype
      np.testing.assert_allclose(got["l"][name],
                                 _numpy_ema(old["l"][name], passes["l"][name], 0.1), rtol=rtol)
  # Another momentum, one pass: a single EMA step.
  one = models.fold_batch_stats(jnp.ones(2), jnp.asarray([[3.0, 5.0]]), 0.25)
  np.testing.assert_allclose(one, [1.5, 2.0])


def test_torch_momentum_matches_the_batchnorm_layer():
  assert models.TORCH_MOMENTUM == pytest.approx(1 - models.BatchNorm().momentum)
  assert models.TORCH_MOMENTUM == pytest.approx(1 - models.BatchNormReLUMaxPool().momentum)


def test_batch_stats_of_pass_recovers_the_batch_mean_and_unbiased_variance():
  bn = models.BatchNorm()
  x = np.random.default_rng(2).normal(1.0, 3.0, size=(6, 4)).astype(np.float32)
  variables = bn.init(jax.random.key(0), x, train=False)
  old = {"mean": jnp.asarray([0.5, -1, 2, 0]), "var": jnp.asarray([1.0, 2, 3, 4])}
  _, mutated = bn.apply({**variables, "batch_stats": old}, x, train=True,
                        mutable=["batch_stats"])
  b = models.batch_stats_of_pass(old, mutated["batch_stats"])
  np.testing.assert_allclose(b["mean"], x.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(b["var"], x.var(0, ddof=1), rtol=1e-5)  # PyTorch's running var


def test_update_batch_stats_modes_against_numpy():
  rng = np.random.default_rng(3)
  m = models.TORCH_MOMENTUM
  s0 = rng.normal(size=2)
  b_now, b_prev = rng.normal(size=(4, 2)), rng.normal(size=(4, 2))  # 4 workers' batch stats
  updated = lambda b: jnp.asarray((1 - m) * s0 + m * b, jnp.float32)
  old = jnp.asarray(s0, jnp.float32)
  honest = train.update_batch_stats("honest_mean", old, updated(b_now), updated(b_prev), 3)
  np.testing.assert_allclose(honest, (1 - m) * s0 + m * b_now[:3].mean(0), rtol=1e-5)
  seq = train.update_batch_stats("sequential", old, updated(b_now), updated(b_prev), 3)
  order = [b for k in range(4) for b in (b_now[k], b_prev[k])]  # worker k at x_t, then x_{t-1}
  np.testing.assert_allclose(seq, _numpy_ema(s0, order, m), rtol=1e-5, atol=1e-6)
  no_prev = train.update_batch_stats("sequential", old, updated(b_now), None, 3)
  np.testing.assert_allclose(no_prev, _numpy_ema(s0, b_now, m), rtol=1e-5, atol=1e-6)


def _tiny_config(attack, mode):
  c = default.get_config()
  c.progress = False
  c.workers.num, c.workers.byzantine, c.workers.batch_size = 5, 2, 4
  c.model.name = "tiny_cnn"
  c.model.batch_stats = mode
  c.attack.name = attack
  return c


@pytest.mark.parametrize("mode, attack, computed", [
    ("sequential", "sf", 5),     # sf computes the Byzantine workers' gradients too
    ("sequential", "alie", 3),   # alie's Byzantine rows are not computed
    ("honest_mean", "sf", 5)])
def test_round_running_stats_equal_a_pass_by_pass_model_run(mode, attack, computed):
  # sequential, the original: one stateful model; every computed worker runs its pass at
  # x_t, then its mu2sgd pass at x_{t-1}, each updating the running statistics in place.
  # honest_mean: each honest worker's pass at x_t from the round's statistics, averaged.
  setup = train.build(_tiny_config(attack, mode))
  assert setup.num_computed == computed
  step = jax.jit(train.make_round(setup))
  data = train.make_device_data(setup)
  state = train.init_state(setup, 1)
  state, _ = step(state, data, train.sample_chunk(setup, state, data, 1)[0])  # now x_2 != x_1
  idx = train.sample_chunk(setup, state, data, 1)[0]
  new_state, _ = step(state, data, idx)

  ds = setup.dataset
  x = data_lib.preprocess(ds.train_images[np.asarray(idx[:computed])], ds.mean, ds.std,
                          jnp.float32)
  apply = jax.jit(lambda params, stats, xk: setup.model.apply(
      {"params": params, "batch_stats": stats}, xk, train=True, mutable=["batch_stats"])[1][
          "batch_stats"])
  if mode == "sequential":
    want = state.batch_stats
    for k in range(computed):
      for params in (state.params, state.prev_params):
        want = apply(params, want, x[k])
  else:
    per_worker = [apply(state.params, state.batch_stats, x[k]) for k in range(3)]
    want = jax.tree.map(lambda *s: np.mean(s, 0), *per_worker)
  for got, w in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, w, rtol=2e-5, atol=2e-6)


def test_batch_stats_mode_changes_the_running_statistics_only():
  # Training normalises with each batch's own statistics, so the parameters do not
  # depend on how the running ones are kept; evaluation does.
  finals = {}
  for mode in models.BATCH_STATS_MODES:
    setup = train.build(_tiny_config("alie", mode))
    step = jax.jit(train.make_round(setup))
    data = train.make_device_data(setup)
    state = train.init_state(setup, 1)
    for _ in range(2):
      state, _ = step(state, data, train.sample_chunk(setup, state, data, 1)[0])
    finals[mode] = state
  a, b = finals["honest_mean"], finals["sequential"]
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  assert not all(np.allclose(x, y) for x, y in zip(jax.tree.leaves(a.batch_stats),
                                                   jax.tree.leaves(b.batch_stats)))


def test_batch_stats_mode_is_checked_before_compiling():
  with pytest.raises(train.ConfigError, match="Unknown model.batch_stats 'torch'"):
    train.build(_tiny_config("alie", "torch"))

  class Own(models.MLP):
    pass

  with pytest.raises(train.ConfigError, match="needs one of ftjax's models"):
    train.build(_tiny_config("alie", "sequential"), model=Own())
