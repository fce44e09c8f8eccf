"""Federated settings: local steps, client sampling, data over the honest workers only."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import build as build_lib
from ftjax import federated
from ftjax import round as round_lib
from ftjax import round_data
from ftjax import train
from test_train import tiny_config


class Linear(nn.Module):
  """Softmax regression: logits = flatten(x) W + b."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(self.num_classes, param_dtype=x.dtype, dtype=x.dtype)(
        x.reshape((x.shape[0], -1)))


def _linear_grads(w, b, x, y):
  """NumPy gradient of the mean softmax cross-entropy of x @ w + b."""
  z = x @ w + b
  z = z - z.max(1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  p /= len(y)
  return x.T @ p, p.sum(0)


def _clip(gw, gb, max_norm):
  norm = np.sqrt((gw ** 2).sum() + (gb ** 2).sum())
  scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
  return gw * scale, gb * scale


def _fedavg_numpy(params, x, y, k, local_lr, clip, server_lr, send):
  """One FedAvg round over every worker, written out in NumPy."""
  w0, b0 = np.asarray(params["Dense_0"]["kernel"]), np.asarray(params["Dense_0"]["bias"])
  sent_w, sent_b = [], []
  for worker in range(x.shape[0]):
    w, b, tw, tb = w0.copy(), b0.copy(), 0.0, 0.0
    for step in range(k):
      xs = np.asarray(x[worker, step]).reshape(x.shape[2], -1)
      gw, gb = _clip(*_linear_grads(w, b, xs, np.asarray(y[worker, step])), clip)
      w, b, tw, tb = w - local_lr * gw, b - local_lr * gb, tw + gw, tb + gb
    if send == "model_change":
      sent_w.append(w0 - w), sent_b.append(b0 - b)
    else:
      sent_w.append(tw / k), sent_b.append(tb / k)
  return w0 - server_lr * np.mean(sent_w, 0), b0 - server_lr * np.mean(sent_b, 0)


def _fedavg_config(**overrides):
  return tiny_config(**{"workers.byzantine": 0, "aggregator.name": "avg",
                        "aggregator.meta": "none", "attack.name": "none",
                        "optim.estimator": "sgd", "optim.clip": 0.5, "dtype": "float64",
                        "federated.local_steps": 3, "federated.local_lr": 0.05, **overrides})


@pytest.mark.parametrize("send", ["pseudo_gradient", "model_change"])
def test_local_steps_equal_a_numpy_fedavg_of_a_linear_model(send):
  with jax.enable_x64(True):
    c = _fedavg_config(**{"federated.send": send})
    setup = train.build(c, model=Linear())
    state = train.init_state(setup, c.seed)
    data = train.make_device_data(setup)
    idx = round_lib.sample_chunk(setup, state, data, 1)[0]
    assert idx.shape == (5, 3 * 4)  # W workers, K minibatches of b
    x, y = round_data.minibatches(setup, state, data, idx)
    new_state, _ = jax.jit(train.make_round(setup))(state, data, idx)
    want_w, want_b = _fedavg_numpy(state.params, x, y, 3, 0.05, 0.5, c.optim.lr, send)
  np.testing.assert_allclose(new_state.params["Dense_0"]["kernel"], want_w, rtol=0, atol=1e-13)
  np.testing.assert_allclose(new_state.params["Dense_0"]["bias"], want_b, rtol=0, atol=1e-13)


@pytest.mark.slow
def test_one_local_step_is_the_papers_round():
  """K = 1 through the local-steps path equals the synchronous round (float64)."""
  with jax.enable_x64(True):
    c = tiny_config(**{"dtype": "float64", "optim.estimator": "momentum", "attack.name": "sf"})
    setup = train.build(c)
    state = train.init_state(setup, c.seed)
    data = train.make_device_data(setup)
    x, y = round_data.minibatches(setup, state, data,
                                  round_lib.sample_chunk(setup, state, data, 1)[0])
    shared = (state.params, state.batch_stats, None)
    plain = round_lib.make_local_updates(setup, local_steps=False)(
        shared, (x, y, state.worker_state, round_lib.model_keys(setup, state)))
    local = round_lib.make_local_updates(setup, local_steps=True)(
        shared, (x[:, None], y[:, None], state.worker_state, round_lib.model_keys(setup, state)))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(local)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_every_worker_drawn_is_the_full_round():
  with jax.enable_x64(True):
    c = tiny_config(**{"dtype": "float64", "optim.estimator": "momentum", "model.name": "mlp"})
    setup = train.build(c)
    drawn_all = dataclasses.replace(
        setup, federated=federated.Federated(participants=setup.num_workers))
    state = train.init_state(setup, c.seed)
    data = train.make_device_data(setup)
    want, _ = jax.jit(train.make_round(setup))(state, data)
    got, metrics = jax.jit(train.make_round(drawn_all))(state, data)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(metrics["sampled_byzantine"]) == setup.num_byzantine


@pytest.mark.slow
def test_client_sampling_averages_the_drawn_rows_and_keeps_the_others_state():
  with jax.enable_x64(True):
    c = tiny_config(**{"dtype": "float64", "workers.num": 6, "workers.byzantine": 0,
                       "aggregator.name": "avg", "aggregator.meta": "none",
                       "attack.name": "none", "optim.estimator": "momentum",
                       "federated.participants": 3, "model.name": "mlp"})
    setup = train.build(c)
    state = train.init_state(setup, c.seed)
    data = train.make_device_data(setup)
    # A state whose momentum is nonzero, so that "kept" differs from "updated".
    state = state._replace(worker_state=jax.tree.map(
        lambda a: a + 0.01 * jnp.arange(6.0).reshape((6,) + (1,) * (a.ndim - 1))
        if a.dtype == jnp.float64 else a, state.worker_state))
    idx = round_lib.sample_chunk(setup, state, data, 1)[0]
    x, y = round_data.minibatches(setup, state, data, idx)
    rows, _, updated = round_lib.make_local_updates(setup)(
        (state.params, state.batch_stats, None),
        (x, y, state.worker_state, round_lib.model_keys(setup, state)))
    new_state, metrics = jax.jit(train.make_round(setup))(state, data, idx)
    drawn = np.asarray(federated.draw_participants(jax.random.fold_in(
        round_lib.purpose_key(state, build_lib.KEY_PARTICIPANTS), 0), 6, 3))
  assert len(set(drawn.tolist())) == 3
  for p, r, q in zip(jax.tree.leaves(state.params), jax.tree.leaves(rows),
                     jax.tree.leaves(new_state.params)):
    np.testing.assert_allclose(q, np.asarray(p) - c.optim.lr * np.asarray(r)[drawn].mean(0),
                               atol=1e-13)
  others = np.setdiff1d(np.arange(6), drawn)
  for old, new, upd in zip(jax.tree.leaves(state.worker_state),
                           jax.tree.leaves(new_state.worker_state), jax.tree.leaves(updated)):
    np.testing.assert_array_equal(np.asarray(new)[others], np.asarray(old)[others])
    np.testing.assert_allclose(np.asarray(new)[drawn], np.asarray(upd)[drawn], atol=1e-15)
  assert float(metrics["sampled_byzantine"]) == 0.0


def test_draws_are_distinct_sorted_and_cover_the_workers():
  seen = set()
  for i in range(200):
    drawn = np.asarray(federated.draw_participants(jax.random.key(i), 10, 4))
    assert len(set(drawn.tolist())) == 4 and np.all(np.diff(drawn) > 0)
    assert drawn.min() >= 0 and drawn.max() < 10
    seen.update(drawn.tolist())
  assert seen == set(range(10))


@pytest.mark.parametrize("declared,f,w,m,want", [
    (None, 8, 17, 9, 5),   # 8 * 9 / 17 = 4.24 -> 5
    (None, 4, 17, 9, 3),   # 2.12 -> 3
    (None, 3, 12, 4, 1),   # exactly 1
    (2, 8, 17, 9, 2),      # aggregator.f wins
])
def test_sampled_f(declared, f, w, m, want):
  assert federated.sampled_f(declared, f, w, m) == want


def test_honest_only_splits_the_data_over_the_honest_workers():
  c = tiny_config(**{"data.honest_only": True, "data.partition": "iid_split",
                     "attack.name": "alie"})
  setup = train.build(c)
  assert setup.partition.table.shape[0] == setup.num_honest == 4
  assert int(setup.partition.sizes.sum()) == setup.dataset.train_images.shape[0]
  assert setup.num_computed == setup.num_honest


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_honest_only_byzantine_workers_on_data_draw_from_the_whole_split(partition):
  c = tiny_config(**{"data.honest_only": True, "data.partition": partition,
                     "attack.name": "sf", "federated.local_steps": 2,
                     "optim.estimator": "momentum"})
  setup = train.build(c)
  assert setup.num_computed == 5
  state = train.init_state(setup, c.seed)
  data = train.make_device_data(setup)
  idx = np.asarray(round_lib.sample_chunk(setup, state, data, 3))
  assert idx.shape == (3, 5, 2 * 4)
  n = setup.dataset.train_images.shape[0]
  assert idx.min() >= 0 and idx.max() < n
  if partition == "dirichlet":  # the honest workers sample from their own shards
    for w in range(4):
      shard = set(setup.partition.table[w, :setup.partition.sizes[w]].tolist())
      assert set(idx[:, w].ravel().tolist()) <= shard


@pytest.mark.parametrize("overrides,words", [
    ({"federated.local_steps": 2}, "mu2sgd"),
    ({"federated.local_steps": 0}, "local_steps"),
    ({"federated.local_lr": -1.0}, "local_lr"),
    ({"federated.send": "weights"}, "federated.send"),
    ({"federated.participants": 9}, "participants"),
    ({"federated.participants": 3, "attack.name": "optimal_ipm"}, "participants"),
    ({"federated.participants": 2, "workers.num": 9, "workers.byzantine": 4}, "rows"),
])
def test_bad_federated_settings_are_refused_in_one_line(overrides, words):
  with pytest.raises(train.ConfigError, match=words) as e:
    train.build(tiny_config(**overrides))
  assert "\n" not in str(e.value)


# --------------------------------------------------------------------------
# Rules that keep state across rounds


def _centered_clipping_numpy(rounds, tau, iters):
  """Karimireddy, He & Jaggi (2021): v <- v + mean_i clip_tau(x_i - v), from the last aggregate."""
  v, out = np.zeros(rounds[0].shape[1]), []
  for x in rounds:
    for _ in range(iters):
      d = x - v
      norms = np.linalg.norm(d, axis=1)
      v = v + np.mean(d * np.minimum(1.0, tau / norms)[:, None], axis=0)
    out.append(v.copy())
  return out


@pytest.mark.parametrize("tau,iters", [(0.5, 1), (2.0, 3)])
def test_centred_clipping_on_the_previous_aggregate_matches_numpy_over_five_rounds(tau, iters):
  from ftjax import aggregators
  rng = np.random.default_rng(0)
  rounds = [rng.normal(1.0, 1.0, (7, 5)) for _ in range(5)]
  agg = aggregators.centered_clipping(tau=tau, iters=iters, init="previous", f=2)
  assert agg.stateful and not aggregators.centered_clipping(f=2).stateful
  with jax.enable_x64(True):
    state = agg.init_state(jnp.zeros(5))
    step = jax.jit(agg.update)
    got = []
    for x in rounds:
      out, _, state = step(jnp.asarray(x), None, state)
      got.append(np.asarray(out))
  for g, w in zip(got, _centered_clipping_numpy(rounds, tau, iters)):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-13)


