"""The attacks that search: against the aggregator (``optimal_ipm``, ``optimal_alie``: a
line search for the scale that moves the aggregate most) and against the honest rows'
distances (``min_max``, ``min_sum``: the largest step that stays as close as an honest
row). Each builder takes the resolved options and returns ``fn(honest, own, key, ctx,
num_honest, f) -> rows``. :func:`evaluate` and :func:`server_output` (every candidate's
aggregate, in one vmap or in chunks) also serve ``fang_krum`` (:mod:`ftjax.attacks_peers`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import attack_maths as maths
from ftjax.kernels import rows as rows_lib

# Doublings of gamma_init allowed when bracketing min-max/min-sum's gamma.
_GROW_STEPS = 40


def server_output(honest, byzantine, aggregator, key):
  """What ``aggregator`` returns for the honest rows followed by the Byzantine rows."""
  rows = jax.tree.map(lambda x, b: jnp.concatenate([x, b.astype(x.dtype)]), honest, byzantine)
  out, _ = aggregator(rows, key)
  return out


def evaluate(fn, candidates, batch_size):
  """``fn(c)`` for every candidate ``c`` along the leading axis of ``candidates``.

  One ``jax.vmap`` over all of them, or ``lax.map`` in chunks of ``batch_size``
  (each candidate holds its own copy of the W rows, so chunks bound the memory).
  """
  if batch_size is None or batch_size >= candidates.shape[0]:
    return jax.vmap(fn)(candidates)
  return jax.lax.map(fn, candidates, batch_size=batch_size)


def _line_search(honest, base, direction, f, aggregator, key, grid, refine_steps,
                 batch_size):
  """The scale s maximising ||agg(honest + f x (base + s direction)) - mean(honest)||.

  A fixed grid (vmapped, or lax.map in chunks of ``batch_size``) followed by
  ``refine_steps`` golden-section steps inside the grid cell pair around the
  best grid point. The refinement only replaces the grid winner when it does
  strictly better, so the result is never worse than any grid candidate.
  """
  acc = maths.acc_dtype(honest)
  mu = maths.mean(honest)

  def damage(s):
    out = server_output(honest, maths.repeat(maths.along(base, direction, s), f), aggregator, key)
    dist = jnp.sqrt(maths.sq_norm(jax.tree.map(lambda o, m: o.astype(acc) - m.astype(acc), out, mu),
                             acc))
    # A NaN aggregate says nothing about distance; never let it win the argmax.
    return jnp.where(jnp.isnan(dist), -jnp.inf, dist)

  grid_a = jnp.asarray(grid, acc)
  values = evaluate(damage, grid_a, batch_size)
  i = jnp.argmax(values)
  best_s, best_v = grid_a[i], values[i]
  if not refine_steps:
    return best_s

  n = len(grid)
  lo = grid_a[jnp.maximum(i - 1, 0)]
  hi = grid_a[jnp.minimum(i + 1, n - 1)]
  x1 = hi - maths.INV_PHI * (hi - lo)
  x2 = lo + maths.INV_PHI * (hi - lo)
  unknown = jnp.full([], -jnp.inf, values.dtype)

  # Steps 0 and 1 evaluate the two interior points, later steps are golden-section
  # steps; one aggregator call per step keeps a single copy of it in the loop body.
  def step(k, carry):
    lo, hi, x1, x2, v1, v2 = carry
    keep_left = v1 >= v2  # the maximum lies in [lo, x2]
    g_lo = jnp.where(keep_left, lo, x1)
    g_hi = jnp.where(keep_left, x2, hi)
    x_gold = jnp.where(keep_left, g_hi - maths.INV_PHI * (g_hi - g_lo),
                       g_lo + maths.INV_PHI * (g_hi - g_lo))
    v = damage(jnp.where(k == 0, x1, jnp.where(k == 1, x2, x_gold)))
    golden = (g_lo, g_hi,
              jnp.where(keep_left, x_gold, x2), jnp.where(keep_left, x1, x_gold),
              jnp.where(keep_left, v, v2), jnp.where(keep_left, v1, v))
    start = (lo, hi, x1, x2, jnp.where(k == 0, v, v1), jnp.where(k == 1, v, v2))
    return jax.tree.map(lambda a, b: jnp.where(k >= 2, a, b), golden, start)

  _, _, x1, x2, v1, v2 = jax.lax.fori_loop(0, refine_steps + 2, step,
                                           (lo, hi, x1, x2, unknown, unknown))
  x_ref, v_ref = jnp.where(v1 >= v2, x1, x2), jnp.maximum(v1, v2)
  return jnp.where(v_ref > best_v, x_ref, best_s)


def _search_grid(low, high, num_candidates, reference):
  """The static candidate scales: an even grid plus the reference scale."""
  grid = np.linspace(low, high, num_candidates)
  if reference is not None and np.isfinite(reference):
    # Always trying the fixed attack's scale guarantees the search is at least as damaging.
    grid = np.unique(np.append(grid, reference))
  return grid


def build_optimal(kind, low, high, num_candidates, refine_steps, batch_size):
  def fn(honest, own, key, ctx, h, f):
    mu = maths.mean(honest)
    if kind == "ipm":
      base = jax.tree.map(jnp.zeros_like, mu)
      direction = jax.tree.map(jnp.negative, mu)
      reference = maths.IPM_REFERENCE_EPS
    else:
      base = mu
      direction = jax.tree.map(jnp.negative, maths.std(honest))
      try:
        reference = maths.alie_z(h + f, f)
      except ValueError:
        reference = None
    grid = _search_grid(low, high, num_candidates, reference)
    scale = _line_search(honest, base, direction, f, ctx.aggregator, key, grid,
                         refine_steps, batch_size)
    return maths.repeat(maths.along(base, direction, scale), f)
  return fn


def centered_gram(honest, acc):
  """Gram matrix of the centred honest rows, summed over leaves: [H, H]."""
  mu = maths.mean(honest)
  gram = 0.0
  for x, m in zip(jax.tree.leaves(honest), jax.tree.leaves(mu)):
    c = (x.astype(acc) - m.astype(acc)).reshape(x.shape[0], -1)
    gram = gram + jnp.matmul(c, c.T, precision=jax.lax.Precision.HIGHEST)
  return rows_lib.coordinate_sum(gram)


def build_min_distance(kind, perturbation, solver, gamma_init, steps):
  """min_max / min_sum of Shejwalkar and Houmansadr (NDSS 2021).

  With c_i = h_i - mu and p the perturbation, ||mu + g p - h_i||^2 is the
  quadratic a_i + 2 g b_i + g^2 |p|^2 in g (a_i = |c_i|^2, b_i = -<c_i, p>),
  so after one pass over the rows every feasibility test is O(H) scalars.
  """
  def fn(honest, own, key, ctx, h, f):
    acc = maths.acc_dtype(honest)
    mu = maths.mean(honest)
    if perturbation == "unit":
      norm = jnp.sqrt(maths.sq_norm(mu, acc))
      inv = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
      p = jax.tree.map(lambda m: -(m.astype(acc) * inv), mu)
    elif perturbation == "std":
      p = jax.tree.map(lambda s: -s.astype(acc), maths.std(honest))
    else:
      p = jax.tree.map(lambda m: -jnp.sign(m).astype(acc), mu)

    gram = centered_gram(honest, acc)
    a = jnp.diagonal(gram)
    sq_dists = jnp.maximum(a[:, None] + a[None, :] - 2.0 * gram, 0.0)
    b = -rows_lib.coordinate_sum(sum(
        jnp.matmul((x.astype(acc) - m.astype(acc)).reshape(h, -1), q.reshape(-1),
                   precision=jax.lax.Precision.HIGHEST)
        for x, m, q in zip(jax.tree.leaves(honest), jax.tree.leaves(mu), jax.tree.leaves(p))))
    c = maths.sq_norm(p, acc)
    if kind == "min_max":
      threshold = jnp.max(sq_dists)
      def excess(g):  # max_i |mal - h_i|^2 - max_{i,j} |h_i - h_j|^2
        return jnp.max(a + 2.0 * g * b + g * g * c) - threshold
    else:
      threshold = jnp.max(jnp.sum(sq_dists, axis=1))
      a_sum, b_sum = jnp.sum(a), jnp.sum(b)
      def excess(g):  # sum_i |mal - h_i|^2 - max_k sum_j |h_k - h_j|^2
        return a_sum + 2.0 * g * b_sum + h * g * g * c - threshold

    if solver == "exact":
      safe_c = jnp.where(c > 0, c, 1.0)
      if kind == "min_max":
        roots = (-b + jnp.sqrt(jnp.maximum(b * b - c * (a - threshold), 0.0))) / safe_c
        gamma = jnp.min(roots)
      else:
        gamma = (-b_sum + jnp.sqrt(jnp.maximum(b_sum * b_sum - h * c * (a_sum - threshold),
                                               0.0))) / (h * safe_c)
      gamma = jnp.where(c > 0, jnp.maximum(gamma, 0.0), 0.0)
    else:
      # Grow the bracket by doubling (fixed count), then bisect (fixed count);
      # `lo` stays feasible throughout, and it is what we send.
      def grow(_, carry):
        lo, hi = carry
        ok = excess(hi) <= 0
        return jnp.where(ok, hi, lo), jnp.where(ok, 2.0 * hi, hi)
      lo, hi = jax.lax.fori_loop(0, _GROW_STEPS, grow,
                                 (jnp.zeros([], acc), jnp.asarray(gamma_init, acc)))
      def bisect(_, carry):
        lo, hi = carry
        mid = 0.5 * (lo + hi)
        ok = excess(mid) <= 0
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)
      gamma, _ = jax.lax.fori_loop(0, steps, bisect, (lo, hi))
    row = jax.tree.map(lambda m, q: m.astype(acc) + gamma * q, mu, p)
    return maths.repeat(row, f)
  return fn

