r"""Paper-ready figures of a sweep or of one run, drawn from its workdir's files alone.

  ftjax plot --workdir=/tmp/sweep [--out=/tmp/sweep/plots]   (or python -m ftjax.plot)

For a sweep, reads ``sweep.json``, ``results.csv`` and every run's
``metrics.jsonl`` (the layout of docs/sweeps.md, through ftjax.results'
readers) and writes, each as PNG and PDF:

* ``curves``: test accuracy against rounds, one panel per attack (or per
  value of the first axis) on a shared y-axis, one line per cell: the mean
  over its seeds with a min-max band;
* ``rule_attack``: a heatmap rule x attack of the final test accuracy (mean
  over the seeds), the worst attack of every rule boxed; one heatmap per
  setting of the other axes;
* ``f_heterogeneity``: a heatmap Byzantine workers x data heterogeneity
  (``workers.byzantine`` x ``data.partition`` / ``alpha`` / ``gamma`` /
  ``shards_per_worker``), one per rule, when the sweep has those axes;
* ``wall_time``: test accuracy against the time spent in training rounds,
  compilation and evaluation excluded (from each row's ``steps_per_sec``).

A workdir of one run (``metrics.csv``, no ``sweep.json``) gets ``run``: test
accuracy and loss against rounds, and the aggregate's norm and the rows CTMA
kept when the run logged them (ftjax.plot_run).

Every figure is also a function (``curves``, ``heatmap``, ``heterogeneity``,
``wall_time``, ``plot_run.run``) returning a matplotlib Figure, so a notebook
shows them inline; ``heatmap_data`` and ``heterogeneity_data`` return the
numbers the heatmaps draw. Colours, names and file formats are those of
ftjax.plot_style: each rule has one colour in every figure. Nothing here
imports JAX; matplotlib is the optional extra ``ftjax[plots]``.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from typing import Any, Optional

import numpy as np

from ftjax import plot_style as style
from ftjax import results as results_lib

ATTACK = "attack.name"
BYZANTINE = "workers.byzantine"
HETEROGENEITY = ("data.partition", "data.alpha", "data.gamma", "data.shards_per_worker")
# results.csv columns read as numbers; the axis values come typed from sweep.json.
NUMBERS = ("final_test_acc_mean", "final_test_acc_min", "final_test_acc_max",
           "best_test_acc_mean", "best_test_acc_min", "best_test_acc_max", "best_step",
           "steps_per_sec", "wall_time")
BOX = 0.45  # half the side of the box around a heatmap entry: boxes of adjacent rows stay apart


PlotError = style.PlotError


# --------------------------------------------------------------------------
# Reading the workdir
# --------------------------------------------------------------------------


def _sweep(workdir: str) -> dict:
  if not os.path.isfile(os.path.join(workdir, "sweep.json")):
    raise PlotError(f"{workdir!r} has no sweep.json: point --workdir at the directory of a "
                    f"sweep (ftjax sweep --sweep=... --workdir=...) or of a run (one with a "
                    f"metrics.csv).")
  try:
    return results_lib.read_sweep(workdir)
  except (OSError, ValueError) as e:
    raise PlotError(f"{os.path.join(workdir, 'sweep.json')} cannot be read ({e}).") from None


def _number(text: str) -> Optional[float]:
  return None if text == "" else float(text)


def cell_rows(workdir: str) -> list[dict]:
  """The rows of ``results.csv``, numbers parsed, axis values as in ``sweep.json``.

  Each row also carries the cell's ``aggregator`` spec from ``sweep.json``.
  """
  sweep = _sweep(workdir)
  path = os.path.join(workdir, "results.csv")
  if not os.path.isfile(path):
    raise PlotError(f"{workdir!r} has no results.csv yet: let the sweep finish (rerun it to "
                    f"resume) or rebuild the tables with python -c \"from ftjax import results; "
                    f"results.write_results('{workdir}')\".")
  cells = {c["cell"]: c for c in sweep["cells"]}
  with open(path, newline="") as fh:
    rows = list(csv.DictReader(fh))
  table = []
  for row in rows:
    cell = cells.get(row["cell"])
    if cell is None:
      raise PlotError(f"results.csv names the cell {row['cell']!r}, which sweep.json does not "
                      f"have; rebuild the tables (ftjax.results.write_results).")
    table.append({**row, **cell["values"], "aggregator": cell["aggregator"],
                  **{k: _number(row[k]) for k in NUMBERS if k in row}})
  return table


def run_metrics(workdir: str) -> dict[str, list[list[dict]]]:
  """Every cell's runs as lists of metrics rows, keyed by cell name.

  Runs that ``status.jsonl`` records as failed are left out (as in the result
  tables); runs still in progress count with the rows they have.
  """
  sweep = _sweep(workdir)
  status = results_lib.read_status(workdir)
  out = {}
  for cell in sweep["cells"]:
    runs = []
    for run in cell["runs"]:
      entry = status.get((cell["cell"], run["seed"]))
      if entry is not None and entry["status"] == "failed":
        continue
      rows = results_lib.read_jsonl(os.path.join(workdir, run["workdir"], "metrics.jsonl"))
      if rows:
        runs.append(rows)
    out[cell["cell"]] = runs
  return out


# --------------------------------------------------------------------------
# Labels and groups
# --------------------------------------------------------------------------


def _rule(cell: dict, axes: list[str]) -> str:
  """The rule of a cell: its spec, plus any aggregator axis the spec does not show."""
  extra = [a for a in axes if a.startswith("aggregator.") and
           a not in ("aggregator.name", "aggregator.meta")]
  return ", ".join([cell["aggregator"]] + [style.setting(a, cell["values"][a]) for a in extra])


def _spread_label(values: dict, spread: list[str]) -> Any:
  """A heterogeneity setting: the bare value for one axis (the axis names the x label)."""
  return values[spread[0]] if len(spread) == 1 else style.settings(values, spread)


def _unique(items) -> list:
  out = []
  for item in items:
    if item not in out:
      out.append(item)
  return out


def _panel_axis(axes: list[str]) -> Optional[str]:
  """The attack, else the first axis that is not the rule's; None: one panel."""
  if ATTACK in axes:
    return ATTACK
  return next((a for a in axes if not a.startswith("aggregator.")), None)


