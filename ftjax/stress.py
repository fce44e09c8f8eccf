"""Hostile updates: does a rule keep its output inside the honest rows' spread?

A robust rule promises that f rows, whatever they hold, cannot drag its output
away from the honest rows. This module checks the promise on the inputs that
break implementations rather than theorems: NaN, +-inf, values whose squares
overflow, denormals, f identical rows, copies of an honest row, and mixes of
these. Use it on a rule of your own before you train with it::

    from ftjax import aggregators, stress
    report = stress.check(aggregators.ctma(my_rule, f=2), num_workers=5)
    assert all(r.passed for r in report), [r for r in report if not r.passed]

The criterion. An output ``a`` is *within the honest rows' spread* when it is
finite and either

* inside the honest rows' box: ``min_i h_i <= a <= max_i h_i`` coordinate by
  coordinate (what coordinate-wise rules guarantee), or
* inside the honest ball: ``|a - m| <= max_i |h_i - m|`` with ``m`` the honest
  mean (what distance-based rules such as Krum, the geometric median or CTMA
  guarantee).

Neither alone fits every rule: a coordinate-wise median can leave the ball
(each coordinate at the box's edge) and a geometric median can leave the box.
``clip(A)`` rescales the honest rows too, so its output is compared with the
clipped honest rows. ``avg`` is the non-robust baseline and fails.
"""
from __future__ import annotations

import contextlib

from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import aggregators as agg_lib

# Byzantine row contents, by name. Each maker gets (honest rows [h, d] as a
# NumPy array, f, the dtype) and returns the f hostile rows [f, d].


def _full(value):
  return lambda honest, f, dtype: np.full((f, honest.shape[1]), value, dtype)


def _huge(honest, f, dtype):
  # Finite, but the square of any coordinate and any sum of them overflows.
  return np.full((f, honest.shape[1]), np.finfo(dtype).max / 4, dtype)


def _denormal(honest, f, dtype):
  # Small multiples of the smallest subnormal: not zero, but flushed to zero by
  # hardware that does so (XLA:CPU does by default), which a rule must survive too.
  tiny = np.finfo(dtype).smallest_subnormal
  steps = 1 + np.arange(f * honest.shape[1]).reshape(f, -1) % 7
  return (steps * tiny).astype(dtype)


def _identical_far(honest, f, dtype):
  # f copies of one point 100 honest radii away: far rows that agree with each other,
  # which is what fools rules that score rows by their nearest neighbours.
  mean = honest.mean(0)
  radius = np.linalg.norm(honest - mean, axis=1).max()
  direction = np.random.default_rng(0).standard_normal(honest.shape[1])
  point = mean + 100 * radius * direction / np.linalg.norm(direction)
  return np.tile(point, (f, 1)).astype(dtype)


def _copies_of_honest(honest, f, dtype):
  return np.tile(honest[0], (f, 1)).astype(dtype)


def _mix(honest, f, dtype):
  # Every fault at once, one per row, cycling: NaN, +inf, -inf, huge, denormal-like
  # zeros, a far point, a copy of an honest row, and one row NaN in one coordinate only.
  makers = [_full(np.nan), _full(np.inf), _full(-np.inf), _huge, _denormal, _identical_far,
            _copies_of_honest]
  out = np.stack([makers[i % len(makers)](honest, f, dtype)[i] for i in range(f)])
  if f >= 2:
    out[-1] = honest[-1]
    out[-1, 0] = np.nan
  return out


HOSTILE_ROWS: dict[str, Callable[[np.ndarray, int, Any], np.ndarray]] = {
    "nan": _full(np.nan),
    "+inf": _full(np.inf),
    "-inf": _full(-np.inf),
    "1e30": _full(1e30),
    "-1e30": _full(-1e30),
    "1e38": _full(1e38),
    "max/4": _huge,
    "denormal": _denormal,
    "identical_far": _identical_far,
    "copies_of_honest": _copies_of_honest,
    "mix": _mix,
}
"""Name -> maker of the f hostile rows."""


def honest_rows(num_honest: int, dim: int, dtype=np.float32, seed: int = 0) -> np.ndarray:
  """Honest rows: a common direction plus noise, away from zero (so ~0 rows are hostile)."""
  rng = np.random.default_rng(seed)
  return (2.0 + 0.5 * rng.standard_normal((num_honest, dim))).astype(dtype)


class Spread(NamedTuple):
  """Where an output lies relative to the honest rows."""
  finite: bool
  in_box: bool          # inside [min_i h_i, max_i h_i] in every coordinate
  ball_ratio: float     # |a - m| / max_i |h_i - m|; <= 1 is inside the honest ball

  @property
  def within(self) -> bool:
    return self.finite and (self.in_box or self.ball_ratio <= 1.0)


