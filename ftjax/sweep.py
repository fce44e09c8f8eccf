r"""Sweeps: a grid of experiments in one process and one workdir.

  ftjax sweep --sweep=demo --workdir=/tmp/sweep
  python -m ftjax.sweep --sweep=configs/sweeps/demo.py --workdir=/tmp/sweep

A sweep config (configs/sweeps/*.py, see docs/sweeps.md) names a base config,
fixed overrides, the axes (grid: a product over field values, and/or cells: an
explicit list of overrides) and the seeds. Every run (cell x seed) is validated
with train.build before anything runs; the runs of a cell differ only in their
seed and train as one compiled program (train.train_runs), in batches of at
most max_batch seeds; cells that differ only in their attack share that
program (attack_families). Each run writes a normal run workdir under
runs/<cell>/seed=<s>, so rerunning the command skips finished runs and resumes
interrupted ones. At the end (and on every rerun) results.csv and results.md
are written (ftjax.results).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Optional

import ml_collections
import tqdm

from ftjax import results as results_lib
from ftjax import loop as loop_lib
from ftjax import run as run_lib
from ftjax import workdir as workdir_lib
from ftjax.sweep_spec import Cell, Run, Sweep, expand, slug
from ftjax import train




def attack_families(sweep: Sweep, failures: dict) -> dict[str, tuple]:
  """``{cell name: attack names}``: the attacks one compiled round serves for the cell.

  Cells whose configs differ only in ``attack.name`` share one round that
  switches between their attacks (``train.build(attacks=...)``), grouped by
  ``train.attack_family``; a cell with a run that failed validation, or in
  the sharded layout, keeps its own round (an empty tuple), as does every
  cell when ``sweep.share_programs`` is False.
  """
  groups = {}
  for cell in sweep.cells:
    c = cell.runs[0].config
    if (not sweep.share_programs or any((cell.name, r.seed) in failures for r in cell.runs)
        or (c.get("mesh") or {}).get("aggregation", "replicated") != "replicated"):
      continue
    rest = train.config_fields(c, ["attack.name"])
    groups.setdefault(json.dumps(rest, sort_keys=True), []).append(cell)
  families = {cell.name: () for cell in sweep.cells}
  for cells in groups.values():
    c = cells[0].runs[0].config
    names = list(dict.fromkeys(cell.runs[0].config.attack.name for cell in cells))
    for family in train.attack_family(names, c.workers.num, c.workers.byzantine):
      for cell in cells:
        if len(family) > 1 and cell.runs[0].config.attack.name in family:
          families[cell.name] = family
  return families


# --------------------------------------------------------------------------
# Validation and the workdir
# --------------------------------------------------------------------------


def validate(sweep: Sweep, dataset=None, model=None) -> tuple[dict, dict]:
  """Builds every run with ``train.build`` before anything runs.

  Returns:
    ``(failures, widths, datasets)``: ``{(cell, seed): one-line reason}`` for
    the runs that cannot run; for the others ``{(cell, seed): shape}`` of the
    per-worker partition (None for the i.i.d. split) and ``{(cell, seed):
    Dataset}``, one object per data source, loaded once.
  """
  failures, widths, datasets, loaded = {}, {}, {}, {}
  for cell in sweep.cells:
    for run in cell.runs:
      c = run.config
      try:
        if c.wandb.enabled:
          raise train.ConfigError("wandb.enabled=True is not supported inside a sweep (one "
                                  "process runs many runs); turn it off for the sweep.")
        key = json.dumps({k: c.data[k] for k in ("name", "path", "data_dir")})
        with run_lib.x64_scope([c]):
          setup = train.build(c, dataset if dataset is not None else loaded.get(key), model)
        loaded.setdefault(key, setup.source)  # as loaded: each run holds its validation out
        datasets[(cell.name, run.seed)] = setup.source
        widths[(cell.name, run.seed)] = (None if setup.partition is None
                                         else setup.partition.table.shape)
      except train.ConfigError as e:
        failures[(cell.name, run.seed)] = " ".join(str(e).split())
  return failures, widths, datasets


def check_workdir(sweep: Sweep, workdir: str) -> None:
  """Refuses a workdir that holds a different sweep (adding cells or seeds is allowed)."""
  path = os.path.join(workdir, "sweep.json")
  if not os.path.exists(path):
    return
  try:
    saved = results_lib.read_sweep(workdir)
  except (OSError, ValueError) as e:
    raise train.ConfigError(f"{path} cannot be read ({e}); restore it or use another "
                            f"--workdir.") from None
  again = "; cells and seeds may be added to a sweep, nothing else changed: use another --workdir"
  if saved["axes"] != list(sweep.axes):
    raise train.ConfigError(f"The workdir {workdir!r} holds a sweep over the axes "
                            f"{saved['axes']}, this one is over {list(sweep.axes)}{again}.")
  dropped = [seed for seed in saved["seeds"] if seed not in sweep.seeds]
  if dropped:
    raise train.ConfigError(f"The workdir {workdir!r} holds a sweep with the seeds "
                            f"{saved['seeds']}, this one drops {dropped}; seeds and cells may be "
                            f"added to a sweep, not removed: list them all, or use another "
                            f"--workdir.")
  now = {c.name: c for c in sweep.cells}
  for cell in saved["cells"]:
    if cell["cell"] not in now:
      raise train.ConfigError(f"The workdir {workdir!r} holds the cell {cell['cell']!r}, which "
                              f"this sweep no longer has{again}.")
    for run in now[cell["cell"]].runs:
      try:
        workdir_lib.check_resume_config(os.path.join(workdir, run.workdir),
                                        workdir_lib.config_fields(run.config))
      except train.ConfigError as e:
        raise train.ConfigError(f"The sweep config changed for the cell {cell['cell']!r}: "
                                f"{e}") from None


def _open_workdir(sweep: Sweep, workdir: str) -> dict:
  """Checks the workdir holds this sweep (or nothing), writes sweep.json, reads the status."""
  check_workdir(sweep, workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "sweep.json"), "w") as fh:
    json.dump(sweep.to_json(), fh, indent=2)
  return results_lib.read_status(workdir)


def _append_status(workdir: str, entry: dict) -> None:
  with open(os.path.join(workdir, "status.jsonl"), "a") as fh:
    fh.write(json.dumps(entry) + "\n")


def _status_entry(run: Run, workdir: str, reason: str = "") -> dict:
  path = os.path.join(workdir, run.workdir)
  summary = results_lib.run_summary(results_lib.read_jsonl(os.path.join(path, "metrics.jsonl")),
                                    results_lib.report_last_k(path))
  return {"cell": run.cell, "seed": run.seed, "status": "failed" if reason else "ok",
          "reason": reason, **{k: summary[k] for k in ("final_test_acc", "best_test_acc",
                                                       "best_step", "best_on",
                                                       "last_k_test_acc", "steps_per_sec",
                                                       "wall_time")}}


def _finished(run: Run, workdir: str) -> bool:
  rows = results_lib.read_jsonl(os.path.join(workdir, run.workdir, "metrics.jsonl"))
  return bool(rows) and rows[-1]["step"] >= run.config.num_steps


# --------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------


class _Table:
  """The live table: one line per finished cell."""

  def __init__(self, sweep: Sweep, write):
    self.axes = sweep.axes
    self.widths = [max([len(a)] + [len(slug(c.values[a])) for c in sweep.cells])
                   for a in sweep.axes]
    self.write = write
    self.header_done = False

  def line(self, cell: Cell, workdir: str, status: dict) -> None:
    if not self.header_done:
      self.write("  ".join(f"{a:<{w}}" for a, w in zip(self.axes, self.widths))
                 + f"  {'final acc % (min-max)':>22}  {'best acc %':>10}  {'steps/s':>8}  status")
      self.header_done = True
    entries = [status.get((cell.name, r.seed)) for r in cell.runs]
    ok = [e for e in entries if e and e["status"] == "ok"]
    values = "  ".join(f"{slug(cell.values[a]):<{w}}" for a, w in zip(self.axes, self.widths))
    if ok:
      final = [100 * e["final_test_acc"] for e in ok]
      best = statistics.fmean(100 * e["best_test_acc"] for e in ok)
      speeds = [e["steps_per_sec"] for e in ok if e["steps_per_sec"] is not None]
      speed = statistics.median(speeds) if speeds else float("nan")
      spread = f"{statistics.fmean(final):.1f} ({min(final):.1f}-{max(final):.1f})"
      numbers = f"{spread:>22}  {best:>10.1f}  {speed:>8.1f}"
    else:
      numbers = f"{'-':>22}  {'-':>10}  {'-':>8}"
    failed = len(entries) - len(ok)
    self.write(f"{values}  {numbers}  " + (f"{failed} of {len(entries)} runs failed" if failed
                                           else "ok"))


def _shrink(bar: tqdm.tqdm, rounds: int) -> None:
  """Takes rounds that will not be trained in this call out of the bar's total."""
  bar.total -= rounds
  bar.refresh()


