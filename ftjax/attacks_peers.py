"""The attacks other libraries offer: Fang et al.'s against Krum and against the trimmed
mean, mimic along the honest rows' principal direction, and the adaptive attacks Blades
writes against SignGuard and ClippedClustering.

Each builder takes an attack's resolved options and returns ``fn(honest, own, key, ctx,
num_honest, f[, draws]) -> rows`` for the ``ATTACKS`` table of :mod:`ftjax.attacks`; an
attack with random values also has a draw builder returning ``draw(honest, key, f)``,
which reads only the rows' shapes. Sums over coordinates go through
:func:`ftjax.kernels.rows.coordinate_sum` (directly, or inside the kernels' Gram matrices
and distances) and everything else works coordinate by coordinate, so every attack here
also runs on one device's slice of the coordinates. docs/attacks.md gives the formulas.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import attack_maths as maths
from ftjax import attack_search as search
from ftjax.kernels import rows as rows_lib

# Blades' ClippedClustering attack turns each link of its chain by this much less than
# the smallest honest angle (less its margin).
_CHAIN_SLACK = 1e-4
# signguard_adaptive's magnitudes are this many random bits over 2**bits: exact in float32.
_MAGNITUDE_BITS = 24


# --------------------------------------------------------------------------
# Draws


def _per_leaf(sample):
  """A ``draw`` of independent ``sample(key, shape, dtype)`` values, leaves [f, ...] like the
  Byzantine rows."""
  def draw(honest, key, f):
    leaves, treedef = jax.tree.flatten(honest)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [sample(k, (f,) + tuple(x.shape[1:]), x.dtype)
                                        for k, x in zip(keys, leaves)])
  return draw


def draw_uniform(**_):
  """Builds ``draw``: independent U[0, 1) values."""
  return _per_leaf(jax.random.uniform)


def draw_fang_krum(epsilon, **_):
  """Builds ``draw`` for ``fang_krum``: Gaussian directions of the f rows' offsets (None for epsilon 0)."""
  return _per_leaf(jax.random.normal) if epsilon else None


def draw_signguard(**_):
  """Builds ``draw`` for ``signguard_adaptive``: int32 leaves [2, ...].

  Row 0 numbers the coordinates of all leaves (leaf after leaf, row-major) by a uniformly
  random permutation of 1..d; row 1 holds 24 random bits per coordinate, its magnitude.
  A 0 in row 0 (the zero columns that pad a sharded leaf) marks no coordinate.
  """
  def draw(honest, key, f):
    del f
    leaves, treedef = jax.tree.flatten(honest)
    sizes = [int(np.prod(x.shape[1:], dtype=np.int64)) for x in leaves]
    k_rank, k_bits = jax.random.split(key)
    rank = jax.random.permutation(k_rank, sum(sizes)).astype(jnp.int32) + 1
    bits = jax.random.bits(k_bits, (sum(sizes),), jnp.uint32) >> (32 - _MAGNITUDE_BITS)
    both = jnp.stack([rank, bits.astype(jnp.int32)])
    parts = jnp.split(both, np.cumsum(sizes)[:-1], axis=1)
    return jax.tree.unflatten(treedef, [p.reshape((2,) + tuple(x.shape[1:]))
                                        for p, x in zip(parts, leaves)])
  return draw


# --------------------------------------------------------------------------
# Fang et al. (USENIX Security 2020)


def fang_krum_bound(honest, s, h, f, acc):
  """The paper's upper bound on lambda (its Theorem 1), for updates with reference 0.

  ``[min_i sum of the h - 2 smallest |h_l - h_i| (l != i) / (h - f - 1) + max_i |h_i|] / |s|``,
  with m - c - 2 = h - 2 and m - 2c - 1 = h - f - 1 in the paper's m workers, c of them
  Byzantine; |s| = sqrt(d) when no coordinate of the honest mean is 0.
  """
  sq, _ = rows_lib.pairwise_sqdist(honest)
  dist = jnp.where(jnp.eye(h, dtype=bool), jnp.inf, jnp.sqrt(sq.astype(acc)))
  spread = jnp.min(jnp.sum(jnp.sort(dist, axis=1)[:, :h - 2], axis=1)) / (h - f - 1)
  farthest = jnp.sqrt(jnp.max(rows_lib.sqdist(honest)).astype(acc))
  s_norm = jnp.sqrt(maths.sq_norm(s, acc))
  return jnp.where(s_norm > 0, (spread + farthest) / jnp.where(s_norm > 0, s_norm, 1.0), 0.0)