def _line_groups(sweep: dict) -> tuple[Optional[str], list, list[tuple[str, str, int, list]]]:
  """(panel axis, panel values, lines) for the curve figures.

  Each line is (label, rule spec, index of its setting of the other axes, cells):
  the rule gives the colour, the setting the line style.
  """
  axes = sweep["axes"]
  panel = _panel_axis(axes)
  others = [a for a in axes if a != panel and not a.startswith("aggregator.")]
  panels = _unique(c["values"][panel] for c in sweep["cells"]) if panel else [None]
  kinds = _unique(style.settings(c["values"], others) for c in sweep["cells"])
  lines = {}
  for cell in sweep["cells"]:
    kind = style.settings(cell["values"], others)
    label = ", ".join(filter(None, [_rule(cell, axes), kind]))
    lines.setdefault(label, (cell["aggregator"], kinds.index(kind), []))[2].append(cell)
  return panel, panels, [(label, *line) for label, line in lines.items()]


def training_time(rows: list[dict]) -> list[float]:
  """Seconds spent in training rounds up to each evaluation row.

  Each row's ``steps_per_sec`` is measured over the rounds since the previous
  evaluation, around the compiled chunk alone, so the running sum of rounds /
  steps_per_sec leaves out compilation and evaluation (``wall_time`` has both).
  """
  total, previous, out = 0.0, 0, []
  for row in rows:  # the step-0 row (no rounds before it) adds nothing
    if row["step"] > previous:
      total += (row["step"] - previous) / row["steps_per_sec"]
    previous = row["step"]
    out.append(total)
  return out


