"""Metric writers: console table and progress bar, CSV and JSONL files, W&B.

One :class:`Reporter` per run receives a flat dict of Python scalars at every
evaluation and fans it out to

* the console: a table row per evaluation above a tqdm progress bar with ETA;
* ``metrics.csv`` and ``metrics.jsonl`` in the workdir (on resume, rows past
  the restored step are dropped so that the files match an uninterrupted run);
* Weights & Biases, only when ``c.wandb.enabled`` (online or offline mode).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import tqdm

# Columns shown in the console table, in order, with their format.
CONSOLE_COLUMNS = (  # (name, width, format spec)
    ("step", 7, "d"),
    ("train_loss", 10, ".4f"),
    ("train_acc", 9, ".4f"),
    ("test_loss", 9, ".4f"),
    ("test_acc", 8, ".4f"),
    ("steps_per_sec", 13, ".1f"),
)
# Shown after test_acc only when the first row has them (a backdoor's attack success rate,
# the validation accuracy).
OPTIONAL_CONSOLE_COLUMNS = (("test_asr", 8, ".4f"), ("val_acc", 8, ".4f"))


class MetricsWriteError(OSError):
  """metrics.csv / metrics.jsonl could not be written (disk full, ...); one line."""


def _truncate_jsonl(path: str, max_step: int) -> list[dict]:
  """The rows of ``path`` up to ``max_step``.

  A line that does not parse is a write torn by a crash or a full disk; it can
  only be the last one written, and its step is past the checkpoint, so it is
  dropped like the other rows past ``max_step``.
  """
  rows = []
  if os.path.exists(path):
    with open(path) as fh:
      for line in fh:
        line = line.strip()
        if not line:
          continue
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row, dict) and row.get("step", 0) <= max_step:
          rows.append(row)
  return rows


def _replace_file(path: str, write) -> None:
  """Writes ``path`` through a temporary file, so a crash leaves the old or the new one."""
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as fh:
    write(fh)
    fh.flush()
    os.fsync(fh.fileno())
  os.replace(tmp, path)


class Reporter:
  """Writes evaluation rows to console, files and optionally W&B.

  Args:
    workdir: where metrics.csv and metrics.jsonl live.
    total_steps: number of training rounds of the whole run (for the ETA).
    start_step: the step the run (re)starts from; later rows are discarded.
    resumed: whether the run resumes from a checkpoint at ``start_step``; a run
      that starts afresh discards every row, its step-0 row included.
    wandb_config: the config's ``wandb`` fields (a dict), or None.
    run_config: the whole config, recorded by W&B.
    show_progress: draw the tqdm bar (off in tests).
    print_rows: print a console table row per evaluation (off inside a sweep,
      which prints its own table).
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0,
               wandb_config=None, run_config: Optional[Mapping[str, Any]] = None,
               show_progress: bool = True, print_rows: bool = True, resumed: bool = True):
    self.workdir = workdir
    self.csv_path = os.path.join(workdir, "metrics.csv")
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.rows = _truncate_jsonl(self.jsonl_path, start_step if resumed else -1)
    self._rewrite_files()
    self._header_printed = False
    self._print_rows = print_rows
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                          dynamic_ncols=True, disable=not show_progress,
                          file=sys.stderr, leave=False)
    self._wandb = None
    wb = wandb_config or {}
    if wb.get("enabled"):
      # W&B is a mirror of the local files: when it is missing, unreachable or
      # not logged in, the run goes on with one warning.
      try:
        import wandb  # Imported lazily: W&B is optional at run time.
        self._wandb = wandb.init(
            project=wb["project"], entity=wb.get("entity") or None,
            name=wb.get("name") or None, mode=wb["mode"], dir=workdir,
            config=dict(run_config or {}), resume="allow", id=wb.get("run_id") or None)
      except Exception as e:  # pylint: disable=broad-except
        self._wandb_failed("start", e)

  def _columns(self) -> list[str]:
    keys: list[str] = []
    for row in self.rows:
      for k in row:
        if k not in keys:
          keys.append(k)
    return keys

  def _rewrite_files(self) -> None:
    def jsonl(fh):
      for row in self.rows:
        fh.write(json.dumps(row) + "\n")

    def table(fh):
      writer = csv.DictWriter(fh, fieldnames=self._columns())
      writer.writeheader()
      writer.writerows(self.rows)

    # JSONL first: it is what a resume reads back.
    with self._reporting_failures():
      _replace_file(self.jsonl_path, jsonl)
      _replace_file(self.csv_path, table)

  @contextlib.contextmanager
  def _reporting_failures(self):
    try:
      yield
    except OSError as e:
      raise MetricsWriteError(
          f"Could not write the metrics files in {self.workdir} "
          f"({e.strerror or e}); free space (or fix the workdir) and rerun the same command: "
          f"the run resumes from its latest checkpoint and rewrites the rows after it.") from None

  def note(self, message: str) -> None:
    """Prints a one-line message above the progress bar."""
    self._bar.write(message, file=sys.stderr)

  def advance(self, num_steps: int) -> None:
    """Moves the progress bar by ``num_steps`` rounds."""
    self._bar.update(num_steps)

  def write(self, row: Mapping[str, Any]) -> None:
    """Records one evaluation row (a flat dict of Python scalars)."""
    row = dict(row)
    new_columns = [k for k in row if k not in self._columns()]
    self.rows.append(row)
    if new_columns and len(self.rows) > 1:
      self._rewrite_files()  # The CSV header changes; rewrite it whole.
    elif len(self.rows) == 1:
      self._rewrite_files()
    else:
      with self._reporting_failures():
        with open(self.jsonl_path, "a") as fh:
          fh.write(json.dumps(row) + "\n")
        with open(self.csv_path, "a", newline="") as fh:
          csv.DictWriter(fh, fieldnames=self._columns()).writerow(row)
    if self._print_rows:
      self._print_row(row)
    if self._wandb is not None:
      try:
        self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))
      except Exception as e:  # pylint: disable=broad-except
        self._wandb_failed("log to", e)

  def _wandb_failed(self, action: str, error: Exception) -> None:
    self._wandb = None
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    self.note(f"Warning: could not {action} Weights & Biases ({type(error).__name__}: {first}); "
              f"the run goes on with the local metrics files in {self.workdir}.")

  def _print_row(self, row: Mapping[str, Any]) -> None:
    if not self._header_printed:
      at = [name for name, _, _ in CONSOLE_COLUMNS].index("test_acc") + 1
      self._console = (CONSOLE_COLUMNS[:at] + tuple(c for c in OPTIONAL_CONSOLE_COLUMNS
                                                    if c[0] in row) + CONSOLE_COLUMNS[at:])
      self._bar.write(" ".join(f"{name:>{width}}" for name, width, _ in self._console))
      self._header_printed = True
    cells = []
    for name, width, spec in self._console:
      value = row.get(name, math.nan)
      if name not in row:  # the step-0 row has no training metrics
        cells.append(f"{'-':>{width}}")
        continue
      try:
        cells.append(f"{value:>{width}{spec}}")
      except (ValueError, TypeError):
        cells.append(f"{str(value):>{width}}")
    self._bar.write(" ".join(cells))

  def close(self) -> None:
    """Closes the progress bar and the W&B run."""
    self._bar.close()
    if self._wandb is not None:
      try:
        self._wandb.finish()
      except Exception as e:  # pylint: disable=broad-except
        self._wandb_failed("finish", e)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A Markdown table of ``rows`` restricted to ``columns`` (used by benchmarks)."""
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    cells = []
    for c in columns:
      v = row.get(c, "")
      cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