def test_a_stateful_rule_is_the_outermost_one():
  from ftjax import aggregators
  with pytest.raises(ValueError, match="outermost"):
    aggregators.make_aggregator("ctma(centered_clipping)", 2, num_workers=9,
                                options={"centered_clipping": {"init": "previous"}})


def test_a_users_stateful_rule_trains_and_carries_its_state():
  from ftjax import aggregators

  def running_mean_state(row_like):
    return {"sum": jax.tree.map(lambda l: jnp.zeros(l.shape, l.dtype), row_like),
            "count": jnp.zeros([], jnp.int32)}

  @aggregators.register(name="test_running_mean", state=lambda row, **o: running_mean_state(row))
  def test_running_mean(updates, key, *, f, state=None):
    """The mean of every round's mean so far."""
    del key, f
    total = jax.tree.map(lambda s, u: s + u.mean(0), state["sum"], updates)
    count = state["count"] + 1
    return jax.tree.map(lambda t: t / count, total), {}, {"sum": total, "count": count}

  try:
    c = tiny_config(**{"aggregator.name": "test_running_mean", "aggregator.meta": "none",
                       "num_steps": 2, "eval_every": 2})
    setup = train.build(c)
    state = train.init_state(setup, c.seed)
    data = train.make_device_data(setup)
    state, metrics = train.make_chunk_fn(setup)(state, data, 2).run(state, data)
    assert int(state.aggregator_state["count"]) == 2
    assert bool(metrics["finite"])
  finally:
    aggregators.AGGREGATORS.pop("test_running_mean")