def _mean_curve(runs: list[list[dict]], x: str, y: str = "test_acc") -> tuple[np.ndarray, ...]:
  """Per evaluation step over the runs that reached it: mean x, mean, min and max of ``y``.

  ``x`` is a metrics column, or "training_time" (:func:`training_time`).
  """
  if x == "training_time":
    runs = [[{**r, x: t} for r, t in zip(rows, training_time(rows))] for rows in runs]
  steps = sorted({r["step"] for rows in runs for r in rows})
  by_step = [[r for rows in runs for r in rows if r["step"] == s] for s in steps]
  xs = np.array([np.mean([r[x] for r in rs]) for rs in by_step])
  accs = [np.array([r[y] for r in rs]) for rs in by_step]
  return (xs, np.array([a.mean() for a in accs]), np.array([a.min() for a in accs]),
          np.array([a.max() for a in accs]))


def _curve_figure(workdir: str, x: str, xlabel: str, ax, band: bool, title: str):
  sweep = _sweep(workdir)
  metrics = run_metrics(workdir)
  panel, panels, lines = _line_groups(sweep)
  fig, axes = style.figure(len(panels), ax=ax, extra_height=0.35 * math.ceil(len(lines) / 3),
                           sharey=True)
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  for value, axis in zip(panels, axes):
    for label, rule, kind, cells in lines:
      color = style.rule_color(rule)
      for cell in cells:
        if panel is not None and cell["values"][panel] != value:
          continue
        runs = metrics[cell["cell"]]
        if not runs:
          continue
        xs, mean, low, high = _mean_curve(runs, x)
        axis.plot(xs, 100 * mean, color=color, markersize=3, label=label,
                  linestyle=style.LINESTYLES[kind % len(style.LINESTYLES)],
                  marker=style.MARKERS[kind % len(style.MARKERS)])
        if band and len(runs) > 1:
          axis.fill_between(xs, 100 * low, 100 * high, color=color, alpha=0.15, linewidth=0)
        if all("val_acc" in r for rows in runs for r in rows):  # a held-out validation split
          xs, val = _mean_curve(runs, x, "val_acc")[:2]
          axis.plot(xs, 100 * val, color=color, linestyle="--", linewidth=0.9, alpha=0.7,
                    label=f"{label}: validation")
        if all("test_asr" in r for rows in runs for r in rows):  # a backdoor's success rate
          xs, asr = _mean_curve(runs, x, "test_asr")[:2]
          axis.plot(xs, 100 * asr, color=color, linestyle=":", linewidth=1.2,
                    label=f"{label}: attack success")
    if not axis.lines:
      axis.text(0.5, 0.5, "no finished evaluation yet", ha="center", va="center",
                transform=axis.transAxes, color="0.4")
    axis.set_title(style.setting(panel, value) if panel else sweep["name"])
    axis.set_xlabel(xlabel)
    if x == "step":
      axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    axis.set_ylabel("test accuracy (%)")
    axis.yaxis.set_tick_params(labelleft=True)
    axis.grid(alpha=0.3)
  handles = {}
  for axis in axes:
    for handle, label in zip(*axis.get_legend_handles_labels()):
      handles.setdefault(label, handle)
  if ax is None:
    fig.suptitle(title)
    if handles:
      fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                 ncol=min(3, len(handles)), fontsize="small", frameon=False)
  elif handles:
    axes[0].legend(fontsize="small")
  return fig


def curves(workdir: str, ax=None):
  """Test accuracy against rounds: one panel per attack (or value of the first axis).

  One line per cell: the mean over its seeds at every evaluation (from step 0
  when the runs evaluated the initial model), with a band from the smallest
  to the largest seed; for cells that hold a validation split out a thin
  dashed line of the mean validation accuracy, and for a backdoor's cells a
  dotted line of the mean attack success rate; the panels share their
  y-axis. ``ax``: axes to draw in, one per panel (default: a new figure).
  Returns the Figure.
  """
  seeds = len(_sweep(workdir)["seeds"])
  return _curve_figure(workdir, "step", "round", ax, band=True,
                       title=f"Test accuracy: mean over {seeds} seeds, band = min-max")


def wall_time(workdir: str, ax=None):
  """Test accuracy against the time spent training, compilation and evaluation excluded.

  The time (:func:`training_time`) and accuracy of every evaluation are
  means over the cell's seeds. Panels and ``ax`` as :func:`curves`.
  """
  seeds = len(_sweep(workdir)["seeds"])
  return _curve_figure(workdir, "training_time", "training time (s), without compilation",
                       ax, band=False,
                       title=f"Test accuracy against training time: mean over {seeds} seeds")


