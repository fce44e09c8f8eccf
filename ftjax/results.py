"""Result tables of a sweep, built from its workdir's files alone.

Pure functions over the layout of ``docs/sweeps.md``: ``sweep.json`` (the
cells and their runs), ``status.jsonl`` (one line per finished or failed run)
and each run's ``metrics.jsonl``. :func:`write_results` writes
``results.csv`` (accuracies as fractions) and ``results.md`` (percentages,
plus the worst case of every aggregation rule over the attacks). Nothing here
imports JAX, so the tables can be rebuilt anywhere from the files.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from typing import Any, Optional

# The columns of metrics.jsonl that are not aggregator diagnostics.
METRIC_COLUMNS = ("step", "train_loss", "train_acc", "test_loss", "test_acc", "aggregate_norm",
                  "wall_time", "steps_per_sec")


def read_jsonl(path: str) -> list[dict]:
  """The rows of a JSONL file ([] when it does not exist)."""
  if not os.path.exists(path):
    return []
  with open(path) as fh:
    return [json.loads(line) for line in fh if line.strip()]


def read_sweep(workdir: str) -> dict:
  """The sweep's ``sweep.json``."""
  with open(os.path.join(workdir, "sweep.json")) as fh:
    return json.load(fh)


def read_status(workdir: str) -> dict[tuple[str, int], dict]:
  """The last ``status.jsonl`` entry of every run, keyed by ``(cell, seed)``."""
  return {(e["cell"], e["seed"]): e for e in read_jsonl(os.path.join(workdir, "status.jsonl"))}


def run_summary(rows: list[dict]) -> dict:
  """One run's summary from its metrics rows (one per evaluation).

  Returns:
    ``final_test_acc`` (last row), ``best_test_acc`` and ``best_step`` (its
    first step), ``steps_per_sec`` (median over the chunks), ``wall_time``
    (last row) and ``diag``: every aggregator diagnostic averaged over the
    evaluations. Values are None for a run without rows.
  """
  if not rows:
    return {"final_test_acc": None, "best_test_acc": None, "best_step": None,
            "steps_per_sec": None, "wall_time": None, "diag": {}}
  best = max(rows, key=lambda r: r["test_acc"])  # max() keeps the first of equal values
  names = [k for k in rows[0] if k not in METRIC_COLUMNS]
  return {"final_test_acc": rows[-1]["test_acc"], "best_test_acc": best["test_acc"],
          "best_step": best["step"],
          "steps_per_sec": statistics.median(r["steps_per_sec"] for r in rows),
          "wall_time": rows[-1]["wall_time"],
          "diag": {n: statistics.fmean(r[n] for r in rows if n in r) for n in names}}


def _spread(values: list[float], prefix: str) -> dict:
  if not values:
    return {f"{prefix}_mean": None, f"{prefix}_min": None, f"{prefix}_max": None}
  return {f"{prefix}_mean": statistics.fmean(values), f"{prefix}_min": min(values),
          f"{prefix}_max": max(values)}


def cell_table(workdir: str) -> list[dict]:
  """One row per cell of the sweep in ``workdir`` (the rows of ``results.csv``).

  Accuracies are over the cell's runs that finished ("ok" in status.jsonl);
  ``status`` is "ok" when all its runs finished, "failed" when all failed,
  and "partial" otherwise, with the reasons in ``reason``.
  """
  sweep = read_sweep(workdir)
  status = read_status(workdir)
  table = []
  for cell in sweep["cells"]:
    summaries, reasons, states = [], [], []
    for run in cell["runs"]:
      entry = status.get((cell["cell"], run["seed"]))
      state = entry["status"] if entry else "not finished"
      states.append(state)
      if state == "ok":
        summaries.append(run_summary(read_jsonl(
            os.path.join(workdir, run["workdir"], "metrics.jsonl"))))
      else:
        reasons.append(f"seed {run['seed']}: {entry['reason'] if entry else 'not finished'}")
    if all(s == "ok" for s in states):
      cell_status = "ok"
    elif all(s == "failed" for s in states):
      cell_status = "failed"
    else:
      cell_status = "partial"
    row = {"cell": cell["cell"], **cell["values"],
           "seeds": ";".join(str(r["seed"]) for r in cell["runs"]),
           "status": cell_status, "reason": " | ".join(reasons),
           **_spread([s["final_test_acc"] for s in summaries], "final_test_acc"),
           **_spread([s["best_test_acc"] for s in summaries], "best_test_acc")}
    for name in ("best_step", "steps_per_sec", "wall_time"):
      row[name] = statistics.median(s[name] for s in summaries) if summaries else None
    diag_names = sorted({n for s in summaries for n in s["diag"]})
    for name in diag_names:
      row[f"diag.{name}"] = statistics.fmean(s["diag"][name] for s in summaries
                                             if name in s["diag"])
    row["aggregator"] = cell.get("aggregator", "")
    table.append(row)
  return table