class _Rounds:
  """``train_runs``' on_rounds for the bar: its first call reports the rounds restored
  from checkpoints, which were not trained now; later calls the rounds trained."""

  def __init__(self, bar: tqdm.tqdm):
    self.bar, self.first = bar, True

  def __call__(self, rounds: int) -> None:
    if self.first:
      self.first = False
      _shrink(self.bar, rounds)
    else:
      self.bar.update(rounds)


def run_sweep(spec: ml_collections.ConfigDict, workdir: str, *, retry_failed: bool = False,
              dataset=None, model=None, progress: bool = True, write=None,
              programs: Optional[loop_lib.ProgramCache] = None) -> dict:
  """Runs (or resumes) every run of a sweep into ``workdir``.

  Args:
    spec: the sweep config.
    workdir: the sweep's directory (layout in docs/sweeps.md).
    retry_failed: run again the runs that status.jsonl records as failed
      (they are skipped by default: divergence and config errors repeat).
    dataset, model: passed to ``train.train_runs``.
    progress: draw one progress bar over all rounds of all runs.
    write: prints one line (the live table, notes); default: above the bar.
    programs: compiled programs to reuse and extend (:class:`ftjax.loop.ProgramCache`),
      e.g. across sweeps in one process; default :data:`ftjax.loop.SHARED`, the process's.

  Returns:
    ``{"compilations": programs compiled by this call,
    "status": {(cell, seed): entry}}``.

  Raises:
    train.ConfigError: a bad sweep config or a workdir holding another sweep.
    KeyboardInterrupt: after the checkpoints and results are written.
  """
  sweep = expand(spec)
  mesh = train.runs_mesh(sweep.devices)
  failures, widths, datasets = validate(sweep, dataset, model)
  status = _open_workdir(sweep, workdir)

  write = write or (lambda line: tqdm.tqdm.write(line, file=sys.stdout))
  table = _Table(sweep, write)

  def record(run, reason=""):
    entry = _status_entry(run, workdir, reason)
    _append_status(workdir, entry)
    status[(run.cell, run.seed)] = entry

  todo = _todo(sweep, workdir, status, failures, retry_failed, record)
  for cell in sweep.cells:  # cells finished before this call
    if not any((cell.name, r.seed) in todo for r in cell.runs):
      table.line(cell, workdir, status)

  # The bar counts the rounds this call trains: rounds restored from checkpoints
  # and those of runs that stop early leave its total, so its rate is a training rate.
  bar = tqdm.tqdm(total=sum(r.config.num_steps for r in todo.values()), unit="round",
                  dynamic_ncols=True, disable=not progress, file=sys.stderr, desc=sweep.name)
  families = attack_families(sweep, failures)
  programs = loop_lib.SHARED if programs is None else programs
  known, batches = programs.compiled, 0
  try:
    for cell in sweep.cells:
      for slots in _batches(cell, todo, failures, widths, sweep, mesh):
        batches += 1
        loaded = next((datasets[(cell.name, r.seed)] for r in slots
                       if r is not None and (cell.name, r.seed) in datasets), None)
        results = train.train_runs(
            [r and r.config for r in slots], [r and os.path.join(workdir, r.workdir)
                                              for r in slots],
            loaded, model, programs=programs, on_rounds=_Rounds(bar), note=write,
            devices=sweep.devices, attacks=families[cell.name])
        _record_batch(slots, results, record, bar)
      if any((cell.name, r.seed) in todo for r in cell.runs):
        table.line(cell, workdir, status)
  except KeyboardInterrupt:
    bar.close()
    results_lib.write_results(workdir)
    raise
  bar.close()
  csv_path, md_path = results_lib.write_results(workdir)
  write(f"Compiled {programs.compiled - known} programs (initialisation, chunks, evaluation) "
        f"for {batches} batches of runs; results in {csv_path} and {md_path}.")
  return {"compilations": programs.compiled - known, "status": status}


