"""The figure of one run's workdir (``ftjax train``): its curves against rounds.

Panels, on one shared round axis: test (and honest workers' train, and validation) accuracy;
test and train loss; then, when the run logged them, the rows CTMA kept
(Byzantine and honest, per round, averaged over the evaluation interval) and
the norm of the aggregate. The rule's colour is its colour in every figure
(ftjax.plot_style). Nothing here imports JAX.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from ftjax import plot_style as style
from ftjax import results as results_lib


def is_run(workdir: str) -> bool:
  """Whether ``workdir`` is one run's (metrics files, no sweep.json)."""
  has = lambda name: os.path.isfile(os.path.join(workdir, name))
  return not has("sweep.json") and (has("metrics.jsonl") or has("metrics.csv"))


def read_rows(workdir: str) -> list[dict]:
  """The evaluation rows: metrics.jsonl, else metrics.csv with its numbers parsed."""
  rows = results_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  if rows:
    return rows
  path = os.path.join(workdir, "metrics.csv")
  if not os.path.isfile(path):
    return []
  with open(path, newline="") as fh:
    return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


def _title(workdir: str) -> tuple[str, str]:
  """(title, rule spec) from the run's config.json ("" when it has none)."""
  try:
    with open(os.path.join(workdir, "config.json")) as fh:
      config = json.load(fh)
    meta = (config["aggregator"].get("meta") or "none").strip()
    name = config["aggregator"]["name"].strip()
    rule = name if meta.lower() == "none" else f"{meta}({name})"
    workers = config["workers"]
    return (f"{rule}, {style.setting('attack.name', config['attack']['name'])}, "
            f"W = {workers['num']}, f = {workers['byzantine']}"), rule
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return os.path.basename(os.path.normpath(workdir)), ""


def _panels(rows: list[dict]) -> list[tuple[str, list[tuple[str, str, float]]]]:
  """[(y label, [(column, legend label, scale)])] for the columns the rows have."""
  columns = {k for row in rows for k in row}  # the step-0 row has no training metrics
  kept = sorted(c for c in columns if c.endswith("kept_byzantine") or c.endswith("kept_honest"))
  panels = [("accuracy (%)", [("test_acc", "test", 100.0), ("train_acc", "train (honest)", 100.0),
                              ("val_acc", "validation", 100.0),
                              ("test_asr", "attack success (backdoor)", 100.0)]),
            ("loss", [("test_loss", "test", 1.0), ("train_loss", "train (honest)", 1.0),
                      ("val_loss", "validation", 1.0)])]
  if kept:
    panels.append(("rows CTMA kept per round",
                   [(c, results_lib.diag_label(c).rsplit(" (", 1)[0], 1.0) for c in kept]))
  if "aggregate_norm" in columns:
    panels.append(("norm of the aggregate", [("aggregate_norm", "aggregate", 1.0)]))
  return [(label, [s for s in series if s[0] in columns]) for label, series in panels]


def run(workdir: str, ax=None):
  """The figure of one run: accuracy, loss, CTMA's kept rows and the aggregate's norm.

  ``ax``: axes to draw in, one per panel (2 to 4, as the run's columns allow).
  Returns the Figure.
  """
  rows = read_rows(workdir)
  if not rows:
    raise style.PlotError(f"{workdir!r} has no evaluation rows yet (metrics.jsonl or "
                          f"metrics.csv): let the run reach its first evaluation.")
  title, rule = _title(workdir)
  color = style.rule_color(rule) if rule else style.PALETTE[1]
  panels = _panels(rows)
  fig, axes = style.figure(len(panels), ax=ax, height=3.2, max_columns=2)
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  steps = np.array([r["step"] for r in rows])
  for (ylabel, series), axis in zip(panels, axes):
    for k, (column, label, scale) in enumerate(series):
      values = np.array([r.get(column, np.nan) for r in rows], dtype=float)
      # One series: the rule's colour; the kept rows: Byzantine vermillion, honest blue.
      shade = (color if len(series) == 1 or k == 0 and "kept" not in column else
               style.PALETTE[4] if column.endswith("byzantine") else
               style.PALETTE[1] if column.endswith("honest") else style.PALETTE[7])
      axis.plot(steps, scale * values, color=shade, marker=style.MARKERS[k], markersize=3,
                linestyle=style.LINESTYLES[k], label=label)
    axis.set_xlabel("round")
    axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if len(series) > 1:
      axis.legend(fontsize="small")
  if ax is None:
    fig.suptitle(title)
  return fig