# --------------------------------------------------------------------------
# Heatmaps
# --------------------------------------------------------------------------


def _matrix(entries: dict, rows: list, columns: list) -> tuple[np.ndarray, np.ndarray]:
  """values (NaN: no cell or none finished) and failed masks from {(row, column): [rows]}."""
  values = np.full((len(rows), len(columns)), np.nan)
  failed = np.zeros((len(rows), len(columns)), bool)
  for (r, c), cells in entries.items():
    i, j = rows.index(r), columns.index(c)
    if any(cell["status"] == "failed" for cell in cells):
      failed[i, j] = True
      continue
    finished = [cell["final_test_acc_mean"] for cell in cells
                if cell["final_test_acc_mean"] is not None]
    if len(finished) == len(cells):
      values[i, j] = float(np.mean(finished))
  return values, failed


def heatmap_data(workdir: str) -> list[dict]:
  """The numbers of the rule x attack heatmaps: one per setting of the other axes.

  Returns:
    A list of panels (empty without an ``attack.name`` axis), each a dict:
    ``title`` (the other axes' setting, or "all"), ``rows`` (the rules, as in
    the cells' ``aggregator`` spec), ``columns`` (the attacks), ``values``
    (final test accuracy, mean over the seeds, as a fraction; NaN where no
    cell or no finished run) and ``failed`` (True where the cell failed:
    it counts as the rule's worst case, as in results.md).
  """
  sweep = _sweep(workdir)
  axes = sweep["axes"]
  if ATTACK not in axes:
    return []
  table = cell_rows(workdir)
  by_name = {c["cell"]: c for c in sweep["cells"]}
  others = [a for a in axes if a != ATTACK and not a.startswith("aggregator.")]
  groups = {}
  for row in table:
    cell = by_name[row["cell"]]
    key = style.settings(cell["values"], others) or "all"
    groups.setdefault(key, {}).setdefault((_rule(cell, axes), cell["values"][ATTACK]),
                                          []).append(row)
  panels = []
  rules = _unique(_rule(c, axes) for c in sweep["cells"])
  attacks = _unique(c["values"][ATTACK] for c in sweep["cells"])
  for title, entries in groups.items():
    rows = [r for r in rules if any(k[0] == r for k in entries)]
    columns = [a for a in attacks if any(k[1] == a for k in entries)]
    values, failed = _matrix(entries, rows, columns)
    panels.append({"title": title, "rows": rows, "columns": columns, "values": values,
                   "failed": failed})
  return panels


def heterogeneity_data(workdir: str) -> list[dict]:
  """The numbers of the Byzantine workers x heterogeneity heatmaps: one per rule.

  Returns:
    [] unless the sweep has a ``workers.byzantine`` axis and a heterogeneity
    axis (``data.partition``, ``data.alpha``, ``data.gamma``,
    ``data.shards_per_worker``). Otherwise one panel per rule: ``title``,
    ``rows`` (the f values, sorted), ``columns`` (the heterogeneity
    settings), ``values`` (final test accuracy, mean over the seeds and over
    the cells of the remaining axes, e.g. the attacks; NaN where none
    finished), ``failed`` (True where one of those cells failed) and
    ``averaged`` (the remaining axes).
  """
  sweep = _sweep(workdir)
  axes = sweep["axes"]
  spread = [a for a in axes if a in HETEROGENEITY]
  if BYZANTINE not in axes or not spread:
    return []
  table = cell_rows(workdir)
  by_name = {c["cell"]: c for c in sweep["cells"]}
  averaged = [a for a in axes if a != BYZANTINE and a not in spread and
              not a.startswith("aggregator.")]
  rules = _unique(_rule(c, axes) for c in sweep["cells"])
  groups = {r: {} for r in rules}
  for row in table:
    cell = by_name[row["cell"]]
    key = (cell["values"][BYZANTINE], _spread_label(cell["values"], spread))
    groups[_rule(cell, axes)].setdefault(key, []).append(row)
  fs = sorted({c["values"][BYZANTINE] for c in sweep["cells"]})
  settings = _unique(_spread_label(c["values"], spread) for c in sweep["cells"])
  panels = []
  for rule in rules:
    values, failed = _matrix(groups[rule], fs, settings)
    panels.append({"title": rule, "rows": fs, "columns": settings, "values": values,
                   "failed": failed, "averaged": averaged})
  return panels


