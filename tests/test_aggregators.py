"""Tests for ftjax.aggregators and ftjax.selection: goldens, properties, faults."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import aggregators as agg_lib
from ftjax import selection

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
    ("gm", [3.78788764, 4.78788764, 5.78788764]), ("rfa", [3.78788764, 4.78788764, 5.78788764]),
    ("krum", [1, 2, 3]), ("multikrum", [2.5, 3.5, 4.5]), ("meamed", [2.5, 3.5, 4.5]),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_golden(spec, expected, dtype):
  with jax.enable_x64(dtype == jnp.float64):
    out, _ = agg_lib.make_aggregator(spec, 1)(jnp.asarray(GOLDEN_ROWS, dtype))
    assert out.dtype == dtype
    np.testing.assert_allclose(out, expected, rtol=1e-6 if dtype == jnp.float32 else 1e-8)


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


def _ctma_reference(x, x0, f, keep_ties=False):
  r = np.sum((x - x0) ** 2, axis=1)
  if keep_ties:
    cutoff = np.sort(r)[len(x) - f - 1]
    return x[r <= cutoff].sum(0) / (len(x) - f), int(np.sum(r <= cutoff))
  idx = np.argsort(r, kind="stable")[:len(x) - f]
  return x[idx].mean(0), len(idx)


@pytest.mark.parametrize("base", ["cwtm", "cwmed", "gm", "avg"])
def test_ctma_is_mean_of_nearest_rows(base):
  x = np.asarray(jax.random.normal(jax.random.key(10), (W, 6)), np.float64)
  x0, _ = call(base, jnp.asarray(x))
  out, diag = call(f"ctma({base})", jnp.asarray(x))
  expected, _ = _ctma_reference(x, np.asarray(x0, np.float64), F)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  assert int(diag["ctma_kept"].sum()) == W - F


def test_ctma_exact_count_with_ties_and_keep_ties_quirk():
  # Rows at +-e_j around the origin: cwtm gives 0 and all 8 are at distance 1,
  # plus one far row. Exactly W-f are kept; the quirk keeps every tied one.
  eye = np.eye(4)
  x = np.concatenate([eye, -eye, 5 * np.ones((1, 4))]).astype(np.float32)
  out, diag = call("ctma(cwtm)", jnp.asarray(x))
  assert int(diag["ctma_kept"].sum()) == W - F
  assert list(np.flatnonzero(diag["ctma_kept"])) == list(range(W - F))  # lowest index wins
  np.testing.assert_allclose(out, x[:W - F].mean(0), atol=1e-6)
  quirk = {"ctma": {"keep_ties": True}}
  out_q, diag_q = call("ctma(cwtm)", jnp.asarray(x), options=quirk)
  assert int(diag_q["ctma_kept"].sum()) == 8
  np.testing.assert_allclose(out_q, x[:8].sum(0) / (W - F), atol=1e-6)


def test_nnm_ctma_trims_original_rows_around_nnm_output():
  x = np.asarray(jax.random.normal(jax.random.key(11), (W, 5)), np.float64)
  x0, _ = call("nnm(cwtm)", jnp.asarray(x))
  out, _ = call("nnm+ctma(cwtm)", jnp.asarray(x))
  expected, _ = _ctma_reference(x, np.asarray(x0, np.float64), F)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture
def small_slices(monkeypatch):
  """Slice sizes small enough that test-sized rows take every sliced path."""
  monkeypatch.setattr(selection, "SQDIST_SLICE", 8)
  monkeypatch.setattr(selection, "SQDIST_GROUP", 4)
  monkeypatch.setattr(selection, "SQDIST_MAX_SLICES", 12)
  monkeypatch.setattr(agg_lib, "_GRAM_MIN_SLICE", 8)


def _offset_rows(n, seed, offset=1000.0):
  """W rows sharing a large common component, at well separated distances."""
  rng = np.random.default_rng(seed)
  scale = 1.0 + 0.25 * rng.permutation(W)[:, None]
  return (offset + scale * rng.standard_normal((W, n))).astype(np.float32)


# n: 20 one reduction; 75 slices in groups (4, 4, 1) plus a 3-column tail; 203
# above SQDIST_MAX_SLICES, 16 long slices plus a tail.
@pytest.mark.parametrize("n", [20, 75, 203])
@pytest.mark.parametrize("base", ["cwtm", "cwmed", "avg", "gm"])
def test_ctma_long_rows_match_float64_with_common_offset(small_slices, base, n):
  x = _offset_rows(n, seed=n)
  x0, _ = call(base, jnp.asarray(x))
  out, diag = jax.jit(make(f"ctma({base})").__call__)(jnp.asarray(x))
  x64, x0_64 = x.astype(np.float64), np.asarray(x0, np.float64)
  r64 = np.sum((x64 - x0_64) ** 2, axis=1)
  np.testing.assert_allclose(selection.row_sqdist(jnp.asarray(x), x0), r64, rtol=1e-5)
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


@pytest.mark.parametrize("n", [20, 75, 203])
def test_row_sqdist_matches_float64_and_faulty_rows_are_infinite(small_slices, n):
  x = _offset_rows(n, seed=3)
  c = (1000.0 + np.random.default_rng(4).standard_normal(n)).astype(np.float32)
  x[1, n - 1] = np.nan    # tail column
  x[2, n // 2] = np.inf   # a middle slice
  x[3] = -np.inf
  x[4, 0] = 3e38          # finite, but its square overflows
  got = np.asarray(jax.jit(selection.row_sqdist)(jnp.asarray(x), jnp.asarray(c)))
  with np.errstate(invalid="ignore", over="ignore"):
    r64 = np.sum((x.astype(np.float64) - c) ** 2, axis=1)
  bad = [1, 2, 3, 4]
  assert np.all(np.isposinf(got[bad]))
  good = [i for i in range(W) if i not in bad]
  np.testing.assert_allclose(got[good], r64[good], rtol=1e-5)
  norms = np.asarray(jax.jit(selection.row_sqdist)(jnp.asarray(x)))
  assert np.all(np.isposinf(norms[bad]))
  np.testing.assert_allclose(norms[good], np.sum(x[good].astype(np.float64) ** 2, axis=1),
                             rtol=1e-5)


def test_row_sqdist_default_slices():
  # The real slice sizes: grouped slices plus a tail, in float32 and float64.
  for dtype in (jnp.float32, jnp.float64):
    with jax.enable_x64(dtype == jnp.float64):
      x = jax.random.normal(jax.random.key(5), (3, 4 * selection.SQDIST_SLICE + 7), dtype)
      c = x[0] * 0.5
      got = jax.jit(selection.row_sqdist)(x, c)
      assert got.dtype == dtype
      expected = np.sum((np.asarray(x, np.float64) - np.asarray(c, np.float64)) ** 2, axis=1)
      np.testing.assert_allclose(got, expected, rtol=1e-5 if dtype == jnp.float32 else 1e-12)


def test_centered_gram_sliced_matches_float64(small_slices):
  x = _offset_rows(75, seed=9)
  x[W - 1, 3] = np.nan
  dist, _, _, finite = agg_lib._centered_gram(jnp.asarray(x))
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


def test_as_optax():
  agg = make("ctma(cwtm)")
  tx = agg.as_optax()
  rows = tree_rows(jax.random.key(20))
  state = tx.init(jax.tree.map(lambda l: l[0], rows))
  out, state = jax.jit(tx.update)(rows, state)
  np.testing.assert_allclose(flat_agg(out), flat_agg(agg(rows)[0]), rtol=1e-6)
  assert int(state.count) == 1


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


def test_canonical_spec_and_alias():
  assert agg_lib.make_aggregator(" NNM + CTMA ( RFA ) ", 1).spec == "nnm+ctma(gm)"
  assert agg_lib.make_aggregator("arc(ctma(cwtm))", 1).spec == "arc(ctma(cwtm))"
  assert set(agg_lib.AGGREGATORS) >= {"avg", "cwmed", "cwtm", "gm", "krum", "multikrum",
                                      "centered_clipping", "meamed"}
  assert set(agg_lib.META_AGGREGATORS) >= {"ctma", "nnm", "nnm+ctma", "bucketing", "clip", "arc"}


# --------------------------------------------------------------------------
# Selection network
# --------------------------------------------------------------------------


@pytest.mark.parametrize("w", list(range(1, 19)))
def test_sorting_network_exact(w):
  rng = np.random.default_rng(w)
  x = rng.integers(-3, 4, size=(w, 64)).astype(np.float32)  # many ties
  x[rng.random(x.shape) < 0.1] = np.nan
  x[rng.random(x.shape) < 0.05] = np.inf
  x[rng.random(x.shape) < 0.05] = -np.inf
  got = np.stack(jax.jit(selection.sorted_rows)(jnp.asarray(x)))
  expected = np.sort(np.where(np.isnan(x), np.inf, x), axis=0)
  np.testing.assert_array_equal(got, expected)


def test_large_networks_sort_in_numpy():
  # The same comparator lists as used under jit, for every W up to the
  # network limit, applied with NumPy (compiling them all would be slow).
  rng = np.random.default_rng(0)
  for n in range(19, selection.NETWORK_MAX_ROWS + 1):
    x = rng.integers(-5, 6, size=(n, 200))
    rows = [x[i].copy() for i in range(n)]
    for a, b in selection.batcher_network(n):
      rows[a], rows[b] = np.minimum(rows[a], rows[b]), np.maximum(rows[a], rows[b])
    np.testing.assert_array_equal(np.stack(rows), np.sort(x, axis=0))


def test_network_is_a_sorting_network_zero_one():
  # The 0-1 principle: a comparator network sorts everything iff it sorts all 0/1 inputs.
  for n in (5, 8, 11):
    bits = np.array(list(itertools.product([0, 1], repeat=n))).T
    rows = [bits[i].copy() for i in range(n)]
    for a, b in selection.batcher_network(n):
      rows[a], rows[b] = np.minimum(rows[a], rows[b]), np.maximum(rows[a], rows[b])
    assert np.all(np.diff(np.stack(rows), axis=0) >= 0)


# --------------------------------------------------------------------------
# Radix select (W above the network limit)
# --------------------------------------------------------------------------


def _faulty_ties(w, n, seed):
  rng = np.random.default_rng(seed)
  x = rng.integers(-3, 4, size=(w, n)).astype(np.float32)  # many ties
  x[:, n // 2:] = rng.standard_normal((w, n - n // 2)) * 1e3
  x[rng.random(x.shape) < 0.05] = np.nan
  x[rng.random(x.shape) < 0.03] = np.inf
  x[rng.random(x.shape) < 0.03] = -np.inf
  x[rng.random(x.shape) < 0.03] = -0.0
  return x


@pytest.mark.parametrize("w", [selection.NETWORK_MAX_ROWS + 1, 100])
def test_radix_order_statistics_exact(w):
  # 300 columns: one full chunk of the cache loop plus a remainder chunk.
  x = _faulty_ties(w, 300, w)
  ranks = [0, 7, w // 2, w - 1]
  got = jax.jit(lambda a: selection.order_statistics(a, ranks))(jnp.asarray(x))
  s = np.sort(np.where(np.isnan(x), np.inf, x), axis=0)
  for g, r in zip(got, ranks):
    np.testing.assert_array_equal(np.asarray(g), s[r])


@pytest.mark.parametrize("w,ranks", [
    (81, [0, 80]), (81, [40, 40]), (300, [3, 150, 298]),  # counts packed into one sum
    (81, [40]), (300, [0]), (300, [150]), (300, [299]),   # one rank: two bits per pass
    (600, [5, 594])])                                     # W >= 512: one sum per rank
def test_radix_packed_rank_counts_exact(w, ranks):
  x = _faulty_ties(w, 300, w + len(ranks))
  got = jax.jit(lambda a: selection.order_statistics(a, ranks))(jnp.asarray(x))
  s = np.sort(np.where(np.isnan(x), np.inf, x), axis=0)
  for g, r in zip(got, ranks):
    np.testing.assert_array_equal(np.asarray(g), s[r])


@pytest.mark.parametrize("w,lo,hi", [(81, 20, 60), (81, 40, 40), (90, 0, 89), (90, 3, 80)])
def test_radix_trimmed_sum_matches_sorted_sum(w, lo, hi):
  x = _faulty_ties(w, 300, lo + hi)
  got = np.asarray(jax.jit(lambda a: selection.trimmed_sum(a, lo, hi))(jnp.asarray(x)))
  s = np.sort(np.where(np.isnan(x), np.inf, x), axis=0).astype(np.float64)
  with np.errstate(invalid="ignore"):
    expected = s[lo:hi + 1].sum(0)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
  assert np.array_equal(np.isfinite(got), np.isfinite(expected))


def test_large_w_cwtm_robust_to_huge_rows():
  # f rows of 1e30 must not cost the honest mean any precision (no sum-then-subtract).
  w, f = 97, 24
  x = np.random.default_rng(1).standard_normal((w, 500)).astype(np.float32)
  x[:f] = 1e30
  got, _ = jax.jit(agg_lib.make_aggregator("cwtm", f).__call__)(jnp.asarray(x))
  s = np.sort(x, axis=0)[f:w - f].astype(np.float64).mean(0)
  np.testing.assert_allclose(np.asarray(got), s, rtol=1e-5, atol=1e-6)
