"""Weighted avg, cwmed, cwtm, gm and ctma against plain NumPy versions of their formulas.

Every reference below is written here from the definition (docs/aggregators.md),
on rows flattened to [W, d] in float64; the identities checked are equal weights
(the unweighted rule, bit for bit), integer weights (the unweighted rule on the
rows repeated that many times), permutations, jit and vmap.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import aggregators as agg
from ftjax.aggregators import weighted

# --------------------------------------------------------------------------
# NumPy references, on flat rows X [W, d] and weights w [W]
# --------------------------------------------------------------------------


def np_avg(X, w):
  return (w[:, None] * X).sum(0) / w.sum()


def np_median(X, w, lower=False):
  """The minimisers of m -> sum_i w_i |m - x_i| form [lo, hi]: the midpoint (or lo)."""
  out = []
  for col in X.T:
    cost = np.array([(w * np.abs(c - col)).sum() for c in col])
    best = col[cost <= cost.min() * (1 + 1e-12) + 1e-300]
    out.append(best.min() if lower else 0.5 * (best.min() + best.max()))
  return np.array(out)


def np_trimmed(X, w, f):
  """(1 / (T - 2c)) * integral over (c, T - c) of the weighted quantile function."""
  W, T = len(w), w.sum()
  c = T * f / W
  out = []
  for col in X.T:
    order = np.argsort(col, kind="stable")
    lo, total, mass = 0.0, 0.0, 0.0
    for k in order:
      hi = lo + w[k]
      overlap = max(0.0, min(hi, T - c) - max(lo, c))
      total, mass, lo = total + overlap * col[k], mass + overlap, hi
    out.append(total / mass)
  return np.array(out)


def np_gm(X, w, iters=3, nu=0.1, init="cwmed"):
  z = {"cwmed": lambda: np_median(X, w), "mean": lambda: np_avg(X, w),
       "zero": lambda: np.zeros(X.shape[1])}[init]()
  for _ in range(iters):
    b = w / np.maximum(np.linalg.norm(X - z, axis=1), nu)
    z = (b[:, None] * X).sum(0) / b.sum()
  return z


def np_ctma(X, w, f, center):
  """Mean of the rows nearest ``center`` under the weight mass (1 - f/W) T, from the nearest."""
  W, T = len(w), w.sum()
  keep = T * (W - f) / W
  order = np.argsort(((X - center) ** 2).sum(1), kind="stable")
  kept, used = np.zeros(W), 0.0
  for i in order:
    kept[i] = max(0.0, min(w[i], keep - used))
    used += w[i]
  return (kept[:, None] * X).sum(0) / kept.sum()


def _np_rule(spec, X, w, f, **options):
  base = {"avg": lambda: np_avg(X, w), "cwmed": lambda: np_median(X, w, **options),
          "cwtm": lambda: np_trimmed(X, w, f), "gm": lambda: np_gm(X, w, **options)}
  if spec.startswith("ctma("):
    return np_ctma(X, w, f, _np_rule(spec[5:-1], X, w, f, **options))
  return base[spec]()


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _rows(w, seed=0):
  """A two-leaf pytree of W rows (d = 5 + 6) and its flat NumPy matrix."""
  rng = np.random.default_rng(seed)
  tree = {"a": rng.normal(size=(w, 5)), "b": rng.normal(size=(w, 2, 3)) * 3.0}
  return tree, _flat(tree)


def _flat(tree):
  return np.concatenate([np.asarray(l).reshape(np.shape(l)[0], -1)
                         for l in jax.tree.leaves(tree)], axis=1)


def _flat_out(tree):
  return np.concatenate([np.asarray(l).reshape(-1) for l in jax.tree.leaves(tree)])


def _weights(w, seed=1, zeros=0):
  rng = np.random.default_rng(seed)
  out = rng.uniform(0.2, 3.0, size=w)
  out[:zeros] = 0.0
  return rng.permutation(out)


SPECS = ["avg", "cwmed", "cwtm", "gm", "ctma(avg)", "ctma(cwmed)", "ctma(cwtm)", "ctma(gm)"]


def _same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------
# Against NumPy
# --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("w, f, zeros", [
    (8, 3, 1), pytest.param(5, 1, 0, marks=pytest.mark.slow),
    pytest.param(9, 2, 2, marks=pytest.mark.slow)])
def test_weighted_rules_match_numpy(spec, w, f, zeros):
  tree, X = _rows(w, seed=w)
  wt = _weights(w, seed=f, zeros=zeros)
  with jax.enable_x64(True):
    rule = agg.make_aggregator(spec, f)
    out, _ = rule(tree, weights=jnp.asarray(wt))
  np.testing.assert_allclose(_flat_out(out), _np_rule(spec, X, wt, f), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lower", [False, True])
def test_weighted_median_ties_at_exactly_half(lower):
  # Weights 1, 1, 2 over sorted values 0, 1, 4: C = 1, 2, 4 and T/2 = 2 at the value 1.
  x = {"w": jnp.array([[4.0], [0.0], [1.0]])}
  with jax.enable_x64(True):
    out, _ = agg.cwmed(lower=lower)(x, weights=jnp.array([2.0, 1.0, 1.0]))
  assert float(out["w"][0]) == (1.0 if lower else 2.5)


@pytest.mark.parametrize("options", [dict(init="mean"), dict(init="zero", iters=5, nu=0.5)])
def test_weighted_gm_options_match_numpy(options):
  tree, X = _rows(7, seed=3)
  wt = _weights(7, seed=4, zeros=1)
  with jax.enable_x64(True):
    out, _ = agg.gm(**options)(tree, weights=jnp.asarray(wt))
  np.testing.assert_allclose(_flat_out(out), np_gm(X, wt, **options), rtol=1e-10, atol=1e-12)


def test_weighted_gm_with_tol_stops_and_reports_its_iterations():
  tree, X = _rows(7, seed=5)
  wt = _weights(7, seed=6)
  with jax.enable_x64(True):
    out, diag = agg.gm(tol=1e-9, max_iters=200)(tree, weights=jnp.asarray(wt))
  iters = int(diag["gm_iters"])
  assert 3 < iters < 200
  np.testing.assert_allclose(_flat_out(out), np_gm(X, wt, iters=iters), rtol=1e-10, atol=1e-12)


def test_weighted_ctma_reports_the_rows_it_kept():
  tree, X = _rows(9, seed=7)
  wt = _weights(9, seed=8, zeros=1)
  with jax.enable_x64(True):
    _, diag = agg.ctma(agg.cwtm(f=3))(tree, weights=jnp.asarray(wt))
  center = np_trimmed(X, wt, 3)
  order = np.argsort(((X - center) ** 2).sum(1), kind="stable")
  cum = np.cumsum(wt[order])
  keep = wt.sum() * 6 / 9
  want = np.zeros(9, bool)
  want[order[(cum - wt[order] < keep) & (wt[order] > 0)]] = True
  np.testing.assert_array_equal(np.asarray(diag["ctma_kept"]), want)


# --------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------

EQUAL_CASES = [("avg", {}), ("cwmed", {}), ("cwmed", {"cwmed": {"lower": True}}),
               ("cwtm", {}), ("gm", {}), ("gm", {"gm": {"init": "mean", "iters": 4}}),
               ("gm", {"gm": {"tol": 1e-8}}), ("ctma(cwtm)", {}),
               pytest.param("ctma(gm)", {}, marks=pytest.mark.slow),
               ("ctma(cwmed)", {}), ("ctma(avg)", {})]


def _equal_weights_case(spec, options, kernels, traced):
  tree, _ = _rows(8, seed=10)
  with jax.enable_x64(True):
    rule = agg.make_aggregator(spec, 3, options=options, kernels=kernels)
    if traced:  # under jit, the weights unknown while tracing
      got = jax.jit(lambda x, v: rule(x, weights=v))(tree, jnp.full(8, 0.25))
      _same(got, jax.jit(rule)(tree))
    else:
      _same(rule(tree, weights=jnp.full(8, 2.5)), rule(tree))


@pytest.mark.parametrize("spec, options", EQUAL_CASES)
def test_equal_known_weights_give_the_unweighted_rule_exactly(spec, options):
  _equal_weights_case(spec, options, "auto", traced=False)


@pytest.mark.parametrize("spec, options", EQUAL_CASES)
def test_equal_traced_weights_give_the_unweighted_rule_exactly(spec, options):
  _equal_weights_case(spec, options, "auto", traced=True)


@pytest.mark.slow
@pytest.mark.parametrize("spec, options", EQUAL_CASES)
@pytest.mark.parametrize("traced", [False, True])
def test_equal_weights_are_exact_with_the_plain_kernels_too(spec, options, traced):
  _equal_weights_case(spec, options, "plain", traced)


@pytest.mark.parametrize("spec", SPECS)
def test_the_weighted_formulas_reduce_to_the_unweighted_rule(spec):
  # Equal weights skip the formulas; run them directly to check that they agree.
  tree, _ = _rows(9, seed=11)
  with jax.enable_x64(True):
    rule = agg.make_aggregator(spec, 3)
    got, _ = weighted._weighted(rule, jax.tree.map(jnp.asarray, tree), jnp.ones(9))
    want, _ = rule(tree)
  np.testing.assert_allclose(_flat_out(got), _flat_out(want), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("spec", SPECS)
def test_integer_weights_equal_the_rule_on_repeated_rows(spec):
  # W = 5, f = 1 and counts summing to N = 10: the repeated rows' rule trims f' = N f / W = 2.
  counts = np.array([1, 3, 2, 1, 3])
  tree, _ = _rows(5, seed=12)
  repeated = jax.tree.map(lambda l: np.repeat(l, counts, axis=0), tree)
  with jax.enable_x64(True):
    got, _ = agg.make_aggregator(spec, 1)(tree, weights=jnp.asarray(counts, jnp.float64))
    want, _ = agg.make_aggregator(spec, 2)(repeated)
  np.testing.assert_allclose(_flat_out(got), _flat_out(want), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("spec", SPECS[:-1] + [pytest.param("ctma(gm)", marks=pytest.mark.slow)])
def test_permuting_rows_and_weights_together_changes_nothing(spec):
  tree, _ = _rows(8, seed=13)
  wt = _weights(8, seed=14, zeros=1)
  perm = np.random.default_rng(15).permutation(8)
  with jax.enable_x64(True):
    rule = agg.make_aggregator(spec, 2)
    a, _ = rule(tree, weights=jnp.asarray(wt))
    b, _ = rule(jax.tree.map(lambda l: l[perm], tree), weights=jnp.asarray(wt[perm]))
  np.testing.assert_allclose(_flat_out(a), _flat_out(b), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("spec", ["cwtm", "ctma(cwtm)", pytest.param("gm", marks=pytest.mark.slow),
                                  pytest.param("ctma(gm)", marks=pytest.mark.slow)])
def test_jit_and_vmap_agree_with_one_call_at_a_time(spec):
  rule = agg.make_aggregator(spec, 2)
  rng = np.random.default_rng(16)
  batch = {"w": jnp.asarray(rng.normal(size=(3, 7, 4)), jnp.float32)}
  weights = jnp.asarray(rng.uniform(0.5, 2.0, size=(3, 7)), jnp.float32)
  weights = weights.at[1].set(1.0)  # one batch element with equal weights
  one = lambda x, v: rule(x, weights=v)
  got, _ = jax.jit(jax.vmap(one))(batch, weights)
  for i in range(3):
    want, _ = jax.jit(one)({"w": batch["w"][i]}, weights[i])
    np.testing.assert_allclose(got["w"][i], want["w"], rtol=2e-6, atol=2e-6)


# --------------------------------------------------------------------------
# Faulty rows and refusals
# --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["cwmed", "cwtm", "gm", "ctma(cwtm)", "ctma(gm)"])
def test_faulty_rows_with_a_small_weight_leave_the_output_finite(spec):
  rule = jax.jit(lambda x, v: agg.make_aggregator(spec, 2)(x, weights=v))
  wt = np.array([1.0, 0.5, 2.0, 1.0, 0.3, 1.5, 1.0])  # faulty mass 0.8 of 7.3, under f/W = 2/7
  for bad in (np.nan, np.inf, -np.inf):
    tree, _ = _rows(7, seed=17)
    for leaf in tree.values():
      leaf[[1, 4]] = bad
    out, _ = rule(tree, wt)
    assert np.all(np.isfinite(_flat_out(out))), bad


def test_a_row_of_weight_zero_never_enters_the_mean():
  tree, X = _rows(5, seed=18)
  tree = jax.tree.map(lambda l: l.copy(), tree)
  for leaf in tree.values():
    leaf[2] = np.nan
  wt = np.array([1.0, 2.0, 0.0, 1.0, 1.0])
  with jax.enable_x64(True):
    out, _ = agg.avg()(tree, weights=jnp.asarray(wt))
  keep = wt > 0
  np.testing.assert_allclose(_flat_out(out), np_avg(X[keep], wt[keep]), rtol=1e-12)


@pytest.mark.parametrize("weights, message", [
    (np.ones(4), r"shape \[W\] = \(5,\)"),
    (np.array([1.0, -1.0, 1.0, 1.0, 1.0]), "nonnegative"),
    (np.zeros(5), "not all zero"),
    (np.array([1.0, np.nan, 1.0, 1.0, 1.0]), "finite"),
])
def test_bad_weights_are_refused_in_one_sentence(weights, message):
  tree, _ = _rows(5)
  with pytest.raises(ValueError, match=message):
    agg.cwtm(f=1)(tree, weights=weights)


def test_traced_bad_weights_give_nan():
  tree, _ = _rows(5)
  out, _ = jax.jit(lambda x, v: agg.cwtm(f=1)(x, weights=v))(
      tree, jnp.array([1.0, -1.0, 1.0, 1.0, 1.0]))
  assert np.all(np.isnan(_flat_out(out)))


@pytest.mark.parametrize("rule, name", [
    (agg.krum(f=1), "krum"), (agg.bucketing(agg.cwtm(f=1)), "bucketing"),
    (agg.nnm(agg.cwtm(f=1)), "nnm"), (agg.ctma(agg.meamed(f=1)), "meamed"),
    (agg.rule(lambda x: jax.tree.map(lambda l: l[0], x), name="first"), "first"),
])
def test_rules_without_a_weighted_version_are_refused(rule, name):
  tree, _ = _rows(5)
  with pytest.raises(ValueError, match=f"{name!r} has no weighted version"):
    rule(tree, weights=np.ones(5))
  with pytest.raises(ValueError, match="no weighted version"):
    weighted.check(rule)


def test_weighted_ctma_refuses_keep_ties():
  tree, _ = _rows(5)
  with pytest.raises(ValueError, match="keep_ties"):
    agg.ctma(agg.cwtm(f=1), keep_ties=True)(tree, weights=np.arange(1.0, 6.0))
