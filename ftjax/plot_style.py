"""The look shared by every figure of :mod:`ftjax.plot`: colours, labels, files.

* One colour per aggregation rule, the same in every figure: the rule's spec
  (``ctma(cwtm)``) picks it from the Okabe-Ito palette, which stays
  distinguishable under the common colour-vision deficiencies; known specs
  have fixed slots, any other spec a slot from a hash of its text.
* Heatmaps use viridis (no red-green scale).
* Axis and value names read as words: ``attack.name=alie`` is "attack: ALIE",
  ``workers.byzantine=4`` is "f = 4".
* ``figure`` lays out the panels; ``save`` writes every figure as PNG and PDF.

Nothing here imports JAX; matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
import os
import zlib
from typing import Any

import numpy as np

# Okabe & Ito (2008), yellow last: it is faint on white.
PALETTE = ("#000000", "#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7",
           "#999999", "#F0E442")
# Fixed colours of the rules the shipped configs and sweeps use (index into PALETTE).
RULE_SLOTS = {"avg": 0, "ctma(cwtm)": 1, "cwmed": 2, "nnm(cwtm)": 3, "ctma(cwmed)": 4,
              "cwtm": 5, "nnm+ctma(cwtm)": 6, "gm": 7, "ctma(gm)": 8}
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
HEATMAP_CMAP = "viridis"
FORMATS = ("png", "pdf")
PANEL_WIDTH, PANEL_HEIGHT = 4.6, 3.4  # inches
MAX_COLUMNS = 3
DPI = 150

AXIS_NAMES = {"attack.name": "attack", "workers.byzantine": "f", "workers.num": "W",
              "workers.batch_size": "b", "data.partition": "partition",
              "data.alpha": "Dirichlet alpha", "data.gamma": "gamma",
              "data.shards_per_worker": "shards per worker", "optim.estimator": "estimator",
              "aggregator.name": "rule", "aggregator.meta": "meta-aggregator",
              "aggregator.f": "rule's f", "optim.lr": "lr",
              "data.validation": "validation share"}
VALUE_NAMES = {
    "attack.name": {"alie": "ALIE", "ipm": "IPM", "sf": "sign flipping",
                    "lf": "label flipping", "none": "no attack", "optimal_ipm": "optimal IPM",
                    "optimal_alie": "optimal ALIE", "min_max": "min-max",
                    "min_sum": "min-sum", "gaussian": "Gaussian", "nan": "NaN",
                    "fang_krum": "Fang (Krum)", "fang_trmean": "Fang (trimmed mean)",
                    "signguard_adaptive": "adaptive (SignGuard)",
                    "clipped_clustering_adaptive": "adaptive (ClippedClustering)"},
    "data.partition": {"iid": "i.i.d.", "iid_split": "i.i.d. split", "dirichlet": "Dirichlet",
                       "gamma_similarity": "gamma-similarity"},
    "optim.estimator": {"sgd": "SGD", "mu2sgd": "mu2-SGD"},
}


class PlotError(ValueError):
  """A workdir that cannot be plotted, or matplotlib missing: one sentence saying what to do."""


def pyplot():
  """matplotlib.pyplot, or a one-sentence error saying how to install it."""
  try:
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise PlotError('Plotting needs matplotlib, which is not installed: '
                    'pip install "ftjax[plots]".') from None
  return plt


def figure(count: int, width: float = PANEL_WIDTH, height: float = PANEL_HEIGHT,
           ax=None, extra_height: float = 0.0, sharey: bool = False,
           max_columns: int = MAX_COLUMNS):
  """A figure with ``count`` panels (wrapped at ``max_columns``), or the caller's axes."""
  plt = pyplot()
  if ax is not None:
    axes = list(np.ravel(ax)) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
    if len(axes) < count:
      raise PlotError(f"This figure has {count} panels; pass as many axes (got {len(axes)}).")
    return axes[0].figure, axes[:count]
  columns = min(count, max_columns)
  rows = math.ceil(count / columns)
  fig, grid = plt.subplots(rows, columns, figsize=(width * columns, height * rows + extra_height),
                           squeeze=False, layout="constrained", sharey=sharey)
  axes = list(grid.ravel())
  for unused in axes[count:]:
    unused.set_visible(False)
  return fig, axes[:count]


def rule_color(spec: str) -> str:
  """The colour of a rule in every figure: a fixed slot, else one chosen by its spec's hash."""
  slot = RULE_SLOTS.get(spec)
  if slot is None:
    slot = zlib.crc32(spec.encode()) % len(PALETTE)
  return PALETTE[slot]


def format_number(value: Any) -> str:
  return f"{value:g}" if isinstance(value, float) else str(value)


def axis_name(axis: str) -> str:
  """A config field as a word: ``attack.name`` -> "attack", ``workers.byzantine`` -> "f"."""
  if axis in AXIS_NAMES:
    return AXIS_NAMES[axis]
  parts = axis.split(".")
  return (parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]).replace("_", " ")


def value_name(axis: str, value: Any) -> str:
  """A value of a field as shown: ``alie`` -> "ALIE"; numbers as ``%g``."""
  if isinstance(value, str):
    return VALUE_NAMES.get(axis, {}).get(value, value)
  return format_number(value)


def setting(axis: str, value: Any) -> str:
  """``attack.name, alie`` -> "attack: ALIE"; a number reads ``f = 4``."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return f"{axis_name(axis)} = {format_number(value)}"
  return f"{axis_name(axis)}: {value_name(axis, value)}"


def settings(values: dict, axes: list[str]) -> str:
  return ", ".join(setting(a, values[a]) for a in axes)


def save(fig, out: str, name: str) -> list[str]:
  """Writes ``fig`` as ``out/name.png`` and ``out/name.pdf``; returns the paths."""
  paths = []
  for fmt in FORMATS:
    path = os.path.join(out, f"{name}.{fmt}")
    fig.savefig(path, dpi=DPI)
    paths.append(path)
  return paths
