"""Tests for ftjax.aggregators.subsets and ftjax.aggregators.filters: NumPy goldens, properties, faults."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.cluster import HDBSCAN, AgglomerativeClustering

from ftjax import aggregators as agg_lib
from ftjax.aggregators import maths as agg_maths
from ftjax.aggregators import filters as rules_filters
from ftjax.aggregators import subsets as rules_subsets

W, F = 11, 2
RULES = {**rules_subsets.RULES, **rules_filters.RULES}
# flame without noise: its cluster and clipping are what the properties are about.
TEST_OPTIONS = {"flame": {"noise": 0.0}, "dnc": {"num_iters": 2}}
# Rules whose output moves with a common shift of the rows (the others use norms or cosines).
TRANSLATION = ["bulyan", "mda", "smea", "monna", "caf", "dnc"]


def body(name, f=F, **options):
  """The rule as a function (x, key) -> (aggregate, diagnostics)."""
  opts = {**RULES[name]["options"], **TEST_OPTIONS.get(name, {}), **options}
  return functools.partial(RULES[name]["body"], f=f, **opts)


def as_aggregator(name, f=F, **options):
  fn = body(name, f, **options)
  return agg_lib.rule(lambda x, key: fn(x, key), f=f, name=name)


def tree_rows(key, w=W, dtype=jnp.float32):
  k1, k2 = jax.random.split(key)
  return {"a": jax.random.normal(k1, (w, 3), dtype) + 0.3,
          "b": {"c": jax.random.normal(k2, (w, 2, 2), dtype) + 0.3}}


def flat(tree):
  return np.concatenate([np.asarray(l).reshape(l.shape[0], -1) for l in jax.tree.leaves(tree)], 1)


def flat_out(tree):
  return np.concatenate([np.asarray(l).reshape(-1) for l in jax.tree.leaves(tree)])


def test_tables_match_the_bodies():
  import inspect
  for name, info in RULES.items():
    params = inspect.signature(info["body"]).parameters
    kw = {k: p.default for k, p in params.items() if p.kind == p.KEYWORD_ONLY and k != "f"}
    assert kw == info["options"], name
    assert info["min_rows"](2, info["options"]) <= info["robust_rows"](2, info["options"])
  for alias, name in {**rules_subsets.ALIASES, **rules_filters.ALIASES}.items():
    assert name in RULES and alias not in RULES


# --------------------------------------------------------------------------
# Plain NumPy references, written from the papers
# --------------------------------------------------------------------------


def sqdists(x):
  return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def np_bulyan(x, f):
  d, pool, sel = sqdists(x), list(range(len(x))), []
  for _ in range(len(x) - 2 * f):
    k = max(0, min(len(pool) - f - 2, len(pool) - 1))
    scores = [sum(sorted(d[i, j] for j in pool if j != i)[:k]) for i in pool]
    sel.append(pool.pop(int(np.argmin(scores))))
  s = x[sel]
  closest = np.argsort(np.abs(s - np.median(s, 0)), axis=0, kind="stable")[:len(x) - 4 * f]
  return np.take_along_axis(s, closest, 0).mean(0)


def np_best_subset(x, f, value):
  subsets = list(itertools.combinations(range(len(x)), len(x) - f))
  return x[list(min(subsets, key=lambda s: value(x[list(s)])))].mean(0)


def np_mda(x, f):
  return np_best_subset(x, f, lambda s: max(np.linalg.norm(a - b) for a in s for b in s))


def np_smea(x, f):
  return np_best_subset(x, f, lambda s: np.linalg.eigvalsh(np.cov(s.T, bias=True))[-1])


def np_monna(x, f, idx=0):
  near = np.argsort(np.linalg.norm(x - x[idx], axis=1), kind="stable")[:len(x) - f]
  return x[near].mean(0)


def np_cge(x, f):
  return x[np.argsort(np.linalg.norm(x, axis=1), kind="stable")[:len(x) - f]].mean(0)


def np_caf(x, f):
  c, best, best_lam = np.ones(len(x)), None, np.inf
  while c.sum() > len(x) - 2 * f:
    mu = c @ x / c.sum()
    diffs = x - mu
    lam, vecs = np.linalg.eigh((c[:, None] * diffs).T @ diffs / c.sum())
    if lam[-1] < best_lam:
      best_lam, best = lam[-1], mu
    tau = (diffs @ vecs[:, -1]) ** 2
    c = np.maximum(c * (1 - tau / tau[c > 0].max()), 0)
  return best


def np_dnc(x, f, masks, c=1.0):
  good = set(range(len(x)))
  for m in masks:
    sub = x[:, m]
    centred = sub - sub.mean(0)
    v = np.linalg.svd(centred, full_matrices=False)[2][0]
    score = (centred @ v) ** 2
    good &= set(np.argsort(score, kind="stable")[:len(x) - int(c * f)].tolist())
  return x[sorted(good)].mean(0)


def np_clip(x, tau):
  n = np.linalg.norm(x, axis=1, keepdims=True)
  return x * np.minimum(1, tau / n)


def np_cosine(x):
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  return np.clip(1 - u @ u.T, 0, 2)


def np_larger(labels):
  return labels == np.argmax(np.bincount(labels))


def np_clustering(x, linkage="complete"):
  lab = AgglomerativeClustering(n_clusters=2, metric="precomputed", linkage=linkage).fit(
      np_cosine(x)).labels_
  return x[np_larger(lab)].mean(0)


def np_clipped_clustering(x, linkage="average"):
  lab = AgglomerativeClustering(n_clusters=2, metric="precomputed", linkage=linkage).fit(
      np_cosine(x)).labels_
  return np_clip(x, np.median(np.linalg.norm(x, axis=1)))[np_larger(lab)].mean(0)


def np_signguard(x, lower=0.1, upper=3.0):
  n = np.linalg.norm(x, axis=1)
  m = np.median(n)
  s1 = (n >= lower * m) & (n <= upper * m)
  feats = np.stack([(x > 0).mean(1), (x < 0).mean(1), (x == 0).mean(1)], 1)
  lab = AgglomerativeClustering(n_clusters=2, linkage="average").fit(feats).labels_
  return np_clip(x, m)[s1 & np_larger(lab)].mean(0)


def np_flame(x):
  w = len(x)
  lab = HDBSCAN(metric="precomputed", min_cluster_size=w // 2 + 1, min_samples=1,
                allow_single_cluster=True, copy=True).fit(np_cosine(x)).labels_
  return np_clip(x, np.median(np.linalg.norm(x, axis=1)))[lab == 0].mean(0)


def golden_rows(seed=0, w=W, d=5):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(w, d)) + 0.5
  x[:F] = rng.normal(size=d) * 4 + rng.normal(size=(F, d)) * 0.2  # f rows far and together
  return x


def sidon_sign_rows(seed=0):
  """Rows whose positive-coordinate counts differ pairwise by distinct amounts (no ties)."""
  rng = np.random.default_rng(seed)
  counts = [1, 2, 4, 8, 13, 21, 31, 45, 66, 81, 97]  # a Sidon set: distinct differences
  x = -np.abs(rng.normal(size=(W, 128)))
  for i, k in enumerate(counts):
    x[i, rng.permutation(128)[:k]] *= -1
  x[3] *= 5.0   # above 3 x the median norm: filtered
  x[7] *= 0.05  # below 0.1 x the median norm: filtered
  return x


REFERENCES = {
    "bulyan": np_bulyan, "mda": np_mda, "smea": np_smea, "monna": np_monna, "cge": np_cge,
    "caf": np_caf,
    "dnc": lambda x, f: np_dnc(x, f, [np.ones(x.shape[1], bool)] * 2),
    "clustering": lambda x, f: np_clustering(x),
    "clipped_clustering": lambda x, f: np_clipped_clustering(x),
    "flame": lambda x, f: np_flame(x),
}


def split(x):
  """Rows [W, 5] as a pytree of two leaves (the rules' norms are global over leaves)."""
  return {"a": x[..., :2], "b": x[..., 2:].reshape(x.shape[:-1] + (3, 1))}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_golden_against_numpy(name):
  xs = np.stack([golden_rows(0), golden_rows(1)])
  with jax.enable_x64(True):
    out, _ = jax.jit(jax.vmap(body(name), in_axes=(0, None)))(split(jnp.asarray(xs)),
                                                             jax.random.key(0))
  for i, x in enumerate(xs):
    got = np.concatenate([np.asarray(out["a"][i]), np.asarray(out["b"][i]).reshape(-1)])
    np.testing.assert_allclose(got, REFERENCES[name](x, F), rtol=1e-9, atol=1e-12)


def test_golden_signguard_against_numpy():
  x = sidon_sign_rows()
  with jax.enable_x64(True):
    out, diag = jax.jit(body("signguard"))(jnp.asarray(x), None)
  np.testing.assert_allclose(out, np_signguard(x), rtol=1e-9, atol=1e-12)
  assert not diag["signguard_selected"][3] and not diag["signguard_selected"][7]


def test_golden_dnc_subsamples_with_the_key():
  x = golden_rows(2, d=12)
  key = jax.random.key(5)
  with jax.enable_x64(True):
    out, _ = jax.jit(body("dnc", subsample=4, num_iters=3))(jnp.asarray(x), key)
    masks = [np.asarray(rules_filters.subsample_masks(k, jnp.asarray(x), 4)[0])
             for k in jax.random.split(key, 3)]
  assert all(m.sum() == 4 for m in masks)
  np.testing.assert_allclose(out, np_dnc(x, F, masks), rtol=1e-9)


def test_bulyan_neighbour_counts():
  # num_neighbours = W - f - 2 is the default's count; the selections of both
  # counts match the NumPy reference with the count shifted by one.
  x = jnp.asarray(golden_rows(3), jnp.float32)
  paper = jax.jit(body("bulyan"))(x, None)[1]["bulyan_selected"]
  same = jax.jit(body("bulyan", num_neighbours=W - F - 2))(x, None)[1]["bulyan_selected"]
  np.testing.assert_array_equal(paper, same)


def test_subset_limit_refused():
  x = jnp.zeros((30, 2))
  for name in ("mda", "smea"):
    with pytest.raises(ValueError, match="C\\(30, 8\\)"):
      body(name, f=8)(x, None)


def test_smea_exact_not_power_iteration():
  # Two honest clusters of rows spread along different axes; the f far rows
  # together have a small spread of their own. The exact top eigenvalue never
  # picks a subset holding them.
  rng = np.random.default_rng(4)
  x = rng.normal(size=(7, 4)) * np.array([3.0, 0.1, 0.1, 0.1])
  x[:2] = np.array([40.0, 0, 0, 0]) + rng.normal(size=(2, 4)) * 0.01
  out, diag = jax.jit(body("smea"))(jnp.asarray(x, jnp.float32), None)
  assert not np.asarray(diag["smea_selected"])[:2].any()
  np.testing.assert_allclose(out, np_smea(x, 2), rtol=1e-5)


# --------------------------------------------------------------------------
# Properties, in one jitted, vmapped call per rule over a pytree of two leaves
# --------------------------------------------------------------------------


def variants(rows):
  perm = np.concatenate([[0], 1 + np.random.default_rng(0).permutation(W - 1)])  # keeps row 0
  shift = tree_rows(jax.random.key(3), w=1)
  row = jax.tree.map(lambda l: l[:1], rows)

  def faulty(value):
    return jax.tree.map(lambda l: l.at[-F:].set(value), rows)

  cases = {
      "base": rows,
      "permuted": jax.tree.map(lambda l: l[perm], rows),
      "translated": jax.tree.map(lambda l, s: l + 3.0 * s, rows, shift),
      "consensus": jax.tree.map(lambda l: jnp.repeat(l, W, axis=0), row),
      "nan": faulty(jnp.nan),
      "inf": jax.tree.map(lambda l: l.at[-1].set(jnp.inf).at[-2].set(-jnp.inf), rows),
      "huge": faulty(1e30),
  }
  return cases, shift, row


@pytest.mark.parametrize("name", sorted(RULES))
def test_properties_under_jit_and_vmap(name):
  cases, shift, row = variants(tree_rows(jax.random.key(1)))
  batch = jax.tree.map(lambda *l: jnp.stack(l), *cases.values())
  fn = jax.jit(jax.vmap(body(name), in_axes=(0, None)))
  out, diag = fn(batch, jax.random.key(2))
  got = {k: jax.tree.map(lambda l: np.asarray(l[i]), out) for i, k in enumerate(cases)}
  close = functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=2e-5)
  jax.tree.map(close, got["permuted"], got["base"])
  jax.tree.map(lambda a, r: close(a, np.asarray(r[0])), got["consensus"], row)
  if name in TRANSLATION:
    jax.tree.map(lambda a, b, s: close(a, b + 3.0 * np.asarray(s[0])),
                 got["translated"], got["base"], shift)
  for k in ("nan", "inf", "huge"):
    assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(got[k])), k
  for v in diag.values():
    assert v.shape[:2] == (len(cases), W)
  # The faulty rows are never averaged.
  for v in diag.values():
    if v.dtype == bool:
      assert not np.asarray(v)[4, -F:].any()