@pytest.mark.slow
def test_a_resumed_stateful_run_equals_the_uninterrupted_one(tmp_path):
  import json
  import os
  over = {"aggregator.name": "centered_clipping", "aggregator.meta": "none",
          "aggregator.options.centered_clipping": {"tau": 1.0, "iters": 2, "init": "previous"},
          "attack.name": "alie", "optim.estimator": "momentum"}

  def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
      return [json.loads(line) for line in fh]

  full, parts = str(tmp_path / "full"), str(tmp_path / "parts")
  train.train_and_evaluate(tiny_config(**over), full)
  train.train_and_evaluate(tiny_config(**over, num_steps=3), parts)
  train.train_and_evaluate(tiny_config(**over), parts)
  a, b = rows(full), rows(parts)
  assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 3, 6]
  for ra, rb in zip(a, b):
    for k in ("train_loss", "test_loss", "test_acc", "aggregate_norm"):
      assert ra.get(k) == rb.get(k), k


# --------------------------------------------------------------------------
# Weights


@pytest.mark.slow
def test_example_count_weights_reach_the_rule_and_equal_weights_change_nothing():
  common = {"dtype": "float64", "data.partition": "dirichlet", "data.alpha": 1.0,
            "aggregator.name": "cwtm", "aggregator.meta": "none", "optim.estimator": "sgd",
            "attack.name": "alie", "model.name": "mlp"}
  with jax.enable_x64(True):
    c = tiny_config(**common)
    setup = train.build(c)
    weighted = train.build(tiny_config(**common, **{"aggregator.weights": "examples"}))
    equal = train.build(tiny_config(**common, **{"aggregator.weights": [2.0] * 5}))
    state = train.init_state(setup, c.seed)
    data = train.make_device_data(setup)
    idx = round_lib.sample_chunk(setup, state, data, 1)[0]
    plain, _ = jax.jit(train.make_round(setup))(state, data, idx)
    same, _ = jax.jit(train.make_round(equal))(state, data, idx)
    by_size, _ = jax.jit(train.make_round(weighted))(state, data, idx)
    x, y = round_data.minibatches(setup, state, data, idx)
    rows, _, _ = round_lib.make_local_updates(setup)(
        (state.params, state.batch_stats, None),
        (x, y, state.worker_state, round_lib.model_keys(setup, state)))
    byz = setup.attack(jax.tree.map(lambda r: r[:4], rows), None, jax.random.fold_in(
        round_lib.purpose_key(state, build_lib.KEY_ATTACK), 0),
        round_lib._attack_context(setup))
    full = jax.tree.map(lambda r, z: jnp.concatenate([r[:4], z]), rows, byz)
    sizes = np.asarray(setup.partition.sizes, np.float64)
    want_agg, _ = setup.aggregator(full, None, weights=sizes)
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(same.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for p, g, q in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_agg),
                     jax.tree.leaves(by_size.params)):
    np.testing.assert_allclose(q, np.asarray(p) - c.optim.lr * np.asarray(g), atol=1e-13)
  assert len(set(sizes.tolist())) > 1  # the weights differ, so the weighted rule ran


