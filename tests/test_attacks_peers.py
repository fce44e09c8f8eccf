"""The peers' attacks (ftjax/attacks_peers.py) against plain-NumPy versions of their papers' formulas.

fang_krum, fang_trmean, mimic, signguard_adaptive and clipped_clustering_adaptive:
golden values from NumPy written here (random values taken from ``attack.draw``),
the properties each definition promises, jit and vmap, degenerate and NaN inputs, the
library's rules they are written against, training rounds, and the device layouts.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.cluster.hierarchy

from ftjax import attacks
from ftjax.attacks import AttackContext, make_attack
from tests.subprocess_env import with_devices

PEERS = ("fang_krum", "fang_trmean", "mimic", "signguard_adaptive",
         "clipped_clustering_adaptive")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat(tree):
  """[n, d] float64: the rows of a pytree, leaves concatenated in jax.tree.leaves order."""
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.asarray(l, np.float64).reshape(l.shape[0], -1) for l in leaves], 1)


def honest_tree(h, seed, base=0.3, spread=1.0):
  rng = np.random.default_rng(seed)
  return {"conv": jnp.asarray(base + spread * rng.normal(size=(h, 2, 3))),
          "dense": jnp.asarray(-base + spread * rng.normal(size=(h, 5)))}


def first_row_agg(updates, key):
  """A server that returns honest row 0 whatever it gets."""
  del key
  return jax.tree.map(lambda x: x[0], updates), {}


def nan_agg(updates, key):
  del key
  return jax.tree.map(lambda x: jnp.full(x.shape[1:], jnp.nan, x.dtype), updates), {}


@functools.lru_cache(maxsize=None)
def paper_krum(f):
  """Krum as Blanchard et al. define it (n - f - 2 nearest squared distances), written here."""
  def agg(updates, key):
    del key
    x = jnp.concatenate([l.reshape(l.shape[0], -1) for l in jax.tree.leaves(updates)], 1)
    n = x.shape[0]
    d2 = jnp.sum((x[:, None] - x[None]) ** 2, -1) + jnp.diag(jnp.full(n, jnp.inf))
    i = jnp.argmin(jnp.sum(jnp.sort(d2, 1)[:, :n - f - 2], 1))
    return jax.tree.map(lambda l: l[i], updates), {}
  return agg


@functools.lru_cache(maxsize=None)
def _jitted(name, options, f, aggregator):
  """One compiled attack per (name, options, f, aggregator): calls on new values reuse it."""
  attack = make_attack(name, **dict(options))
  ctx = AttackContext(num_byzantine=f, aggregator=aggregator)
  return jax.jit(lambda h, k: attack(h, None, k, ctx))


def call(name, honest, f, aggregator=None, key=0, **options):
  fn = _jitted(name, tuple(sorted(options.items())), f, aggregator)
  return flat(fn(honest, jax.random.key(key)))


def drawn(name, honest, f, key=0, **options):
  """The random values the attack adds (the same ones the call above uses), as NumPy leaves."""
  attack = make_attack(name, **options)
  return jax.tree.map(np.asarray, attack.draw(honest, jax.random.key(key),
                                              AttackContext(num_byzantine=f)))


# --------------------------------------------------------------------------
# fang_krum


def np_krum_index(rows, f):
  n = len(rows)
  d2 = ((rows[:, None] - rows[None]) ** 2).sum(-1)
  return int(np.argmin([np.sort(np.delete(d2[i], i))[:n - f - 2].sum() for i in range(n)]))


def np_fang_krum(x, f, picks, threshold=1e-5, halvings=30):
  """Fang et al.'s Krum attack on [h, d] rows: lambda from Theorem 1's bound, halved.

  Returns (Byzantine rows, number of halvings made).
  """
  h, d = x.shape
  s = np.sign(x.mean(0))
  dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
  spread = min(np.sort(np.delete(dist[i], i))[:h - 2].sum() for i in range(h)) / (h - f - 1)
  lam = (spread + np.linalg.norm(x, axis=1).max()) / np.sqrt(d)
  for k in range(halvings + 1):
    byz = np.tile(-lam * s, (f, 1))
    if picks(np.concatenate([x, byz])) >= h or lam <= threshold or k == halvings:
      return byz, k
    lam /= 2


@pytest.mark.parametrize("h, f, seed, base, spread, halvings", [
    (9, 3, 0, 0.3, 1.0, 2), (12, 5, 1, 0.3, 0.3, 6), (7, 2, 0, 0.0, 0.05, 3)])
def test_fang_krum_golden_against_paper_krum(h, f, seed, base, spread, halvings):
  with jax.enable_x64(True):
    honest = honest_tree(h, seed, base=base, spread=spread)
    got = call("fang_krum", honest, f, aggregator=paper_krum(f))
  want, made = np_fang_krum(flat(honest), f, lambda rows: np_krum_index(rows, f))
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
  assert np_krum_index(np.concatenate([flat(honest), want]), f) >= h  # Krum picks it
  assert made == halvings  # the bound itself was too far: the search had to halve


def test_fang_krum_sends_the_last_lambda_when_no_row_is_ever_picked():
  with jax.enable_x64(True):
    honest = honest_tree(9, 3)
    for agg in (first_row_agg, nan_agg):  # a NaN aggregate never counts as a pick
      got = call("fang_krum", honest, 3, aggregator=agg)
      want, halvings = np_fang_krum(flat(honest), 3, lambda rows: 0)
      np.testing.assert_allclose(got, want, rtol=1e-12)
      assert 0 < np.abs(want).max() <= 1e-5 < 2 * np.abs(want).max()
    got = call("fang_krum", honest, 3, aggregator=first_row_agg, halvings=3, threshold=1e-9)
    want, halvings = np_fang_krum(flat(honest), 3, lambda rows: 0, threshold=1e-9, halvings=3)
    assert halvings == 3
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.slow
def test_fang_krum_with_the_library_krum_and_offsets():
  from ftjax.aggregators import make_aggregator
  h, f = 12, 5
  honest = honest_tree(h, 4)
  agg = make_aggregator("krum", f=f, num_workers=h + f)
  for epsilon in (0.0, 0.01):
    rows = call("fang_krum", honest, f, aggregator=agg, epsilon=epsilon)
    out, diag = agg({"x": jnp.asarray(np.concatenate([flat(honest), rows]), jnp.float32)},
                    jax.random.key(0))
    assert np.flatnonzero(diag["krum_selected"])[0] >= h
    # Rows 1..f-1 at distance epsilon from row 0, which is -lambda sign(mean).
    np.testing.assert_allclose(np.linalg.norm(rows[1:] - rows[0], axis=1), epsilon, atol=1e-6)
    s = np.sign(flat(honest).mean(0))
    lam = -rows[0] / s
    np.testing.assert_allclose(lam, lam[0], rtol=1e-6)
    assert lam[0] > 0


def test_fang_krum_bound_counts_only_nonzero_signs():
  from ftjax import attacks_peers
  x = flat(honest_tree(6, 5))
  x[:, 3] = 0.0  # a coordinate where the mean is exactly 0: sign 0
  s = np.sign(x.mean(0))
  dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
  spread = min(np.sort(np.delete(dist[i], i))[:4].sum() for i in range(6)) / (6 - 2 - 1)
  want = (spread + np.linalg.norm(x, axis=1).max()) / np.sqrt(x.shape[1] - 1)
  with jax.enable_x64(True):
    got = attacks_peers.fang_krum_bound({"x": jnp.asarray(x)}, {"x": jnp.asarray(s)}, 6, 2,
                                        jnp.float64)
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_fang_krum_refuses_too_many_byzantine_workers():
  with pytest.raises(ValueError, match=r"W >= 2f \+ 2.*W = 9, f = 4"):
    call("fang_krum", honest_tree(5, 0), 4, aggregator=first_row_agg)
  assert attacks.canonical_name("FangAttack") == "fang_krum"  # FLPoison's name
  attack = make_attack("fang_krum")  # the same check, for a caller that knows W and f first
  with pytest.raises(ValueError, match=r"W >= 2f \+ 2.*W = 5, f = 2"):
    attack.check_counts(5, 2)
  attack.check_counts(6, 2)
  attack.check_counts(3, 0)
  with pytest.raises(ValueError, match="at least 3 honest rows"):
    attack.check_counts(2, 0)
  with pytest.raises(ValueError, match="aggregator"):
    call("fang_krum", honest_tree(9, 0), 3)


# --------------------------------------------------------------------------
# fang_trmean


def np_fang_trmean(x, u, b):
  """Per coordinate j: s_j = sign(mean_j); values between w_max and b w_max (w_max > 0) or
  w_max / b (w_max <= 0) when s_j < 0, between w_min / b (w_min > 0) or b w_min (w_min <= 0)
  and w_min when s_j > 0; u = 0 at the lower end, as Blades draws them."""
  out = np.zeros_like(u)
  for j in range(x.shape[1]):
    s, hi, lo = np.sign(x[:, j].mean()), x[:, j].max(), x[:, j].min()
    if s < 0:
      a, c = (hi, b * hi) if hi > 0 else (hi, hi / b)
    elif s > 0:
      a, c = (lo / b, lo) if lo > 0 else (b * lo, lo)
    else:
      a = c = 0.0
    out[:, j] = a + u[:, j] * (c - a)
  return out


@pytest.mark.parametrize("b", [2.0, 1.0, 3.5])
def test_fang_trmean_golden(b):
  with jax.enable_x64(True):
    honest = honest_tree(7, 6, base=0.2, spread=0.5)
    honest["dense"] = honest["dense"].at[:, 0].set(0.0)  # a zero mean: sign 0, sends 0
    honest["dense"] = honest["dense"].at[:, 1].set(jnp.arange(7.0) - 1.0)  # mean > 0, min < 0
    got = call("fang_trmean", honest, 4, b=b)
    u = flat(drawn("fang_trmean", honest, 4, b=b))
    # The paper attacks the median with the same rows.
    assert make_attack("fang_median", b=b) == make_attack("fang_trmean", b=b)
  x = flat(honest)
  np.testing.assert_allclose(got, np_fang_trmean(x, u, b), rtol=1e-12, atol=1e-15)
  s = np.sign(x.mean(0))
  assert np.all(got[:, s > 0] <= x.min(0)[s > 0]) and np.all(got[:, s < 0] >= x.max(0)[s < 0])
  assert np.all(got[:, s == 0] == 0.0)
  if b > 1:
    assert not np.allclose(got[0], got[1])  # each Byzantine worker draws its own values


def test_fang_trmean_draws_are_uniform_and_the_option_is_checked():
  u = flat(drawn("fang_trmean", {"a": jnp.zeros((3, 20000))}, 2))
  assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
  with pytest.raises(ValueError, match="fang_trmean.b must be >= 1"):
    make_attack("fang_trmean", b=0.5)


# --------------------------------------------------------------------------
# mimic


def np_principal_row(x):
  centred = x - x.mean(0)
  z = np.linalg.svd(centred, full_matrices=False)[2][0]  # top right singular vector
  return int(np.argmax(np.abs(centred @ z)))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mimic_copies_the_principal_directions_row(seed):
  rng = np.random.default_rng(seed)
  h, d = 8, 11
  z = rng.normal(size=d)
  # Heterogeneous rows: one direction carries most of the spread.
  x = 0.5 + np.outer(rng.normal(size=h) * 3.0, z / np.linalg.norm(z)) + 0.3 * rng.normal(size=(h, d))
  with jax.enable_x64(True):
    honest = {"a": jnp.asarray(x[:, :4].reshape(h, 2, 2)), "b": jnp.asarray(x[:, 4:])}
    got = call("mimic", honest, 3)
    # index= keeps the fixed copy.
    np.testing.assert_array_equal(call("mimic", honest, 2, index=5), np.tile(x[5], (2, 1)))
  want = np_principal_row(x)
  np.testing.assert_array_equal(got, np.tile(x[want], (3, 1)))


def test_mimic_options_and_degenerate_rows():
  assert make_attack("mimic").options == (("index", None),)
  with pytest.raises(ValueError, match="only 4 honest rows.*None for the principal"):
    call("mimic", {"a": jnp.ones((4, 3))}, 1, index=4)
  # Identical rows: every row is as principal as any other; the copy is one of them.
  np.testing.assert_array_equal(call("mimic", {"a": jnp.full((4, 3), 2.0)}, 2),
                                np.full((2, 3), 2.0))


# --------------------------------------------------------------------------
# signguard_adaptive


def sign_fractions(row):
  return np.array([(row > 0).mean(), (row < 0).mean(), (row == 0).mean()])


@pytest.mark.parametrize("magnitude", ["uniform", "median_norm"])
def test_signguard_adaptive_golden(magnitude):
  honest = honest_tree(6, 7, base=0.1)
  honest["dense"] = honest["dense"].at[:, :2].set(0.0)  # two zero coordinates in the mean
  got = call("signguard_adaptive", honest, 3, magnitude=magnitude)
  draws = drawn("signguard_adaptive", honest, 3)
  rank = np.concatenate([d[0].ravel() for d in jax.tree.leaves(draws)])
  bits = np.concatenate([d[1].ravel() for d in jax.tree.leaves(draws)])
  x = flat(honest)
  mean = x.astype(np.float32).mean(0)
  pos, neg = int((mean > 0).sum()), int((mean < 0).sum())
  # Blades: pos values U[0, 1), neg values -U[0, 1) and zeros, at random positions.
  np.testing.assert_array_equal(np.sort(rank), np.arange(1, x.shape[1] + 1))
  sign = np.where(rank <= pos, 1.0, np.where(rank <= pos + neg, -1.0, 0.0))
  want = sign * bits / 2.0 ** 24
  if magnitude == "median_norm":
    want *= np.median(np.linalg.norm(x, axis=1)) / np.linalg.norm(want)
  np.testing.assert_allclose(got, np.tile(want, (3, 1)), rtol=2e-6, atol=1e-7)
  np.testing.assert_array_equal(sign_fractions(got[0]), sign_fractions(mean))
  if magnitude == "uniform":
    assert np.abs(got).max() < 1
  other = call("signguard_adaptive", honest, 3, key=1)
  assert not np.array_equal(np.sign(other[0]), np.sign(got[0]))  # the positions are random


@pytest.mark.slow
def test_signguard_adaptive_passes_the_library_signguard():
  from ftjax.aggregators import make_aggregator
  h, f = 12, 5
  honest = honest_tree(h, 8, base=0.2)
  agg = make_aggregator("signguard", f=f, num_workers=h + f)
  rows = call("signguard_adaptive", honest, f, magnitude="median_norm")
  _, diag = agg({"x": jnp.asarray(np.concatenate([flat(honest), rows]), jnp.float32)},
                jax.random.key(0))
  assert np.all(np.asarray(diag["signguard_selected"])[h:])


# --------------------------------------------------------------------------
# clipped_clustering_adaptive


def np_clipped_clustering_adaptive(x, f, margin=0.1, scale=10.0):
  """Blades' chain against ClippedClustering, as its code means it (see docs/attacks.md)."""
  h = len(x)
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  cos = np.clip(unit @ unit.T, -1, 1)
  cross = np.arccos(1 - (1 - cos)[~np.eye(h, dtype=bool)].min()) - margin
  tree = scipy.cluster.hierarchy.linkage(1 - cos[np.triu_indices(h, 1)], method="single")
  labels = scipy.cluster.hierarchy.fcluster(tree, 2, criterion="maxclust")
  larger = labels == np.bincount(labels).argmax()
  mu = x.mean(0)
  u_mu = mu / np.linalg.norm(mu)
  to_mean = np.where(larger, 1 - unit @ u_mu, -np.inf)
  e = unit[np.argmax(to_mean)]
  theta = np.arccos(1 - to_mean.max())
  n = (e - np.cos(theta) * u_mu) / np.sin(theta)  # unit, orthogonal to mu, on e's side
  rows, angle = [], theta
  for _ in range(f):
    if angle + cross >= np.pi:
      rows.append(-scale * mu)
    else:
      angle += cross - 1e-4
      rows.append(scale * (np.cos(angle) * u_mu + np.sin(angle) * n))
  return np.array(rows)


