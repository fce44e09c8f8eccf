"""Momentum conventions: the first momentum, dampening and server momentum.

Each convention is checked against a plain NumPy loop written here, the defaults
against today's formula bit for bit in float64, and every option through a short
training run and a resume.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from ftjax import estimators
from ftjax import optim
from ftjax import train

STEPS = 5


def _grads(seed=0, shape=(3,)):
  """Five float64 gradients (NumPy)."""
  return np.random.default_rng(seed).normal(size=(STEPS,) + shape)


def _run_estimator(tx, grads):
  state = tx.init({"w": jnp.zeros(grads.shape[1:], grads.dtype)})
  out = []
  for g in grads:
    m, state = tx.update({"w": jnp.asarray(g)}, state)
    out.append(np.asarray(m["w"]))
  return np.stack(out)


def _numpy_momentum(grads, beta, init, dampening):
  """m_t = beta m_{t-1} + (1 - dampening) g_t, from m_1 = g_1 or from m_0 = 0."""
  weight = 1.0 - (beta if dampening is None else dampening)
  out, m = [], np.zeros_like(grads[0])
  for t, g in enumerate(grads):
    m = g.copy() if (t == 0 and init == "gradient") else beta * m + weight * g
    out.append(m)
  return np.stack(out)


# (beta, init, dampening): ftjax's default, ByzFL's, PyTorch's SGD default and a
# PyTorch dampening.
CONVENTIONS = [(0.9, "gradient", None), (0.9, "zero", None), (0.9, "gradient", 0.0),
               (0.7, "gradient", 0.3), (0.5, "zero", 0.2)]


@pytest.mark.parametrize("beta, init, dampening", CONVENTIONS)
def test_momentum_conventions_match_a_numpy_loop(beta, init, dampening):
  grads = _grads()
  with jax.enable_x64(True):
    got = _run_estimator(estimators.momentum(beta, init, dampening), grads)
  np.testing.assert_allclose(got, _numpy_momentum(grads, beta, init, dampening),
                             rtol=1e-15, atol=0)


def test_byzfl_first_update_is_one_minus_beta_times_the_gradient():
  grads = _grads(1)
  with jax.enable_x64(True):
    got = _run_estimator(estimators.momentum(0.9, "zero"), grads[:1])
  np.testing.assert_allclose(got[0], 0.1 * grads[0], rtol=1e-15)


def test_pytorch_sgd_momentum_buffer_is_reproduced():
  # torch.optim.SGD(momentum=beta, dampening=d): buf_1 = g_1, buf_t = beta buf + (1 - d) g_t.
  grads, beta, d = _grads(2), 0.9, 0.25
  buf = [grads[0]]
  for g in grads[1:]:
    buf.append(beta * buf[-1] + (1 - d) * g)
  with jax.enable_x64(True):
    got = _run_estimator(estimators.momentum(beta, "gradient", d), grads)
  np.testing.assert_allclose(got, np.stack(buf), rtol=1e-15)


def _optim_config(**overrides):
  c = default.get_config().optim
  c.update(overrides)
  return c


def test_default_momentum_is_todays_formula_bit_for_bit():
  grads = _grads(3, (4, 2))
  beta = 0.9

  def today(updates, state):  # the estimator before the conventions were options
    first = state.count == 0
    new = jax.tree.map(lambda g, m: jnp.where(first, g, beta * m + (1 - beta) * g).astype(g.dtype),
                       updates, state.trace)
    return new, estimators.EstimatorState(count=state.count + 1, trace=new)

  with jax.enable_x64(True):
    built = estimators.make_estimator(_optim_config(estimator="momentum"))
    state = built.init({"w": jnp.zeros((4, 2))})
    ref = state
    for g in grads:
      got, state = jax.jit(built.update)({"w": jnp.asarray(g)}, state)
      want, ref = jax.jit(today)({"w": jnp.asarray(g)}, ref)
      np.testing.assert_array_equal(got["w"], want["w"])


def _run_server(tx, aggregates, x0):
  x = {"w": jnp.asarray(x0)}
  state = tx.init(x)
  out = []
  for a in aggregates:
    u, state = tx.update({"w": jnp.asarray(a)}, state, x)
    x = optax.apply_updates(x, u)
    out.append(np.asarray(x["w"]))
  return np.stack(out), state


@pytest.mark.parametrize("mu, decay", [(0.9, 0.0), (0.5, 0.01)])
def test_server_momentum_matches_a_numpy_loop(mu, decay):
  aggregates, x0, lr = _grads(4), np.array([1.0, -2.0, 0.5]), 0.1
  with jax.enable_x64(True):
    tx = optim.make_server_optimizer(_optim_config(
        estimator="sgd", lr=lr, server_momentum=mu, weight_decay=decay))
    got, _ = _run_server(tx, aggregates, x0)
  want, x, v = [], x0.copy(), np.zeros(3)
  for a in aggregates:  # v_0 = 0, v_t = mu v_{t-1} + a_t + decay x_t, x -= lr v_t
    v = mu * v + (a + decay * x)
    x = x - lr * v
    want.append(x)
  np.testing.assert_allclose(got, np.stack(want), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("estimator", ["sgd", "momentum", "mu2sgd"])
def test_server_momentum_zero_is_todays_server_step(estimator):
  aggregates, x0 = _grads(5), np.array([0.3, 0.2, -0.1])
  without = _optim_config(estimator=estimator)
  del without["server_momentum"]  # a config written before the option existed
  with jax.enable_x64(True):
    got, state = _run_server(optim.make_server_optimizer(_optim_config(estimator=estimator)),
                             aggregates, x0)
    want, ref = _run_server(optim.make_server_optimizer(without), aggregates, x0)
  np.testing.assert_array_equal(got, want)
  assert jax.tree.structure(state) == jax.tree.structure(ref)


@pytest.mark.parametrize("field, value, message", [
    ("momentum_init", "ones", "optim.momentum_init must be 'gradient'"),
    ("dampening", 1.5, r"optim.dampening must be a number in \[0, 1\]"),
    ("server_momentum", 1.0, r"optim.server_momentum must be a number in \[0, 1\)"),
    ("server_momentum", -0.1, r"optim.server_momentum must be a number in \[0, 1\)"),
])
def test_bad_values_are_one_config_error(field, value, message):
  c = _tiny(**{"optim.estimator": "momentum", f"optim.{field}": value})
  with pytest.raises(train.ConfigError, match=message) as err:
    train.build(c)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("field, value", [("momentum_init", "zero"), ("dampening", 0.0)])
def test_momentum_options_with_another_estimator_are_refused(field, value):
  c = _tiny(**{"optim.estimator": "mu2sgd", f"optim.{field}": value})
  with pytest.raises(train.ConfigError, match="shape the momentum estimator"):
    train.build(c)


def _tiny(**overrides):
  c = default.get_config()
  c.num_steps, c.eval_every, c.progress = 4, 2, False
  c.workers.num, c.workers.byzantine, c.workers.batch_size = 5, 1, 4
  c.model.name, c.data.eval_batch_size = "mlp", 512
  for key, value in overrides.items():
    section, (*path, last) = c, key.split(".")
    for p in path:
      section = section[p]
    section[last] = value
  return c


def _rows(workdir):
  """The evaluation rows without their timings."""
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    rows = [json.loads(line) for line in fh]
  return [{k: v for k, v in r.items() if k not in ("wall_time", "steps_per_sec")} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {"optim.estimator": "momentum", "optim.momentum_init": "zero"},
    {"optim.estimator": "momentum", "optim.dampening": 0.0},
    {"optim.estimator": "momentum", "optim.server_momentum": 0.9},
    {"optim.estimator": "mu2sgd", "optim.server_momentum": 0.5},
])
def test_training_with_each_option_is_finite(overrides, tmp_path):
  train.train_and_evaluate(_tiny(**overrides), str(tmp_path))
  rows = _rows(str(tmp_path))
  assert [r["step"] for r in rows] == [0, 2, 4]  # eval_at_start: the initial model's row
  assert all(np.isfinite(r.get("train_loss", 0.0)) and np.isfinite(r["test_loss"]) for r in rows)


@pytest.mark.slow
def test_resume_restores_the_server_momentum(tmp_path):
  overrides = {"optim.estimator": "momentum", "optim.server_momentum": 0.9}
  full, parts = str(tmp_path / "full"), str(tmp_path / "parts")
  whole = train.train_and_evaluate(_tiny(**overrides), full)
  train.train_and_evaluate(_tiny(num_steps=2, **overrides), parts)
  resumed = train.train_and_evaluate(_tiny(**overrides), parts)  # resumes at step 2
  assert _rows(full) == _rows(parts)
  traces = [r.state.server_state[0] for r in (whole, resumed)]
  assert all(isinstance(t, optax.TraceState) for t in traces)
  for a, b in zip(jax.tree.leaves(traces[0]), jax.tree.leaves(traces[1])):
    np.testing.assert_array_equal(a, b)
  assert float(optax.tree.norm(traces[0].trace)) > 0
