"""Rules that average a chosen subset of the rows: Bulyan, MDA, MoNNA, CAF, SMEA, CGE.

Each rule is a body with the contract of :mod:`ftjax.aggregators`,
``(x, key, *, f, **options) -> (aggregate, diagnostics)``: ``x`` is a pytree
whose leaves share a leading worker axis W, norms and distances are global over
the leaves, and the diagnostics are fixed-shape arrays (a [W] mask of the rows
the rule averaged, or their weights). The rules follow the NaN policy of
:mod:`ftjax.aggregators`: a row with a non-finite coordinate is infinitely far
from every other row and is never averaged while at most f rows are faulty.

Subset enumeration. MDA and SMEA minimise over every subset of W - f rows. The
subsets are enumerated with NumPy while the rule is traced (W and f are
static), and the per-subset quantities come from the W x W matrix of pairwise
squared distances, so the rules are jit-able and vmap-able; a rule refuses
more than :data:`MAX_SUBSETS` subsets with a ValueError.

:data:`RULES` lists the bodies with their options and row requirements, and
:data:`ALIASES` the names other libraries use.
"""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.aggregators import core as agg
from ftjax.aggregators import maths
from ftjax.kernels import rows

MAX_SUBSETS = 50_000
"""Most subsets of W - f rows that MDA and SMEA enumerate: C(W, f) <= 50,000
(e.g. W = 17 with any f, W = 20 with f <= 6, W = 30 with f <= 4)."""


def _subsets(w: int, f: int, rule: str) -> np.ndarray:
  """Every subset of W - f rows as ascending indices, int [C(W, f), W - f], lexicographic."""
  count = math.comb(w, f)
  if count > MAX_SUBSETS:
    raise ValueError(
        f"{rule} enumerates every subset of W - f = {w - f} of the W = {w} rows, "
        f"C({w}, {f}) = {count} subsets, above its limit of {MAX_SUBSETS}; use fewer "
        f"workers or a smaller f, or a rule without enumeration (e.g. cwtm, or ctma around one).")
  subsets = np.array(list(itertools.combinations(range(w), w - f)), dtype=np.int32)
  return subsets.reshape(count, w - f)


def _mask(w: int, idx: jax.Array) -> jax.Array:
  return jnp.zeros(w, bool).at[idx].set(True)


def _take_rows(x, idx: jax.Array):
  """The rows ``idx`` of every leaf (a static number of rows)."""
  return jax.tree.map(lambda leaf: jnp.take(leaf, idx, axis=0), x)


def _best_subset(values: jax.Array, subsets: np.ndarray, w: int):
  """(indices, bool [W] mask) of the subset with the smallest value, the first on ties."""
  idx = jnp.asarray(subsets)[jnp.argmin(rows.nan_to_posinf(values))]
  return idx, _mask(w, idx)


# --------------------------------------------------------------------------
# Bulyan
# --------------------------------------------------------------------------


def _bulyan(x, key, *, f, num_neighbours=None):
  """Bulyan (El Mhamdi et al., 2018): Krum picks W - 2f rows, then a mean around their median.

  Selection: theta = W - 2f times, Krum over the rows not yet selected (a pool
  of n_t = W - t rows at step t) picks the row whose summed squared distance to
  its k_t nearest other pool rows is smallest (ties to the lower index), with
  k_t = n_t - f - 2 by default, or ``num_neighbours - t`` (capped at n_t - 1).
  Aggregation: per coordinate, the mean of the beta = theta - 2f selected
  values nearest the selected rows' median.
  """
  del key
  w = maths.num_rows(x)
  theta, beta = w - 2 * f, w - 4 * f
  if beta < 1:
    raise ValueError(f"bulyan needs W > 4f (W - 4f values averaged per coordinate), "
                     f"got W = {w}, f = {f}.")
  dist, _ = maths.pairwise_sqdist(x, f)
  off_diagonal = ~jnp.eye(w, dtype=bool)
  pool = jnp.ones(w, bool)
  chosen = []
  for t in range(theta):
    n_t = w - t
    k = n_t - f - 2 if num_neighbours is None else num_neighbours - t
    k = max(0, min(k, n_t - 1))
    others = jnp.where(pool[None, :] & off_diagonal, dist, jnp.inf)
    score = jnp.where(pool, rows.smallest_sum(others, k), jnp.inf)
    i = jnp.argmin(score)
    i = jnp.where(pool[i], i, jnp.argmax(pool))  # every score +inf: the first pool row
    chosen.append(i)
    pool = pool.at[i].set(False)
  idx = jnp.stack(chosen)
  out = jax.tree.map(lambda leaf: _median_window_mean(leaf, beta), _take_rows(x, idx))
  return out, {"bulyan_selected": _mask(w, idx)}