@pytest.mark.parametrize("h, f, seed, spread", [(9, 3, 0, 0.4), (10, 8, 1, 1.5), (6, 2, 2, 0.1)])
def test_clipped_clustering_adaptive_golden(h, f, seed, spread):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=11) + spread * rng.normal(size=(h, 11))
  with jax.enable_x64(True):
    got = call("clipped_clustering_adaptive", {"a": jnp.asarray(x)}, f)
  want = np_clipped_clustering_adaptive(x, f)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
  if seed == 1:  # the chain passes pi: the later rows fall back to -10 mean
    np.testing.assert_allclose(got[-1], -10.0 * x.mean(0), rtol=1e-12)
  else:
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 10.0, rtol=1e-9)


@pytest.mark.slow
def test_clipped_clustering_adaptive_joins_the_larger_single_linkage_cluster():
  from ftjax.aggregators import make_aggregator
  h, f = 12, 5
  rng = np.random.default_rng(0)
  x = rng.normal(size=50) + 0.5 * rng.normal(size=(h, 50))
  agg = make_aggregator("clipped_clustering", f=f, num_workers=h + f,
                        options={"clipped_clustering": {"linkage": "single"}})
  rows = call("clipped_clustering_adaptive", {"a": jnp.asarray(x, jnp.float32)}, f)
  _, diag = agg({"a": jnp.asarray(np.concatenate([x, rows]), jnp.float32)}, jax.random.key(0))
  assert np.all(np.asarray(diag["clipped_clustering_selected"])[h:])


