"""Tests for ftjax.kernels.rows: every cpu primitive equals its plain version and NumPy."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import aggregators as agg_lib
from ftjax import kernels
from ftjax.kernels import distances, rows, select

KERNEL_SETS = ("plain", "cpu")


def run(kernel_set, fn, *args):
  """``fn(*args)`` jitted under ``kernel_set`` (a fresh function: its own jit cache)."""
  def wrapped(*a):
    with kernels.use(kernel_set):
      return fn(*a)
  return jax.jit(wrapped)(*args)


def both(fn, *args):
  """(plain result, cpu result) as NumPy pytrees."""
  return tuple(jax.tree.map(np.asarray, run(k, fn, *args)) for k in KERNEL_SETS)


def _faulty_ties(w, n, seed):
  """float32 [w, n] with many ties, large values, NaN, +-inf and -0.0."""
  rng = np.random.default_rng(seed)
  x = rng.integers(-3, 4, size=(w, n)).astype(np.float32)
  x[:, n // 2:] = rng.standard_normal((w, n - n // 2)) * 1e3
  x[rng.random(x.shape) < 0.05] = np.nan
  x[rng.random(x.shape) < 0.03] = np.inf
  x[rng.random(x.shape) < 0.03] = -np.inf
  x[rng.random(x.shape) < 0.03] = -0.0
  return x


def _np_sorted(x):
  return np.sort(np.where(np.isnan(x), np.inf, x), axis=0)


def test_default_set_is_cpu_on_cpu():
  assert jax.default_backend() == "cpu" and kernels.current() == "cpu"
  with kernels.use("plain"):
    assert kernels.current() == "plain"


# --------------------------------------------------------------------------
# Order statistics: network (W <= 80), radix select (float32, W > 80)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("w", list(range(1, 19)))
def test_sort_network_exact(w):
  rng = np.random.default_rng(w)
  x = rng.integers(-3, 4, size=(w, 64)).astype(np.float32)  # many ties
  x[rng.random(x.shape) < 0.1] = np.nan
  x[rng.random(x.shape) < 0.05] = np.inf
  x[rng.random(x.shape) < 0.05] = -np.inf
  plain, cpu = both(rows.sort, jnp.asarray(x))
  np.testing.assert_array_equal(cpu, _np_sorted(x))
  np.testing.assert_array_equal(plain, _np_sorted(x))


def test_sort_above_network_limit_and_float64():
  x = _faulty_ties(rows.NETWORK_MAX_ROWS + 5, 40, 0)
  for v in (x, x.astype(np.float64)):
    with jax.enable_x64(v.dtype == np.float64):
      plain, cpu = both(rows.sort, jnp.asarray(v))
      assert cpu.dtype == v.dtype
      np.testing.assert_array_equal(cpu, _np_sorted(v))
      np.testing.assert_array_equal(plain, cpu)


def test_large_networks_sort_in_numpy():
  # The comparator lists used under jit, for every W up to the network limit,
  # applied with NumPy (compiling them all would be slow).
  rng = np.random.default_rng(0)
  for n in range(19, rows.NETWORK_MAX_ROWS + 1):
    x = rng.integers(-5, 6, size=(n, 200))
    wires = [x[i].copy() for i in range(n)]
    for a, b in rows.batcher_network(n):
      wires[a], wires[b] = np.minimum(wires[a], wires[b]), np.maximum(wires[a], wires[b])
    np.testing.assert_array_equal(np.stack(wires), np.sort(x, axis=0))


def test_network_is_a_sorting_network_zero_one():
  # The 0-1 principle: a comparator network sorts everything iff it sorts all 0/1 inputs.
  for n in (5, 8, 11):
    bits = np.array(list(itertools.product([0, 1], repeat=n))).T
    wires = [bits[i].copy() for i in range(n)]
    for a, b in rows.batcher_network(n):
      wires[a], wires[b] = np.minimum(wires[a], wires[b]), np.maximum(wires[a], wires[b])
    assert np.all(np.diff(np.stack(wires), axis=0) >= 0)


@pytest.mark.parametrize("w,ranks", [
    (9, [0, 4, 8]), (17, [8]), (16, [7, 8]),                # network
    (81, [0, 80]), (81, [40, 40]), (300, [3, 150, 298]),    # radix, counts packed into one sum
    (81, [40]), (300, [0]), (300, [150]), (300, [299]),     # one rank: two bits per pass
    (100, [0, 7, 50, 99]),                                  # four ranks: one sum per rank
    (600, [5, 594])])                                       # W >= 512: one sum per rank
def test_order_statistics_exact(w, ranks):
  # 300 columns: at W > 80 one full chunk of the cache loop plus a remainder chunk.
  x = _faulty_ties(w, 300, w + len(ranks))
  plain, cpu = both(lambda a: rows.order_statistics(a, ranks), jnp.asarray(x))
  s = _np_sorted(x)
  for p, c, r in zip(plain, cpu, ranks):
    np.testing.assert_array_equal(c, s[r])
    np.testing.assert_array_equal(p, s[r])


def test_order_statistics_float64_above_network_limit():
  # Radix select is float32 only; float64 falls back to a sort.
  with jax.enable_x64(True):
    x = _faulty_ties(90, 50, 1).astype(np.float64)
    plain, cpu = both(lambda a: rows.order_statistics(a, [3, 45]), jnp.asarray(x))
    s = _np_sorted(x)
    for p, c, r in zip(plain, cpu, [3, 45]):
      assert c.dtype == np.float64
      np.testing.assert_array_equal(c, s[r])
      np.testing.assert_array_equal(p, s[r])


def test_order_statistics_of_multidimensional_leaf():
  x = _faulty_ties(85, 24, 2).reshape(85, 2, 3, 4)
  plain, cpu = both(lambda a: rows.order_statistics(a, [10, 42]), jnp.asarray(x))
  s = _np_sorted(x)
  for p, c, r in zip(plain, cpu, [10, 42]):
    assert c.shape == (2, 3, 4)
    np.testing.assert_array_equal(c, s[r])
    np.testing.assert_array_equal(p, s[r])


@pytest.mark.parametrize("w,lo,hi", [(9, 2, 6), (17, 4, 12), (81, 20, 60), (81, 40, 40),
                                     (90, 0, 89), (90, 3, 80)])
def test_trimmed_sum_matches_sorted_sum(w, lo, hi):
  x = _faulty_ties(w, 300, lo + hi)
  plain, cpu = both(lambda a: rows.trimmed_sum(a, lo, hi), jnp.asarray(x))
  kept = _np_sorted(x).astype(np.float64)[lo:hi + 1]
  with np.errstate(invalid="ignore"):
    expected = kept.sum(0)
  ok = np.isfinite(expected)
  # float32 rounding of a sum: relative to the magnitudes added.
  atol = 1e-6 * np.abs(kept[:, ok]).sum(0)
  for got in (plain, cpu):
    assert np.array_equal(np.isfinite(got), ok)
    assert np.all(np.abs(got[ok] - expected[ok]) <= atol + 1e-5 * np.abs(expected[ok]))
    assert np.array_equal(np.isnan(got), np.isnan(expected))


def test_trimmed_sum_float64():
  with jax.enable_x64(True):
    x = np.random.default_rng(3).standard_normal((13, 70))
    plain, cpu = both(lambda a: rows.trimmed_sum(a, 3, 9), jnp.asarray(x))
    expected = np.sort(x, axis=0)[3:10].sum(0)
    np.testing.assert_allclose(cpu, expected, rtol=1e-13)
    np.testing.assert_allclose(plain, expected, rtol=1e-13)


def test_trimmed_sum_drops_huge_values_without_precision_loss():
  w = 97
  x = np.random.default_rng(1).standard_normal((w, 500)).astype(np.float32)
  x[:24] = 1e30
  plain, cpu = both(lambda a: rows.trimmed_sum(a, 24, w - 25), jnp.asarray(x))
  expected = np.sort(x, axis=0)[24:w - 24].astype(np.float64).sum(0)
  np.testing.assert_allclose(cpu, expected, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(plain, expected, rtol=1e-5, atol=1e-4)


def _adversarial(w, n, seed):
  """float32 [w, n]: each column block one hard case for an exact select.

  Ties and all-equal columns, -0.0 mixed with +0.0, denormals, huge and tiny
  magnitudes of both signs, NaN and +-inf (a third of the rows in some
  columns), whole NaN and inf rows, and values spread over every binade.
  """
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((w, n)).astype(np.float32)
  b = n // 8
  x[:, :b] = rng.integers(-2, 3, size=(w, b))                        # ties
  x[:, b:b + 4] = 7.0                                                # all equal
  x[:, b + 4:2 * b] = rng.choice([-0.0, 0.0, 1.0], size=(w, b - 4))  # signed zeros
  x[:, 2 * b:3 * b] = rng.choice([1e-45, -1e-45, 3e-39, -5e-40, 0.0], size=(w, b))  # denormals
  x[:, 3 * b:4 * b] = rng.choice([1e30, -1e30, 1e-30, -1e-30, 3e38, -3e38], size=(w, b))
  x[:, 4 * b:5 * b] = (np.float32(2.0) ** rng.integers(-126, 127, size=(w, b))
                       * rng.choice([-1, 1], size=(w, b)))             # every binade
  x[:, 5 * b:6 * b][rng.random((w, b)) < 0.35] = np.nan
  x[:, 5 * b:6 * b][rng.random((w, b)) < 0.2] = -np.inf
  x[:, 6 * b:7 * b][rng.random((w, b)) < 0.3] = np.inf
  x[1] = np.nan
  x[2] = -np.inf
  return x


@pytest.mark.parametrize("w", [rows.NETWORK_MAX_ROWS - 1, rows.NETWORK_MAX_ROWS,
                               rows.NETWORK_MAX_ROWS + 1, 257, 513])
@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_order_statistics_adversarial_across_crossover(w, num_ranks):
  # Below the crossover the network, above it the radix select, whose digit
  # width depends on the number of ranks (and on W >= 512, where counts are
  # not packed): each combination against NumPy's sort. The radix select
  # compares the floats' bits, so it matches NumPy bit for bit except the sign
  # of a zero (it orders -0.0 below +0.0, a sort keeps their input order).
  # XLA:CPU compares denormals as zero, so jnp.sort and the network's
  # min/max match NumPy once denormals are flushed to zero.
  ranks = [0, w // 2, w - 1][:num_ranks] if num_ranks < 3 else [w // 4, w // 2, w - 2]
  x = _adversarial(w, 96, w + num_ranks)
  s = _np_sorted(x)
  plain, cpu = both(lambda a: rows.order_statistics(a, ranks), jnp.asarray(x))
  radix = w > rows.NETWORK_MAX_ROWS
  for got, exact in ((plain, False), (cpu, radix)):
    for g, r in zip(got, ranks):
      if exact:
        np.testing.assert_array_equal(g, s[r])
        assert np.all((g.view(np.uint32) == s[r].view(np.uint32)) | (g == 0))
      else:
        np.testing.assert_array_equal(_flush(g), _flush(s[r]))


def _no_overflow(x):
  """``x`` with finite magnitudes above 1e37 set to +-1e30: float32 sums of
  hundreds of them stay finite, so a trimmed sum has a finite reference."""
  return np.where(np.isfinite(x) & (np.abs(x) > 1e37), np.sign(x) * 1e30, x).astype(np.float32)


def _flush(a):
  return np.where(np.abs(a) < np.finfo(np.float32).tiny, np.float32(0), a)


def test_radix_digit_width_fits_the_packed_sums():
  # The widest digit whose 2^b - 1 trials per rank fit MAX_PACKED_SUMS sums.
  for w, per_sum in ((257, 3), (600, 1)):
    for num_ranks in (1, 2, 3, 4):
      b = select._digit_bits(num_ranks, w)
      sums = lambda bits: -(-num_ranks * (2 ** bits - 1) // per_sum)
      assert (sums(b) <= select.MAX_PACKED_SUMS < sums(b + 1)
              or (b == 1 and sums(1) > select.MAX_PACKED_SUMS))
  assert [select._digit_bits(k, 257) for k in (1, 2, 3, 4)] == [3, 2, 2, 1]


@pytest.mark.parametrize("w", [3, 9, 40])
def test_radix_select_forced_below_its_crossover(monkeypatch, w):
  # The crossover is one constant: lowering it sends small W through the radix select.
  monkeypatch.setattr(select, "NETWORK_MAX_ROWS", 2)
  x = _no_overflow(_adversarial(w, 64, w))
  s = _np_sorted(x)
  ranks = sorted({0, w // 2, w - 1})
  for r, got in zip(ranks, run("cpu", lambda a: rows.order_statistics(a, ranks),
                               jnp.asarray(x))):
    np.testing.assert_array_equal(np.asarray(got), s[r])
  lo, hi = w // 4, w - 1 - w // 4
  got = np.asarray(run("cpu", lambda a: rows.trimmed_sum(a, lo, hi), jnp.asarray(x)))
  kept = s.astype(np.float64)[lo:hi + 1]
  with np.errstate(invalid="ignore"):
    expected = kept.sum(0)
  _assert_trimmed_close(got, expected, kept)


def _assert_trimmed_close(got, expected, kept):
  """float32 sums of k kept values against their float64 sum.

  Any order of k - 1 float32 additions is within (k - 1) eps of the sum of
  the magnitudes added; XLA:CPU also flushes denormal results to zero, which
  loses less than the smallest normal float per addition.
  """
  ok = np.isfinite(expected)
  assert np.array_equal(np.isnan(got), np.isnan(expected))
  assert np.array_equal(got[~ok & ~np.isnan(expected)], expected[~ok & ~np.isnan(expected)])
  mags = np.abs(np.where(np.isfinite(kept), kept, 0)).sum(0)[ok]
  k = kept.shape[0]
  tol = k * np.finfo(np.float32).eps * mags + k * np.finfo(np.float32).tiny
  assert np.all(np.abs(got[ok] - expected[ok]) <= tol)


@pytest.mark.parametrize("w,lo,hi", [(rows.NETWORK_MAX_ROWS + 1, 20, 60), (257, 64, 192),
                                     (257, 0, 255), (257, 128, 129), (513, 100, 400)])
def test_trimmed_sum_adversarial(w, lo, hi):
  # The sum of the kept order statistics of NumPy's sort (in float64), within
  # float32 summation error: the select's bounds are exact, so only the order
  # of the additions differs from the sort's sum.
  x = _adversarial(w, 96, lo + hi)
  x = _no_overflow(x)
  kept = _np_sorted(x).astype(np.float64)[lo:hi + 1]
  with np.errstate(invalid="ignore"):
    expected = kept.sum(0)
  for got in both(lambda a: rows.trimmed_sum(a, lo, hi), jnp.asarray(x)):
    _assert_trimmed_close(got, expected, kept)


def test_radix_select_under_vmap():
  x = np.stack([_no_overflow(_adversarial(rows.NETWORK_MAX_ROWS + 3, 40, s)) for s in range(3)])
  fn = jax.vmap(lambda a: rows.order_statistics(a, [7, 41]))
  got = run("cpu", fn, jnp.asarray(x))
  for b in range(3):
    s = _np_sorted(x[b])
    np.testing.assert_array_equal(np.asarray(got[0][b]), s[7])
    np.testing.assert_array_equal(np.asarray(got[1][b]), s[41])
  tsum = run("cpu", jax.vmap(lambda a: rows.trimmed_sum(a, 10, 70)), jnp.asarray(x))
  for b in range(3):
    kept = _np_sorted(x[b]).astype(np.float64)[10:71]
    with np.errstate(invalid="ignore"):
      _assert_trimmed_close(np.asarray(tsum[b]), kept.sum(0), kept)


# --------------------------------------------------------------------------
# Means and weighted sums (unrolled up to MEAN_UNROLL_MAX_ROWS / UNROLL_MAX_ROWS, then a matvec)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("w", [1, 5, 17, rows.MEAN_UNROLL_MAX_ROWS + 10])
def test_mean(w):
  x = np.random.default_rng(w).standard_normal((w, 3, 7)).astype(np.float32)
  plain, cpu = both(rows.mean, jnp.asarray(x))
  expected = x.astype(np.float64).mean(0)
  np.testing.assert_allclose(cpu, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(plain, expected, rtol=1e-5, atol=1e-6)
  with jax.enable_x64(True):
    plain, cpu = both(rows.mean, jnp.asarray(x, jnp.float64))
    np.testing.assert_allclose(cpu, expected, rtol=1e-13)
    np.testing.assert_allclose(plain, expected, rtol=1e-13)


def test_mean_propagates_nan():
  x = np.ones((5, 4), np.float32)
  x[2, 1] = np.nan
  for got in both(rows.mean, jnp.asarray(x)):
    assert np.isnan(got[1]) and np.all(got[[0, 2, 3]] == 1.0)


@pytest.mark.parametrize("w", [7, rows.UNROLL_MAX_ROWS + 10])
def test_weighted_sum_with_mask_skips_nonfinite_rows(w):
  rng = np.random.default_rng(w)
  x = rng.standard_normal((w, 6)).astype(np.float32)
  weights = rng.random(w).astype(np.float32)
  mask = rng.random(w) < 0.7
  mask[0] = False
  x[0] = np.nan
  x[np.flatnonzero(~mask)[-1], 2] = np.inf
  expected = (weights[mask, None].astype(np.float64) * x[mask]).sum(0)
  plain, cpu = both(rows.weighted_sum, jnp.asarray(x), jnp.asarray(weights), jnp.asarray(mask))
  np.testing.assert_allclose(cpu, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(plain, expected, rtol=1e-5, atol=1e-5)
  xf = np.where(mask[:, None], x, 0.0)
  nomask = (weights[:, None].astype(np.float64) * xf).sum(0)
  plain, cpu = both(rows.weighted_sum, jnp.asarray(xf), jnp.asarray(weights))
  np.testing.assert_allclose(cpu, nomask, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(plain, nomask, rtol=1e-5, atol=1e-5)


def test_weighted_sum_float64_and_dtype():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    x, weights = rng.standard_normal((9, 2, 5)), rng.random(9)
    plain, cpu = both(rows.weighted_sum, jnp.asarray(x), jnp.asarray(weights, jnp.float32))
    expected = np.tensordot(weights.astype(np.float32).astype(np.float64), x, 1)
    for got in (plain, cpu):
      assert got.dtype == np.float64 and got.shape == (2, 5)
      np.testing.assert_allclose(got, expected, rtol=1e-13)


@pytest.mark.parametrize("w,k", [(9, 1), (9, 7),
                                 (rows.UNROLL_MAX_ROWS + 80, rows.UNROLL_MAX_ROWS + 5)])
def test_mean_of_reads_only_selected_rows(w, k):
  rng = np.random.default_rng(k)
  x = rng.standard_normal((w, 2, 3)).astype(np.float32)
  idx = np.sort(rng.permutation(w)[:k])
  others = np.setdiff1d(np.arange(w), idx)
  x[others[:2]] = np.nan
  if len(others) > 2:
    x[others[2]] = np.inf
  expected = x[idx].astype(np.float64).mean(0)
  plain, cpu = both(rows.mean_of, jnp.asarray(x), jnp.asarray(idx))
  np.testing.assert_allclose(cpu, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(plain, expected, rtol=1e-5, atol=1e-6)


def test_sum_rows_balanced():
  parts = [np.full(3, float(i), np.float32) for i in range(7)]
  np.testing.assert_array_equal(rows.sum_rows([jnp.asarray(p) for p in parts]), np.full(3, 21.0))


# --------------------------------------------------------------------------
# Squared row distances and Gram matrices
# --------------------------------------------------------------------------


def _offset_rows(w, n, seed, offset=1000.0):
  """w rows sharing a large common component, at well separated distances."""
  rng = np.random.default_rng(seed)
  scale = 1.0 + 0.25 * rng.permutation(w)[:, None]
  return (offset + scale * rng.standard_normal((w, n))).astype(np.float32)


# n: 20 one reduction (plain fallback: shorter than four slices); 75 slices in
# groups (4, 4, 1) plus a 3-column tail; 203 above SQDIST_MAX_SLICES, 16 long
# slices plus a tail.
@pytest.mark.parametrize("n", [20, 75, 203])
def test_sqdist_matches_float64_and_faulty_rows_are_infinite(small_slices, n):
  w = 9
  x = _offset_rows(w, n, seed=3)
  c = (1000.0 + np.random.default_rng(4).standard_normal(n)).astype(np.float32)
  x[1, n - 1] = np.nan    # tail column
  x[2, n // 2] = np.inf   # a middle slice
  x[3] = -np.inf
  x[4, 0] = 3e38          # finite, but its square overflows
  bad = [1, 2, 3, 4]
  good = [i for i in range(w) if i not in bad]
  with np.errstate(invalid="ignore", over="ignore"):
    r64 = np.sum((x.astype(np.float64) - c) ** 2, axis=1)
  norms64 = np.sum(x[good].astype(np.float64) ** 2, axis=1)
  dist = both(rows.sqdist, jnp.asarray(x), jnp.asarray(c))
  norms = both(rows.sqdist, jnp.asarray(x))
  for got, got_norms in zip(dist, norms):
    assert np.all(np.isposinf(got[bad])) and np.all(np.isposinf(got_norms[bad]))
    np.testing.assert_allclose(got[good], r64[good], rtol=1e-5)
    np.testing.assert_allclose(got_norms[good], norms64, rtol=1e-5)


def test_sqdist_default_slices_and_float64():
  # The real slice sizes: grouped slices plus a tail, in float32 and float64.
  for dtype in (jnp.float32, jnp.float64):
    with jax.enable_x64(dtype == jnp.float64):
      x = jax.random.normal(jax.random.key(5), (3, 4 * distances.SQDIST_SLICE + 7), dtype)
      c = x[0] * 0.5
      expected = np.sum((np.asarray(x, np.float64) - np.asarray(c, np.float64)) ** 2, axis=1)
      for got in both(rows.sqdist, x, c):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, expected, rtol=1e-5 if dtype == jnp.float32 else 1e-12)


def test_sqdist_of_multidimensional_leaf_and_infinite_center():
  x = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
  c = np.full((2, 3), 1.5, np.float32)
  expected = np.sum((x.astype(np.float64) - c) ** 2, axis=(1, 2))
  for got in both(rows.sqdist, jnp.asarray(x), jnp.asarray(c)):
    assert got.shape == (4,)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
  # A non-finite centre is infinitely far from every row, inf - inf included.
  x[3, 1, 1], c[1, 1] = np.inf, np.inf
  for got in both(rows.sqdist, jnp.asarray(x), jnp.asarray(c)):
    assert np.all(np.isposinf(got))


@pytest.mark.parametrize("n", [20, 75, 203])
def test_gram_sliced_matches_float64(small_slices, n):
  y = (_offset_rows(9, n, seed=n) - 1000.0).astype(np.float32)
  y64 = y.astype(np.float64)
  for got in both(rows.gram, jnp.asarray(y)):
    np.testing.assert_allclose(got, y64 @ y64.T, rtol=1e-5, atol=1e-4)


def test_gram_default_slices_float64_and_leaf_shape():
  with jax.enable_x64(True):
    # The real block sizes: a loop over groups of blocks, blocks written out, a tail.
    n = (distances.GRAM_UNROLL + 2) * distances._block_width(3, np.float64) + 5
    y = np.random.default_rng(6).standard_normal((3, n))
    for got in both(rows.gram, jnp.asarray(y)):
      np.testing.assert_allclose(got, y @ y.T, rtol=1e-12)
  y = np.random.default_rng(7).standard_normal((4, 2, 3)).astype(np.float32)
  flat = y.reshape(4, -1).astype(np.float64)
  for got in both(rows.gram, jnp.asarray(y)):
    np.testing.assert_allclose(got, flat @ flat.T, rtol=1e-5, atol=1e-6)


def test_gram_many_groups_keeps_float32_rounding_small(small_slices):
  # 4000 loop steps (groups of three 16-column blocks) adding positive
  # entries: a plain running sum over them drifts by about 1e-6 relative; the
  # compensated one stays near one group's rounding (a few 1e-8).
  y = np.random.default_rng(9).random((3, 48 * 4000)).astype(np.float32)
  y64 = y.astype(np.float64)
  expected = y64 @ y64.T
  with kernels.use("cpu"):
    got = np.asarray(jax.jit(rows.gram)(jnp.asarray(y)), np.float64)
  assert np.max(np.abs(got - expected) / expected) < 2e-7


def _np_pairwise(x):
  """|x_i - x_j|^2 in float64 from the differences (the definition), +inf for non-finite rows."""
  x64 = x.reshape(len(x), -1).astype(np.float64)
  finite = np.all(np.isfinite(x64), axis=1)
  safe = np.where(finite[:, None], x64, 0.0)
  d = np.sum((safe[:, None] - safe[None]) ** 2, axis=2)
  d[~(finite[:, None] & finite[None, :])] = np.inf
  np.fill_diagonal(d, 0.0)
  return d, finite


def _np_finite_mean(x):
  return np.where(np.isfinite(x), x, 0.0).astype(np.float64).sum(0) / len(x)


def _tree_of(x):
  """Two leaves of different shapes holding the columns of x [W, n] (n >= 12)."""
  w = len(x)
  return {"a": jnp.asarray(x[:, :12].reshape(w, 3, 4)), "b": jnp.asarray(x[:, 12:])}


def _check_bound(got, x, center, dtype):
  # |D - |x_i - x_j|^2| <= (n + 5) u (|y_i| + |y_j|)^2 with y = x - c.
  expected, finite = _np_pairwise(x)
  y = np.linalg.norm(x.astype(np.float64) - center, axis=1)
  u = np.finfo(dtype).eps / 2
  n = x.shape[1]
  bound = (n + 5) * u * (y[:, None] + y[None, :]) ** 2
  ok = finite[:, None] & finite[None, :]
  err = np.abs(got - expected)
  assert np.all(err[ok] <= bound[ok])
  return err[ok].max(), bound[ok].max()


@pytest.mark.parametrize("n", [40, 203])  # 203 loops over groups of blocks
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pairwise_sqdist_within_bound_of_definition(small_slices, n, dtype):
  # Rows with a common component 1000 times their spread: uncentred, the
  # float32 rounding alone (about u |x|^2) would exceed the bound.
  w = 9
  x = _offset_rows(w, n, seed=n).astype(dtype)
  c = (1000.0 + np.random.default_rng(1).standard_normal(n)).astype(dtype)
  with jax.enable_x64(dtype == np.float64):
    for center, c64 in ((None, _np_finite_mean(x)), (c, c.astype(np.float64))):
      def fn(a, ctr):
        tree_ctr = None if ctr is None else jax.tree.map(lambda l: l[0], _tree_of(ctr[None]))
        return rows.pairwise_sqdist(_tree_of(a), tree_ctr)

      for d, finite in both(fn, x, center):
        assert d.dtype == dtype and np.all(finite)
        np.testing.assert_array_equal(d, d.T)
        err, bound = _check_bound(d, x, c64, dtype)
        assert err > 0 or dtype == np.float64  # float32 rounding is there, and bounded
  # Without centring the same rows break the bound (the test can fail).
  if dtype == np.float32:
    d0, _ = rows.pairwise_sqdist(jnp.asarray(x), jnp.zeros(n, dtype))
    with pytest.raises(AssertionError):
      _check_bound(np.asarray(d0), x, _np_finite_mean(x), dtype)


def test_pairwise_sqdist_nonfinite_rows_are_infinitely_far(small_slices):
  w, n = 9, 40
  x = _offset_rows(w, n, seed=2, offset=3.0)
  x[1, n - 1] = np.nan
  x[2, 5] = np.inf
  x[3] = -np.inf
  x[4, 0] = 3e38   # finite, but its squared distance from the centre overflows
  bad = [1, 2, 3, 4]
  good = [i for i in range(w) if i not in bad]
  expected, _ = _np_pairwise(np.delete(x, bad, axis=0))
  # A centre within the good rows (the default, the finite mean, is moved by 3e38).
  c = np.median(x[good], axis=0)
  fn = lambda a, ctr: rows.pairwise_sqdist(_tree_of(a), jax.tree.map(lambda l: l[0],
                                                                     _tree_of(ctr[None])))
  for d, finite in both(fn, x, c):
    assert list(np.flatnonzero(~finite)) == bad
    np.testing.assert_array_equal(np.diag(d), 0.0)
    off = ~np.eye(w, dtype=bool)
    assert np.all(np.isposinf(d[bad][:, :][off[bad]]))
    assert np.all(np.isposinf(d[:, bad][off[:, bad]]))
    np.testing.assert_allclose(d[np.ix_(good, good)], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("w", [13, 65, 257])
def test_pairwise_sqdist_identical_rows_get_identical_distances(w):
  # Copies of row 5 at the first, a middle and the last row, on the real block
  # sizes (several blocks, a tail), in float32 and float64: their distances to
  # every row are bitwise equal, and 0 between them.
  n = 3 * 1024 + 17
  for dtype in (np.float32, np.float64):
    with jax.enable_x64(dtype == np.float64):
      x = (5.0 + np.random.default_rng(w).standard_normal((w, n))).astype(dtype)
      copies = [0, 5, w // 2, w - 1]
      x[copies] = x[5]
      for d, _ in both(lambda a: rows.pairwise_sqdist(a), x):
        for a in copies:
          np.testing.assert_array_equal(d[a], d[5])
          np.testing.assert_array_equal(d[:, a], d[:, 5])
        assert np.all(d[np.ix_(copies, copies)] == 0.0)
        others = [i for i in range(w) if i not in copies]
        assert np.all(d[np.ix_(others, others)][~np.eye(len(others), dtype=bool)] > 0)


def _np_smallest_mask(v, k):
  """NumPy's stable argsort, NaN as +inf: each row's first k columns, as a mask."""
  order = np.argsort(np.where(np.isnan(v), np.inf, v), axis=1, kind="stable")[:, :k]
  mask = np.zeros(v.shape, bool)
  np.put_along_axis(mask, order, True, axis=1)
  return mask


# c: top_k of the k smallest (k <= c - k + 1) or of the c - k + 1 largest, and
# above NETWORK_MAX_ROWS columns the radix select; R != C (not only square).
@pytest.mark.parametrize("r,c,k", [(7, 9, 2), (9, 9, 7), (9, 9, 9), (5, 97, 90), (97, 97, 3)])
def test_smallest_mask_is_stable_argsort(r, c, k):
  rng = np.random.default_rng(c + k)
  v = rng.integers(0, 4, size=(r, c)).astype(np.float32)  # many exact ties
  v[:, ::3] = rng.standard_normal((r, len(range(0, c, 3))))
  v[0, 1], v[1, 2], v[2, 0], v[3, 4] = np.nan, np.inf, -np.inf, -0.0
  v[4] = 1.0  # a row of one value: the k lowest columns
  expected = _np_smallest_mask(v, k)
  for got in both(lambda a: rows.smallest_mask(a, k), jnp.asarray(v)):
    np.testing.assert_array_equal(got, expected)
  assert np.all(expected.sum(1) == k)


@pytest.mark.parametrize("c,k", [(9, 0), (9, 4), (9, 8), (97, 60)])
def test_smallest_sum_within_rounding_of_sorted_sum(c, k):
  rng = np.random.default_rng(c + k)
  v = rng.random((6, c)).astype(np.float32) * 10.0 ** rng.integers(-3, 4, size=(6, c))
  v[1, 3] = np.nan   # ordered as +inf
  v[2, :] = np.inf
  expected = np.sort(np.where(np.isnan(v), np.inf, v).astype(np.float64), axis=1)[:, :k].sum(1)
  u = np.finfo(np.float32).eps / 2
  for got in both(lambda a: rows.smallest_sum(a, k), jnp.asarray(v)):
    assert got.dtype == np.float32
    fin = np.isfinite(expected)
    np.testing.assert_array_equal(got[~fin], expected[~fin])
    assert np.all(np.abs(got[fin] - expected[fin]) <= max(k - 1, 1) * u * expected[fin])
  # Rows of a distance matrix of copies (rows 0, 3 and 5 of the points): equal sums.
  x = rng.standard_normal((c, 3))
  x[[3, 5]] = x[0]
  d = ((x[:, None] - x[None]) ** 2).sum(-1).astype(np.float32)
  np.fill_diagonal(d, np.inf)
  for got in both(lambda a: rows.smallest_sum(a, k), jnp.asarray(d)):
    assert got[0] == got[3] == got[5]


@pytest.mark.parametrize("n", [7, 40, 203])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mix_is_weights_times_masked_rows(small_slices, n, dtype):
  rng = np.random.default_rng(n)
  w = 9
  x = rng.standard_normal((w, n)).astype(dtype)
  m = rng.random((w, w)).astype(dtype)
  mask = np.ones(w, bool)
  mask[[2, 6]] = False
  x[2] = np.nan
  x[6, 1] = np.inf
  expected = m.astype(np.float64) @ np.where(mask[:, None], x, 0.0).astype(np.float64)
  with jax.enable_x64(dtype == np.float64):
    for got in both(rows.mix, x.reshape(w, n, 1), m, mask):
      assert got.dtype == dtype and got.shape == (w, n, 1)
      np.testing.assert_allclose(got[..., 0], expected,
                                 rtol=1e-5 if dtype == np.float32 else 1e-13, atol=1e-5)
    # keep_masked: the masked rows come back as they are (NaN and inf included).
    for got in both(lambda a, b, c: rows.mix(a, b, c, keep_masked=True), x, m, mask):
      np.testing.assert_array_equal(got[~mask], x[~mask])
      np.testing.assert_allclose(got[mask], expected[mask],
                                 rtol=1e-5 if dtype == np.float32 else 1e-13, atol=1e-5)


def test_mix_keep_masked_needs_a_mask_and_square_weights():
  x = jnp.ones((3, 4))
  with pytest.raises(ValueError, match="keep_masked"):
    rows.mix(x, jnp.ones((2, 3)), jnp.ones(3, bool), keep_masked=True)
  with pytest.raises(ValueError, match="keep_masked"):
    rows.mix(x, jnp.ones((3, 3)), keep_masked=True)


# --------------------------------------------------------------------------
# Fusion barriers
# --------------------------------------------------------------------------


def _primitives(kernel_set, fn, *args):
  def wrapped(*a):
    with kernels.use(kernel_set):
      return fn(*a)
  return {str(e.primitive) for e in jax.make_jaxpr(wrapped)(*args).jaxpr.eqns}


def test_isolate_is_a_cond_on_cpu_and_a_call_on_plain():
  x = jnp.arange(6.0).reshape(3, 2)
  z = jnp.ones(2)
  fn = lambda a, b: (a.sum(0) * b, {"n": a.shape[0]})
  for k in KERNEL_SETS:
    out, aux = run(k, lambda a, b: rows.isolate(fn, a, b), x, z)
    np.testing.assert_array_equal(out, [6.0, 9.0])
    assert int(aux["n"]) == 3
  assert "cond" in _primitives("cpu", lambda a: rows.isolate(jnp.sin, a), x)
  assert "cond" not in _primitives("plain", lambda a: rows.isolate(jnp.sin, a), x)
  # Under vmap both branches run as a select; the value is unchanged.
  batched = jax.vmap(lambda a: run("cpu", lambda v: rows.isolate(lambda u: u * 2, v), a))(x)
  np.testing.assert_array_equal(batched, 2 * np.arange(6.0).reshape(3, 2))
  nan_first = jnp.array([[jnp.nan, 1.0], [2.0, 3.0]])  # the predicate's branch, same function
  np.testing.assert_array_equal(run("cpu", lambda v: rows.isolate(lambda u: u[1], v), nan_first),
                                [2.0, 3.0])


def test_isolate_stays_a_barrier_on_coordinate_slices():
  # Under shard_coordinates the devices' predicates are combined by a psum, so
  # the cond stays (and every device takes the same branch). A vmapped axis
  # named like the mesh axis stands for the devices here; its psum makes the
  # predicate unbatched, so the cond is not turned into a select.
  x = jnp.arange(12.0).reshape(2, 3, 2).at[1, 0, 0].set(jnp.nan)  # one "device" sees a NaN

  def on_slice(v):
    with kernels.use("cpu"), kernels.shard_coordinates("model"):
      return rows.isolate(lambda u: u * 2, v)

  batched = jax.vmap(on_slice, axis_name="model")
  assert "cond" in {str(e.primitive) for e in jax.make_jaxpr(batched)(x).jaxpr.eqns}
  np.testing.assert_array_equal(batched(x), 2 * x)


def test_materialize_is_a_barrier_on_cpu_and_identity_on_plain():
  tree = {"a": jnp.arange(3.0), "b": (jnp.ones((2, 2)),)}
  for k in KERNEL_SETS:
    out = run(k, rows.materialize, tree)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    np.testing.assert_array_equal(out["a"], [0.0, 1.0, 2.0])
  assert "optimization_barrier" in _primitives("cpu", rows.materialize, tree)
  assert _primitives("plain", rows.materialize, tree) == set()


# --------------------------------------------------------------------------
# Every rule: plain kernels equal cpu kernels (and each is checked against
# NumPy in tests/test_aggregators.py)
# --------------------------------------------------------------------------

SPECS = ["avg", "cwmed", "cwtm", "gm", "krum", "multikrum", "centered_clipping", "meamed",
         "ctma(cwtm)", "ctma(gm)", "ctma(cwmed)", "ctma(krum)", "ctma(meamed)", "nnm(cwtm)",
         "nnm+ctma(cwtm)", "bucketing(cwtm)", "clip(cwtm)", "arc(cwtm)", "arc(ctma(cwtm))"]
OPTIONS = {"gm": {"iters": 4}, "ctma": {"keep_ties": False}}


def _rule_pair(spec, f, x, key, options=OPTIONS):
  agg = agg_lib.make_aggregator(spec, f, options=options)
  return [jax.tree.map(np.asarray, jax.jit(agg.with_kernels(k).__call__)(x, key))
          for k in KERNEL_SETS]


@pytest.mark.parametrize("spec", SPECS)
def test_rule_plain_equals_cpu(small_slices, spec):
  # 75 columns take the sliced distance and Gram paths; one NaN row is faulty.
  x = _offset_rows(9, 75, seed=11, offset=3.0)
  x[8, 5] = np.nan
  x = {"a": jnp.asarray(x[:, :60]), "b": jnp.asarray(x[:, 60:].reshape(9, 3, 5))}
  (p, pd), (c, cd) = _rule_pair(spec, 2, x, jax.random.key(3))
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(c)):
    assert spec == "avg" or np.all(np.isfinite(a))  # avg is not robust
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  assert set(pd) == set(cd)
  for k in pd:
    np.testing.assert_array_equal(pd[k], cd[k])


@pytest.mark.parametrize("spec", ["cwtm", "cwmed", "meamed", "ctma(cwtm)", "avg"])
def test_rule_plain_equals_cpu_above_network_limit(spec):
  w = rows.NETWORK_MAX_ROWS + 5
  x = np.random.default_rng(12).standard_normal((w, 300)).astype(np.float32)
  x[:5] = 1e6
  (p, pd), (c, cd) = _rule_pair(spec, 20, jnp.asarray(x), jax.random.key(0))
  np.testing.assert_allclose(p, c, rtol=1e-5, atol=1e-5)
  for k in pd:
    np.testing.assert_array_equal(pd[k], cd[k])


def test_rule_plain_equals_cpu_float64_keep_ties():
  with jax.enable_x64(True):
    x = np.random.default_rng(13).standard_normal((11, 7))
    x[3] = x[4] = x[5]  # tied rows
    for spec in ("ctma(avg)", "nnm+ctma(cwmed)", "ctma(gm)"):
      opts = {"ctma": {"keep_ties": True}, "nnm+ctma": {"keep_ties": True}}
      (p, pd), (c, cd) = _rule_pair(spec, 3, jnp.asarray(x), None, options=opts)
      np.testing.assert_allclose(p, c, rtol=1e-12, atol=1e-12)
      np.testing.assert_array_equal(pd["ctma_kept"], cd["ctma_kept"])


@pytest.mark.parametrize("w", [rows.NETWORK_MAX_ROWS + 1, 257])
@pytest.mark.parametrize("spec", ["cwtm", "cwmed", "meamed"])
def test_rule_plain_equals_cpu_adversarial_large_w(spec, w):
  # Ties, signed zeros, denormals, NaN and inf rows and columns (magnitudes
  # capped at 1e3, so that the order of float32 additions stays within rtol).
  x = _adversarial(w, 64, 7 * w)
  x = np.where(np.isfinite(x) & (np.abs(x) > 1e3), np.sign(x) * 1e3, x).astype(np.float32)
  (p, _), (c, _) = _rule_pair(spec, w // 4, jnp.asarray(x), jax.random.key(0))
  assert np.array_equal(np.isnan(p), np.isnan(c))
  np.testing.assert_allclose(c, p, rtol=2e-5, atol=1e-5)