@pytest.mark.parametrize("overrides,words", [
    ({"aggregator.weights": "sizes"}, "aggregator.weights"),
    ({"aggregator.weights": [1.0, 2.0]}, "5 finite nonnegative"),
    ({"aggregator.weights": "examples", "aggregator.name": "krum", "aggregator.meta": "none"},
     "weighted"),
])
def test_bad_weights_are_refused_in_one_line(overrides, words):
  with pytest.raises(train.ConfigError, match=words) as e:
    train.build(tiny_config(**overrides))
  assert "\n" not in str(e.value)


@pytest.mark.slow
def test_runs_sharing_programs_get_their_own_rules_state(tmp_path):
  """A stateless and a stateful cell in one program cache (a sweep) each start their own state."""
  from ftjax import loop
  programs = loop.ProgramCache()
  common = {"model.name": "mlp", "num_steps": 2, "eval_every": 2, "attack.name": "alie"}
  plain = tiny_config(**common, **{"aggregator.name": "cwtm", "aggregator.meta": "none"})
  stateful = tiny_config(**common, **{
      "aggregator.name": "centered_clipping", "aggregator.meta": "none",
      "aggregator.options.centered_clipping": {"tau": 1.0, "iters": 1, "init": "previous"}})
  for i, c in enumerate((plain, stateful)):
    [result] = train.train_runs([c], [str(tmp_path / str(i))], programs=programs)
    assert result.error is None and result.metrics["step"] == 2
  assert jax.tree.leaves(result.state.aggregator_state)  # the previous aggregate