def test_clipped_clustering_adaptive_degenerate_rows_stay_finite():
  for x in (np.ones((4, 3)), np.zeros((4, 3)), np.array([[1.0, 0], [2, 0], [0, 1], [0, 0]])):
    got = call("clipped_clustering_adaptive", {"a": jnp.asarray(x, jnp.float32)}, 3)
    assert np.all(np.isfinite(got)), x
  np.testing.assert_allclose(call("clipped_clustering_adaptive", {"a": jnp.ones((4, 3))}, 2),
                             -10.0 * np.ones((2, 3)))  # no plane: the fallback
  with pytest.raises(ValueError, match="at least 2 honest rows"):
    call("clipped_clustering_adaptive", {"a": jnp.ones((1, 3))}, 1)
  assert attacks.canonical_name("AttackClippedClustering") == "clipped_clustering_adaptive"


# --------------------------------------------------------------------------
# All of them: options, jit, vmap, finite outputs on degenerate rows


@pytest.mark.parametrize("name, options, message", [
    ("fang_krum", {"threshold": 0.0}, "fang_krum.threshold must be > 0"),
    ("fang_krum", {"halvings": -1}, "fang_krum.halvings must be an integer >= 0"),
    ("fang_krum", {"epsilon": -0.1}, "fang_krum.epsilon must be >= 0"),
    ("fang_median", {"b": float("inf")}, "fang_trmean.b must be a finite number"),
    ("mimic", {"index": -1}, "mimic.index must be an integer >= 0"),
    ("signguard_adaptive", {"magnitude": "norm"}, "'uniform', 'median_norm'"),
    ("clipped_clustering_adaptive", {"linkage": "ward"}, "'single', 'complete', 'average'"),
    ("clipped_clustering_adaptive", {"scale": 0.0}, "scale must be > 0"),
])
def test_bad_options_are_refused(name, options, message):
  with pytest.raises(ValueError, match=message):
    make_attack(name, **options)


