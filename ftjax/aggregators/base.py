"""The base rules: one robust reduction of the worker rows each.

avg, cwmed, cwtm, meamed, gm, krum, multikrum and centered_clipping, each a
body ``(x, key, *, f, **options) -> (aggregate, diagnostics)`` and a public
builder returning the :class:`~ftjax.aggregators.core.Aggregator`; the table
at the end registers them (:data:`ftjax.aggregators.core.AGGREGATORS`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ftjax.kernels import rows

from ftjax.aggregators import maths
from ftjax.aggregators.core import AGGREGATORS, Aggregator, _base, _info
from ftjax.aggregators.core import _above, _any, _half

PyTree = Any

# --------------------------------------------------------------------------
# Base rules: (x, key, *, f, **options) -> (aggregate, diagnostics)
# --------------------------------------------------------------------------


def _avg(x, key, *, f):
  del key, f
  return jax.tree.map(rows.mean, x), {}


def _cwmed(x, key, *, f, lower):
  del key, f
  return jax.tree.map(lambda leaf: maths.median(leaf, lower), x), {}


def _cwtm(x, key, *, f):
  """Per coordinate: drop the f smallest and f largest values, average the rest."""
  del key

  def trimmed_mean(leaf):
    w = leaf.shape[0]
    return rows.trimmed_sum(leaf, f, w - f - 1) / jnp.asarray(w - 2 * f, leaf.dtype)

  return jax.tree.map(trimmed_mean, x), {}


def _meamed(x, key, *, f):
  """Per coordinate, the mean of the W-f values closest to the median.

  Sorted values s_0 <= ... <= s_{W-1} with median m: the W-f closest to m form
  a window [k, k + W - f). The f dropped values are the f farthest among the
  bottom distances a_j = m - s_j and top distances b_j = s_{W-1-j} - m, both
  decreasing in j, so k = #{j < f : a_j > b_{f-1-j}} (b_{f-1-j} = s_{W-f+j}).
  An exact tie drops the upper value, which keeps the rule permutation
  invariant (a tie-break by worker index would not be).
  """
  del key

  def window_mean(leaf):
    w = leaf.shape[0]
    s = rows.sort(leaf)
    m = s[(w - 1) // 2] if w % 2 else (s[w // 2 - 1] + s[w // 2]) * jnp.asarray(0.5, leaf.dtype)
    k = sum(((m - s[j]) > (s[w - f + j] - m)).astype(jnp.int32) for j in range(f)) \
        if f else jnp.zeros(leaf.shape[1:], jnp.int32)
    # 0 <= k <= f: the window always holds s_f .. s_{W-f-1}; of the f lowest
    # values it keeps those at j >= k, of the f highest those at j < k + W - f.
    zero = jnp.zeros((), leaf.dtype)
    window = [s[j] for j in range(f, w - f)]
    window += [jnp.where(j >= k, s[j], zero) for j in range(f)]
    window += [jnp.where(j < k + (w - f), s[j], zero) for j in range(w - f, w)]
    return rows.sum_rows(window) / jnp.asarray(w - f, leaf.dtype)

  return jax.tree.map(window_mean, x), {}


def _gm(x, key, *, f, iters, nu, init, tol, max_iters):
  """Smoothed Weiszfeld: z <- sum_i b_i x_i / sum_i b_i, b_i = 1/max(|z - x_i|, nu)."""
  del key, f
  # Each point feeds the next distance pass over the rows: its own computation.
  z = rows.isolate(lambda v: maths.init_point(v, init), x)
  return maths.weiszfeld(x, z, iters=iters, nu=nu, tol=tol, max_iters=max_iters)



def _multikrum_with_distances(x, key, *, f, num_selected, num_neighbours):
  """multikrum, and every row's squared distance to its output (for ctma), from its Gram matrix."""
  del key
  w = maths.num_rows(x)
  m = w - f if num_selected is None else num_selected
  dist, finite = maths.pairwise_sqdist(x, f)
  idx = maths.smallest_indices(maths.krum_scores(dist, f, num_neighbours), m)
  chosen = jnp.zeros(w, bool).at[idx].set(True)
  r = maths.sqdist_to_combination(dist, jnp.where(chosen, 1.0 / m, 0.0).astype(dist.dtype), finite)
  return maths.mean_of(x, idx), {"krum_selected": chosen}, r


