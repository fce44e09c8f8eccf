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
METRIC_COLUMNS = ("step", "train_loss", "train_acc", "test_loss", "test_acc", "test_asr",
                  "val_loss", "val_acc", "aggregate_norm", "wall_time", "steps_per_sec")
DEFAULT_LAST_K = 5
"""``report_last_k`` of a run whose config.json predates the field (configs/default.py's)."""
ASR_COLUMNS = ("final_test_asr_mean", "final_test_asr_min", "final_test_asr_max")
"""results.csv's columns of a backdoor's attack success rate (cells of other attacks: empty)."""


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


def selected_on(rows: list[dict]) -> str:
  """What "best" is chosen on: "validation" when the rows carry ``val_acc``, else "test"."""
  return "validation" if rows and "val_acc" in rows[0] else "test"


def _selection_key(rows: list[dict]) -> str:
  return "val_acc" if selected_on(rows) == "validation" else "test_acc"


def best_row(rows: list[dict]) -> dict:
  """The row of the best evaluation: the highest ``val_acc`` when the run holds a
  validation split out, else the highest ``test_acc``; the first of equal values."""
  key = _selection_key(rows)
  return max(rows, key=lambda r: r[key])  # max() keeps the first of equal values


def last_k_mean(rows: list[dict], k: int) -> float:
  """The mean test accuracy of the last ``k`` rows (of all of them when there are fewer)."""
  return statistics.fmean(r["test_acc"] for r in rows[-k:])


def run_summary(rows: list[dict], last_k: int = DEFAULT_LAST_K) -> dict:
  """One run's summary from its metrics rows (one per evaluation).

  Returns:
    ``final_test_acc`` and ``final_step`` (last row); ``best_test_acc`` and
    ``best_step``: the test accuracy and step of :func:`best_row`, chosen on
    ``best_on`` ("validation" or "test"); ``last_k_test_acc``, the mean test
    accuracy of the last ``last_k`` rows (:func:`last_k_mean`), and ``last_k``;
    ``steps_per_sec`` (median over the chunks), ``wall_time`` (last row),
    ``curve`` ({step: test_acc}) and ``diag``: every aggregator diagnostic
    averaged over the evaluations; ``final_test_asr``, a backdoor's attack
    success rate at the last row (None for the other attacks). Values are None
    for a run without rows.
  """
  if not rows:
    return {"final_test_acc": None, "final_step": None, "best_test_acc": None,
            "best_step": None, "best_on": None, "last_k_test_acc": None, "last_k": last_k,
            "steps_per_sec": None, "wall_time": None, "curve": {}, "selection_curve": {},
            "diag": {},
            "final_test_asr": None}
  best = best_row(rows)
  names = [k for k in rows[-1] if k not in METRIC_COLUMNS]
  chunks = [r["steps_per_sec"] for r in rows if "steps_per_sec" in r]  # not the step-0 row
  return {"final_test_acc": rows[-1]["test_acc"], "final_step": rows[-1]["step"],
          "best_test_acc": best["test_acc"], "best_step": best["step"],
          "best_on": selected_on(rows), "last_k_test_acc": last_k_mean(rows, last_k),
          "last_k": last_k,
          "steps_per_sec": statistics.median(chunks) if chunks else None,
          "wall_time": rows[-1]["wall_time"],
          "curve": {r["step"]: r["test_acc"] for r in rows},
          "selection_curve": {r["step"]: r[_selection_key(rows)] for r in rows},
          "diag": {n: statistics.fmean(r[n] for r in rows if n in r) for n in names},
          "final_test_asr": rows[-1].get("test_asr")}


def mean_curve_peak(summaries: list[dict]) -> Optional[int]:
  """The evaluated step where the seeds' mean accuracy peaks (the first of equal peaks):
  the validation accuracy for runs that hold a validation split out, else the test one.

  Over the steps that every run evaluated; None when they share none.
  """
  if not summaries:
    return None
  curves = [s.get("selection_curve", s["curve"]) for s in summaries]
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  if not steps:
    return None
  return max(steps, key=lambda t: statistics.fmean(c[t] for c in curves))


