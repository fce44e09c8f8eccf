"""Rules that filter the rows by outlier scores or clusters: DnC, SignGuard, Clustering,
ClippedClustering, FLAME.

Each rule is a body with the contract of :mod:`ftjax.aggregators`,
``(x, key, *, f, **options) -> (aggregate, diagnostics)``; the diagnostics hold a
bool [W] mask of the rows averaged. Norms and Gram matrices are global over the
leaves of ``x`` (through :mod:`ftjax.kernels.rows`), and the clustering steps
run on W x W matrices with a fixed number of steps, so every rule is jit-able
and vmap-able and deterministic given its key. A row with a non-finite
coordinate (or whose squared norm overflows) is infinitely far from the others:
it is never averaged, and the clustering rules leave it out of their clusters.

:data:`RULES` lists the bodies with their options and row requirements, and
:data:`ALIASES` the names other libraries use.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.aggregators import core as agg
from ftjax.aggregators import maths
from ftjax import kernels as kernels_lib
from ftjax.kernels import rows

LINKAGES = ("single", "complete", "average")


# --------------------------------------------------------------------------
# Agglomerative clustering on a W x W distance matrix
# --------------------------------------------------------------------------


def _merge_closest(dist, size, label, linkage):
  """Merges the two closest clusters (the first pair on ties); returns the new state.

  ``dist`` holds cluster distances between the representatives (the lowest
  index of each cluster) and +inf elsewhere; ``label`` maps every row to its
  cluster's representative. The merged cluster's distances follow the
  Lance-Williams update of the linkage.
  """
  w = dist.shape[0]
  flat = jnp.argmin(dist)
  i, j = jnp.minimum(flat // w, flat % w), jnp.maximum(flat // w, flat % w)
  if linkage == "single":
    joined = jnp.minimum(dist[i], dist[j])
  elif linkage == "complete":
    joined = jnp.maximum(dist[i], dist[j])
  else:
    joined = (size[i] * dist[i] + size[j] * dist[j]) / (size[i] + size[j])
  joined = joined.at[i].set(jnp.inf).at[j].set(jnp.inf)
  dist = dist.at[i].set(joined).at[:, i].set(joined)
  dist = dist.at[j].set(jnp.inf).at[:, j].set(jnp.inf)
  size = size.at[i].add(size[j]).at[j].set(0)
  label = jnp.where(label == j, i, label)
  return dist, size, label, i


def _start(dist, active):
  """Every active row its own cluster; inactive rows are in no cluster (size 0, +inf away)."""
  w = dist.shape[0]
  pair = active[:, None] & active[None, :] & ~jnp.eye(w, dtype=bool)
  return jnp.where(pair, dist, jnp.inf), active.astype(dist.dtype), jnp.arange(w)


def _merge_while(state, linkage, go):
  """:func:`_merge_closest` on (dist, size, label) where ``go``, else the same state."""
  merged = _merge_closest(*state, linkage)
  return tuple(jnp.where(go, new, old) for new, old in zip(merged[:3], state)), merged[3]


def larger_of_two_clusters(dist: jax.Array, linkage: str, active: jax.Array) -> jax.Array:
  """Agglomerative clustering of the active rows into two clusters; bool [W], the larger.

  Merges of the closest clusters under ``linkage`` (``"single"``,
  ``"complete"`` or ``"average"``) until two are left, ties to the first pair
  in row-major order; of two clusters of equal size, the one holding the lower
  row index. Inactive rows are in neither cluster.

  Args:
    dist: [W, W] symmetric distances (finite between active rows).
    linkage: the cluster distance.
    active: bool [W], the rows to cluster.

  Returns:
    bool [W], the rows of the larger cluster (one row when only two are active).
  """
  if linkage not in LINKAGES:
    raise ValueError(f"Unknown linkage {linkage!r}; valid linkages: {list(LINKAGES)}.")
  w = dist.shape[0]

  def body(_, state):
    go = jnp.sum(state[1] > 0) > 2
    return _merge_while(state, linkage, go)[0]

  _, size, label = jax.lax.fori_loop(0, max(w - 2, 0), body, _start(dist, active))
  biggest = jnp.argmax(size)  # the first representative on a tie
  return active & (label == biggest)


def first_cluster_of_size(dist: jax.Array, min_size: int, active: jax.Array) -> jax.Array:
  """Single-linkage merges of the active rows until a cluster holds ``min_size`` rows.

  Single linkage merges in increasing distance, so for min_size > W/2 this is
  the connected component of the graph {d_ij <= t} at the smallest threshold t
  where one holds min_size rows (ties at t: the first merge that reaches it).

  Returns:
    bool [W], that cluster; all active rows if none reaches min_size.
  """
  w = dist.shape[0]

  def body(_, carry):
    state, found, members = carry
    state, i = _merge_while(state, "single", ~found & (jnp.sum(state[1] > 0) > 1))
    hit = ~found & (state[1][i] >= min_size)
    return state, found | hit, jnp.where(hit, active & (state[2] == i), members)

  start = _start(dist, active)
  found = jnp.asarray(min_size <= 1) | (jnp.sum(active) < min_size)
  members = active if min_size > 1 else active & (jnp.arange(w) == jnp.argmax(active))
  return jax.lax.fori_loop(0, max(w - 1, 0), body, (start, found, members))[2]


# --------------------------------------------------------------------------
# Row geometry
# --------------------------------------------------------------------------


def cosine_distances(x) -> tuple[jax.Array, jax.Array, jax.Array]:
  """1 - cos(x_i, x_j) for every pair, from the Gram matrix of the unit rows.

  A non-finite row or a zero row has no direction: its distance to every other
  row is 2, the largest cosine distance.

  Returns:
    (dist [W, W] with 0 on the diagonal, norms [W] (+inf for a non-finite
    row), bool [W] finite rows).
  """
  w = maths.num_rows(x)
  norms = jnp.sqrt(maths.row_sqdist(x))
  finite = jnp.isfinite(norms)
  has_direction = finite & (norms > 0)
  inv = jnp.where(has_direction, 1.0 / jnp.where(has_direction, norms, 1.0), 0.0)

  def unit(leaf):
    shape = (w,) + (1,) * (leaf.ndim - 1)
    return jnp.where(has_direction.reshape(shape), leaf * inv.reshape(shape).astype(leaf.dtype),
                     jnp.zeros((), leaf.dtype))

  cos = rows.gram(jax.tree.map(unit, x))
  dist = jnp.clip(1.0 - cos, 0.0, 2.0)
  dist = jnp.where(has_direction[:, None] & has_direction[None, :], dist, 2.0)
  return jnp.where(jnp.eye(w, dtype=bool), 0.0, dist), norms, finite


def _clip_to(x, norms, tau):
  """Every row scaled to norm at most ``tau`` (non-finite rows are left to the caller's mask)."""
  w = maths.num_rows(x)
  scale = jnp.where(norms > tau, tau / jnp.where(norms > tau, norms, 1.0), 1.0)
  scale = jnp.where(jnp.isfinite(norms), scale, 0.0)

  def clip_leaf(leaf):
    return leaf * scale.reshape((w,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)

  return jax.tree.map(clip_leaf, x)


def _median_norm(norms):
  """Median of the W norms (+inf sorts last, so it is finite while fewer than W/2 are)."""
  w = norms.shape[0]
  s = jnp.sort(norms)
  return s[(w - 1) // 2] if w % 2 else 0.5 * (s[w // 2 - 1] + s[w // 2])


def _slice_key(key: jax.Array) -> jax.Array:
  """``key``, folded with the device's index when the coordinates are sharded.

  Each device then draws its own coordinates' randomness (a subsample, noise)
  rather than repeating another device's draws.
  """
  axis = kernels_lib.coordinate_axis()
  return key if axis is None else jax.random.fold_in(key, jax.lax.axis_index(axis))


def _check(ok: bool, rule: str, what: str) -> None:
  """Refuses an option value while tracing, in one sentence."""
  if not ok:
    raise ValueError(f"{rule}: {what}.")


# --------------------------------------------------------------------------
# DnC
# --------------------------------------------------------------------------


def subsample_masks(key: jax.Array, x, size: int) -> list[jax.Array]:
  """A uniformly random set of ``size`` coordinates of the rows, one mask per leaf.

  The coordinates are numbered leaf after leaf (each leaf row-major); the
  masks have the leaves' shapes without the worker axis.
  """
  shapes = [leaf.shape[1:] for leaf in jax.tree.leaves(x)]
  sizes = [int(np.prod(s)) for s in shapes]
  d = sum(sizes)
  picked = jax.random.permutation(key, d)[:min(size, d)]
  mask = jnp.zeros(d, bool).at[picked].set(True)
  splits = np.cumsum(sizes)[:-1]
  return [m.reshape(s) for m, s in zip(jnp.split(mask, splits), shapes)]


def _dnc(x, key, *, f, num_iters=5, subsample=10_000, c=1.0):
  """Divide-and-conquer (Shejwalkar & Houmansadr, 2021).

  ``num_iters`` times: draw ``subsample`` coordinates at random; centre the
  subsampled rows at their mean; score every row by its squared projection on
  the top right singular vector of the centred rows; keep the W - floor(c f)
  lowest scores. The result is the mean of the rows kept every time. The
  scores come from the top eigenpair (lambda, u) of the W x W centred Gram
  matrix of the subsample: score_i = lambda u_i^2. A non-finite row is left
  out of the mean and scored +inf.
  """
  if key is None:
    raise ValueError("dnc is stochastic: call it with a PRNG key, e.g. "
                     "agg(updates, jax.random.key(0)).")
  w = maths.num_rows(x)
  keep = w - int(np.floor(c * f))
  _check(num_iters >= 1 and subsample >= 1, "dnc", "num_iters and subsample must be >= 1")
  _check(c >= 0 and keep >= 1, "dnc", f"c must be >= 0 and floor(c f) < W = {w}, got c = {c}")
  finite = maths.row_finite(x)
  # Centring at the coordinate-wise median first keeps float32 Gram entries
  # from cancelling; the mean-centred Gram matrix below does not depend on it.
  center = rows.isolate(lambda v: jax.tree.map(maths.median, v), x)
  centred = jax.tree.map(
      lambda leaf, m: jnp.where(finite.reshape((w,) + (1,) * (leaf.ndim - 1)), leaf - m[None],
                                jnp.zeros((), leaf.dtype)), x, center)
  weights = finite / jnp.sum(finite)
  good = finite
  for k in jax.random.split(_slice_key(key), num_iters):
    masks = subsample_masks(k, x, subsample)
    g = rows.gram(jax.tree.map(lambda y, m: jnp.where(m[None], y, jnp.zeros((), y.dtype)),
                               centred, jax.tree.unflatten(jax.tree.structure(x), masks)))
    gw = g @ weights  # centre at the finite rows' mean: J_w G J_w^T
    k_mat = g - gw[:, None] - gw[None, :] + weights @ gw
    k_mat = jnp.where(finite[:, None] & finite[None, :], k_mat, 0.0)
    lam, vecs = jnp.linalg.eigh(k_mat)
    score = jnp.where(finite, lam[-1] * vecs[:, -1] ** 2, jnp.inf)
    good = good & jnp.zeros(w, bool).at[maths.smallest_indices(score, keep)].set(True)
  return maths.masked_mean(x, good), {"dnc_selected": good}


# --------------------------------------------------------------------------
# SignGuard
# --------------------------------------------------------------------------


def sign_features(x) -> jax.Array:
  """[W, 3]: each row's fractions of positive, negative and zero coordinates."""
  # Counted like the sums below, so that sharded coordinates add up over the devices.
  d = rows.coordinate_sum(jnp.asarray(sum(int(np.prod(leaf.shape[1:]))
                                          for leaf in jax.tree.leaves(x)), jnp.float32))

  def count(pred):
    return rows.coordinate_sum(sum(jnp.sum(pred(leaf).reshape(leaf.shape[0], -1), axis=1,
                                           dtype=jnp.float32)
                                   for leaf in jax.tree.leaves(x)))

  pos, neg = count(lambda l: l > 0), count(lambda l: l < 0)
  return jnp.stack([pos, neg, d - pos - neg], axis=1) / d


def _signguard(x, key, *, f, lower=0.1, upper=3.0, linkage="average"):
  """SignGuard (Xu et al., 2022), deterministic.

  With M the median row norm: S1 = {i : lower M <= |x_i| <= upper M}; S2 = the
  larger of two clusters of the rows' sign features (fractions of positive,
  negative and zero coordinates, over every coordinate) by agglomerative
  clustering with Euclidean distances; the result is the mean of the rows in
  S1 and S2, each clipped to norm M (zero when no row is in both).
  """
  del key, f
  _check(0 <= lower <= upper, "signguard", f"need 0 <= lower <= upper, got {lower}, {upper}")
  norms = jnp.sqrt(maths.row_sqdist(x))
  finite = jnp.isfinite(norms)
  m = _median_norm(norms)
  s1 = finite & (norms >= lower * m) & (norms <= upper * m)
  feats = sign_features(x)
  fd = jnp.sqrt(jnp.maximum(jnp.sum((feats[:, None] - feats[None, :]) ** 2, axis=-1), 0.0))
  chosen = s1 & larger_of_two_clusters(fd, linkage, finite)
  return maths.masked_mean(_clip_to(x, norms, m), chosen), {"signguard_selected": chosen}


# --------------------------------------------------------------------------
# Clustering, ClippedClustering
# --------------------------------------------------------------------------


def _clustering(x, key, *, f, linkage="complete"):
  """Clustering (Sattler et al., 2020): the mean of the larger of two clusters by cosine distance.

  Agglomerative clustering with ``linkage`` of the cosine distances
  1 - cos(x_i, x_j) into two clusters; the mean of the finite rows of the larger.
  """
  del key, f
  dist, _, finite = cosine_distances(x)
  chosen = larger_of_two_clusters(dist, linkage, finite)
  return maths.masked_mean(x, chosen), {"clustering_selected": chosen}


def _clipped_clustering(x, key, *, f, linkage="average", max_tau=1e5):
  """ClippedClustering (Li et al., 2023), per round.

  Every row is clipped to tau = min(median row norm, ``max_tau``), then
  :func:`_clustering`'s two clusters (cosine distances are unchanged by the
  clipping) and the mean of the clipped rows of the larger. The paper takes
  the median over the norms of every round so far; this rule is stateless and
  takes the median of the current round's W norms.
  """
  del key, f
  _check(max_tau > 0, "clipped_clustering", f"max_tau must be positive, got {max_tau}")
  dist, norms, finite = cosine_distances(x)
  tau = jnp.minimum(_median_norm(norms), max_tau)
  chosen = larger_of_two_clusters(dist, linkage, finite)
  return (maths.masked_mean(_clip_to(x, norms, tau), chosen),
          {"clipped_clustering_selected": chosen})


# --------------------------------------------------------------------------
# FLAME
# --------------------------------------------------------------------------


def _flame(x, key, *, f, noise=0.001):
  """FLAME (Nguyen et al., 2022): cosine clustering, clipping at the median norm, noise.

  Cluster: the rows HDBSCAN labels as its cluster with min_cluster_size =
  floor(W/2) + 1, min_samples = 1 and a single cluster allowed, computed
  directly: the single-linkage component of the cosine distances at the
  smallest threshold where one holds floor(W/2) + 1 rows. The rows of the
  cluster are clipped to M, the median norm of all W rows, and averaged; then
  Gaussian noise of standard deviation ``noise * M`` is added to every
  coordinate (``noise=0`` adds none and needs no key).
  """
  del f
  _check(noise >= 0, "flame", f"noise must be >= 0, got {noise}")
  w = maths.num_rows(x)
  dist, norms, finite = cosine_distances(x)
  chosen = first_cluster_of_size(dist, w // 2 + 1, finite)
  m = _median_norm(norms)
  out = maths.masked_mean(_clip_to(x, norms, m), chosen)
  if noise:
    if key is None:
      raise ValueError("flame adds Gaussian noise: call it with a PRNG key, or set noise=0.")
    leaves, tree = jax.tree.flatten(out)
    keys = jax.random.split(_slice_key(key), len(leaves))
    leaves = [l + (noise * m).astype(l.dtype) * jax.random.normal(k, l.shape, l.dtype)
              for l, k in zip(leaves, keys)]
    out = jax.tree.unflatten(tree, leaves)
  return out, {"flame_selected": chosen}


# --------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------

RULES = {
    "dnc": dict(body=_dnc, options={"num_iters": 5, "subsample": 10_000, "c": 1.0},
                min_rows=lambda f, o: int(np.floor(o["c"] * f)) + 1,
                robust_rows=lambda f, o: 2 * f + 1,
                requirement="W > 2f", stochastic=True),
    "signguard": dict(body=_signguard, options={"lower": 0.1, "upper": 3.0, "linkage": "average"},
                      min_rows=lambda f, o: 1, robust_rows=lambda f, o: 2 * f + 1,
                      requirement="W > 2f", stochastic=False),
    "clustering": dict(body=_clustering, options={"linkage": "complete"},
                       min_rows=lambda f, o: 1, robust_rows=lambda f, o: 2 * f + 1,
                       requirement="W > 2f", stochastic=False),
    "clipped_clustering": dict(body=_clipped_clustering,
                               options={"linkage": "average", "max_tau": 1e5},
                               min_rows=lambda f, o: 1, robust_rows=lambda f, o: 2 * f + 1,
                               requirement="W > 2f", stochastic=False),
    "flame": dict(body=_flame, options={"noise": 0.001},
                  min_rows=lambda f, o: 1, robust_rows=lambda f, o: 2 * f + 1,
                  requirement="W > 2f", stochastic=True),
}
"""name -> body, options (name -> default), min_rows, robust_rows, requirement, stochastic
(flame needs a key only with noise > 0)."""

ALIASES = {
    "divide-and-conquer": "dnc",
    "clippedclustering": "clipped_clustering",     # Blades' class name, lowercased
}
"""Other names of these rules (Blades' and FLPoison's other class names, lowercased, are
the names themselves)."""

agg.register_table(RULES, ALIASES)
