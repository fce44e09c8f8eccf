"""Attacks: formulas on hand-made rows, pytrees, jit, line searches, constraints, errors."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from ftjax import attacks
from ftjax.attacks import AttackContext, make_attack

CANONICAL = sorted({spec.name for spec in attacks.ATTACKS.values()})
OMNISCIENT = [n for n in CANONICAL if not attacks.ATTACKS[n].uses_own_updates]


# Small aggregators written here, independent of ftjax.aggregators.
def mean_agg(updates, key):
  del key
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), updates), {}


def median_agg(updates, key):
  del key
  return jax.tree.map(lambda x: jnp.median(x, axis=0), updates), {}


def tree_dist(a, b):
  return float(np.sqrt(sum(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))))


def rows_of(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def honest_tree(h=5, seed=0, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {"conv": {"kernel": (0.3 + jax.random.normal(k1, (h, 2, 3))).astype(dtype),
                   "bias": jax.random.normal(k2, (h, 3)).astype(dtype)},
          "dense": (1.0 + 0.5 * jax.random.normal(k3, (h, 4))).astype(dtype)}


def call(attack, honest, f, own=None, key=0, aggregator=median_agg):
  ctx = AttackContext(num_byzantine=f, aggregator=aggregator, num_classes=10)
  # One compiled program is much faster here than op-by-op dispatch.
  return jax.jit(lambda h, o, k: attack(h, o, k, ctx))(honest, own, jax.random.key(key))


def own_for(attack, honest, f):
  if not attack.uses_own_updates:
    return None
  return jax.tree.map(lambda x: x[:1].repeat(f, 0) * 2.0 + 1.0, honest)


# --------------------------------------------------------------------------
# Formulas


def test_alie_z_matches_spec_and_scipy():
  assert round(attacks.alie_z(17, 8), 4) == 1.2206
  for m, f in [(10, 3), (20, 4), (9, 2), (5, 0)]:
    s = (m // 2 + 1) - f
    assert attacks.alie_z(m, f) == pytest.approx(scipy.stats.norm.ppf((m - f - s) / (m - f)),
                                                 rel=1e-9)
  with pytest.raises(ValueError, match="explicit z"):
    attacks.alie_z(2, 0)  # quantile 0: no finite z
  with pytest.raises(ValueError, match="num_byzantine"):
    attacks.alie_z(4, 4)


def test_flip_labels():
  y = jnp.arange(10, dtype=jnp.int32)
  out = jax.jit(attacks.flip_labels, static_argnums=1)(y, 10)
  np.testing.assert_array_equal(out, 9 - np.arange(10))
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(attacks.flip_labels(jnp.array([0, 1, 2]), 3), [2, 1, 0])
  with pytest.raises(ValueError, match="num_classes"):
    attacks.flip_labels(y, 1)
  with pytest.raises(ValueError, match="integers"):
    attacks.flip_labels(jnp.zeros(3), 10)


def test_own_update_attacks():
  honest = {"a": jnp.arange(6.0).reshape(3, 2)}
  own = {"a": jnp.array([[1.0, -2.0], [3.0, 0.5]])}
  np.testing.assert_array_equal(call(make_attack("sf"), honest, 2, own)["a"], -own["a"])
  for name in ("none", "lf"):
    np.testing.assert_array_equal(call(make_attack(name), honest, 2, own)["a"], own["a"])
  flags = {n: (attacks.ATTACKS[n].uses_own_updates, attacks.ATTACKS[n].flips_labels)
           for n in CANONICAL}
  assert flags.pop("lf") == (True, True)
  assert flags.pop("sf") == flags.pop("none") == flags.pop("backdoor") == (True, False)
  assert set(flags.values()) == {(False, False)}
  # The backdoor's workers send their own updates (on poisoned data), times boost.
  np.testing.assert_allclose(call(make_attack("backdoor", boost=3.0), honest, 2, own)["a"],
                             3.0 * own["a"])


def test_ipm_formula():
  honest = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])}
  out = call(make_attack("ipm", eps=0.5), honest, 2)["a"]
  np.testing.assert_allclose(out, [[-1.5, -2.5], [-1.5, -2.5]])
  # The default is eps = 0.5, what the original program runs; "empire" is the same attack.
  np.testing.assert_allclose(call(make_attack("empire"), honest, 1)["a"], [[-1.5, -2.5]],
                             rtol=1e-6)
  np.testing.assert_allclose(call(make_attack("ipm", eps=0.1), honest, 1)["a"], [[-0.3, -0.5]],
                             rtol=1e-6)


def test_alie_formula_unbiased_std():
  honest = {"a": jnp.array([[1.0], [2.0], [3.0], [6.0]])}
  std = np.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3)  # ddof = 1
  out = call(make_attack("alie", z=1.5), honest, 3)["a"]
  np.testing.assert_allclose(out, np.full((3, 1), 3 - 1.5 * std), rtol=1e-6, atol=1e-6)
  # Default z: Phi^{-1}((m - f - s) / (m - f)), s = floor(m/2 + 1) - f, for m = H + f = 7, f = 3.
  z = attacks.alie_z(7, 3)
  np.testing.assert_allclose(call(make_attack("little"), honest, 3)["a"],
                             np.full((3, 1), 3 - z * std), rtol=1e-6, atol=1e-6)


def test_mimic_copies_a_row():
  honest = {"a": jnp.arange(12.0).reshape(4, 3)}
  # index= copies a fixed row; the default, the principal direction's row, has its
  # own tests in test_attacks_peers.py.
  np.testing.assert_array_equal(call(make_attack("mimic", index=0), honest, 2)["a"],
                                np.tile(np.arange(3.0), (2, 1)))
  np.testing.assert_array_equal(call(make_attack("mimic", index=2), honest, 1)["a"],
                                [[6.0, 7.0, 8.0]])
  with pytest.raises(ValueError, match="index"):
    call(make_attack("mimic", index=4), honest, 1)


def test_gaussian_noise():
  honest = {"a": jnp.array([[1.0, 3.0], [3.0, 5.0]])}
  np.testing.assert_allclose(call(make_attack("gaussian", sigma=0.0), honest, 2)["a"],
                             [[2.0, 4.0], [2.0, 4.0]])
  wide = {"a": jnp.ones((3, 20000))}
  out = np.asarray(call(make_attack("gaussian", sigma=2.0), wide, 2)["a"])
  assert abs(out.mean() - 1.0) < 0.05 and abs(out.std() - 2.0) < 0.05
  assert not np.allclose(out[0], out[1])  # independent noise per Byzantine worker
  pure = np.asarray(call(make_attack("gaussian", sigma=2.0, center="zero"), wide, 2)["a"])
  assert abs(pure.mean()) < 0.05 and abs(pure.std() - 2.0) < 0.05


def test_inf_and_nan_rows():
  honest = honest_tree()
  for leaf in jax.tree.leaves(call(make_attack("inf"), honest, 2)):
    assert np.all(np.isposinf(leaf))
  for leaf in jax.tree.leaves(call(make_attack("nan"), honest, 2)):
    assert np.all(np.isnan(leaf))


# --------------------------------------------------------------------------
# Shapes, dtypes, jit, determinism


@pytest.mark.parametrize("name", CANONICAL)
def test_pytree_shapes_dtypes_jit_and_determinism(name):
  attack = make_attack(name)
  honest, f = honest_tree(h=5), 3
  own = own_for(attack, honest, f)
  ctx = AttackContext(num_byzantine=f, aggregator=median_agg, num_classes=10)
  traces = []

  def run(h, o, k):
    traces.append(1)
    return attack(h, o, k, ctx)

  jitted = jax.jit(run)
  out = jitted(honest, own, jax.random.key(3))
  assert jax.tree.structure(out) == jax.tree.structure(honest)
  for o, h in zip(jax.tree.leaves(out), jax.tree.leaves(honest)):
    assert o.shape == (f,) + h.shape[1:] and o.dtype == h.dtype
  again = jitted(jax.tree.map(lambda x: x + 1.0, honest), own, jax.random.key(3))
  assert len(traces) == 1  # new values, same shapes: no retrace
  same_key = jitted(honest, own, jax.random.key(3))
  for a, c in zip(jax.tree.leaves(out), jax.tree.leaves(same_key)):
    np.testing.assert_array_equal(a, c)
  if not name.startswith("optimal"):  # op-by-op line searches are slow; skip their eager run
    eager = attack(honest, own, jax.random.key(3), ctx)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(eager)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  if name not in ("inf", "nan"):
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(again))
  if name in ("ipm", "alie", "min_max", "min_sum", "optimal_ipm", "optimal_alie"):
    for leaf in jax.tree.leaves(out):  # every Byzantine worker sends the same vector
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
  if name == "gaussian":
    other = jitted(honest, own, jax.random.key(4))
    assert not np.allclose(out["dense"], other["dense"])


@pytest.mark.parametrize("name", ["alie", "min_sum", "optimal_ipm"])
def test_float64(name):
  with jax.enable_x64(True):
    attack = make_attack(name)
    honest = honest_tree(dtype=jnp.float64)
    out = call(attack, honest, 2, own=own_for(attack, honest, 2))
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(out))


@pytest.mark.parametrize("name", CANONICAL)
def test_no_byzantine_workers_gives_empty_rows(name):
  attack = make_attack(name)
  honest = honest_tree(h=4)
  out = call(attack, honest, 0, own=own_for(attack, honest, 0), aggregator=None)
  for o, h in zip(jax.tree.leaves(out), jax.tree.leaves(honest)):
    assert o.shape == (0,) + h.shape[1:] and o.dtype == h.dtype


# --------------------------------------------------------------------------
# Line-search attacks


def damage(aggregator, honest, byz):
  rows = jax.tree.map(lambda h, b: jnp.concatenate([h, b]), honest, byz)
  out, _ = jax.jit(aggregator)(rows, jax.random.key(0))
  return tree_dist(out, jax.tree.map(lambda x: x.mean(0), honest))


@pytest.mark.parametrize("aggregator", [median_agg, mean_agg])
@pytest.mark.parametrize("fixed, optimal", [(("ipm", {"eps": 0.5}), "optimal_ipm"),
                                            (("alie", {}), "optimal_alie")])
def test_optimal_at_least_as_damaging_as_fixed(aggregator, fixed, optimal):
  honest, f = honest_tree(h=9, seed=1), 8
  fixed_rows = call(make_attack(fixed[0], **fixed[1]), honest, f, aggregator=aggregator)
  optimal_rows = call(make_attack(optimal), honest, f, aggregator=aggregator)
  d_fixed = damage(aggregator, honest, fixed_rows)
  d_opt = damage(aggregator, honest, optimal_rows)
  assert d_opt >= d_fixed * (1 - 1e-6)
  if aggregator is mean_agg:
    # Against the mean damage grows with the scale: the search must go to `high`.
    assert d_opt > 2.0 * d_fixed


def radius_filter_agg(updates, key):
  """Mean of the rows within distance 5 of the coordinate-wise median.

  Pushing the Byzantine rows farther helps until they are filtered out, so the
  damage has an interior maximum the line search has to find.
  """
  del key
  med = jax.tree.map(lambda x: jnp.median(x, axis=0), updates)
  sq = sum(jnp.sum((x - m[None]) ** 2, axis=tuple(range(1, x.ndim)))
           for x, m in zip(jax.tree.leaves(updates), jax.tree.leaves(med)))
  keep = (sq <= 5.0 ** 2).astype(jnp.float32)
  return jax.tree.map(
      lambda x: jnp.tensordot(keep, x, axes=1) / jnp.sum(keep), updates), {}


@pytest.mark.parametrize("kind", ["ipm", "alie"])
def test_optimal_finds_interior_maximum(kind):
  honest, f = honest_tree(h=7, seed=2), 2
  attack = make_attack(f"optimal_{kind}", num_candidates=11, refine_steps=12)
  out = call(attack, honest, f, aggregator=radius_filter_agg)
  mu = jax.tree.map(lambda x: x.mean(0), honest)
  if kind == "ipm":
    base, direction = jax.tree.map(jnp.zeros_like, mu), jax.tree.map(jnp.negative, mu)
  else:
    base = mu
    direction = jax.tree.map(lambda x: -jnp.std(x, axis=0, ddof=1), honest)
  # The rows lie on the searched ray: out = base + s * direction for one s in range.
  s = (tree_dist(rows_of(out, 0), base) / tree_dist(direction, jax.tree.map(jnp.zeros_like, mu)))
  assert 0.0 <= s <= 10.0
  for a, b, d in zip(jax.tree.leaves(rows_of(out, 0)), jax.tree.leaves(base),
                     jax.tree.leaves(direction)):
    np.testing.assert_allclose(a, b + s * d, rtol=1e-4, atol=1e-5)
  # Brute force in NumPy over a fine grid of scales.
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  h_np = np.concatenate([np.reshape(x, (7, -1)) for x in jax.tree.leaves(honest)], axis=1)
  b_np, d_np = flat(base), flat(direction)
  mu_np, brute = h_np.mean(0), 0.0
  for t in np.linspace(0.0, 10.0, 2001):
    rows = np.concatenate([h_np, np.tile(b_np + t * d_np, (f, 1))])
    keep = np.linalg.norm(rows - np.median(rows, 0), axis=1) <= 5.0
    brute = max(brute, np.linalg.norm(rows[keep].mean(0) - mu_np))
  found = damage(radius_filter_agg, honest, out)
  assert found >= 0.98 * brute
  assert s < 9.5  # the maximum is interior, not the end of the range


def test_optimal_always_tries_the_reference_scale():
  # Grid {3, 10} lies beyond the filter radius; only the reference eps 0.5 does damage.
  honest, f = honest_tree(h=7, seed=2), 2
  attack = make_attack("optimal_ipm", low=3.0, high=10.0, num_candidates=2, refine_steps=0)
  out = call(attack, honest, f, aggregator=radius_filter_agg)
  for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(honest)):
    np.testing.assert_allclose(o, np.broadcast_to(-0.5 * x.mean(0), o.shape), rtol=1e-5)


def test_optimal_batched_map_matches_vmap():
  honest, f = honest_tree(h=6, seed=3), 2
  a = call(make_attack("optimal_alie", refine_steps=0), honest, f)
  b = call(make_attack("optimal_alie", refine_steps=0, batch_size=4), honest, f)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6)


# --------------------------------------------------------------------------
# min-max / min-sum


def sq_dists_to(rows, point):
  return np.array([tree_dist(rows_of(rows, i), point) ** 2
                   for i in range(jax.tree.leaves(rows)[0].shape[0])])


@pytest.mark.parametrize("perturbation", ["unit", "std", "sign"])
@pytest.mark.parametrize("kind", ["min_max", "min_sum"])
def test_min_distance_constraints(kind, perturbation):
  honest, h = honest_tree(h=6, seed=4), 6
  mal_rows = call(make_attack(kind, perturbation=perturbation), honest, 3)
  mal = rows_of(mal_rows, 0)
  pair = np.array([[tree_dist(rows_of(honest, i), rows_of(honest, j)) ** 2 for j in range(h)]
                   for i in range(h)])
  to_mal = sq_dists_to(honest, mal)
  if kind == "min_max":
    used, bound = to_mal.max(), pair.max()
  else:
    used, bound = to_mal.sum(), pair.sum(axis=1).max()
  assert used <= bound * (1 + 1e-5)
  assert used >= bound * (1 - 1e-4)  # gamma is the largest feasible: the bound is reached
  # The row is mean + gamma * p with gamma > 0 along the chosen perturbation.
  mu = jax.tree.map(lambda x: x.mean(0), honest)
  delta = np.concatenate([np.ravel(m - u) for m, u in zip(jax.tree.leaves(mal),
                                                           jax.tree.leaves(mu))])
  if perturbation == "unit":
    p = -np.concatenate([np.ravel(u) for u in jax.tree.leaves(mu)])
  elif perturbation == "std":
    p = -np.concatenate([np.ravel(np.std(x, 0, ddof=1)) for x in jax.tree.leaves(honest)])
  else:
    p = -np.sign(np.concatenate([np.ravel(u) for u in jax.tree.leaves(mu)]))
  cos = delta @ p / (np.linalg.norm(delta) * np.linalg.norm(p))
  assert cos > 1 - 1e-5


@pytest.mark.parametrize("kind", ["min_max", "min_sum"])
def test_bisection_agrees_with_closed_form(kind):
  with jax.enable_x64(True):
    honest = honest_tree(h=7, seed=5, dtype=jnp.float64)
    a = call(make_attack(kind), honest, 2)
    b = call(make_attack(kind, solver="exact"), honest, 2)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)


def test_min_max_needs_bracket_growth():
  # Honest rows far apart relative to gamma_init: the search must double its bracket.
  honest = {"a": jnp.array([[0.0, 100.0], [100.0, 0.0], [50.0, 50.0]])}
  out = call(make_attack("min_max", gamma_init=0.5), honest, 1)
  used = sq_dists_to(honest, rows_of(out, 0)).max()
  np.testing.assert_allclose(used, 2 * 100.0 ** 2, rtol=1e-4)


# --------------------------------------------------------------------------
# Names, options and errors


def test_names_aliases_and_canonical():
  assert attacks.canonical_name("empire") == "ipm"
  assert attacks.canonical_name("little") == "alie"
  assert attacks.canonical_name(" Min-Max ") == "min_max"
  assert make_attack("EMPIRE", eps=0.5) == make_attack("ipm", eps=0.5)
  assert make_attack("little").name == "alie"
  assert set(CANONICAL) == {"none", "lf", "sf", "ipm", "alie", "mimic", "gaussian", "inf",
                            "nan", "optimal_ipm", "optimal_alie", "min_max", "min_sum",
                            "fang_krum", "fang_trmean", "signguard_adaptive",
                            "clipped_clustering_adaptive", "backdoor"}
  assert make_attack("BadNets") == make_attack("backdoor")
  assert attacks.canonical_name("fang_median") == "fang_trmean"
  with pytest.raises(ValueError, match="teleport.*valid names:.*alie.*empire"):
    make_attack("teleport")


@pytest.mark.parametrize("name, options, message", [
    ("ipm", {"epsilon": 0.5}, "epsilon.*valid options: eps"),
    ("sf", {"eps": 1.0}, "valid options: none"),
    ("ipm", {"eps": float("nan")}, "ipm.eps must be a finite number"),
    ("gaussian", {"sigma": -1.0}, "sigma must be >= 0"),
    ("gaussian", {"center": "median"}, "'mean', 'zero'"),
    ("mimic", {"index": 1.5}, "integer >= 0"),
    ("optimal_ipm", {"low": 3.0, "high": 1.0}, "low < high"),
    ("optimal_alie", {"num_candidates": 1}, "num_candidates must be an integer >= 2"),
    ("min_max", {"perturbation": "random"}, "'unit', 'std', 'sign'"),
    ("min_sum", {"solver": "newton"}, "'bisection', 'exact'"),
])
def test_bad_options_are_refused(name, options, message):
  with pytest.raises(ValueError, match=message):
    make_attack(name, **options)


def test_bad_calls_are_refused():
  honest = honest_tree(h=4)
  with pytest.raises(ValueError, match="aggregator"):
    call(make_attack("optimal_ipm"), honest, 2, aggregator=None)
  with pytest.raises(ValueError, match="at least 2 honest rows"):
    call(make_attack("alie"), {"a": jnp.ones((1, 3))}, 1)
  with pytest.raises(ValueError, match="own"):
    call(make_attack("sf"), honest, 2)
  with pytest.raises(ValueError, match=r"\[f=2"):
    call(make_attack("sf"), honest, 2, own=jax.tree.map(lambda x: x[:1], honest))
  with pytest.raises(ValueError, match="leading worker axis"):
    call(make_attack("ipm"), {"a": jnp.ones((4, 2)), "b": jnp.ones((3,))}, 1)
  with pytest.raises(ValueError, match="floating"):
    call(make_attack("ipm"), {"a": jnp.ones((4, 2), jnp.int32)}, 1)
  with pytest.raises(ValueError, match="num_byzantine"):
    call(make_attack("ipm"), honest, -1)


def test_with_library_aggregator():
  aggregators = pytest.importorskip("ftjax.aggregators")
  agg = aggregators.make_aggregator("ctma(cwtm)", f=2, num_workers=7)
  honest, f = honest_tree(h=5, seed=6), 2
  fixed = call(make_attack("alie"), honest, f, aggregator=agg)
  optimal = jax.jit(lambda h, k: make_attack("optimal_alie")(
      h, None, k, AttackContext(num_byzantine=f, aggregator=agg)))(honest, jax.random.key(0))
  assert damage(agg, honest, optimal) >= damage(agg, honest, fixed) * (1 - 1e-6)


@pytest.mark.parametrize("kind", ["min_max", "min_sum"])
def test_min_distance_degenerate_rows_stay_finite(kind):
  ctx = AttackContext(num_byzantine=2)
  for perturbation in ("unit", "std", "sign"):
    attack = make_attack(kind, perturbation=perturbation)
    fn = jax.jit(lambda h: attack(h, None, jax.random.key(0), ctx))
    for value in (0.0, 2.0):  # identical rows, with zero and non-zero mean
      out = fn({"a": jnp.full((4, 3), value)})["a"]
      np.testing.assert_allclose(out, np.full((2, 3), value), atol=1e-6)


@pytest.mark.parametrize("name", ["optimal_alie", "min_max"])
def test_vmap_over_independent_runs(name):
  # DESIGN: several runs may be batched by a vmap over a leading runs axis.
  attack = make_attack(name)
  ctx = AttackContext(num_byzantine=2, aggregator=median_agg)
  runs = [honest_tree(h=5, seed=s) for s in (7, 8)]
  keys = jax.random.split(jax.random.key(0), 2)
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *runs)
  batched = jax.jit(jax.vmap(lambda h, k: attack(h, None, k, ctx)))(stacked, keys)
  one_run = jax.jit(lambda h, k: attack(h, None, k, ctx))
  for r, (honest, key) in enumerate(zip(runs, keys)):
    single = one_run(honest, key)
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
      np.testing.assert_allclose(a[r], b, rtol=1e-5, atol=1e-6)