@pytest.mark.parametrize("name", sorted(RULES))
def test_composes_under_ctma(name):
  rows = tree_rows(jax.random.key(6))
  rows = jax.tree.map(lambda l: l.at[-1].set(jnp.nan), rows)
  rule = agg_lib.ctma(as_aggregator(name))
  out, diag = jax.jit(lambda x, k: rule(x, k))(rows, jax.random.key(0))
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(out))
  assert not diag["ctma_kept"][-1] and int(np.sum(diag["ctma_kept"])) == W - F


def test_flame_noise_needs_key_and_scales_with_median_norm():
  x = jnp.asarray(golden_rows(0, d=400), jnp.float32)
  with pytest.raises(ValueError, match="key"):
    jax.jit(body("flame", noise=0.1))(x, None)
  quiet, _ = jax.jit(body("flame"))(x, None)
  noisy, _ = jax.jit(body("flame", noise=0.5))(x, jax.random.key(0))
  # Noise of standard deviation noise * M, M the median norm.
  m = np.median(np.linalg.norm(np.asarray(x), axis=1))
  np.testing.assert_allclose(np.std(np.asarray(noisy - quiet)), 0.5 * m, rtol=0.15)


def test_dnc_needs_key():
  with pytest.raises(ValueError, match="key"):
    body("dnc")(jnp.zeros((W, 3)), None)