def spread(output: np.ndarray, honest: np.ndarray, rtol: float = 1e-5) -> Spread:
  """Measures ``output`` [d] against the honest rows [h, d] (in float64)."""
  a = np.asarray(output, np.float64)
  h = np.asarray(honest, np.float64)
  if not np.all(np.isfinite(a)):
    return Spread(False, False, float("inf"))
  lo, hi = h.min(0), h.max(0)
  slack = rtol * np.maximum(np.abs(lo), np.abs(hi))
  in_box = bool(np.all((a >= lo - slack) & (a <= hi + slack)))
  mean = h.mean(0)
  radius = np.linalg.norm(h - mean, axis=1).max()
  ratio = float(np.linalg.norm(a - mean) / radius) if radius > 0 else (
      0.0 if np.allclose(a, mean) else float("inf"))
  # Rounding of a float32 rule's sums may put it a hair outside either set.
  return Spread(True, in_box, ratio if ratio > 1 + rtol else min(ratio, 1.0))


def _reference_rows(aggregator: agg_lib.Aggregator, honest: np.ndarray) -> np.ndarray:
  """The rows the rule promises to stay near: the honest rows, clipped for ``clip``."""
  if aggregator.name != "clip":
    return honest
  tau = dict(aggregator.options)["tau"]
  norms = np.linalg.norm(honest.astype(np.float64), axis=1, keepdims=True)
  return honest * np.minimum(1.0, tau / np.maximum(norms, 1e-300))


class Cell(NamedTuple):
  """One rule on one hostile input."""
  spec: str
  kind: str
  num_workers: int
  f: int
  dtype: str
  spread: Optional[Spread]   # None when the rule refuses this W, f
  refused: str               # the rule's one-line refusal, or ""

  @property
  def passed(self) -> bool:
    return bool(self.refused) or (self.spread is not None and self.spread.within)


def check(aggregator: agg_lib.Aggregator, num_workers: int, *, dim: int = 50,
          dtypes: Sequence[Any] = (np.float32, np.float64),
          kinds: Iterable[str] = tuple(HOSTILE_ROWS), seed: int = 0,
          spec: Optional[str] = None) -> list[Cell]:
  """Runs ``aggregator`` on every hostile input at ``num_workers`` rows.

  The last ``aggregator.f`` rows are hostile, the others honest
  (:func:`honest_rows`). A rule whose robustness condition fails for this
  W and f (:meth:`Aggregator.check`) is reported as refused, not run. A rule
  that reads the server's own update (fltrust) gets the honest rows' mean.

  Returns:
    One :class:`Cell` per (dtype, kind).
  """
  f = aggregator.f
  spec = spec or aggregator.spec
  cells = []
  kinds = list(kinds)
  for dtype in dtypes:
    name = np.dtype(dtype).name
    try:
      aggregator.check(num_workers)
    except ValueError as e:
      cells += [Cell(spec, k, num_workers, f, name, None, str(e)) for k in kinds]
      continue
    honest = honest_rows(num_workers - f, dim, dtype, seed)
    inputs = np.stack([np.concatenate([honest, HOSTILE_ROWS[k](honest, f, dtype)])
                       for k in kinds])
    x64 = jax.enable_x64(True) if np.dtype(dtype) == np.float64 else contextlib.nullcontext()
    with x64:
      keys = jax.random.split(jax.random.key(seed), len(kinds))
      # A rule that weighs the rows against the server's own update (fltrust) gets the
      # honest rows' mean: the update the server's examples give in expectation.
      server = jnp.asarray(honest.mean(0)) if aggregator.needs_server else None
      call = lambda x, k: aggregator(x, k, server=server)
      outs, _ = jax.jit(jax.vmap(call))(jnp.asarray(inputs), keys)
      outs = np.asarray(outs)
    reference = _reference_rows(aggregator, honest)
    cells += [Cell(spec, k, num_workers, f, name, spread(o, reference), "")
              for k, o in zip(kinds, outs)]
  return cells


def default_specs() -> list[str]:
  """Every base rule; every meta-aggregator over cwtm; CTMA over every robust base rule."""
  bases = list(agg_lib.shipped(agg_lib.AGGREGATORS))
  metas = [f"{m}(cwtm)" for m in agg_lib.shipped(agg_lib.META_AGGREGATORS)]
  over = [f"ctma({b})" for b in bases if b not in ("avg", "cwtm")]
  return bases + metas + over


def table(specs: Optional[Sequence[str]] = None,
          settings: Sequence[tuple[int, int]] = ((5, 2), (7, 2), (17, 8), (17, 4)),
          **kwargs) -> list[Cell]:
  """:func:`check` for every spec at every (W, f) of ``settings``."""
  cells = []
  for spec in specs or default_specs():
    for w, f in settings:
      cells += check(agg_lib.make_aggregator(spec, f), w, spec=spec, **kwargs)
  return cells