def _record_batch(slots, results, record, bar: tqdm.tqdm) -> None:
  """Appends each run of a batch to status.jsonl; a failed run's untrained rounds leave the bar."""
  for run, result in zip(slots, results):
    if run is None:
      continue
    record(run, "" if result.error is None else " ".join(str(result.error).split()))
    if result.error is not None:
      _shrink(bar, run.config.num_steps - result.metrics.get("step", 0))


def _todo(sweep: Sweep, workdir: str, status: dict, failures: dict, retry_failed: bool,
          record) -> dict:
  """The runs to train now, by (cell, seed): not finished, and not failed unless retried.

  A run that failed validation is recorded as failed (again, if its reason changed).
  """
  todo = {}
  for cell in sweep.cells:
    for run in cell.runs:
      key = (cell.name, run.seed)
      previous = status.get(key)
      if key in failures:
        if not previous or previous["status"] != "failed" or previous["reason"] != failures[key]:
          record(run, failures[key])
      elif not ((previous and previous["status"] == "ok" and _finished(run, workdir))
                or (previous and previous["status"] == "failed" and not retry_failed)):
        todo[key] = run
  return todo


def _batches(cell: Cell, todo: dict, failures: dict, widths: dict, sweep: Sweep, mesh):
  """The cell's runs to train, in batches of slots (None: an empty slot)."""
  if not any((cell.name, r.seed) in todo for r in cell.runs):
    return
  shapes = {widths.get((cell.name, r.seed)) for r in cell.runs
            if (cell.name, r.seed) not in failures}
  # Seeds of a cell share one program, unless their per-worker partitions differ in shape.
  size = min(sweep.max_batch, len(cell.runs)) if len(shapes) <= 1 else 1
  if mesh is not None:  # a batch fills every device (empty slots pad it)
    size = -(-size // mesh.devices.size) * mesh.devices.size
  for start in range(0, len(cell.runs), size):
    slots = [r if (cell.name, r.seed) in todo else None for r in cell.runs[start:start + size]]
    slots += [None] * (size - len(slots))  # the last batch keeps the program's shape
    if any(slots):
      yield slots


def main(argv, command: str = "python -m ftjax.sweep"):
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  from ftjax import cli  # pylint: disable=import-outside-toplevel
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value; "
             f"{command} --help lists them).")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint at INFO
  spec = cli.load_config("sweep")
  try:
    run_sweep(spec, FLAGS.workdir, retry_failed=FLAGS.retry_failed)
  except train.RUN_ERRORS as e:
    cli.fail(str(e), code=run_lib.exit_code(e))
  except KeyboardInterrupt:
    print(f"Interrupted; the checkpoints and results so far are saved. Resume with the same "
          f"command: {command} {' '.join(sys.argv[1:])}", file=sys.stderr)
    sys.exit(130)