_LAYOUTS = """
import json, sys
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
from ftjax import train
from tests.test_train import tiny_config

out = {}
for devices, layout in ((1, "replicated"), (0, "replicated"), (0, "sharded")):
  c = tiny_config(**{"dtype": "float64", "model.name": "mlp", "devices": devices,
                     "mesh.aggregation": layout, "num_steps": 3, "eval_every": 3,
                     "optim.estimator": "momentum", "attack.name": "sf",
                     "federated.local_steps": 2, "federated.participants": 4,
                     "data.honest_only": True, "data.partition": "dirichlet"})
  setup = train.build(c)
  state = train.init_state(setup, c.seed)
  data = train.make_device_data(setup)
  state, metrics = train.make_chunk_fn(setup)(state, data, 3).run(state, data)
  out[f"{devices}|{layout}"] = [np.asarray(p).ravel().tolist()
                                for p in jax.tree.leaves(state.params)]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_federated_rounds_are_equal_in_every_device_layout():
  import json
  import os
  import subprocess
  import sys
  from tests.subprocess_env import with_devices
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=with_devices(3))
  proc = subprocess.run([sys.executable, "-c", _LAYOUTS], capture_output=True, text=True,
                        cwd=root, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT ", 1)[1])
  one = out.pop("1|replicated")
  for name, params in out.items():
    for a, b in zip(one, params):
      np.testing.assert_allclose(b, a, rtol=0, atol=1e-10, err_msg=name)