# --------------------------------------------------------------------------
# Hypothesis: the subset rules against NumPy on arbitrary small inputs
# --------------------------------------------------------------------------

SMALL = hnp.arrays(np.float64, (7, 3), elements=st.floats(-10, 10, allow_subnormal=False))


@settings(max_examples=25, deadline=None)
@given(SMALL)
def test_subset_rules_match_numpy(x):
  # Ties in the criteria would make both sides pick by index; skip those inputs.
  d = np.sqrt(sqdists(x))
  assume(len(np.unique(np.round(d[np.triu_indices(7, 1)], 6))) == 21)
  assume(len(np.unique(np.round(np.linalg.norm(x, axis=1), 6))) == 7)
  with jax.enable_x64(True):
    for name, ref in (("mda", np_mda), ("smea", np_smea), ("cge", np_cge), ("monna", np_monna)):
      out, _ = _jitted(name)(jnp.asarray(x), None)
      np.testing.assert_allclose(out, ref(x, 2), rtol=1e-9, atol=1e-9, err_msg=name)


@functools.lru_cache(maxsize=None)
def _jitted(name):
  return jax.jit(body(name, f=2))


@pytest.mark.slow
def test_plain_and_cpu_kernels_agree():
  from ftjax import kernels
  rows = tree_rows(jax.random.key(7))
  names = ["bulyan", "dnc", "signguard"]

  def run(kernel_set):
    with kernels.use(kernel_set):
      return jax.jit(lambda x, k: [body(n)(x, k) for n in names])(rows, jax.random.key(0))

  for name, plain, cpu in zip(names, run("plain"), run("cpu")):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6,
                                   err_msg=name), plain, cpu)