def _median_window_mean(leaf: jax.Array, keep: int) -> jax.Array:
  """Per coordinate, the mean of the ``keep`` values nearest the median.

  In sorted order s_0 <= ... <= s_{n-1} with median m those values are the
  window [k, k + keep) whose farthest value from m is nearest:
  k = argmin_k max(m - s_k, s_{k+keep-1} - m), the lower window on a tie.
  """
  n = leaf.shape[0]
  s = rows.sort(leaf)
  m = s[(n - 1) // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) * jnp.asarray(0.5, leaf.dtype)
  best_k = jnp.zeros(leaf.shape[1:], jnp.int32)
  best_reach = jnp.maximum(m - s[0], s[keep - 1] - m)
  for k in range(1, n - keep + 1):
    reach = jnp.maximum(m - s[k], s[k + keep - 1] - m)
    better = reach < best_reach
    best_k = jnp.where(better, k, best_k)
    best_reach = jnp.where(better, reach, best_reach)
  zero = jnp.zeros((), leaf.dtype)
  window = [jnp.where((best_k <= j) & (j < best_k + keep), s[j], zero) for j in range(n)]
  return rows.sum_rows(window) / jnp.asarray(keep, leaf.dtype)


# --------------------------------------------------------------------------
# Subset minimisers: MDA, SMEA
# --------------------------------------------------------------------------


def _distances_to_mean(dist, chosen, finite):
  """Every row's squared distance [W] to the mean of the ``chosen`` rows, from D."""
  weights = jnp.where(chosen, 1.0 / jnp.sum(chosen), 0.0).astype(dist.dtype)
  return maths.sqdist_to_combination(dist, weights, finite)


def _mda_with_distances(x, key, *, f):
  """Minimum-diameter averaging: the mean of the W - f rows whose diameter is smallest.

  The diameter of a subset S is max_{i, j in S} |x_i - x_j|; every subset of
  W - f rows is enumerated and the first of the smallest wins. Also returns
  every row's squared distance to the output, from the pairwise distances.
  """
  del key
  w = maths.num_rows(x)
  subsets = _subsets(w, f, "mda")
  dist, finite = maths.pairwise_sqdist(x, f)
  s = jnp.asarray(subsets)
  diameter = jnp.max(dist[s[:, :, None], s[:, None, :]], axis=(1, 2))
  idx, chosen = _best_subset(diameter, subsets, w)
  return (maths.mean_of(x, idx), {"mda_selected": chosen},
          _distances_to_mean(dist, chosen, finite))


def _mda(x, key, *, f):
  """:func:`_mda_with_distances` without the distances."""
  return _mda_with_distances(x, key, f=f)[:2]


def _top_covariance_eigenvalues(dist: jax.Array, subsets: np.ndarray) -> jax.Array:
  """Largest eigenvalue of every subset's empirical covariance, [C], from the distances.

  For a subset S of m rows with centring matrix J = I - 11^T/m, the centred
  Gram matrix is J G_S J = -(1/2) J D_S J (D the squared distances), and its
  nonzero eigenvalues are m times those of the covariance
  (1/m) sum_{i in S} (x_i - mu_S)(x_i - mu_S)^T. A subset with a non-finite
  row gets +inf.
  """
  s = jnp.asarray(subsets)
  m = subsets.shape[1]
  d = dist[s[:, :, None], s[:, None, :]]                              # [C, m, m]
  finite = jnp.all(jnp.isfinite(d), axis=(1, 2))
  d = jnp.where(finite[:, None, None], d, 0.0)
  j = jnp.eye(m, dtype=dist.dtype) - 1.0 / m
  centred = -0.5 * (j @ d @ j)
  top = jnp.linalg.eigvalsh(centred)[:, -1] / m
  return jnp.where(finite, top, jnp.inf)


def _smea_with_distances(x, key, *, f):
  """Smallest maximum eigenvalue averaging: the mean of the W - f rows whose covariance
  has the smallest largest eigenvalue.

  Exact: every subset of W - f rows is enumerated and its covariance's largest
  eigenvalue computed from the subset's (W - f) x (W - f) centred Gram matrix;
  the first of the smallest wins. Also returns every row's squared distance
  to the output, from the pairwise distances.
  """
  del key
  w = maths.num_rows(x)
  subsets = _subsets(w, f, "smea")
  dist, finite = maths.pairwise_sqdist(x, f)
  idx, chosen = _best_subset(_top_covariance_eigenvalues(dist, subsets), subsets, w)
  return (maths.mean_of(x, idx), {"smea_selected": chosen},
          _distances_to_mean(dist, chosen, finite))


def _smea(x, key, *, f):
  """:func:`_smea_with_distances` without the distances."""
  return _smea_with_distances(x, key, f=f)[:2]


# --------------------------------------------------------------------------
# Nearest rows: MoNNA, CGE
# --------------------------------------------------------------------------


def _monna(x, key, *, f, idx=0):
  """MoNNA: the mean of the W - f rows nearest the trusted row ``idx`` (itself included).

  Ties go to the lower index. The trusted row is assumed honest: if it is
  non-finite every row is infinitely far from it, and the finite rows among
  the first W - f are averaged.
  """
  del key
  w = maths.num_rows(x)
  if not 0 <= idx < w:
    raise ValueError(f"monna's trusted row idx={idx} is not a row of W = {w}.")
  trusted = jax.tree.map(lambda leaf: leaf[idx], x)
  nearest = maths.smallest_indices(maths.row_sqdist(x, trusted), w - f)
  chosen = _mask(w, nearest)
  return maths.masked_mean(x, chosen & maths.row_finite(x)), {"monna_selected": chosen}


def _cge(x, key, *, f):
  """Comparative gradient elimination: the mean of the W - f rows of smallest norm."""
  del key
  w = maths.num_rows(x)
  idx = maths.smallest_indices(maths.row_sqdist(x), w - f)
  return maths.mean_of(x, idx), {"cge_selected": _mask(w, idx)}


# --------------------------------------------------------------------------
# CAF
# --------------------------------------------------------------------------


def _weighted_centred_gram(dist: jax.Array, weights: jax.Array) -> jax.Array:
  """(x_i - mu).(x_k - mu) for mu = sum_j w_j x_j (weights summing to one), from D.

  With J_w = I - 1 w^T, J_w G J_w^T = -(1/2) J_w D J_w^T: the terms of D that
  depend on one index only cancel.
  """
  dw = dist @ weights
  return -0.5 * (dist - dw[:, None] - dw[None, :] + weights @ dw)


def _caf_with_distances(x, key, *, f):
  """Covariance-bound agnostic filter (Allouah, Guerraoui & Stephan, 2025).

  Weights c_i start at 1 (0 for a non-finite row). While sum_i c_i > W - 2f:
  mu_c = sum_i c_i x_i / sum_i c_i; v, lambda = the top eigenvector and
  eigenvalue of Sigma_c = sum_i c_i (x_i - mu_c)(x_i - mu_c)^T / sum_i c_i;
  tau_i = ((x_i - mu_c).v)^2; c_i <- c_i (1 - tau_i / max_{c_j > 0} tau_j).
  The result is the mu_c of the smallest lambda met. Each step zeroes at least
  one weight, so at most 2f steps run; the eigenpair is exact, from the W x W
  matrix diag(sqrt c) K diag(sqrt c) / sum c with K the centred Gram matrix.
  Also returns every row's squared distance to the output, from the pairwise
  distances.
  """
  del key
  w = maths.num_rows(x)
  pairwise, finite = maths.pairwise_sqdist(x, f)
  dist = jnp.where(finite[:, None] & finite[None, :], pairwise, 0.0)
  c0 = finite.astype(dist.dtype)

  def step(_, carry):
    c, best_c, best_lam, done = carry
    total = jnp.sum(c)
    running = ~done & (total > w - 2 * f)
    k = _weighted_centred_gram(dist, c / total)
    root = jnp.sqrt(c / total)
    lam, vecs = jnp.linalg.eigh(root[:, None] * k * root[None, :])
    lam, u = jnp.maximum(lam[-1], 0.0), vecs[:, -1]
    # (x_i - mu).v with v = Y^T u / sqrt(lam), Y = diag(root) (X - mu).
    proj = (k @ (root * u)) / jnp.sqrt(jnp.where(lam > 0, lam, 1.0))
    tau = jnp.where(c > 0, proj * proj, 0.0)
    tau_max = jnp.max(tau)
    better = running & (lam < best_lam)
    best_c = jnp.where(better, c, best_c)
    best_lam = jnp.where(better, lam, best_lam)
    moved = running & (tau_max > 0)
    # The row of the largest tau drops out exactly (XLA may divide by tau_max as
    # a multiplication by its reciprocal, which would leave it a tiny weight).
    new_c = jnp.maximum(c * (1.0 - tau / jnp.where(tau_max > 0, tau_max, 1.0)), 0.0)
    new_c = jnp.where(tau >= tau_max, 0.0, new_c)
    return jnp.where(moved, new_c, c), best_c, best_lam, done | ~moved

  init = (c0, c0, jnp.asarray(jnp.inf, dist.dtype), jnp.asarray(False))
  _, best_c, _, _ = jax.lax.fori_loop(0, 2 * f, step, init)
  weights = best_c / jnp.sum(best_c)
  return (maths.weighted_sum(x, weights, best_c > 0), {"caf_weights": weights},
          maths.sqdist_to_combination(pairwise, weights, finite))


def _caf(x, key, *, f):
  """:func:`_caf_with_distances` without the distances."""
  return _caf_with_distances(x, key, f=f)[:2]


# --------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------

RULES = {
    "bulyan": dict(body=_bulyan, options={"num_neighbours": None},
                   min_rows=lambda f, o: 4 * f + 1, robust_rows=lambda f, o: 4 * f + 3,
                   requirement="W > 4f + 2", stochastic=False),
    "mda": dict(body=_mda, with_distances=_mda_with_distances, options={},
                min_rows=lambda f, o: f + 1, robust_rows=lambda f, o: 2 * f + 1,
                requirement="W > 2f (and C(W, f) <= 50,000)", stochastic=False),
    "smea": dict(body=_smea, with_distances=_smea_with_distances, options={},
                 min_rows=lambda f, o: f + 1, robust_rows=lambda f, o: 2 * f + 1,
                 requirement="W > 2f (and C(W, f) <= 50,000)", stochastic=False),
    "monna": dict(body=_monna, options={"idx": 0},
                  min_rows=lambda f, o: max(f + 1, o["idx"] + 1),
                  robust_rows=lambda f, o: max(2 * f + 1, o["idx"] + 1),
                  requirement="W > 2f (and the trusted row idx < W)", stochastic=False),
    "cge": dict(body=_cge, options={},
                min_rows=lambda f, o: f + 1, robust_rows=lambda f, o: 2 * f + 1,
                requirement="W > 2f", stochastic=False),
    "caf": dict(body=_caf, with_distances=_caf_with_distances, options={},
                min_rows=lambda f, o: 2 * f + 1, robust_rows=lambda f, o: 2 * f + 1,
                requirement="W > 2f", stochastic=False),
}
"""name -> body, options (name -> default), min_rows, robust_rows, requirement, stochastic,
and for mda, smea and caf ``with_distances``: the body that also returns every row's
squared distance [W] to the aggregate, from the pairwise distances it computed anyway
(what ``RuleInfo.with_distances`` is for: ctma then skips its distance pass)."""

ALIASES = {
    "minimum-diameter-averaging": "mda",           # byzpy
    "comparative-gradient-elimination": "cge",     # byzpy
    "smallest-maximum-eigenvalue-averaging": "smea",
    "covariance-bound-agnostic-filter": "caf",
}
"""Other names of these rules (ByzFL's class names, lowercased, are the names themselves)."""

agg.register_table(RULES, ALIASES)