def define_flags():
  """Defines the command's flags (--sweep, --workdir, --retry_failed) on absl's FLAGS."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file(
      "sweep", None, "A shipped sweep's name (tiny, demo, ...) or a sweep config file "
      "(configs/sweeps/*.py), optionally NAME:arg.", lock_config=True)
  flags.DEFINE_string("workdir", None, "The sweep's directory (sweep.json, runs/, results).")
  flags.DEFINE_bool("retry_failed", False, "Run again the runs recorded as failed.")
  flags.mark_flags_as_required(["sweep", "workdir"])


def run(argv: list[str], command: str = "python -m ftjax.sweep") -> None:
  """The command: ``argv`` is ``[program, --sweep=..., --workdir=...]``, flags defined."""
  import functools  # pylint: disable=import-outside-toplevel
  from absl import app  # pylint: disable=import-outside-toplevel
  from ftjax import cli  # pylint: disable=import-outside-toplevel
  app.run(functools.partial(main, command=command), argv=argv, flags_parser=functools.partial(
      cli.parse_flags, command=command, config_flag="sweep", fields_doc="docs/sweeps.md"))


if __name__ == "__main__":
  from ftjax import commands  # pylint: disable=g-import-not-at-top
  commands.sweep(sys.argv, command="python -m ftjax.sweep")