def report_last_k(run_workdir: str) -> int:
  """The run's ``report_last_k`` from its config.json (:data:`DEFAULT_LAST_K` without one)."""
  try:
    with open(os.path.join(run_workdir, "config.json")) as fh:
      return int(json.load(fh).get("report_last_k", DEFAULT_LAST_K))
  except (OSError, ValueError, TypeError):
    return DEFAULT_LAST_K


def _spread(values: list[float], prefix: str) -> dict:
  if not values:
    return {f"{prefix}_mean": None, f"{prefix}_min": None, f"{prefix}_max": None}
  return {f"{prefix}_mean": statistics.fmean(values), f"{prefix}_min": min(values),
          f"{prefix}_max": max(values)}


def cell_table(workdir: str) -> list[dict]:
  """One row per cell of the sweep in ``workdir`` (the rows of ``results.csv``).

  Accuracies are over the cell's runs that finished ("ok" in status.jsonl);
  ``status`` is "ok" when all its runs finished, "failed" when all failed,
  and "partial" otherwise, with the reasons in ``reason``. ``best_step`` is
  the evaluated step where the seeds' mean accuracy peaks
  (:func:`mean_curve_peak`); ``best_steps`` and ``final_steps`` list each
  finished seed's best and last evaluated step, ";"-separated. ``best_test_acc``
  is each seed's test accuracy at its best row (:func:`best_row`), chosen on
  ``best_on``; ``last_k_test_acc`` the mean of its last ``last_k`` rows.
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
        path = os.path.join(workdir, run["workdir"])
        summaries.append(run_summary(read_jsonl(os.path.join(path, "metrics.jsonl")),
                                     report_last_k(path)))
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
           **_spread([s["best_test_acc"] for s in summaries], "best_test_acc"),
           **_spread([s["last_k_test_acc"] for s in summaries], "last_k_test_acc"),
           "last_k": ";".join(sorted({str(s["last_k"]) for s in summaries})),
           "best_on": ";".join(sorted({s["best_on"] for s in summaries})),
           **_spread([s["final_test_asr"] for s in summaries
                      if s["final_test_asr"] is not None], "final_test_asr")}
    row["best_step"] = mean_curve_peak(summaries)
    row["best_steps"] = ";".join(str(s["best_step"]) for s in summaries)
    row["final_steps"] = ";".join(str(s["final_step"]) for s in summaries)
    for name in ("steps_per_sec", "wall_time"):
      values = [s[name] for s in summaries if s[name] is not None]
      row[name] = statistics.median(values) if values else None
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


def _cell_name(row: dict, axes: list[str]) -> str:
  return ", ".join(f"{a}={_number(row[a])}" for a in axes) or row["cell"]


def _percent(value: Optional[float]) -> str:
  return "" if value is None else f"{100 * value:.1f}"


def _number(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


# Diagnostics that count rows (per-worker flags summed over the honest or the Byzantine rows).
ROW_DIAGNOSTICS = ("kept", "selected", "clipped")


def diag_label(column: str) -> str:
  """A ``diag.*`` column as a header with its unit: ``diag.ctma_kept_byzantine`` ->
  "ctma kept, Byzantine (rows/round)"."""
  name = column[len("diag."):] if column.startswith("diag.") else column
  for group in ("honest", "byzantine"):
    if name.endswith(f"_{group}"):
      what = name[:-len(group) - 1].replace("_", " ")
      unit = "rows/round" if name.split("_")[-2] in ROW_DIAGNOSTICS else "per round"
      return f"{what}, {'Byzantine' if group == 'byzantine' else group} ({unit})"
  if name.endswith("_iters"):
    return f"{name[:-len('_iters')]} iterations/round"
  return name.replace("_", " ")


def _steps(text: str, per_seed: bool) -> str:
  """"20;30" -> "20, 30"; unless ``per_seed``, one value when every seed has it."""
  steps = text.split(";") if text else []
  return steps[0] if not per_seed and len(set(steps)) == 1 else ", ".join(steps)


def to_markdown(sweep: dict, table: list[dict]) -> str:
  """``results.md``: the cell table in percentages and the worst case per rule."""
  axes = sweep["axes"]
  diag = sorted({k for row in table for k in row if k.startswith("diag.")})
  asr = any(row.get("final_test_asr_mean") is not None for row in table)
  on = " or ".join(sorted({o for row in table for o in row["best_on"].split(";") if o}))
  last_k = " or ".join(sorted({k for row in table for k in row["last_k"].split(";") if k}))
  header = ([*axes, "seeds", "status", "final acc % (min-max)", "at round",
             f"best (on {on or 'test'}) acc % (min-max)", "best at round (per seed)",
             f"mean of last {last_k or DEFAULT_LAST_K} evals acc % (min-max)",
             *(["final attack success % (min-max)"] if asr else []), "steps/s", "wall s",
             *(diag_label(d) for d in diag)])
  lines = [f"# Sweep {sweep['name']}", "",
           "Test accuracy in percent: mean over the seeds that finished, (min-max) over them. "
           "The final accuracy is that of each seed's last evaluation (at round). The best is "
           "each seed's test accuracy at its best evaluation, at the round listed per seed: "
           "the one of highest validation accuracy for a run that holds a validation split "
           "out (best on validation), else the one of highest test accuracy (best on test); "
           "the first of equal values. The mean of the last k evaluations averages each "
           "seed's last k test accuracies. steps/s (rounds per second "
           "of training, without compilation or evaluation) and wall s (seconds from start to "
           "the last evaluation, compilation included) are medians over the seeds.", ""]
  if asr:
    lines += ["Attack success (backdoor cells only): the share of triggered test images of "
              "the other classes that each seed's final model puts in the target class, in "
              "percent.", ""]
  if diag:
    lines += ["The aggregator's diagnostics are per round, averaged over the evaluations and "
              "the seeds: rows/round counts the rows of the W workers that got the flag "
              "(kept by CTMA, selected by Krum, clipped), split into the honest workers' and "
              "the Byzantine workers' rows.", ""]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cells(row, axes, asr, diag)) + " |" for row in table]
  failed = [row for row in table if row["reason"]]
  if failed:
    lines += ["", "Failed or unfinished runs:", ""]
    lines += [f"* {_cell_name(row, axes)}: {row['reason']}" for row in failed]
  lines += _worst_section(worst_case(table, axes))
  return "\n".join(lines) + "\n"


def _range(row: dict, prefix: str) -> str:
  """``mean (min-max)`` in percent of the ``prefix`` columns, or "" when none finished."""
  mean = row.get(f"{prefix}_mean")
  return ("" if mean is None else
          f"{_percent(mean)} ({_percent(row[f'{prefix}_min'])}-{_percent(row[f'{prefix}_max'])})")


def _cells(row: dict, axes: list, asr: bool, diag: list) -> list[str]:
  """One cell's row of results.md."""
  cells = [*(_number(row[a]) for a in axes), ", ".join(row["seeds"].split(";")), row["status"],
           _range(row, "final_test_acc"), _steps(row["final_steps"], False),
           _range(row, "best_test_acc"), _steps(row["best_steps"], True),
           _range(row, "last_k_test_acc")]
  if asr:
    cells.append(_range(row, "final_test_asr"))
  return cells + [_number(row["steps_per_sec"]), _number(row["wall_time"]),
                  *(_number(row.get(d)) for d in diag)]


def _worst_section(worst) -> list[str]:
  """The worst case per rule over the attacks (nothing without an attack axis)."""
  if worst is None:
    return []
  lines = ["", "## Worst case per rule over the attacks", "",
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
  return lines


def write_results(workdir: str) -> tuple[str, str]:
  """Writes ``results.csv`` and ``results.md`` in ``workdir``; returns their paths."""
  sweep = read_sweep(workdir)
  table = cell_table(workdir)
  columns = ["cell", *sweep["axes"], "seeds", "status", "reason",
             "final_test_acc_mean", "final_test_acc_min", "final_test_acc_max",
             "best_test_acc_mean", "best_test_acc_min", "best_test_acc_max", "best_on",
             "best_step", "best_steps", "final_steps", "last_k_test_acc_mean",
             "last_k_test_acc_min", "last_k_test_acc_max", "last_k", "steps_per_sec",
             "wall_time"]
  if any(row.get("final_test_asr_mean") is not None for row in table):
    columns += list(ASR_COLUMNS)
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

