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

import dataclasses
import difflib
import importlib.util
import itertools
import json
import os
import re
import statistics
import sys
from typing import Any, Optional

import ml_collections
import tqdm

from ftjax import configfiles
from ftjax import results as results_lib
from ftjax import build as build_lib
from ftjax import loop as loop_lib
from ftjax import run as run_lib
from ftjax import workdir as workdir_lib
from ftjax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP_FIELDS = ("name", "base", "overrides", "grid", "cells", "seeds", "max_batch", "devices",
                "share_programs")


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: a cell's config with one seed."""
  cell: str
  seed: int
  workdir: str                        # relative to the sweep's workdir
  config: ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Cell:
  """One setting of the axes and its runs, one per seed."""
  name: str
  values: dict      # axis -> value
  aggregator: str   # the resolved rule spec, e.g. "ctma(cwtm)"
  runs: tuple


@dataclasses.dataclass(frozen=True)
class Sweep:
  """An expanded sweep config."""
  name: str
  axes: tuple
  seeds: tuple
  cells: tuple
  max_batch: int
  devices: int = 1  # local devices a batch's runs are spread over (0 = all)
  share_programs: bool = True  # cells that differ only in their attack share a program

  def to_json(self) -> dict:
    """The ``sweep.json`` record (docs/sweeps.md)."""
    return {"name": self.name, "axes": list(self.axes), "seeds": list(self.seeds),
            "cells": [{"cell": c.name, "values": c.values, "aggregator": c.aggregator,
                       "runs": [{"seed": r.seed, "workdir": r.workdir} for r in c.runs]}
                      for c in self.cells]}