def _draw_heatmaps(panels: list[dict], ax, xlabel: str, ylabel: str, title: str,
                   box_minimum: bool, column_axis: Optional[str] = None):
  """The heatmaps of ``panels`` on one colour scale (viridis); ``column_axis`` names the columns'
  field, so that they read as words ("ALIE")."""
  plt = style.pyplot()
  from matplotlib import patches  # pylint: disable=import-outside-toplevel
  width = max(max(len(p["columns"]) for p in panels) * 1.05 + 2.4, 5.2)
  height = max(len(p["rows"]) for p in panels) * 0.5 + 1.6
  fig, axes = style.figure(len(panels), width=width, height=height, ax=ax)
  finite = np.concatenate([p["values"][np.isfinite(p["values"])] for p in panels])
  low, high = (100 * finite.min(), 100 * finite.max()) if finite.size else (0.0, 100.0)
  if high - low < 1:
    low, high = low - 0.5, high + 0.5
  image = None
  for panel, axis in zip(panels, axes):
    values = 100 * panel["values"]
    image = axis.imshow(np.ma.masked_invalid(values), cmap=style.HEATMAP_CMAP, vmin=low,
                        vmax=high, aspect="auto")
    axis.set_facecolor("0.85")  # cells without a value
    axis.set_xticks(range(len(panel["columns"])),
                    [style.value_name(column_axis, c) if column_axis else style.format_number(c)
                     for c in panel["columns"]])
    axis.set_yticks(range(len(panel["rows"])), [style.format_number(r) for r in panel["rows"]])
    axis.tick_params(length=0)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if panel["title"] != "all":
      axis.set_title(panel["title"], fontsize="medium")
    for i in range(values.shape[0]):
      for j in range(values.shape[1]):
        text = ("failed" if panel["failed"][i, j] else
                "-" if np.isnan(values[i, j]) else f"{values[i, j]:.1f}")
        dark = np.isfinite(values[i, j]) and (values[i, j] - low) < 0.55 * (high - low)
        axis.text(j, i, text, ha="center", va="center", fontsize="small",
                  color="white" if dark else "black")
      if box_minimum:
        worst = _worst(panel["values"][i], panel["failed"][i])
        if worst is not None:  # vermillion: visible on viridis' dark and light ends
          axis.add_patch(patches.Rectangle((worst - BOX, i - BOX), 2 * BOX, 2 * BOX,
                                           fill=False, edgecolor=style.PALETTE[4],
                                           linewidth=3))
  if image is not None:
    fig.colorbar(image, ax=axes, label="final test accuracy (%)", shrink=0.9)
  if ax is None:
    fig.suptitle(title)
  return fig


def _worst(values: np.ndarray, failed: np.ndarray) -> Optional[int]:
  """The column of a row's worst case: a failed cell, else the smallest value."""
  if failed.any():
    return int(np.argmax(failed))
  if np.isnan(values).all():
    return None
  return int(np.nanargmin(values))


def heatmap(workdir: str, ax=None):
  """Heatmap rule x attack of the final test accuracy, mean over the seeds.

  One heatmap per setting of the axes that are neither the attack nor the
  rule's (titled with it); each rule's worst attack is boxed. ``ax``: axes
  to draw in, one per heatmap. Returns the Figure, or None (with a printed
  note) without an ``attack.name`` axis.
  """
  panels = heatmap_data(workdir)
  if not panels:
    print(f"No rule x attack heatmap: the sweep has no {ATTACK} axis.")
    return None
  seeds = len(_sweep(workdir)["seeds"])
  return _draw_heatmaps(panels, ax, "attack", "rule",
                        f"Final test accuracy (%), mean over {seeds} seeds\n"
                        f"box: each rule's worst attack", box_minimum=True, column_axis=ATTACK)


