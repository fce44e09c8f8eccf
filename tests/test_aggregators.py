"""Tests for ftjax.aggregators: goldens, NumPy references, properties, faults, the API."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.experimental import aggregating as optax_aggregating

from ftjax import aggregators as agg_lib
from ftjax.aggregators import maths as agg_maths
from ftjax import kernels
from ftjax.kernels import rows

W, F = 9, 2
KEY = jax.random.key(0)
GOLDEN_ROWS = np.array([[1., 2, 3], [4, 5, 6], [7, 8, 9]])

# Options that make every rule's textbook property hold in the tests: gm from
# the median (a zero start is not translation equivariant, a mean start is
# dragged by far rows) with negligible
# smoothing, centred clipping from the median, clip radius above honest norms.
OPTIONS = {"gm": {"init": "cwmed", "nu": 1e-6, "iters": 8},
           "centered_clipping": {"init": "cwmed", "tau": 1.0, "iters": 3},
           "clip": {"tau": 100.0}}

ROBUST = ["cwmed", "cwtm", "gm", "krum", "multikrum", "centered_clipping", "meamed",
          "ctma(cwtm)", "ctma(gm)", "ctma(cwmed)", "ctma(krum)", "nnm(cwtm)", "nnm+ctma(cwtm)",
          "bucketing(cwtm)", "clip(cwtm)", "arc(cwtm)", "arc(ctma(cwtm))", "nnm(gm)"]
ALL = ["avg"] + ROBUST
# Deterministic rules whose output is unchanged when the rows are permuted.
PERMUTATION_INVARIANT = [s for s in ALL if "bucketing" not in s]
TRANSLATION = [s for s in PERMUTATION_INVARIANT if not s.startswith(("clip", "arc"))]
SCALING = [s for s in PERMUTATION_INVARIANT
           if s not in ("centered_clipping",) and not s.startswith("clip")]


def make(spec, f=F, **kw):
  return agg_lib.make_aggregator(spec, f, options=kw.pop("options", OPTIONS), **kw)


def tree_rows(key, w=W, dtype=jnp.float32):
  """A two-leaf pytree of rows with different shapes."""
  k1, k2 = jax.random.split(key)
  return {"a": jax.random.normal(k1, (w, 3), dtype),
          "b": {"c": jax.random.normal(k2, (w, 2, 2), dtype)}}


def flat(tree):
  """Rows of a stacked pytree as one [W, n] matrix (leaves concatenated)."""
  return np.concatenate([np.asarray(l).reshape(l.shape[0], -1) for l in jax.tree.leaves(tree)],
                        axis=1)


def flat_agg(tree):
  return np.concatenate([np.asarray(l).reshape(-1) for l in jax.tree.leaves(tree)])


def call(spec, rows, f=F, key=KEY, **kw):
  # Eager: on tiny shapes dispatching ops is cheaper than compiling; jit is
  # covered by the batched property tests and the jit-specific tests below.
  return make(spec, f, **kw)(rows, key)


# --------------------------------------------------------------------------
# Golden values
# --------------------------------------------------------------------------


@pytest.mark.parametrize("spec,expected", [
    ("avg", [4, 5, 6]), ("cwmed", [4, 5, 6]), ("cwtm", [4, 5, 6]),
    # gm starts at the median [4, 5, 6], where the weights of rows 1 and 3 are equal.
    ("gm", [4, 5, 6]), ("rfa", [4, 5, 6]),
    ("krum", [1, 2, 3]), ("multikrum", [2.5, 3.5, 4.5]), ("meamed", [2.5, 3.5, 4.5]),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_golden(spec, expected, dtype):
  with jax.enable_x64(dtype == jnp.float64):
    out, _ = agg_lib.make_aggregator(spec, 1)(jnp.asarray(GOLDEN_ROWS, dtype))
    assert out.dtype == dtype
    np.testing.assert_allclose(out, expected, rtol=1e-6 if dtype == jnp.float32 else 1e-8)


def test_golden_gm_from_zero():
  # Weiszfeld from 0 with nu = 0.1: three steps of z <- sum_i b_i x_i / sum_i b_i.
  out, _ = agg_lib.make_aggregator("gm", 1, options={"gm": {"init": "zero"}})(
      jnp.asarray(GOLDEN_ROWS, jnp.float32))
  np.testing.assert_allclose(out, [3.78788764, 4.78788764, 5.78788764], rtol=1e-6)


def test_golden_nnm_rows():
  mixed = agg_lib.nearest_neighbour_mix(jnp.asarray(GOLDEN_ROWS, jnp.float32), 1)
  np.testing.assert_allclose(mixed, [[2.5, 3.5, 4.5], [2.5, 3.5, 4.5], [5.5, 6.5, 7.5]],
                             rtol=1e-6)


def test_cwmed_even_midpoint_and_lower():
  rows = jnp.array([[1.], [2.], [10.], [20.]])
  assert float(agg_lib.make_aggregator("cwmed", 1)(rows)[0][0]) == 6.0
  lower = agg_lib.make_aggregator("cwmed", 1, options={"cwmed": {"lower": True}})
  assert float(lower(rows)[0][0]) == 2.0


# --------------------------------------------------------------------------
# Properties over the tables
# --------------------------------------------------------------------------


def _variants(rows):
  """Inputs of one shape for one compiled call: name -> rows."""
  perm = np.random.default_rng(0).permutation(W)
  shift = tree_rows(jax.random.key(3), w=1)
  row = jax.tree.map(lambda l: l[:1], rows)
  return {
      "base": rows,
      "permuted": jax.tree.map(lambda l: l[perm], rows),
      "translated": jax.tree.map(lambda l, s: l + 3.0 * s, rows, shift),
      "scaled": jax.tree.map(lambda l: 2.5 * l, rows),
      "consensus": jax.tree.map(lambda l: jnp.repeat(l, W, axis=0), row),
  }, shift, row


@pytest.mark.parametrize("spec", ALL)
def test_equivariance_and_consensus(spec):
  """Permutation invariance, translation/scaling equivariance, consensus."""
  rows = tree_rows(jax.random.key(2))
  variants, shift, row = _variants(rows)
  names = list(variants)
  batch = jax.tree.map(lambda *v: jnp.stack(v), *variants.values())
  outs, _ = jax.jit(jax.vmap(make(spec)))(batch, jax.random.split(KEY, len(names)))
  out = {n: flat_agg(jax.tree.map(lambda l, i=i: l[i], outs)) for i, n in enumerate(names)}
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  close(out["consensus"], flat_agg(row))
  if spec in PERMUTATION_INVARIANT:
    close(out["permuted"], out["base"])
  if spec in TRANSLATION:
    close(out["translated"], out["base"] + 3.0 * flat_agg(shift))
  if spec in SCALING:
    close(out["scaled"], 2.5 * out["base"])


@pytest.mark.parametrize("spec", ["avg", "cwtm", "multikrum", "nnm(cwtm)", "nnm(cwmed)",
                                  "ctma(cwmed)", "ctma(krum)", "nnm+ctma(gm)"])
def test_f_zero_gives_mean(spec):
  rows = tree_rows(jax.random.key(6))
  out, _ = call(spec, rows, f=0)
  np.testing.assert_allclose(flat_agg(out), flat(rows).mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["cwmed", "cwtm"])
@pytest.mark.parametrize("w", [5, 8, 12])
def test_coordinatewise_order_statistic_bounds(spec, w):
  f = (w - 1) // 2 - 1
  x = np.asarray(jax.random.normal(jax.random.key(w), (w, 40)))
  out, _ = call(spec, jnp.asarray(x), f=f)
  s = np.sort(x, axis=0)
  assert np.all(out >= s[f] - 1e-6) and np.all(out <= s[w - f - 1] + 1e-6)


def test_cwtm_and_meamed_match_numpy():
  x = np.asarray(jax.random.normal(jax.random.key(7), (W, 50)), np.float64)
  s = np.sort(x, axis=0)
  np.testing.assert_allclose(call("cwtm", jnp.asarray(x))[0], s[F:W - F].mean(0), rtol=1e-5)
  med = np.median(x, axis=0)
  idx = np.argsort(np.abs(x - med), axis=0, kind="stable")[:W - F]
  expected = np.take_along_axis(x, idx, axis=0).mean(0)
  np.testing.assert_allclose(call("meamed", jnp.asarray(x))[0], expected, rtol=1e-5)


@pytest.mark.slow
def test_meamed_and_bucketing_above_the_network_limit_match_numpy():
  # W > NETWORK_MAX_ROWS: the CPU sort of integer keys and the bucket gather.
  w, f = 97, 20
  x = np.array(jax.random.normal(jax.random.key(17), (w, 30)), np.float32)
  x[3, :5] = np.nan  # a faulty row: sorted as +inf, and its bucket's mean is NaN
  finite_x = np.where(np.isnan(x), np.inf, x)
  med = np.median(np.sort(finite_x, axis=0), axis=0)
  s = np.sort(finite_x, axis=0)
  expected = []
  for c in range(x.shape[1]):  # the window of W - f values nearest the median
    col, m = s[:, c], med[c]
    k = sum(int((m - col[j]) > (col[w - f + j] - m)) for j in range(f))
    expected.append(col[k:k + w - f].astype(np.float64).mean())
  out, _ = call("meamed", jnp.asarray(x), f=f)
  np.testing.assert_allclose(out, expected, rtol=2e-6, atol=2e-7)

  key = jax.random.key(4)
  out, _ = call("bucketing(cwmed)", jnp.asarray(x), f=f, key=key,
                options={"bucketing": {"bucket_size": 3}})
  perm = np.asarray(jax.random.permutation(jax.random.split(key)[0], w))
  # A bucket holding a row with any NaN is NaN in every coordinate, which cwmed
  # orders as +inf.
  means = np.stack([np.full(x.shape[1], np.inf) if 3 in perm[i:i + 3]
                    else x[perm[i:i + 3]].astype(np.float64).mean(0) for i in range(0, w, 3)])
  np.testing.assert_allclose(out, np.median(means, axis=0), rtol=2e-6, atol=2e-7)


def _faulty_variants():
  """Rows whose last F are faulty, several ways, all of one shape."""
  rows = tree_rows(jax.random.key(8))
  honest = flat(rows)[:W - F]
  variants = {str(v): jax.tree.map(lambda l, v=v: l.at[W - F:].set(v), rows)
              for v in (1e6, -1e6, np.nan, np.inf, -np.inf)}
  # One NaN coordinate in one row and a -inf row: finite elsewhere.
  variants["mixed"] = {"a": rows["a"].at[W - 1, 1].set(jnp.nan).at[W - 2].set(-jnp.inf),
                       "b": rows["b"]}
  return honest, variants


@pytest.mark.parametrize("spec", ROBUST)
def test_faulty_rows_are_ignored(spec):
  """f rows far away (1e6), NaN, +-inf or partly non-finite: output stays honest."""
  honest, variants = _faulty_variants()
  batch = jax.tree.map(lambda *v: jnp.stack(v), *variants.values())
  outs, _ = jax.jit(jax.vmap(make(spec)))(batch, jax.random.split(KEY, len(variants)))
  center = honest.mean(0)
  radius = np.max(np.linalg.norm(honest - center, axis=1))
  coordinatewise = spec in ("cwmed", "cwtm", "meamed") or (
      spec.endswith("(cwtm)") and not spec.startswith(("arc", "clip")))
  for i, name in enumerate(variants):
    out = flat_agg(jax.tree.map(lambda l: l[i], outs))
    assert np.all(np.isfinite(out)), (name, out)
    assert np.linalg.norm(out - center) <= radius, (name, out, center)
    if coordinatewise:
      assert np.all(out >= honest.min(0) - 1e-5) and np.all(out <= honest.max(0) + 1e-5), name


def test_avg_is_plain_mean_and_not_robust():
  _, variants = _faulty_variants()
  out, _ = call("avg", variants["nan"])
  assert np.all(np.isnan(flat_agg(out)))


# --------------------------------------------------------------------------
# CTMA, bucketing, clipping, gm specifics
# --------------------------------------------------------------------------


def np_cwtm(x, f):
  w = len(x)
  return np.sort(x, axis=0)[f:w - f].mean(0)


def np_gm(x, iters=8, nu=1e-6, init="cwmed"):
  z = {"cwmed": np.median(x, axis=0), "zero": np.zeros(x.shape[1])}[init]
  for _ in range(iters):
    beta = 1.0 / np.maximum(np.linalg.norm(x - z, axis=1), nu)
    z = beta @ x / beta.sum()
  return z


# Base rules with OPTIONS (gm: from the median, nu = 1e-6, 8 iterations).
NP_BASE = {"cwtm": np_cwtm, "cwmed": lambda x, f: np.median(x, axis=0),
           "avg": lambda x, f: x.mean(0), "gm": lambda x, f: np_gm(x)}


def np_nnm(x, f):
  w = len(x)
  dist = np.sum((x[:, None] - x[None]) ** 2, axis=2)
  np.fill_diagonal(dist, -1.0)
  order = np.argsort(dist, axis=1, kind="stable")[:, :w - f]
  return np.stack([x[o].mean(0) for o in order])


def _ctma_reference(x, x0, f, keep_ties=False):
  """(aggregate, rows kept) of CTMA around x0, in NumPy."""
  w = len(x)
  r = np.sum((x - x0) ** 2, axis=1)
  if keep_ties:
    kept = r <= np.sort(r)[w - f - 1]
    return x0 + (x[kept] - x0).sum(0) / (w - f), int(kept.sum())
  idx = np.argsort(r, kind="stable")[:w - f]
  return x[idx].mean(0), len(idx)


@pytest.mark.parametrize("keep_ties", [False, True])
@pytest.mark.parametrize("base", ["cwtm", "cwmed", "gm", "avg"])
def test_ctma_is_mean_of_nearest_rows(base, keep_ties):
  x = np.asarray(jax.random.normal(jax.random.key(10), (W, 6)), np.float64)
  x[2] = x[5]  # a tie
  x0 = NP_BASE[base](x, F)
  opts = {**OPTIONS, "ctma": {"keep_ties": keep_ties}}
  with jax.enable_x64(True):
    out, diag = call(f"ctma({base})", jnp.asarray(x), options=opts)
  expected, count = _ctma_reference(x, x0, F, keep_ties)
  np.testing.assert_allclose(out, expected, rtol=1e-8, atol=1e-8)
  assert int(diag["ctma_kept"].sum()) == count


def test_ctma_exact_count_with_ties_and_keep_ties():
  # Rows 3 +- e_j and one far row: cwtm is exactly 3 everywhere and all 8 near
  # rows are at distance 1. Exactly W-f are kept (lowest index wins); with
  # keep_ties all 8 are, and x0 + (1/(W-f)) sum_i (x_i - x0) = 3 (the offsets
  # cancel), where dividing the kept rows' sum by W-f would give 24/7.
  eye = np.eye(4)
  x = (3.0 + np.concatenate([eye, -eye, 5 * np.ones((1, 4))])).astype(np.float32)
  out, diag = call("ctma(cwtm)", jnp.asarray(x))
  assert list(np.flatnonzero(diag["ctma_kept"])) == list(range(W - F))
  np.testing.assert_allclose(out, x[:W - F].mean(0), rtol=1e-6)
  out_t, diag_t = call("ctma(cwtm)", jnp.asarray(x), options={"ctma": {"keep_ties": True}})
  assert list(np.flatnonzero(diag_t["ctma_kept"])) == list(range(8))
  np.testing.assert_allclose(out_t, [3.0] * 4, rtol=1e-6)


@pytest.mark.parametrize("spec,keep_ties,expected", [
    # x0 = cwtm = 1; the four 1s tie at distance 0: 1 + (4 * 0) / 3.
    ("ctma(cwtm)", True, 1.0),
    # x0 = 2.8; the four 1s tie: 2.8 + 4 * (1 - 2.8) / 3.
    ("ctma(avg)", True, 0.4),
    # exactly W - f = 3 of the 1s.
    ("ctma(avg)", False, 1.0),
    # nnm mixes [10, 1, 1, 1, 1] into [4, 1, 1, 1, 1]; x0 = avg = 1.6; the four
    # 1s tie: 1.6 + 4 * (1 - 1.6) / 3.
    ("nnm+ctma(avg)", True, 0.8),
])
def test_ctma_keep_ties_by_hand(spec, keep_ties, expected):
  x = jnp.array([[10.0], [1.0], [1.0], [1.0], [1.0]])
  opts = {"ctma": {"keep_ties": keep_ties}, "nnm+ctma": {"keep_ties": keep_ties}}
  out, diag = agg_lib.make_aggregator(spec, 2, options=opts)(x)
  np.testing.assert_allclose(out, [expected], rtol=1e-6)
  assert int(diag["ctma_kept"].sum()) == (4 if keep_ties else 3)
  assert not bool(diag["ctma_kept"][0])


@pytest.mark.parametrize("keep_ties", [False, True])
def test_nnm_ctma_trims_original_rows_around_nnm_output(keep_ties):
  x = np.asarray(jax.random.normal(jax.random.key(11), (W, 5)), np.float64)
  x[6] = x[1]  # a tie
  x0 = np_cwtm(np_nnm(x, F), F)
  with jax.enable_x64(True):
    out, diag = call("nnm+ctma(cwtm)", jnp.asarray(x),
                     options={"nnm+ctma": {"keep_ties": keep_ties}})
  expected, count = _ctma_reference(x, x0, F, keep_ties)
  np.testing.assert_allclose(out, expected, rtol=1e-8, atol=1e-8)
  assert int(diag["ctma_kept"].sum()) == count


def test_nnm_matches_numpy():
  x = np.asarray(jax.random.normal(jax.random.key(21), (W, 7)), np.float64)
  with jax.enable_x64(True):
    mixed = agg_lib.nearest_neighbour_mix(jnp.asarray(x), F)
    out, _ = call("nnm(cwmed)", jnp.asarray(x))
  np.testing.assert_allclose(mixed, np_nnm(x, F), rtol=1e-10)
  np.testing.assert_allclose(out, np.median(np_nnm(x, F), axis=0), rtol=1e-10)


def _offset_rows(n, seed, offset=1000.0):
  """W rows sharing a large common component, at well separated distances."""
  rng = np.random.default_rng(seed)
  scale = 1.0 + 0.25 * rng.permutation(W)[:, None]
  return (offset + scale * rng.standard_normal((W, n))).astype(np.float32)


# n: 20 one reduction; 75 slices in groups (4, 4, 1) plus a 3-column tail; 203
# above SQDIST_MAX_SLICES, 16 long slices plus a tail.
@pytest.mark.parametrize("n", [20, 75, 203])
@pytest.mark.parametrize("base", ["cwtm", "cwmed", "avg", "gm", "krum", "multikrum"])
def test_ctma_long_rows_match_float64_with_common_offset(small_slices, base, n):
  x = _offset_rows(n, seed=n)
  x0, _ = call(base, jnp.asarray(x))
  out, diag = jax.jit(make(f"ctma({base})").__call__)(jnp.asarray(x))
  x64, x0_64 = x.astype(np.float64), np.asarray(x0, np.float64)
  r64 = np.sum((x64 - x0_64) ** 2, axis=1)
  expected, _ = _ctma_reference(x64, x0_64, F)
  kept = np.zeros(W, bool)
  kept[np.argsort(r64, kind="stable")[:W - F]] = True
  np.testing.assert_array_equal(diag["ctma_kept"], kept)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("n", [72, 216])
def test_ctma_long_rows_exact_count_with_ties_and_faulty_rows(small_slices, n):
  # Rows 0-3 are 1000 + 1 and rows 4-7 are 1000 - 1 on their own block of
  # columns; cwtm is exactly 1000, so rows 0-7 tie at distance n / 9.
  x = np.full((W, n), 1000.0, np.float32)
  block = n // 9
  for i in range(8):
    x[i, (i % 4) * block:(i % 4 + 1) * block] += 1.0 if i < 4 else -1.0
  x[8] += 5.0
  variants = {"far": x, "nan": x.copy(), "inf": x.copy()}
  variants["nan"][7:, -1] = np.nan       # F rows with NaN in the tail columns
  variants["inf"][7] = np.inf
  variants["inf"][8, n // 2] = -np.inf
  agg = jax.jit(make("ctma(cwtm)").__call__)
  for name, rows in variants.items():
    out, diag = agg(jnp.asarray(rows))
    keep = 7 if name == "far" else W - F
    assert list(np.flatnonzero(diag["ctma_kept"])) == list(range(keep)), name
    np.testing.assert_allclose(out, x[:W - F].mean(0), rtol=1e-6, err_msg=name)


def np_multikrum(x, f, m):
  """(mean of the m rows with the smallest Krum scores, their indices), NaN-safe, in NumPy."""
  w = len(x)
  finite = np.all(np.isfinite(x), axis=1)
  with np.errstate(invalid="ignore", over="ignore"):
    dist = np.sum((x[:, None] - x[None]) ** 2, axis=2)
  dist[~(finite[:, None] & finite[None, :])] = np.inf
  np.fill_diagonal(dist, np.inf)  # a row is not its own neighbour
  scores = np.sort(dist, axis=1)[:, :w - f - 1].sum(1)
  idx = np.sort(np.argsort(scores, kind="stable")[:m])
  return x[idx].mean(0), idx


def np_ctma(x, x0, f, keep_ties):
  """(aggregate, bool kept) of CTMA around x0, non-finite rows infinitely far, in NumPy."""
  w = len(x)
  with np.errstate(invalid="ignore", over="ignore"):
    r = np.sum((x - x0) ** 2, axis=1)
  r[np.isnan(r)] = np.inf
  if keep_ties:
    kept = r <= np.sort(r)[w - f - 1]
    return x0 + (x[kept] - x0).sum(0) / (w - f), kept
  kept = np.zeros(w, bool)
  kept[np.argsort(r, kind="stable")[:w - f]] = True
  return x[kept].mean(0), kept


def _tie_at_cutoff(spec_m, w, f, seed):
  """float64 [w, 7] rows where two identical rows sit at CTMA's cut-off around
  the (multi)krum centre: ranks W-f-1 and W-f of the distances."""
  for attempt in range(200):
    rng = np.random.default_rng(seed + 1000 * attempt)
    x = rng.standard_normal((w, 7))
    x0, _ = np_multikrum(x, f, spec_m)
    order = np.argsort(np.sum((x - x0) ** 2, axis=1), kind="stable")
    x[order[w - f]] = x[order[w - f - 1]]
    x0, _ = np_multikrum(x, f, spec_m)
    r = np.sum((x - x0) ** 2, axis=1)
    ranks = np.argsort(r, kind="stable")
    a, b = ranks[w - f - 1], ranks[w - f]
    if np.array_equal(x[a], x[b]) and not np.array_equal(x[a], x0):
      return x
  raise AssertionError("no rows with a tie at the cut-off")


@pytest.mark.parametrize("keep_ties", [False, True])
@pytest.mark.parametrize("spec,m", [("krum", 1), ("multikrum", 11 - 2), ("multikrum", 3)])
@pytest.mark.parametrize("variant", ["tie", "faulty", "leaves"])
def test_ctma_of_krum_matches_numpy(spec, m, keep_ties, variant):
  # ctma(krum) and ctma(multikrum) take the rows' distances to the centre from
  # krum's pairwise distances, not from a pass over the rows: the kept rows and
  # the aggregate must still be those of a plain float64 NumPy CTMA, with two
  # identical rows at the cut-off, with NaN and inf rows, and over a pytree.
  w, f = 11, 2
  x = _tie_at_cutoff(m, w, f, seed=m + 17 * keep_ties)
  if variant == "faulty":
    x[0, 3] = np.nan
    x[5] = -np.inf
  x0, _ = np_multikrum(x, f, m)
  expected, kept = np_ctma(x, x0, f, keep_ties)
  if variant == "faulty":
    assert not kept[0] and not kept[5]
  if variant == "tie":
    r = np.sum((x - x0) ** 2, axis=1)
    assert np.sum(r == np.sort(r)[w - f - 1]) >= 2  # the tie really is at the cut-off
  options = {"ctma": {"keep_ties": keep_ties}, "multikrum": {"num_selected": m}}
  with jax.enable_x64(True):
    if variant == "leaves":  # columns 0-2 as one leaf, 3-6 as a [2, 2] leaf
      rows_in = {"a": jnp.asarray(x[:, :3]), "b": {"c": jnp.asarray(x[:, 3:].reshape(w, 2, 2))}}
    else:
      rows_in = jnp.asarray(x)
    out, diag = jax.jit(make(f"ctma({spec})", f, options=options).__call__)(rows_in)
  got = flat_agg(out) if variant == "leaves" else np.asarray(out)
  np.testing.assert_array_equal(np.asarray(diag["ctma_kept"]), kept)
  np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec,passes", [("ctma(krum)", 0), ("ctma(multikrum)", 0),
                                         ("ctma(cwtm)", 1), ("ctma(avg)", 1)])
def test_ctma_distance_passes(monkeypatch, spec, passes):
  # Distances of the rows to a point (a pass over the rows): ctma makes one to
  # its centre unless the inner rule knows them (krum's pairwise distances),
  # and only then puts the centre behind a fusion barrier.
  calls, barriers = [], []
  real, real_isolate = agg_maths.row_sqdist, rows.isolate

  def counting(x, center=None):
    calls.append(center is not None)
    return real(x, center)

  def counting_isolate(fn, *args):
    barriers.append(fn)
    return real_isolate(fn, *args)

  monkeypatch.setattr(agg_maths, "row_sqdist", counting)
  monkeypatch.setattr(rows, "isolate", counting_isolate)
  x = jax.random.normal(jax.random.key(5), (W, 6))
  jax.make_jaxpr(make(spec[len("ctma("):-1]).__call__)(x)  # the inner rule's own barriers
  inner_barriers = len(barriers)
  jax.make_jaxpr(make(spec).__call__)(x)
  assert sum(calls) == passes
  assert len(barriers) - 2 * inner_barriers == passes


def test_pairwise_sqdist_sliced_matches_float64(small_slices):
  x = _offset_rows(75, seed=9)
  x[W - 1, 3] = np.nan
  dist, finite = agg_maths.pairwise_sqdist(jnp.asarray(x), F)
  x64 = x.astype(np.float64)
  expected = np.sum((x64[:, None] - x64[None]) ** 2, axis=2)
  ok = np.asarray(finite)
  assert list(ok) == [True] * (W - 1) + [False]
  np.testing.assert_allclose(np.asarray(dist)[np.ix_(ok, ok)], expected[np.ix_(ok, ok)],
                             rtol=1e-5)
  assert np.all(np.isposinf(np.asarray(dist)[W - 1, :W - 1]))
  krum, _ = call("krum", jnp.asarray(x))
  honest = expected[:W - 1, :W - 1]
  scores = np.sort(honest + np.diag(np.full(W - 1, np.inf)), axis=1)[:, :W - F - 1].sum(1)
  np.testing.assert_array_equal(krum, x[np.argmin(scores)])


def _dup_faulty_rows(w, n, seed, dtype):
  """[w, n] rows near 100 with copies of row 4 at rows 1, w // 2 and w - 2, a NaN row
  and an inf row."""
  rng = np.random.default_rng(seed)
  x = (100.0 + rng.standard_normal((w, n)) * (1 + 0.1 * rng.permutation(w)[:, None]))
  x[[1, w // 2, w - 2]] = x[4]
  x[3, n - 1] = np.nan
  x[w - 1, 0] = -np.inf
  return x.astype(dtype)


def _np_nnm_faulty(x, f):
  """NumPy nnm with non-finite rows infinitely far and returned unchanged."""
  w = len(x)
  finite = np.all(np.isfinite(x), axis=1)
  safe = np.where(finite[:, None], x, 0.0).astype(np.float64)
  dist = np.sum((safe[:, None] - safe[None]) ** 2, axis=2)
  dist[~(finite[:, None] & finite[None, :])] = np.inf
  np.fill_diagonal(dist, -1.0)
  order = np.argsort(dist, axis=1, kind="stable")[:, :w - f]
  mixed = np.stack([safe[o].mean(0) for o in order])
  return np.where(finite[:, None], mixed, x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spec,m", [("krum", 1), ("multikrum", None), ("multikrum", 4)])
def test_krum_duplicates_faulty_rows_and_leaves_match_numpy(small_slices, dtype, spec, m):
  # Copies of one row tie exactly: the selection is NumPy's stable one (lowest
  # index first) on the rows split over two leaves, long enough for blocks.
  w, f, n = 13, 3, 52
  x = _dup_faulty_rows(w, n, seed=7, dtype=dtype)
  m_used = w - f if m is None else m
  expected, idx = np_multikrum(x.astype(np.float64), f, m_used)
  options = {"multikrum": {"num_selected": m}} if m else {}
  with jax.enable_x64(dtype == np.float64):
    tree = {"a": jnp.asarray(x[:, :12].reshape(w, 3, 4)), "b": jnp.asarray(x[:, 12:])}
    out, diag = jax.jit(make(spec, f, options=options).__call__)(tree)
  np.testing.assert_array_equal(np.flatnonzero(diag["krum_selected"]), idx)
  np.testing.assert_allclose(flat_agg(out), expected,
                             rtol=1e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nnm_duplicates_faulty_rows_and_leaves_match_numpy(small_slices, dtype):
  w, f, n = 13, 3, 52
  x = _dup_faulty_rows(w, n, seed=8, dtype=dtype)
  expected = _np_nnm_faulty(x, f)
  with jax.enable_x64(dtype == np.float64):
    tree = {"a": jnp.asarray(x[:, :12].reshape(w, 3, 4)), "b": jnp.asarray(x[:, 12:])}
    for k in ("plain", "cpu"):
      with kernels.use(k):
        mixed = jax.jit(lambda t: agg_lib.nearest_neighbour_mix(t, f))(tree)
      got = flat(mixed)
      finite = np.all(np.isfinite(x), axis=1)
      np.testing.assert_array_equal(got[~finite], x[~finite])
      np.testing.assert_allclose(got[finite], expected[finite],
                                 rtol=1e-6 if dtype == np.float32 else 1e-12)


def test_nnm_above_network_rows_matches_numpy():
  # W > NETWORK_MAX_ROWS: the neighbourhoods come from the radix select; copies
  # of rows tie exactly and a NaN row stays as it is.
  w, f, n = 97, 24, 8
  x = np.random.default_rng(9).integers(-2, 3, size=(w, n)).astype(np.float32)
  x[[10, 50, 96]] = x[3]
  x[20, 1] = np.nan
  expected = _np_nnm_faulty(x, f)
  for k in ("plain", "cpu"):
    with kernels.use(k):
      got = np.asarray(jax.jit(lambda t: agg_lib.nearest_neighbour_mix(t, f))(jnp.asarray(x)))
    np.testing.assert_array_equal(got[20], x[20])
    good = np.arange(w) != 20
    np.testing.assert_allclose(got[good], expected[good], rtol=1e-6, atol=1e-6)


def test_bucketing_matches_definition_and_uses_key():
  x = np.asarray(jax.random.normal(jax.random.key(12), (W, 5)), np.float64)
  key = jax.random.key(3)
  out, _ = call("bucketing(cwmed)", jnp.asarray(x), key=key)
  perm = np.asarray(jax.random.permutation(jax.random.split(key)[0], W))
  s = W // (2 * F)  # default bucket size: 2 -> buckets of sizes 2,2,2,2,1
  means = np.stack([x[perm[i:i + s]].mean(0) for i in range(0, W, s)])
  np.testing.assert_allclose(out, np.median(means, axis=0), rtol=1e-5)
  jitted = jax.jit(make("bucketing(cwmed)").__call__)
  outs = {tuple(np.round(np.asarray(jitted(jnp.asarray(x), jax.random.key(k))[0]), 5))
          for k in range(6)}
  assert len(outs) > 1  # a fresh permutation per key
  with pytest.raises(ValueError, match="PRNG key"):
    make("bucketing(cwmed)")(jnp.asarray(x))


def test_arc_clips_k_largest_to_next_norm():
  norms = np.array([1., 2, 3, 4, 5, 6, 7, 8, 9])
  x = (norms[:, None] * np.array([[0.6, 0.8]])).astype(np.float32)
  out, diag = call("arc(avg)", jnp.asarray(x))
  k = int(2 * F * (W - F) / W)  # 3 largest clipped to the 4th largest norm (6)
  clipped = np.minimum(norms, norms[::-1][k])
  assert list(np.flatnonzero(diag["arc_clipped"])) == list(range(W - k, W))
  np.testing.assert_allclose(out, (clipped[:, None] * [0.6, 0.8]).mean(0), rtol=1e-6)


def test_static_clip():
  x = jnp.asarray([[3., 4.], [0.3, 0.4], [6., 8.]])
  out, diag = call("clip(avg)", x, f=1, options={"clip": {"tau": 1.0}})
  np.testing.assert_allclose(out, np.array([[0.6, 0.8], [0.3, 0.4], [0.6, 0.8]]).mean(0),
                             rtol=1e-6)
  assert list(np.asarray(diag["clip_clipped"])) == [True, False, True]


def test_gm_tolerance_variant_reaches_fixed_point():
  x = np.asarray(jax.random.normal(jax.random.key(13), (W, 4)), np.float64)
  opts = {"gm": {"tol": 1e-7, "max_iters": 500, "init": "cwmed", "nu": 1e-8}}
  out, diag = call("gm", jnp.asarray(x), options=opts)
  assert 1 < int(diag["gm_iters"]) < 500
  z = np.asarray(out, np.float64)
  grad = ((z - x) / np.linalg.norm(z - x, axis=1, keepdims=True)).sum(0)
  assert np.linalg.norm(grad) < 1e-3  # the geometric median's optimality condition


def test_centered_clip_from_given_center():
  x = jnp.asarray([[0., 0.], [10., 0.], [0., 10.]])
  out = agg_lib.centered_clip(x, jnp.zeros(2), tau=1.0, iters=1)
  np.testing.assert_allclose(out, [1 / 3, 1 / 3], rtol=1e-6)


# --------------------------------------------------------------------------
# Pytrees, jit, vmap, recompilation, optax
# --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL + ["bucketing(gm)"])
def test_pytree_equals_flat(spec):
  rows = tree_rows(jax.random.key(14))
  a, _ = call(spec, rows)
  b, _ = call(spec, jnp.asarray(flat(rows)))
  np.testing.assert_allclose(flat_agg(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(a) == jax.tree.structure(jax.tree.map(lambda l: l[0], rows))


@pytest.mark.parametrize("spec", ["cwtm", "ctma(cwtm)", "nnm(gm)", "bucketing(cwmed)"])
def test_vmap_over_runs(spec):
  agg = make(spec)
  runs = jax.random.normal(jax.random.key(15), (3, W, 4))
  keys = jax.random.split(KEY, 3)
  batched, _ = jax.jit(jax.vmap(agg))(runs, keys)
  for r in range(3):
    np.testing.assert_allclose(batched[r], agg(runs[r], keys[r])[0], rtol=1e-5, atol=1e-6)


def test_no_recompile_on_second_call():
  agg = make("nnm+ctma(cwtm)")
  traces = []

  @jax.jit
  def step(rows):
    traces.append(1)
    return agg(rows)

  step(tree_rows(jax.random.key(16)))
  step(tree_rows(jax.random.key(17)))
  assert len(traces) == 1


def test_diagnostics_structure_fixed():
  agg = make("bucketing(ctma(cwtm))")
  _, d1 = agg(tree_rows(jax.random.key(18)), jax.random.key(1))
  _, d2 = agg(tree_rows(jax.random.key(19)), jax.random.key(2))
  assert set(d1) == set(d2) == {"ctma_kept"}
  assert d1["ctma_kept"].shape == (W,)  # per worker: whether its bucket was kept


def test_as_optax_in_process_keeps_diagnostics():
  # process(identity, aggregator, chain(recorder, sgd), aggregator_has_aux=True)
  # hands the diagnostics to the postprocessor as extra arguments.
  def record(updates, state, params=None, *, ctma_kept, **extra):
    del params, extra
    return updates, state + jnp.sum(ctma_kept)

  recorder = optax.GradientTransformationExtraArgs(lambda p: jnp.zeros([], jnp.int32), record)
  rule = agg_lib.ctma(agg_lib.cwtm(f=F))
  tx = optax_aggregating.process(optax.identity(), rule.as_optax(),
                                 optax.chain(recorder, optax.sgd(0.5)), aggregator_has_aux=True)
  params = {"w": jnp.zeros(4)}
  state = tx.init(params)
  x = np.asarray(jax.random.normal(jax.random.key(20), (2, W, 4)), np.float64)
  step = jax.jit(tx.update)
  expected = np.zeros(4)
  for t in range(2):
    updates, state = step({"w": jnp.asarray(x[t], jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    expected -= 0.5 * _ctma_reference(x[t], np_cwtm(x[t], F), F)[0]
  np.testing.assert_allclose(params["w"], expected, rtol=1e-5, atol=1e-6)
  _, agg_state, (recorded, _) = state
  assert int(agg_state.count) == 2
  assert int(recorded) == 2 * (W - F)


def test_as_optax_folds_count_into_key_for_stochastic_rules():
  tx = make("bucketing(cwmed)").as_optax(jax.random.key(4))
  rows_ = jnp.asarray(np.random.default_rng(0).standard_normal((W, 3)), jnp.float32)
  state = tx.init(jnp.zeros(3))
  (out1, _), state = tx.update(rows_, state)
  (out2, diag), state = tx.update(rows_, state)
  direct, _ = make("bucketing(cwmed)")(rows_, jax.random.fold_in(jax.random.key(4), 1))
  np.testing.assert_allclose(out2, direct, rtol=1e-6)
  assert diag == {} and int(state.count) == 2


# --------------------------------------------------------------------------
# The composable API, identity, kernels
# --------------------------------------------------------------------------


@pytest.mark.parametrize("spec,built", [
    ("cwtm", lambda f: agg_lib.cwtm(f)),
    ("ctma(cwtm)", lambda f: agg_lib.ctma(agg_lib.cwtm(f=f))),
    ("nnm+ctma(gm)", lambda f: agg_lib.nnm_ctma(agg_lib.gm(f=f))),
    ("arc(ctma(cwtm))", lambda f: agg_lib.arc(agg_lib.ctma(agg_lib.cwtm(f)))),
    ("bucketing(cwmed)", lambda f: agg_lib.bucketing(agg_lib.cwmed(f=f))),
    ("clip(multikrum)", lambda f: agg_lib.clip(agg_lib.multikrum(f))),
    ("nnm(meamed)", lambda f: agg_lib.nnm(agg_lib.meamed(f))),
    ("ctma(centered_clipping)", lambda f: agg_lib.ctma(agg_lib.centered_clipping(f=f))),
    ("krum", lambda f: agg_lib.krum(f)),
    ("avg", lambda f: agg_lib.avg(f=f)),
])
def test_spec_builds_the_public_callables(spec, built):
  assert agg_lib.make_aggregator(spec, 2) == built(2)
  assert hash(agg_lib.make_aggregator(spec, 2)) == hash(built(2))
  assert built(2).spec == spec and built(2).f == 2


def test_meta_f_defaults_to_inner_and_options_reach_the_rule():
  rule = agg_lib.ctma(agg_lib.cwtm(f=3), keep_ties=True)
  assert rule.f == 3 and rule.inner.f == 3 and dict(rule.options) == {"keep_ties": True}
  assert agg_lib.ctma(agg_lib.cwtm(f=3), f=1).f == 1
  assert rule == agg_lib.make_aggregator("ctma(cwtm)", 3, options={"ctma": {"keep_ties": True}})


def test_one_table_of_defaults():
  assert dict(agg_lib.DEFAULT_OPTIONS["gm"]) == {
      "iters": 3, "nu": 0.1, "init": "cwmed", "tol": None, "max_iters": 100}
  assert dict(agg_lib.DEFAULT_OPTIONS["centered_clipping"]) == {
      "tau": None, "iters": 1, "init": "cwmed"}
  assert agg_lib.AGGREGATORS["gm"].options is agg_lib.DEFAULT_OPTIONS["gm"]
  for name, info in agg_lib.shipped({**agg_lib.AGGREGATORS, **agg_lib.META_AGGREGATORS}).items():
    assert set(agg_lib.DEFAULT_OPTIONS[name]) == set(info.options), name
  # The builders' defaults are the table's.
  assert dict(agg_lib.gm().options) == dict(agg_lib.DEFAULT_OPTIONS["gm"])
  assert agg_lib.make_aggregator("gm", 0) == agg_lib.gm()


def test_equality_and_hash_cover_options_f_inner_and_kernels():
  make_gm = lambda **o: agg_lib.make_aggregator("gm", 1, options={"gm": o})
  assert make_gm(iters=1) != make_gm(iters=50)
  assert make_gm(iters=3) == make_gm() and hash(make_gm(iters=3)) == hash(make_gm())
  assert agg_lib.cwtm(2) != agg_lib.cwtm(3)
  assert agg_lib.ctma(agg_lib.cwtm(2)) != agg_lib.ctma(agg_lib.cwmed(f=2))
  assert agg_lib.ctma(agg_lib.gm(iters=1, f=2)) != agg_lib.ctma(agg_lib.gm(iters=2, f=2))
  assert agg_lib.cwtm(2).with_kernels("plain") != agg_lib.cwtm(2).with_kernels("cpu")
  assert agg_lib.cwtm(2).with_kernels("plain").kernels == "plain"


def test_jit_static_argument_distinguishes_options():
  x = np.asarray(jax.random.normal(jax.random.key(22), (W, 5)), np.float64)
  traces = []

  def apply(agg, v):
    traces.append(agg)
    return agg(v)[0]

  jitted = jax.jit(apply, static_argnums=0)
  opts = lambda iters: {"gm": {"iters": iters, "nu": 1e-6}}
  one = jitted(agg_lib.make_aggregator("gm", 1, options=opts(1)), jnp.asarray(x, jnp.float32))
  many = jitted(agg_lib.make_aggregator("gm", 1, options=opts(50)), jnp.asarray(x, jnp.float32))
  again = jitted(agg_lib.make_aggregator("gm", 1, options=opts(50)), jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(one, np_gm(x, iters=1), rtol=1e-5)
  np.testing.assert_allclose(many, np_gm(x, iters=50), rtol=1e-4, atol=1e-5)
  assert not np.allclose(one, many, rtol=1e-3)
  np.testing.assert_array_equal(again, many)
  assert len(traces) == 2  # the equal third aggregator reuses the second's compilation


def test_user_rules_wrap_and_compare_by_function():
  def my_mean(updates):
    return jax.tree.map(lambda l: l.mean(0), updates)

  def my_median(updates, key):
    del key
    return jax.tree.map(lambda l: jnp.median(l, axis=0), updates), {"seen": jnp.ones(())}

  x = np.asarray(jax.random.normal(jax.random.key(23), (W, 4)), np.float64)
  with jax.enable_x64(True):
    out, diag = agg_lib.ctma(my_mean, f=F)(jnp.asarray(x))
    np.testing.assert_allclose(out, _ctma_reference(x, x.mean(0), F)[0], rtol=1e-10)
    assert set(diag) == {"ctma_kept"}
    out, diag = agg_lib.nnm(agg_lib.rule(my_median, f=F))(jnp.asarray(x))
    np.testing.assert_allclose(out, np.median(np_nnm(x, F), axis=0), rtol=1e-10)
    assert set(diag) == {"seen"}
  assert agg_lib.rule(my_mean, f=2) == agg_lib.rule(my_mean, f=2)
  assert agg_lib.ctma(my_mean, f=2) == agg_lib.ctma(agg_lib.rule(my_mean, f=2))
  assert agg_lib.rule(my_mean, f=2) != agg_lib.rule(my_median, f=2)
  assert agg_lib.ctma(my_mean, f=2).spec == "ctma(my_mean)"
  assert agg_lib.rule(my_mean, name="mine").spec == "mine"
  with pytest.raises(ValueError, match="rule must be a function"):
    agg_lib.ctma(42, f=1)
  with pytest.raises(ValueError, match="must return"):
    agg_lib.rule(lambda u, k: u)(jnp.asarray(x, jnp.float32))


def test_user_rule_runs_with_the_aggregators_kernels():
  seen = []

  def my_rule(updates):
    seen.append(kernels.current())
    return jax.tree.map(rows.mean, updates)

  x = jnp.ones((5, 3))
  for k in ("plain", "cpu"):
    agg_lib.ctma(my_rule, f=1).with_kernels(k)(x)
  assert seen == ["plain", "cpu"]


def test_cpu_kernels_materialize_the_input():
  def prims(kernel_set):
    agg = agg_lib.cwtm(1).with_kernels(kernel_set)
    return {str(e.primitive) for e in jax.make_jaxpr(lambda v: agg(v)[0])(jnp.ones((5, 3))).eqns}

  assert "optimization_barrier" in prims("cpu")
  assert "optimization_barrier" not in prims("plain")


def test_builders_validate_options():
  with pytest.raises(ValueError, match="zero"):
    agg_lib.gm(init="random")
  with pytest.raises(ValueError, match="integer >= 0"):
    agg_lib.cwtm(-1)
  with pytest.raises(ValueError, match="True or False"):
    agg_lib.ctma(agg_lib.cwtm(1), keep_ties="yes")
  with pytest.raises(ValueError, match="kernel set"):
    agg_lib.make_aggregator("cwtm", 1, kernels="gpu")
  with pytest.raises(ValueError, match="kernel set"):
    agg_lib.cwtm(1).with_kernels("fast")


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("spec,f,w,match", [
    ("cwtm", 2, 4, "W > 2f"),
    ("cwmed", 3, 6, "W > 2f"),
    ("krum", 2, 6, r"W > 2f \+ 2"),
    ("bucketing(cwmed)", 2, 7, "f <= W/4"),
    ("ctma(cwtm)", 4, 8, "W > 2f"),
])
def test_check_refuses_with_advice(spec, f, w, match):
  with pytest.raises(ValueError, match=match) as e:
    agg_lib.make_aggregator(spec, f, num_workers=w)
  assert "lower f" in str(e.value)
  agg_lib.make_aggregator(spec, f, num_workers=4 * f + 5)  # enough workers is fine


def test_bucketing_inner_rows_checked():
  with pytest.raises(ValueError, match="bucket"):
    agg_lib.make_aggregator("bucketing(cwtm)", 4, num_workers=16)


@pytest.mark.parametrize("spec,match", [
    ("median", "valid base rules"), ("foo(cwtm)", "valid meta-aggregators"),
    ("ctma(cwtm", "parenthes"), ("", "non-empty"), ("cwtm(ctma)", "base rule"),
])
def test_unknown_names(spec, match):
  with pytest.raises(ValueError, match=match) as e:
    agg_lib.make_aggregator(spec, 1)
  if "valid" in match:
    assert "cwtm" in str(e.value) or "ctma" in str(e.value)


@pytest.mark.parametrize("options,match", [
    ({"gm": {"iterations": 3}}, "valid options"), ({"median": {}}, "valid names"),
    ({"gm": {"init": "random"}}, "zero"), ({"bucketing": {"bucket_size": 0}}, ">= 1"),
    ({"gm": {"nu": -1}}, "positive"), ({"ctma": {"keep_ties": 1}}, "True or False"),
])
def test_bad_options(options, match):
  with pytest.raises(ValueError, match=match):
    agg_lib.make_aggregator("cwtm", 1, options=options)


@pytest.mark.parametrize("f", [-1, 1.5, True, "2"])
def test_bad_f(f):
  with pytest.raises(ValueError, match="integer >= 0"):
    agg_lib.make_aggregator("cwtm", f)


def test_bad_inputs_refused_before_tracing():
  agg = agg_lib.make_aggregator("cwtm", 1)
  with pytest.raises(ValueError, match="empty"):
    agg({})
  with pytest.raises(ValueError, match="same leading worker axis"):
    agg({"a": jnp.zeros((5, 2)), "b": jnp.zeros((4,))})
  with pytest.raises(ValueError, match="floating"):
    agg(jnp.zeros((5, 2), jnp.int32))
  with pytest.raises(ValueError, match="at least 3 rows"):
    agg(jnp.zeros((2, 2)))
  with pytest.raises(ValueError, match="no worker axis"):
    agg({"a": jnp.zeros((5, 2)), "b": jnp.float32(1.0)})
  with pytest.raises(ValueError, match=r"integer >= 1, got 0"):
    agg(jnp.zeros((0, 2)))
  for dtype in (bool, jnp.complex64):
    with pytest.raises(ValueError, match="floating"):
      agg(jnp.zeros((5, 2), dtype))


def test_canonical_spec_and_alias():
  assert agg_lib.make_aggregator(" NNM + CTMA ( RFA ) ", 1).spec == "nnm+ctma(gm)"
  assert agg_lib.make_aggregator("arc(ctma(cwtm))", 1).spec == "arc(ctma(cwtm))"
  assert set(agg_lib.AGGREGATORS) >= {"avg", "cwmed", "cwtm", "gm", "krum", "multikrum",
                                      "centered_clipping", "meamed"}
  assert set(agg_lib.META_AGGREGATORS) >= {"ctma", "nnm", "nnm+ctma", "bucketing", "clip", "arc"}


# --------------------------------------------------------------------------
# Many workers (radix select above the network limit)
# --------------------------------------------------------------------------


def test_large_w_cwtm_robust_to_huge_rows():
  # f rows of 1e30 must not cost the honest mean any precision (no sum-then-subtract).
  w, f = 97, 24
  x = np.random.default_rng(1).standard_normal((w, 500)).astype(np.float32)
  x[:f] = 1e30
  got, _ = jax.jit(agg_lib.make_aggregator("cwtm", f).__call__)(jnp.asarray(x))
  s = np.sort(x, axis=0)[f:w - f].astype(np.float64).mean(0)
  np.testing.assert_allclose(np.asarray(got), s, rtol=1e-5, atol=1e-6)


def _np_centered_clipping(x, v, iters):
  """Adaptive centred clipping in NumPy: the radius is the median row distance to v."""
  w = x.shape[0]
  for _ in range(iters):
    d = np.sqrt(((x - v) ** 2).sum(1))
    d = np.where(np.isfinite(d), d, np.inf)
    tau = np.sort(d)[(w - 1) // 2]
    s = np.where(np.isfinite(d), np.minimum(1.0, tau / np.where(d > 0, d, 1.0)), 0.0)
    offsets = np.where(np.isfinite(d)[:, None], x - v, 0.0)
    v = v + (s[:, None] * offsets).sum(0) / w
  return v


@pytest.mark.parametrize("value", [1e30, 1e38, -1e30])
@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_centered_clipping_defaults_protect_at_any_scale(value, scale):
  # 8 of 17 rows far away. With the old defaults (tau=10 around the mean) the output
  # followed them to about (8/17) * value; the default radius (the median distance
  # to the centre, which f < W/2 far rows cannot raise above the largest honest
  # distance) keeps their pull on the honest rows' own scale, whatever that scale is.
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    honest = scale * rng.normal(1.0, 0.5, (9, 40))
    x = np.concatenate([honest, np.full((8, 40), value)])
    out = np.asarray(agg_lib.centered_clipping(f=8)(jnp.asarray(x))[0])
    expected = _np_centered_clipping(x, np.median(x, 0), iters=1)
  np.testing.assert_allclose(out, expected, rtol=1e-10)
  assert np.all(np.isfinite(out))
  mean = honest.mean(0)
  spread = np.sqrt(((honest - mean) ** 2).sum(1)).max()
  # The median start already sits at the honest rows' edge (8 of 17 rows beyond it);
  # one clipping step moves it by at most the radius, itself at most the largest
  # honest distance to the start.
  start = np.linalg.norm(np.median(x, 0) - mean)
  assert np.linalg.norm(out - mean) <= 2 * start + spread


@pytest.mark.parametrize("k", [None, 3, 5])
def test_krum_neighbour_count_follows_the_option(k):
  # NumPy Krum: score = sum of the k nearest other rows' squared distances (k = W - f - 1
  # by default, the original program's; Blanchard et al. use W - f - 2).
  rng = np.random.default_rng(3)
  x = rng.normal(size=(9, 4))
  x[7:] += 3.0
  f = 2
  d = ((x[:, None] - x[None]) ** 2).sum(-1) + np.diag(np.full(9, np.inf))
  kk = 9 - f - 1 if k is None else k
  scores = np.sort(d, axis=1)[:, :kk].sum(1)
  out, diag = agg_lib.krum(f, num_neighbours=k)({"w": jnp.asarray(x)})
  np.testing.assert_allclose(out["w"], x[np.argmin(scores)], rtol=1e-6)
  chosen = np.argsort(scores, kind="stable")[:9 - f]
  out, _ = agg_lib.multikrum(f, num_neighbours=k)({"w": jnp.asarray(x)})
  np.testing.assert_allclose(out["w"], x[chosen].mean(0), rtol=1e-5)
  with pytest.raises(ValueError, match="num_neighbours=0 is invalid"):
    agg_lib.krum(f, num_neighbours=0)