def _multikrum(x, key, *, f, num_selected, num_neighbours):
  """Mean of the num_selected rows (default W - f) with the smallest Krum scores."""
  out, diag, _ = _multikrum_with_distances(x, key, f=f, num_selected=num_selected,
                                           num_neighbours=num_neighbours)
  return out, diag


def _krum_with_distances(x, key, *, f, num_neighbours):
  return _multikrum_with_distances(x, key, f=f, num_selected=1, num_neighbours=num_neighbours)


def _krum(x, key, *, f, num_neighbours):
  return _multikrum(x, key, f=f, num_selected=1, num_neighbours=num_neighbours)


def centered_clip(updates: PyTree, center: PyTree, tau: float | None, iters: int = 1) -> PyTree:
  """Centred clipping (Karimireddy et al., 2021) around a given reference point.

  ``v <- v + mean_i clip_tau(x_i - v)``, ``iters`` times, starting at ``center``
  (e.g. the previous aggregate). A non-finite row contributes zero.

  A fixed radius lets f far rows move v by up to (f/W) * tau whatever the
  scale of the honest rows; ``tau=None`` takes, at every iteration, the median
  distance of the W rows to v, so that with f < W/2 faulty rows the radius is
  at most the largest honest distance and their pull stays on the honest
  rows' own scale.

  Args:
    updates: pytree stacked on a leading worker axis W.
    center: pytree without the W axis, the starting point v.
    tau: clipping radius (> 0), or None for the median distance to v.
    iters: number of clipping iterations (>= 1).

  Returns:
    The aggregate, same structure as ``center``.
  """
  w = maths.num_rows(updates)

  def step(updates, v):
    dist = jnp.sqrt(maths.row_sqdist(updates, v))
    ok = jnp.isfinite(dist)
    # Non-finite distances are +inf, so they sort last and the median is finite.
    radius = jnp.sort(dist)[(w - 1) // 2] if tau is None else tau
    scale = jnp.where(ok, jnp.minimum(1.0, radius / jnp.where(ok & (dist > 0), dist, 1.0)), 0.0)
    # v + mean_i s_i (x_i - v) = sum_i (s_i / W) x_i - (sum_i s_i / W) v + v
    moved = maths.weighted_sum(updates, scale / w, ok)
    total = jnp.sum(scale) / w
    return jax.tree.map(lambda m, c: m - total.astype(c.dtype) * c + c, moved, v)

  v = center
  for i in range(iters):
    # Each iterate but the last feeds the next distance pass: its own computation.
    v = step(updates, v) if i == iters - 1 else rows.isolate(step, updates, v)
  return v


def _centered_clipping(x, key, *, f, tau, iters, init, state=None):
  del key, f
  if init == "previous":  # the previous round's aggregate, kept in the state
    out = centered_clip(x, state, tau, iters)
    return out, {}, out
  center = rows.isolate(lambda v: maths.init_point(v, init), x)
  return centered_clip(x, center, tau, iters), {}


def _centered_clipping_state(row_like, *, init, **unused):
  """The previous aggregate, zero before the first round (``init="previous"``)."""
  del unused
  if init != "previous":
    return None
  return jax.tree.map(lambda l: jnp.zeros(l.shape, l.dtype), row_like)



def avg(*, f: int = 0) -> Aggregator:
  """The coordinate-wise mean (not robust: one NaN row makes it NaN).

  Args:
    f: declared number of Byzantine workers (unused by the mean).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("avg", f)


def cwmed(lower: bool = False, *, f: int = 0) -> Aggregator:
  """The coordinate-wise median.

  Args:
    lower: for even W, the lower of the two middle values instead of their
      midpoint (the original program's median).
    f: number of Byzantine workers (robust for W > 2f).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("cwmed", f, lower=lower)


def cwtm(f: int) -> Aggregator:
  """The coordinate-wise trimmed mean.

  Per coordinate: order the W values along the worker axis, drop the f
  smallest and the f largest, average the W - 2f others.

  Args:
    f: values dropped at each end (needs W > 2f).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("cwtm", f)


def meamed(f: int) -> Aggregator:
  """Mean around the median (meamed).

  Per coordinate, the mean of the W - f values nearest the coordinate-wise
  median (an exact tie drops the upper value).

  Args:
    f: values dropped (robust for W > 2f).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("meamed", f)


def gm(iters: int = 3, nu: float = 0.1, init: str = "cwmed", tol: float | None = None,
       max_iters: int = 100, *, f: int = 0) -> Aggregator:
  """The geometric median by smoothed Weiszfeld iterations.

  z <- sum_i b_i x_i / sum_i b_i with b_i = 1 / max(|z - x_i|, nu); rows with
  a non-finite distance get weight zero.

  Args:
    iters: iterations when ``tol`` is None.
    nu: smoothing of the weights.
    init: starting point: ``"cwmed"`` (the coordinate-wise median), ``"mean"``
      (of the finite rows) or ``"zero"`` (the original program's).
    tol: if given, iterate until a step moves less than ``tol`` (at most
      ``max_iters`` steps); diagnostics then hold ``gm_iters``.
    max_iters: iteration cap with ``tol``.
    f: number of Byzantine workers (robust for W > 2f).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("gm", f, iters=iters, nu=nu, init=init, tol=tol, max_iters=max_iters)


def krum(f: int, num_neighbours: int | None = None) -> Aggregator:
  """Krum: the row with the smallest Krum score.

  A row's score is its summed squared distance to its ``num_neighbours``
  nearest other rows: W - f - 1 by default (the original program's count);
  Blanchard et al. (2017) sum W - f - 2.

  Args:
    f: number of Byzantine workers (needs W > 2f + 2).
    num_neighbours: rows in a score (None: W - f - 1).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("krum", f, num_neighbours=num_neighbours)


def multikrum(f: int, num_selected: int | None = None,
              num_neighbours: int | None = None) -> Aggregator:
  """Multi-Krum: the mean of the ``num_selected`` rows with the smallest Krum scores.

  Args:
    f: number of Byzantine workers (needs W > 2f + 2).
    num_selected: rows averaged (None: W - f).
    num_neighbours: rows in a score, as in :func:`krum` (None: W - f - 1).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("multikrum", f, num_selected=num_selected, num_neighbours=num_neighbours)


def centered_clipping(tau: float | None = None, iters: int = 1, init: str = "cwmed", *,
                      f: int = 0) -> Aggregator:
  """Centred clipping: from a centre v, ``iters`` times v <- v + mean_i clip_tau(x_i - v).

  The defaults protect at any scale: the first centre is the coordinate-wise
  median and the radius the median distance of the rows to v (see
  :func:`centered_clip`); a fixed ``tau`` and ``init="mean"`` are the
  textbook choices, robust only when tau is small against the honest spread.

  Args:
    tau: clipping radius, or None for the median distance to the centre.
    iters: clipping iterations.
    init: first centre: ``"cwmed"``, ``"mean"`` (of the finite rows), ``"zero"``,
      or ``"previous"``: the previous round's aggregate, as Karimireddy, He and
      Jaggi (2021) define the rule (zero before the first round). The rule then
      keeps that aggregate as its state across rounds (:meth:`Aggregator.update`).
    f: number of Byzantine workers (robust for W > 2f).

  Returns:
    The :class:`Aggregator`.
  """
  return _base("centered_clipping", f, tau=tau, iters=iters, init=init)



AGGREGATORS.update({
    "avg": _info(avg, _avg, _any, _any, "any W"),
    "cwmed": _info(cwmed, _cwmed, _any, _half, "W > 2f"),
    "cwtm": _info(cwtm, _cwtm, _half, _half, "W > 2f"),
    "gm": _info(gm, _gm, _any, _half, "W > 2f"),
    "krum": _info(krum, _krum, lambda f, o: f + 2, lambda f, o: 2 * f + 3, "W > 2f + 2",
                  with_distances=_krum_with_distances),
    "multikrum": _info(multikrum, _multikrum,
                       lambda f, o: max(f + 2, o["num_selected"] or 0),
                       lambda f, o: max(2 * f + 3, o["num_selected"] or 0),
                       "W > 2f + 2 (and W >= num_selected)",
                       with_distances=_multikrum_with_distances),
    "centered_clipping": _info(centered_clipping, _centered_clipping, _any, _half, "W > 2f",
                               state=_centered_clipping_state),
    "meamed": _info(meamed, _meamed, _above, _half, "W > 2f"),
})