def heterogeneity(workdir: str, ax=None):
  """Heatmap Byzantine workers x data heterogeneity, one per rule.

  Each entry is the final test accuracy, mean over the seeds and over the
  remaining axes (named in the title). ``ax``: axes to draw in, one per
  rule. Returns the Figure, or None (with a printed note) when the sweep has
  no ``workers.byzantine`` or no heterogeneity axis.
  """
  panels = heterogeneity_data(workdir)
  if not panels:
    print(f"No f x heterogeneity heatmap: the sweep needs a {BYZANTINE} axis and one of "
          f"{', '.join(HETEROGENEITY)}.")
    return None
  sweep = _sweep(workdir)
  averaged = panels[0]["averaged"]
  over = f"mean over {len(sweep['seeds'])} seeds" + (
      f"\nand over {', '.join(style.axis_name(a) for a in averaged)}" if averaged else "")
  spread = [a for a in sweep["axes"] if a in HETEROGENEITY]
  return _draw_heatmaps(panels, ax, ", ".join(style.axis_name(a) for a in spread),
                        "Byzantine workers f", f"Final test accuracy (%), {over}",
                        box_minimum=False, column_axis=spread[0] if len(spread) == 1 else None)


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------


FIGURES = (("curves", curves), ("rule_attack", heatmap), ("f_heterogeneity", heterogeneity),
           ("wall_time", wall_time))


def write_plots(workdir: str, out: Optional[str] = None) -> list[str]:
  """Writes every figure that applies to the workdir as PNG and PDF; returns their paths.

  A sweep's workdir (``sweep.json``) gets the figures of FIGURES, one run's
  workdir (``metrics.csv`` or ``metrics.jsonl``, no ``sweep.json``) the
  figure of ftjax.plot_run. ``out`` defaults to ``<workdir>/plots``. A
  figure that does not apply (no attack axis, no heterogeneity axis) is
  skipped with a printed note.
  """
  from ftjax import plot_run  # pylint: disable=import-outside-toplevel
  plt = style.pyplot()
  if plot_run.is_run(workdir):
    figures = (("run", plot_run.run),)
  else:
    cell_rows(workdir)  # a missing sweep.json or results.csv stops before any file is written
    figures = FIGURES
  out = out or os.path.join(workdir, "plots")
  os.makedirs(out, exist_ok=True)
  paths = []
  for name, draw in figures:
    fig = draw(workdir)
    if fig is None:
      continue
    written = style.save(fig, out, name)
    plt.close(fig)
    paths += written
    print(f"Wrote {' and '.join(written)}")
  return paths


def main(argv: list[str], command: str = "python -m ftjax.plot") -> None:
  """``ftjax plot --workdir=<sweep or run workdir> [--out=<dir>]``."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ftjax import cli  # pylint: disable=import-outside-toplevel
  # Own flag values, so that the command also runs inside another program (the tests).
  values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "A sweep's directory (ftjax sweep) or one run's "
                      "(ftjax train).", flag_values=values)
  flags.DEFINE_string("out", None, "Where the PNG and PDF files go (default: <workdir>/plots).",
                      flag_values=values)
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(f"usage: {command} --workdir=DIR [--out=DIR]\n\n"
          f"Draws the figures of a sweep (curves, rule x attack and f x heterogeneity\n"
          f"heatmaps, accuracy against training time) or of one run (accuracy, loss, the\n"
          f"aggregate's norm, the rows CTMA kept), as PNG and PDF.\n\nflags:\n"
          f"{values.get_help()}")
    return
  try:
    values(argv)
  except flags.Error as e:
    cli.fail(f"{e} ({command} --help lists the flags).")
  if not values.workdir:
    cli.fail(f"--workdir is required: the directory of a sweep or of a run ({command} "
             f"--workdir=/tmp/sweep).")
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    cli.fail('Plotting needs matplotlib, which is not installed: pip install "ftjax[plots]".',
             code=1)
  if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")  # files only: no display needed
  try:
    write_plots(values.workdir, values.out)
  except PlotError as e:
    cli.fail(str(e), code=1)


if __name__ == "__main__":
  main(sys.argv)