def _is_aggregator_axis(axis: str) -> bool:
  return axis.startswith("aggregator.")


def worst_case(table: list[dict], axes: list[str]) -> Optional[dict]:
  """The worst case of each aggregation rule over the attacks.

  Returns None without an ``attack.name`` axis. Otherwise a dict with
  ``columns`` (one per setting of the axes that are neither the attack nor
  the aggregator's, or ["all"]) and ``rows``: ``{rule: {column: (value,
  attack)}}`` where value is the smallest ``final_test_acc_mean`` over the
  attacks (None when such a cell failed, which counts as the worst).
  """
  if "attack.name" not in axes:
    return None
  others = [a for a in axes if a != "attack.name" and not _is_aggregator_axis(a)]
  columns, rows = [], {}
  for row in table:
    column = ", ".join(f"{a}={row[a]}" for a in others) or "all"
    if column not in columns:
      columns.append(column)
    value = row["final_test_acc_mean"]
    if value is None and row["status"] != "failed":
      continue  # not finished yet: no verdict
    rule = rows.setdefault(row["aggregator"], {})
    current = rule.get(column)
    failed_before = current is not None and current[0] is None
    if current is None or (not failed_before and (value is None or value < current[0])):
      rule[column] = (value, row["attack.name"])
  return {"columns": columns, "rows": rows}


def _percent(value: Optional[float]) -> str:
  return "" if value is None else f"{100 * value:.1f}"


def _number(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def to_markdown(sweep: dict, table: list[dict]) -> str:
  """``results.md``: the cell table in percentages and the worst case per rule."""
  axes = sweep["axes"]
  diag = sorted({k for row in table for k in row if k.startswith("diag.")})
  header = (["cell", *axes, "seeds", "status", "final acc % (min-max)", "best acc % (min-max)",
             "best step", "steps/s", "wall s", *diag])
  lines = [f"# Sweep {sweep['name']}", "",
           "Test accuracy in percent: mean over the seeds that finished, (min-max) over them. "
           "steps/s and wall time are medians over the seeds; diag.* are the aggregator's "
           "diagnostics averaged over the evaluations and the seeds.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in table:
    cells = [row["cell"], *(_number(row[a]) for a in axes), row["seeds"], row["status"]]
    for prefix in ("final_test_acc", "best_test_acc"):
      mean = row[f"{prefix}_mean"]
      cells.append("" if mean is None else
                   f"{_percent(mean)} ({_percent(row[f'{prefix}_min'])}-"
                   f"{_percent(row[f'{prefix}_max'])})")
    cells += [_number(row["best_step"]), _number(row["steps_per_sec"]),
              _number(row["wall_time"]), *(_number(row.get(d)) for d in diag)]
    lines.append("| " + " | ".join(cells) + " |")
  failed = [row for row in table if row["reason"]]
  if failed:
    lines += ["", "Failed or unfinished runs:", ""]
    lines += [f"* {row['cell']}: {row['reason']}" for row in failed]
  worst = worst_case(table, axes)
  if worst is not None:
    lines += ["", "## Worst case per rule over the attacks", "",
              "The smallest final test accuracy (mean over the seeds, %) over the attacks, "
              "and the attack that achieves it.", "",
              "| rule | " + " | ".join(worst["columns"]) + " |",
              "|" + "---|" * (len(worst["columns"]) + 1)]
    for rule, by_column in worst["rows"].items():
      cells = []
      for column in worst["columns"]:
        if column not in by_column:
          cells.append("")
        else:
          value, attack = by_column[column]
          cells.append(f"failed ({attack})" if value is None else f"{_percent(value)} ({attack})")
      lines.append(f"| {rule} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_results(workdir: str) -> tuple[str, str]:
  """Writes ``results.csv`` and ``results.md`` in ``workdir``; returns their paths."""
  sweep = read_sweep(workdir)
  table = cell_table(workdir)
  columns = ["cell", *sweep["axes"], "seeds", "status", "reason",
             "final_test_acc_mean", "final_test_acc_min", "final_test_acc_max",
             "best_test_acc_mean", "best_test_acc_min", "best_test_acc_max",
             "best_step", "steps_per_sec", "wall_time"]
  columns += sorted({k for row in table for k in row if k.startswith("diag.")})
  csv_path = os.path.join(workdir, "results.csv")
  with open(csv_path, "w", newline="") as fh:
    writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in table:
      writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
  md_path = os.path.join(workdir, "results.md")
  with open(md_path, "w") as fh:
    fh.write(to_markdown(sweep, table))
  return csv_path, md_path