@pytest.mark.parametrize("name,options,match", [
    ("dnc", {"c": 6.0}, "floor"), ("dnc", {"num_iters": 0}, "num_iters"),
    ("signguard", {"lower": 2.0, "upper": 1.0}, "lower"),
    ("clustering", {"linkage": "ward"}, "ward"),
    ("clipped_clustering", {"max_tau": 0.0}, "max_tau"), ("flame", {"noise": -1.0}, "noise"),
    ("monna", {"idx": W}, "idx"), ("bulyan", {}, "4f"),
])
def test_bad_options_refused(name, options, match):
  x = jnp.zeros((W if name != "bulyan" else 8, 3))
  with pytest.raises(ValueError, match=match):
    body(name, **options)(x, jax.random.key(0))


@pytest.mark.parametrize("name", ["mda", "smea", "caf"])
def test_with_distances_are_the_distances_to_the_output(name):
  rows = jax.tree.map(lambda l: l.at[-1].set(jnp.nan), tree_rows(jax.random.key(8)))
  fn = functools.partial(RULES[name]["with_distances"], f=F)
  with jax.enable_x64(True):
    rows = jax.tree.map(lambda l: l.astype(jnp.float64), rows)
    out, diag, r = jax.jit(fn)(rows, None)
    direct = agg_maths.row_sqdist(rows, out)
  np.testing.assert_allclose(r, direct, rtol=1e-9, atol=1e-12)
  assert np.isinf(r[-1])
