"""FLTrust: the rule against a NumPy version of the paper's formula, and the server's examples
and update in the round (data.server_examples)."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import aggregators
from ftjax import build as build_lib
from ftjax import round as round_lib
from ftjax import sampling
from ftjax import train
from subprocess_env import with_devices
from test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_fltrust(rows: np.ndarray, g0: np.ndarray) -> np.ndarray:
  """Cao et al. (2021): sum_i ReLU(cos(g_i, g0)) |g0|/|g_i| g_i / sum_i ReLU(cos(g_i, g0));
  a non-finite or zero row scores 0; no positive score: 0."""
  out, total = np.zeros_like(g0), 0.0
  n0 = np.linalg.norm(g0)
  for g in rows:
    if not np.all(np.isfinite(g)) or np.linalg.norm(g) == 0 or n0 == 0:
      continue
    score = max(0.0, float(g @ g0) / (np.linalg.norm(g) * n0))
    out += score * n0 / np.linalg.norm(g) * g
    total += score
  return out / total if total > 0 else out


def _split(flat, shapes):
  out, start = {}, 0
  for name, shape in shapes.items():
    size = int(np.prod(shape))
    out[name] = flat[..., start:start + size].reshape(flat.shape[:-1] + shape)
    start += size
  return out


SHAPES = {"a": (3, 2), "b": (5,)}


def _rows(seed=0, w=7):
  rng = np.random.default_rng(seed)
  g0 = rng.normal(size=11)
  rows = rng.normal(size=(w, 11)) + 0.5 * g0
  rows[1] = -3.0 * g0           # opposite: score 0
  rows[2, 4] = np.nan           # non-finite: score 0
  rows[3] = 0.0                 # no direction: score 0
  rows[4] *= 100.0              # large: rescaled to |g0|
  rows[5, 0] = -np.inf          # non-finite: score 0
  return rows, g0


def test_fltrust_equals_the_numpy_formula_float64():
  rows, g0 = _rows()
  with jax.enable_x64(True):
    rule = aggregators.make_aggregator("fltrust", 2, num_workers=7)
    got, diag = jax.jit(lambda x, s: rule(x, None, server=s))(
        _split(jnp.asarray(rows), SHAPES), _split(jnp.asarray(g0), SHAPES))
    flat = np.concatenate([np.asarray(got[k]).reshape(-1) for k in SHAPES])
  np.testing.assert_allclose(flat, numpy_fltrust(rows, g0), rtol=1e-12, atol=1e-14)
  with np.errstate(invalid="ignore"):
    positive = (np.nan_to_num(rows, nan=0.0, neginf=0.0) @ g0 > 0) & np.isfinite(rows).all(1)
  assert np.asarray(diag["fltrust_used"]).tolist() == positive.tolist()
  assert positive.tolist()[:6] == [True, False, False, False, True, False]


def test_fltrust_is_zero_when_no_row_scores_and_permutation_invariant():
  rows, g0 = _rows(1)
  with jax.enable_x64(True):
    rule = aggregators.make_aggregator("fltrust", 0, num_workers=7)
    server = _split(jnp.asarray(g0), SHAPES)
    away, _ = rule(_split(jnp.asarray(-np.abs(rows[:, :1]) * g0), SHAPES), None, server=server)
    assert all(np.all(np.asarray(v) == 0) for v in away.values())
    zero_server, _ = rule(_split(jnp.asarray(rows), SHAPES), None,
                          server=_split(jnp.zeros(11), SHAPES))
    assert all(np.all(np.asarray(v) == 0) for v in zero_server.values())
    perm = np.random.default_rng(0).permutation(7)
    a, _ = rule(_split(jnp.asarray(rows), SHAPES), None, server=server)
    b, _ = rule(_split(jnp.asarray(rows[perm]), SHAPES), None, server=server)
    for k in SHAPES:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-12)
    # vmap over a batch of row sets, each with its own server update
    batched = jax.vmap(lambda x, s: rule(x, None, server=s)[0])(
        _split(jnp.asarray(np.stack([rows, rows[perm]])), SHAPES),
        _split(jnp.asarray(np.stack([g0, -g0])), SHAPES))
    flat = np.concatenate([np.asarray(batched[k]).reshape(2, -1) for k in SHAPES], axis=1)
    np.testing.assert_allclose(flat[0], numpy_fltrust(rows, g0), rtol=1e-12)
    np.testing.assert_allclose(flat[1], numpy_fltrust(rows[perm], -g0), rtol=1e-12)


def test_fltrust_needs_the_server_update():
  rule = aggregators.make_aggregator("ctma(fltrust)", 1, num_workers=5)
  assert rule.needs_server and not aggregators.make_aggregator("cwtm", 1).needs_server
  with pytest.raises(ValueError, match="server="):
    rule({"a": jnp.ones((5, 2))}, None)
  with pytest.raises(ValueError, match=r"shaped like one row.*got \[\(3,\)\]"):
    rule({"a": jnp.ones((5, 2))}, None, server={"a": jnp.ones((3,))})


def _config(**more):
  return tiny_config(**{"aggregator.name": "fltrust", "aggregator.meta": "none",
                        "data.server_examples": 30, "model.name": "mlp", **more})


@pytest.mark.parametrize("overrides, match", [
    ({"data.server_examples": 0}, "data.server_examples > 0"),
    ({"data.server_examples": -1}, "data.server_examples must be an integer >= 0"),
    ({"data.server_examples": 5000}, "leaves no training examples"),
    ({"data.server_examples": 1430}, "less the server's 1430"),
    ({"federated.local_steps": 2, "optim.estimator": "sgd"}, "local_steps = 1"),
    ({"aggregator.weights": "examples", "data.partition": "dirichlet"}, "weights"),
])
def test_bad_server_configs_are_refused_in_one_line(overrides, match):
  with pytest.raises(build_lib.ConfigError, match=match) as e:
    train.build(_config(**overrides))
  assert "\n" not in str(e.value)


def test_server_examples_without_fltrust_are_set_aside_all_the_same():
  setup = train.build(_config(**{"aggregator.name": "cwtm", "data.partition": "dirichlet"}))
  assert setup.server_examples == 30 and not setup.aggregator.needs_server
  n = setup.dataset.train_images.shape[0]
  key = jax.random.fold_in(jax.random.key(setup.seed), build_lib.KEY_DATA)
  server = np.asarray(sampling.set_aside(key, jnp.arange(30), n))
  table = setup.partition.table
  shards = table[table >= 0]
  # The workers' shards and the server's examples split the train split between them.
  assert np.intersect1d(shards, server).size == 0
  assert np.array_equal(np.sort(np.concatenate([shards, server])), np.arange(n))


def test_round_one_aggregate_is_fltrust_of_the_rows_and_the_server_gradient():
  """A tiny run (float64): the first step equals x_0 - lr * FLTrust(rows, g0) in NumPy, with
  the rows and g0 differentiated here on the examples the round's samplers give."""
  c = _config(**{"dtype": "float64", "optim.estimator": "sgd", "optim.clip": None,
                 "attack.name": "sf", "num_steps": 1, "eval_every": 1})
  with jax.enable_x64(True):
    setup = train.build(c)
    state = train.init_state(setup, c.seed)
    data = round_lib.make_device_data(setup)
    idx = np.asarray(round_lib.sample_chunk(setup, state, data, 1)[0])
    n = setup.dataset.train_images.shape[0]
    server_idx = np.asarray(sampling.set_aside(
        round_lib.purpose_key(state, build_lib.KEY_DATA), jnp.arange(30), n))
    assert np.intersect1d(idx, server_idx).size == 0 and len(set(server_idx.tolist())) == 30
    ds = setup.dataset

    def grad(examples):
      x = (jnp.asarray(ds.train_images[examples], jnp.float64) / 255 - ds.mean[0]) / ds.std[0]
      y = jnp.asarray(ds.train_labels[examples])

      def loss(p):
        logits = setup.model.apply({"params": p}, x, train=True)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
      leaves = jax.tree.leaves(jax.grad(loss)(state.params))
      return np.concatenate([np.asarray(l).reshape(-1) for l in leaves])

    rows = np.stack([grad(i) for i in idx])
    rows[-1] = -rows[-1]  # sign flipping: the Byzantine worker sends its gradient negated
    want = np.concatenate([np.asarray(l).reshape(-1) for l in jax.tree.leaves(state.params)]) \
        - c.optim.lr * numpy_fltrust(rows, grad(server_idx))
    new_state, metrics = jax.jit(train.make_round(setup))(state, data, jnp.asarray(idx))
    got = np.concatenate([np.asarray(l).reshape(-1) for l in jax.tree.leaves(new_state.params)])
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  assert float(metrics["fltrust_used_byzantine"]) == 0.0


_SHARDED = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    import jax, numpy as np
    from test_train import tiny_config
    from ftjax import train
    c = tiny_config(**{"aggregator.name": "fltrust", "aggregator.meta": "none",
                       "data.server_examples": 30, "model.name": "mlp", "devices": 2,
                       "mesh.aggregation": "sharded"})
    try:
      train.build(c)
    except train.ConfigError as e:
      print("REFUSED " + str(e))
    c.mesh.aggregation = "replicated"
    setup = train.build(c)
    state = train.place(setup, train.init_state(setup, c.seed))
    data = train.place(setup, train.make_device_data(setup))
    state, metrics = jax.jit(train.make_round(setup))(state, data)
    print("FINITE", all(bool(np.isfinite(l).all()) for l in jax.tree.leaves(state.params)))
""")


@pytest.mark.slow
def test_sharded_layout_is_refused_and_replicated_runs():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=with_devices(2))
  proc = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  refused = [l for l in proc.stdout.splitlines() if l.startswith("REFUSED ")]
  assert refused and "mesh.aggregation='replicated'" in refused[0]
  assert "FINITE True" in proc.stdout