def _offsets(directions, epsilon, f, acc):
  """epsilon times the unit directions of rows 1..f-1, and 0 for row 0: leaves [f, ...]."""
  norms = jnp.sqrt(rows_lib.sqdist(directions).astype(acc))
  scale = jnp.where(norms > 0, epsilon / jnp.where(norms > 0, norms, 1.0), 0.0)
  scale = scale.at[0].set(0.0)
  return jax.tree.map(lambda n: n * scale.reshape((f,) + (1,) * (n.ndim - 1)).astype(n.dtype),
                      directions)


def check_fang_krum_counts(name, num_workers, num_byzantine):
  """The bound divides by W - 2f - 1: refuses W < 2f + 2 in one line."""
  if num_workers < 2 * num_byzantine + 2:
    raise ValueError(f"Attack {name!r} needs W >= 2f + 2 workers (its bound divides by "
                     f"W - 2f - 1), got W = {num_workers}, f = {num_byzantine}; use fewer "
                     f"Byzantine workers or another attack.")


def build_fang_krum(threshold, halvings, epsilon, batch_size):
  """fang_krum: rows -lambda s (+ offsets), lambda halved from the bound until a Byzantine row wins."""
  def fn(honest, own, key, ctx, h, f, draws=None):
    acc = maths.acc_dtype(honest)
    s = jax.tree.map(jnp.sign, maths.mean(honest))
    offsets = None if draws is None else _offsets(draws, epsilon, f, acc)

    def rows_at(lam):
      row = jax.tree.map(lambda v: -lam.astype(v.dtype) * v, s)
      rows = maths.repeat(row, f)
      return rows if offsets is None else jax.tree.map(jnp.add, rows, offsets)

    def picks_byzantine(lam):
      byz = rows_at(lam)
      out = search.server_output(honest, byz, ctx.aggregator, key)
      # The aggregate lies nearer a Byzantine row than every honest row (a NaN aggregate
      # is +inf from both, so it never counts).
      return jnp.min(rows_lib.sqdist(byz, out)) < jnp.min(rows_lib.sqdist(honest, out))

    grid = fang_krum_bound(honest, s, h, f, acc) * 0.5 ** jnp.arange(halvings + 1, dtype=acc)
    picked = search.evaluate(picks_byzantine, grid, batch_size)
    # The paper's loop stops at the first lambda Krum picks, or once lambda <= threshold.
    stop = (picked | (grid <= threshold)).at[-1].set(True)
    return rows_at(grid[jnp.argmax(stop)])
  return fn


def build_fang_trmean(b):
  """fang_trmean: per coordinate, U-drawn values beyond the honest extreme opposite the mean's sign."""
  def fn(honest, own, key, ctx, h, f, u):
    def leaf(x, r):
      mu, hi, lo = jnp.mean(x, axis=0), jnp.max(x, axis=0), jnp.min(x, axis=0)
      below = jnp.where(lo > 0, lo / b, lo * b)   # [below, lo]: under the smallest value
      above = jnp.where(hi > 0, hi * b, hi / b)   # [hi, above]: over the largest value
      start = jnp.where(mu > 0, below, jnp.where(mu < 0, hi, mu))
      end = jnp.where(mu > 0, lo, jnp.where(mu < 0, above, mu))
      return start[None] + r * (end - start)[None]
    return jax.tree.map(leaf, honest, u)
  return fn


# --------------------------------------------------------------------------
# Mimic (Karimireddy, He and Jaggi, ICLR 2022)


def principal_row(honest) -> jax.Array:
  """argmax_i |<z, h_i - mu>|, z the top principal direction of the centred honest rows.

  With G the H x H Gram matrix of the centred rows and v its top eigenvector,
  <z, h_i - mu> = sqrt(lambda_max) v_i, so the row is argmax_i |v_i| (the first on a tie).
  """
  gram = search.centered_gram(honest, maths.acc_dtype(honest))
  _, vectors = jnp.linalg.eigh(gram)
  return jnp.argmax(jnp.abs(vectors[:, -1]))


def build_mimic(index):
  """mimic: every Byzantine row copies one honest row (``index``, or the principal one)."""
  def fn(honest, own, key, ctx, h, f):
    if index is not None and index >= h:
      raise ValueError(f"mimic.index={index} but there are only {h} honest rows; "
                       f"use an index in [0, {h - 1}], or None for the principal direction's row.")
    i = principal_row(honest) if index is None else index
    return maths.repeat(jax.tree.map(lambda x: x[i], honest), f)
  return fn


# --------------------------------------------------------------------------
# Blades' adaptive attacks


def _count(tree, predicate) -> jax.Array:
  """How many coordinates of ``tree`` (all leaves) satisfy ``predicate``: int32 []."""
  return rows_lib.coordinate_sum(sum(jnp.sum(predicate(x), dtype=jnp.int32)
                                     for x in jax.tree.leaves(tree)))


