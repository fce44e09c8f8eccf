"""Worker estimators and server transforms against hand-computed sequences."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ftjax import estimators
from ftjax import optim


def _optim_config(**overrides):
  c = ml_collections.ConfigDict(dict(
      estimator="mu2sgd", lr=0.1, momentum=0.9, beta_schedule="1/t",
      gamma_schedule="anytime", gamma=0.1, clip=2.0, weight_decay=0.0,
      reference_rounding=False))
  c.update(overrides)
  return c


def test_momentum_hand_computed():
  tx = estimators.momentum(beta=0.5)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  outs = []
  for g in ([1.0, -2.0], [3.0, 0.0], [-1.0, 4.0]):
    u, state = tx.update({"w": jnp.array(g)}, state)
    outs.append(np.asarray(u["w"]))
  # m1 = g1; m2 = .5 m1 + .5 g2; m3 = .5 m2 + .5 g3
  np.testing.assert_allclose(outs, [[1, -2], [2, -1], [0.5, 1.5]])
  assert int(state.count) == 3


def test_sgd_is_identity():
  tx = estimators.sgd()
  state = tx.init({"w": jnp.zeros(3)})
  g = {"w": jnp.array([1.0, 2.0, 3.0])}
  u, state = tx.update(g, state)
  np.testing.assert_array_equal(u["w"], g["w"])


@pytest.mark.parametrize("beta", [None, 0.3, 0.9])
def test_mu2sgd_noise_free_tracks_true_gradient(beta):
  # With noise-free gradients of f(x) = 0.5 x^T A x, d_t = A x_t exactly for any beta.
  a = jnp.array([[2.0, 0.5], [0.5, 1.0]])
  grad = lambda x: a @ x
  tx = estimators.mu2sgd(beta=beta)
  xs = jax.random.normal(jax.random.key(0), (8, 2))
  state = tx.init(xs[0])
  prev = xs[0]
  for x in xs:
    d, state = tx.update(grad(x), state, prev_grads=grad(prev))
    np.testing.assert_allclose(d, grad(x), rtol=1e-5, atol=1e-6)
    prev = x


def test_mu2sgd_recursion_with_noise():
  tx = estimators.mu2sgd(beta=None)
  state = tx.init(jnp.zeros(1))
  g = [jnp.array([1.0]), jnp.array([4.0]), jnp.array([2.0])]
  gp = [jnp.array([9.0]), jnp.array([3.0]), jnp.array([5.0])]
  d1, state = tx.update(g[0], state, prev_grads=gp[0])
  d2, state = tx.update(g[1], state, prev_grads=gp[1])
  d3, state = tx.update(g[2], state, prev_grads=gp[2])
  assert float(d1[0]) == 1.0  # d_1 = g_1, prev ignored
  np.testing.assert_allclose(d2, 4.0 + 0.5 * (1.0 - 3.0))          # beta_2 = 1/2
  np.testing.assert_allclose(d3, 2.0 + (2 / 3) * (float(d2[0]) - 5.0), rtol=1e-6)


def test_mu2sgd_beta_one_is_sgd():
  tx = estimators.mu2sgd(beta=1.0)
  state = tx.init(jnp.zeros(2))
  for i in range(4):
    g = jnp.array([i, -i], jnp.float32) + 0.5
    d, state = tx.update(g, state, prev_grads=g * 7)
    np.testing.assert_array_equal(d, g)


def test_mu2sgd_requires_prev_grads():
  tx = estimators.mu2sgd()
  with pytest.raises(ValueError, match="prev_grads"):
    tx.update(jnp.zeros(1), tx.init(jnp.zeros(1)))


def test_reference_rounding_of_beta():
  ts = jnp.arange(1, 201)
  got = np.asarray(estimators.mu2sgd_beta(ts, None, reference_rounding=True))
  want = np.maximum(np.round(1.0 / np.arange(1, 201), 3), 0.01)
  np.testing.assert_allclose(got, want, atol=1e-7)
  assert got[2] == pytest.approx(0.333) and got[199] == pytest.approx(0.01)


def test_clip_by_global_norm():
  tree = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}  # norm 5
  clipped = estimators.clip_by_global_norm(tree, 2.0)
  assert float(optax.tree.norm(clipped)) == pytest.approx(2.0)
  np.testing.assert_allclose(clipped["a"], [1.2, 0.0])
  same = estimators.clip_by_global_norm(tree, 10.0)
  np.testing.assert_array_equal(same["b"], tree["b"])
  zero = estimators.clip_by_global_norm({"a": jnp.zeros(3)}, 1.0)
  assert np.all(np.isfinite(zero["a"]))
  assert estimators.clip_by_global_norm(tree, None) is tree


def test_make_estimator_names():
  for name in estimators.ESTIMATOR_NAMES:
    estimators.make_estimator(_optim_config(estimator=name))
  with pytest.raises(ValueError, match="valid names: sgd, momentum, mu2sgd"):
    estimators.make_estimator(_optim_config(estimator="adam"))


def _run_server(config, aggregates, x0):
  tx = optim.make_server_optimizer(config)
  state = tx.init(x0)
  x = x0
  xs = [x]
  for a in aggregates:
    u, state = tx.update(a, state, x)
    x = optax.apply_updates(x, u)
    xs.append(x)
  return xs, state


def test_anytime_average_is_alpha_weighted_average_of_iterates():
  c = _optim_config()
  aggregates = list(jax.random.normal(jax.random.key(1), (6, 3)))
  x0 = jnp.array([1.0, -1.0, 0.5])
  xs, _ = _run_server(c, aggregates, x0)
  ws = [x0]
  for a in aggregates:
    ws.append(ws[-1] - c.lr * a)
  for t in range(1, len(aggregates) + 1):
    # After t server steps, x is the average of w_2..w_{t+1} with weights alpha_s = s.
    weights = np.arange(1, t + 1, dtype=np.float64)
    want = sum(wt * np.asarray(ws[s]) for wt, s in zip(weights, range(1, t + 1)))
    want = want / weights.sum()
    np.testing.assert_allclose(xs[t], want, rtol=1e-5, atol=1e-6)


def test_fixed_gamma_and_weight_decay():
  c = _optim_config(gamma_schedule="fixed", gamma=0.25, weight_decay=0.01)
  aggregates = [jnp.array([1.0, 2.0]), jnp.array([-3.0, 0.5])]
  x0 = jnp.array([0.5, 0.5])
  xs, _ = _run_server(c, aggregates, x0)
  w, x = np.asarray(x0), np.asarray(x0)
  for a in aggregates:
    w = w - c.lr * (np.asarray(a) + c.weight_decay * x)
    x = 0.75 * x + 0.25 * w
  np.testing.assert_allclose(xs[-1], x, rtol=1e-6)


def test_reference_rounding_of_gamma():
  g = optim.anytime_gamma(jnp.asarray(300), jnp.asarray(300 * 301 / 2.0), None, True)
  assert float(g) == pytest.approx(0.01)  # 2/301 = 0.00664 -> floored at 0.01
  g = optim.anytime_gamma(jnp.asarray(2), jnp.asarray(3.0), None, True)
  assert float(g) == pytest.approx(0.667)


@pytest.mark.parametrize("estimator", ["sgd", "momentum"])
def test_plain_sgd_server_without_anytime(estimator):
  c = _optim_config(estimator=estimator)
  xs, _ = _run_server(c, [jnp.array([1.0]), jnp.array([2.0])], jnp.array([0.0]))
  np.testing.assert_allclose(xs[-1], [-0.3], rtol=1e-6)


def test_bad_server_settings():
  for lr in (0.0, -0.1, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="lr must be a positive number"):
      optim.make_server_optimizer(_optim_config(lr=lr))
  with pytest.raises(ValueError, match="gamma_schedule"):
    optim.make_server_optimizer(_optim_config(gamma_schedule="cosine"))


@pytest.mark.parametrize("estimator, schedule", [("momentum", "1/t"), ("mu2sgd", "fixed")])
@pytest.mark.parametrize("beta", [1.5, -0.1, float("nan")])
def test_momentum_weight_outside_0_1_is_refused(estimator, schedule, beta):
  with pytest.raises(ValueError, match=r"optim.momentum is a weight in \[0, 1\]"):
    estimators.make_estimator(_optim_config(estimator=estimator, beta_schedule=schedule,
                                            momentum=beta))