# --------------------------------------------------------------------------
# Expansion: sweep config -> cells -> runs
# --------------------------------------------------------------------------


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path.py`` or ``path.py:arg``.

  The path is relative to the current directory or the checkout; a bare name or a
  ``configs/...`` path that is not there is a shipped config (:mod:`ftjax.configfiles`).
  """
  path, _, arg = spec.partition(":")
  found = next((p for p in (path, os.path.join(ROOT, path)) if os.path.isfile(p)), None)
  if found is None:
    try:
      found = configfiles.resolve(path, "config")
    except configfiles.ConfigNotFound as e:
      raise train.ConfigError(f"The sweep's base config: {e}") from None
    found = found if os.path.isfile(found) else None
  if found is None:
    raise train.ConfigError(f"The sweep's base config {path!r} does not exist; set base to a "
                            f"config file such as 'configs/default.py'.")
  module_spec = importlib.util.spec_from_file_location("ftjax_sweep_base", found)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise train.ConfigError(f"The sweep's base config {spec!r} cannot be loaded "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})."
                            ) from None


def _plain(value: Any) -> Any:
  """ConfigDicts, tuples and lists of the sweep config as plain Python values."""
  if isinstance(value, ml_collections.ConfigDict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value


def get_field(config: ml_collections.ConfigDict, field: str) -> Any:
  """The value of a dotted field (``attack.name``)."""
  value = config
  for part in field.split("."):
    value = value[part]
  return _plain(value)


def set_field(config: ml_collections.ConfigDict, field: str, value: Any, where: str) -> None:
  """Sets a dotted field, refusing unknown fields and ill-typed values in one sentence."""
  section = config
  parts = field.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(section, ml_collections.ConfigDict) or part not in section:
      keys = list(section.keys()) if isinstance(section, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, keys, n=1)
      prefix = ".".join(parts[:depth])
      hint = f" (did you mean {'.'.join([prefix, close[0]]).lstrip('.')!r}?)" if close else ""
      raise train.ConfigError(f"{where}: the config has no field {field!r}{hint}; "
                              f"configs/default.py lists every field.")
    if depth < len(parts) - 1:
      section = section[part]
  try:
    section[parts[-1]] = value
  except (TypeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise train.ConfigError(f"{where}: {field}={value!r} is not a valid value ({first}).") from None


def _pairs(value, where: str) -> list[tuple[str, Any]]:
  """A mapping or a sequence of (dotted field, value) pairs, as ordered pairs.

  A ConfigDict iterates in sorted order; a sequence of pairs keeps its order.
  """
  if value is None:
    return []
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    pairs = list(value.items())
  else:
    pairs = list(value)
  for pair in pairs:
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
      raise train.ConfigError(f"{where} holds (dotted field, value) pairs or a dict, got "
                              f"{pair!r}.")
  return [(field, _plain(v)) for field, v in pairs]


def _grid(spec) -> list[tuple[str, list]]:
  """The grid as ordered (field, values) pairs."""
  out = []
  for field, values in _pairs(spec.get("grid", None), "sweep.grid"):
    if not isinstance(values, list) or not values:
      raise train.ConfigError(f"sweep.grid[{field!r}] must be a non-empty list of values, got "
                              f"{values!r}.")
    out.append((field, values))
  return out


def _slug(value: Any) -> str:
  text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
  return re.sub(r"[^A-Za-z0-9_.+()-]", "_", text)


def _aggregator_spec(config) -> str:
  return build_lib.aggregator_spec(config.aggregator.name, config.aggregator.meta)


def expand(spec: ml_collections.ConfigDict) -> Sweep:
  """Expands a sweep config into its cells and runs (grid x cells x seeds).

  Raises:
    train.ConfigError: one sentence naming the field, for an unknown sweep or
      config field, an ill-typed value, no seeds or two equal cells.
  """
  for key in spec.keys():
    if key not in SWEEP_FIELDS:
      close = difflib.get_close_matches(key, SWEEP_FIELDS, n=1)
      raise train.ConfigError(f"The sweep config has no field {key!r}"
                              f"{f' (did you mean {close[0]!r}?)' if close else ''}; its "
                              f"fields are {', '.join(SWEEP_FIELDS)}.")
  base = load_config_file(spec.get("base", None) or "configs/default.py")
  seeds = list(_plain(spec.get("seeds", None) or []))
  if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
    raise train.ConfigError(f"sweep.seeds must be a non-empty list of integers, got {seeds!r}.")
  if len(set(seeds)) != len(seeds):
    raise train.ConfigError(f"sweep.seeds lists a seed twice: {seeds}.")
  max_batch = spec.get("max_batch", None) or len(seeds)
  if not isinstance(max_batch, int) or max_batch < 1:
    raise train.ConfigError(f"sweep.max_batch must be a positive integer, got {max_batch!r}.")
  devices = spec.get("devices", None)
  devices = 1 if devices is None else devices
  if not isinstance(devices, int) or isinstance(devices, bool) or devices < 0:
    raise train.ConfigError(f"sweep.devices must be an integer >= 0 (0 = all local devices, "
                            f"1 = one device), got {devices!r}.")
  share = spec.get("share_programs", None)
  share = True if share is None else share
  if not isinstance(share, bool):
    raise train.ConfigError(f"sweep.share_programs must be True or False, got {share!r}.")
  for field, value in _pairs(spec.get("overrides", None), "sweep.overrides"):
    set_field(base, field, value, "sweep.overrides")
  grid = _grid(spec)
  explicit = _plain(spec.get("cells", None) or [])
  if not isinstance(explicit, list) or not all(isinstance(c, dict) for c in explicit):
    raise train.ConfigError("sweep.cells must be a list of dicts of overrides "
                            "({'aggregator.name': 'krum', ...}).")
  axes = [field for field, _ in grid]
  for cell in explicit:
    for field in cell:
      if field in [f for f, _ in grid]:
        raise train.ConfigError(f"sweep.cells sets {field!r}, which is also a grid axis; set "
                                f"it in one of them.")
      if field not in axes:
        axes.append(field)
  for field in axes:
    if field == "seed":
      raise train.ConfigError("The seed is not an axis: list the seeds in sweep.seeds.")
  cells, names = [], {}
  points = itertools.product(*[values for _, values in grid]) if grid else [()]
  for point, extra in itertools.product(list(points), explicit or [{}]):
    overrides = {**dict(zip([f for f, _ in grid], point)), **extra}
    config = ml_collections.ConfigDict(base.to_dict())
    where = "sweep cell " + ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    for field, value in overrides.items():
      set_field(config, field, value, where)
    values = {axis: get_field(config, axis) for axis in axes}
    name = ",".join(f"{axis}={_slug(values[axis])}" for axis in axes) or "base"
    if name in names:
      raise train.ConfigError(f"{where} is the same setting as the cell {name!r}; every cell "
                              f"must differ.")
    names[name] = True
    runs = []
    for seed in seeds:
      run_config = ml_collections.ConfigDict(config.to_dict())
      run_config.seed = seed
      run_config.progress = False
      if devices != 1:  # the runs are spread over the devices: each run on one of them
        run_config.devices = 1
      runs.append(Run(name, seed, os.path.join("runs", name, f"seed={seed}"), run_config))
    cells.append(Cell(name, values, _aggregator_spec(config), tuple(runs)))
  return Sweep(spec.get("name", None) or "sweep", tuple(axes), tuple(seeds), tuple(cells),
               max_batch, devices, share)


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
    for family in train.attack_family(names, c.workers.num - c.workers.byzantine):
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
        loaded.setdefault(key, setup.dataset)
        datasets[(cell.name, run.seed)] = setup.dataset
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
        workdir_lib.check_resume_config(
            os.path.join(workdir, run.workdir), run.config)
      except train.ConfigError as e:
        raise train.ConfigError(f"The sweep config changed for the cell {cell['cell']!r}: "
                                f"{e}") from None


def _append_status(workdir: str, entry: dict) -> None:
  with open(os.path.join(workdir, "status.jsonl"), "a") as fh:
    fh.write(json.dumps(entry) + "\n")


def _status_entry(run: Run, workdir: str, reason: str = "") -> dict:
  summary = results_lib.run_summary(
      results_lib.read_jsonl(os.path.join(workdir, run.workdir, "metrics.jsonl")))
  return {"cell": run.cell, "seed": run.seed, "status": "failed" if reason else "ok",
          "reason": reason, **{k: summary[k] for k in ("final_test_acc", "best_test_acc",
                                                       "best_step", "steps_per_sec",
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
    self.widths = [max([len(a)] + [len(_slug(c.values[a])) for c in sweep.cells])
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
    values = "  ".join(f"{_slug(cell.values[a]):<{w}}" for a, w in zip(self.axes, self.widths))
    if ok:
      final = [100 * e["final_test_acc"] for e in ok]
      best = statistics.fmean(100 * e["best_test_acc"] for e in ok)
      speed = statistics.median(e["steps_per_sec"] for e in ok)
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
      e.g. across sweeps in one process; a new cache by default.

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
  check_workdir(sweep, workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "sweep.json"), "w") as fh:
    json.dump(sweep.to_json(), fh, indent=2)
  status = results_lib.read_status(workdir)

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
  programs = loop_lib.ProgramCache() if programs is None else programs
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
        for run, result in zip(slots, results):
          if run is not None:
            record(run, "" if result.error is None else " ".join(str(result.error).split()))
          if run is not None and result.error is not None:
            _shrink(bar, run.config.num_steps - result.metrics.get("step", 0))
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