@pytest.mark.parametrize("name", PEERS)
def test_vmap_over_runs_equals_each_run(name):
  attack = make_attack(name)
  ctx = AttackContext(num_byzantine=2, aggregator=paper_krum(2))
  runs = [honest_tree(6, s) for s in (9, 10)]
  keys = jax.random.split(jax.random.key(0), 2)
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *runs)
  batched = jax.jit(jax.vmap(lambda h, k: attack(h, None, k, ctx)))(stacked, keys)
  one_run = jax.jit(lambda h, k: attack(h, None, k, ctx))
  for r, (honest, key) in enumerate(zip(runs, keys)):
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(one_run(honest, key))):
      np.testing.assert_allclose(a[r], b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", PEERS)
def test_identical_and_zero_rows_give_finite_rows(name):
  for value in (0.0, 1.5):
    got = call(name, {"a": jnp.full((5, 4), value)}, 2, aggregator=paper_krum(2))
    assert np.all(np.isfinite(got)), (name, value)


# --------------------------------------------------------------------------
# Training


@pytest.mark.slow
def test_every_peer_attack_trains():
  from ftjax import train
  from tests.test_train import tiny_config
  c = tiny_config(**{"attack.name": PEERS[0], "num_steps": 2, "eval_every": 2,
                     "aggregator.name": "krum", "aggregator.meta": "none"})
  setup = train.build(c, attacks=PEERS)  # one compiled round serves the five
  data = train.make_device_data(setup)
  run = train.make_chunk_fn(setup)
  for i, name in enumerate(PEERS):
    state = train.init_state(setup, c.seed)
    member = data._replace(attack=jnp.asarray(i, jnp.int32))
    state, metrics = run(state, member, 2).run(state, member)
    assert int(state.step) == 2 and bool(metrics["finite"]), name
    assert np.isfinite(metrics["train_loss"]), name


_LAYOUTS = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from ftjax import train
    from tests.test_train import tiny_config

    peers = json.loads(sys.argv[1])
    out = {}
    for devices, layout in ((1, "replicated"), (0, "replicated"), (0, "sharded")):
      # The plain average: every Byzantine coordinate reaches the parameters.
      c = tiny_config(**{"attack.name": peers[0], "dtype": "float64", "model.name": "mlp",
                         "devices": devices, "mesh.aggregation": layout, "num_steps": 3,
                         "eval_every": 3, "loop": "scan", "aggregator.name": "avg",
                         "aggregator.meta": "none"})
      setup = train.build(c, attacks=peers)
      data = train.make_device_data(setup)
      run = train.make_chunk_fn(setup)
      for i, name in enumerate(peers):
        state = train.init_state(setup, c.seed)
        member = data._replace(attack=jnp.asarray(i, jnp.int32))
        state, metrics = run(state, member, 3).run(state, member)
        out[f"{name}|{devices}|{layout}"] = {
            "params": [np.asarray(p).ravel().tolist() for p in jax.tree.leaves(state.params)],
            "finite": bool(metrics["finite"])}
    print("RESULT " + json.dumps(out))
    """)


@pytest.mark.slow
def test_every_device_layout_trains_the_one_device_parameters():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=with_devices(3))
  proc = subprocess.run([sys.executable, "-c", _LAYOUTS, json.dumps(PEERS)], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
  for name in PEERS:
    one = out[f"{name}|1|replicated"]
    for layout in ("replicated", "sharded"):
      other = out[f"{name}|0|{layout}"]
      assert one["finite"] and other["finite"], (name, layout)
      for a, b in zip(one["params"], other["params"]):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-10 * max(np.abs(a).max(), 1.0), (name, layout)