def _median(values: jax.Array) -> jax.Array:
  s = jnp.sort(values)
  n = s.shape[0]
  return s[(n - 1) // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def build_signguard_adaptive(magnitude):
  """signguard_adaptive: random signs with the honest mean's sign counts, U[0, 1) magnitudes."""
  def fn(honest, own, key, ctx, h, f, draws):
    acc = maths.acc_dtype(honest)
    mu = maths.mean(honest)
    pos, neg = _count(mu, lambda m: m > 0), _count(mu, lambda m: m < 0)

    def leaf(m, d):
      rank, u = d[0], (d[1].astype(jnp.float32) * (0.5 ** _MAGNITUDE_BITS)).astype(m.dtype)
      sign = jnp.where((rank >= 1) & (rank <= pos), 1.0,
                       jnp.where((rank > pos) & (rank <= pos + neg), -1.0, 0.0))
      return sign.astype(m.dtype) * u

    row = jax.tree.map(leaf, mu, draws)
    if magnitude == "median_norm":
      target = _median(jnp.sqrt(rows_lib.sqdist(honest).astype(acc)))
      norm = jnp.sqrt(maths.sq_norm(row, acc))
      scale = jnp.where(norm > 0, target / jnp.where(norm > 0, norm, 1.0), 0.0)
      row = jax.tree.map(lambda r: r * scale.astype(r.dtype), row)
    return maths.repeat(row, f)
  return fn


def _cosine_distance(dots, norms_a, norms_b):
  """1 - cos from inner products and norms; 2 (the largest) where a vector is zero."""
  ok = (norms_a > 0) & (norms_b > 0)
  cos = dots / jnp.where(ok, norms_a * norms_b, 1.0)
  return jnp.where(ok, jnp.clip(1.0 - cos, 0.0, 2.0), 2.0)


def _chain_angles(theta, cross, f):
  """Each Byzantine row's angle from the mean, and whether it is on the chain (else the fallback)."""
  step = cross - _CHAIN_SLACK
  before = theta + step * jnp.arange(f, dtype=theta.dtype)  # the previous link's angle
  on_chain = jnp.cumprod(before + cross < math.pi) > 0
  return before + step, on_chain


def build_clipped_clustering_adaptive(linkage, margin, scale):
  """clipped_clustering_adaptive: a chain of rows turning away from the mean, one angle step apart."""
  def fn(honest, own, key, ctx, h, f):
    # The rules' clustering; imported here so that ftjax.attacks does not load the rules.
    from ftjax.aggregators import filters  # pylint: disable=import-outside-toplevel
    acc = maths.acc_dtype(honest)
    g = rows_lib.gram(jax.tree.map(lambda x: x.astype(acc), honest))
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(g), 0.0))
    dist = jnp.where(jnp.eye(h, dtype=bool), 0.0, _cosine_distance(g, norms[:, None], norms[None]))
    cross = jnp.arccos(1.0 - jnp.min(jnp.where(jnp.eye(h, dtype=bool), jnp.inf, dist))) - margin
    larger = filters.larger_of_two_clusters(dist, linkage, jnp.ones(h, bool))
    mu_norm = jnp.sqrt(jnp.maximum(jnp.mean(g), 0.0))
    to_mean = _cosine_distance(jnp.mean(g, axis=1), norms, mu_norm)
    e = jnp.argmax(jnp.where(larger, to_mean, -jnp.inf))
    theta = jnp.arccos(1.0 - to_mean[e])
    phi, on_chain = _chain_angles(theta, cross, f)
    sin_t = jnp.sin(theta)
    in_plane = on_chain & (sin_t > 0) & (mu_norm > 0) & (norms[e] > 0)
    safe = lambda v: jnp.where(v > 0, v, 1.0)
    # The unit vector at angle phi from mu/|mu|, in the plane of mu and h_e, on h_e's side.
    along_mu = (jnp.cos(phi) - jnp.sin(phi) * jnp.cos(theta) / safe(sin_t)) / safe(mu_norm)
    along_e = jnp.sin(phi) / safe(sin_t) / safe(norms[e])
    c_mu = jnp.where(in_plane, scale * along_mu, -scale)
    c_e = jnp.where(in_plane, scale * along_e, 0.0)

    def leaf(x):
      shape = (f,) + (1,) * (x.ndim - 1)
      return (c_mu.reshape(shape) * jnp.mean(x.astype(acc), axis=0)[None]
              + c_e.reshape(shape) * x[e].astype(acc)[None])
    return jax.tree.map(leaf, honest)
  return fn
