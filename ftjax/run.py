"""Runs: one loop that trains one run or many, with metrics, checkpoints and resume.

:func:`train_runs` trains R runs of one config that differ only in their seed
as one program (their states stacked on a leading runs axis), each run with
its own workdir; :func:`train_and_evaluate` is its one-run case. Both check
the workdir, resume from the latest checkpoint, write ``config.json``, report,
stop a diverged run and close in the same place, here.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ftjax import checkpoint as checkpoint_lib
from ftjax import loop as loop_lib
from ftjax import reporting
from ftjax import round as round_lib
from ftjax import sharding
from ftjax.build import ConfigError, Setup, build

# Config fields that may change between an interrupted run and its resume.
RESUMABLE_FIELDS = ("num_steps", "eval_every", "wandb", "checkpoint", "progress", "loop",
                    "devices", "mesh")
RUNS_AXIS = "runs"
"""The mesh axis :func:`train_runs` spreads its runs over."""


class TrainingDiverged(FloatingPointError):
  """The honest loss or the model became non-finite; the last good checkpoint is kept."""


RUN_ERRORS = (ConfigError, TrainingDiverged, checkpoint_lib.CheckpointWriteError,
              checkpoint_lib.CheckpointRestoreError, reporting.MetricsWriteError)
"""What a run raises for a problem the user must fix; each message is one line."""


class TrainResult(NamedTuple):
  """What :func:`train_and_evaluate` returns."""
  state: round_lib.TrainState  # the final state (model, estimator and server states, step)
  metrics: dict                # the last evaluation row (step, train/test loss and accuracy, ...)


class RunResult(NamedTuple):
  """What :func:`train_runs` returns for each run."""
  workdir: str
  metrics: dict                # the last evaluation row ({} when there is none)
  error: Optional[Exception]   # the ConfigError or TrainingDiverged that stopped it, or None
  state: Optional[round_lib.TrainState] = None  # the final state of a run that finished


# --------------------------------------------------------------------------
# Workdirs
# --------------------------------------------------------------------------


def config_fields(config, drop: Sequence[str] = ()) -> dict:
  """The config as a JSON-able dict, without the dotted fields in ``drop``."""
  fields = json.loads(config.to_json())
  for name in drop:
    *parents, leaf = name.split(".")
    node = fields
    for p in parents:
      node = node.get(p, {})
    node.pop(leaf, None)
  return fields


def check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as fh:
      fh.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"Cannot write to workdir {workdir!r} ({e.strerror}); pass a "
                      f"writable --workdir.") from None


def _comparable(fields: dict) -> dict:
  return {k: v for k, v in fields.items() if k not in RESUMABLE_FIELDS + ("resolved",)}


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _differences(va, vb, f"{prefix}{k}.")
    elif va != vb:
      out.append(f"{prefix}{k} was {va!r}, now {vb!r}")
  return out


def check_resume_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir that holds another config's run, or checkpoints of an unknown one."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
      raise ConfigError(
          f"The workdir {workdir!r} holds checkpoints but no config.json, so the run they "
          f"belong to is unknown; restore its config.json or use another --workdir.")
    return
  try:
    with open(path) as fh:
      saved = _comparable(json.load(fh))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} cannot be read as JSON ({e}); the workdir is damaged: restore "
                      f"the file or use another --workdir.") from None
  now = _comparable(json.loads(config.to_json()))
  if saved != now:
    raise ConfigError(
        f"The workdir {workdir!r} holds a run with a different config "
        f"({'; '.join(_differences(saved, now))}); resume it with the same config "
        f"or use another --workdir.")


def _write_config(workdir: str, config, setup: Setup) -> None:
  """config.json: the config, plus the rule and f it resolved to."""
  fields = json.loads(config.to_json())
  fields["resolved"] = {"aggregator": setup.aggregator.spec, "f": setup.aggregator.f,
                        "attack": setup.attack.name, "loop": setup.loop,
                        "worker_chunk": setup.worker_chunk}
  with open(os.path.join(workdir, "config.json"), "w") as fh:
    json.dump(fields, fh, indent=2)


# --------------------------------------------------------------------------
# Runs stacked on a leading axis
# --------------------------------------------------------------------------


@jax.jit
def _take_runs(tree, index):
  """The runs ``index`` (an int, or an int array for a new runs axis) of a stacked tree."""
  return jax.tree.map(lambda a: a[index], tree)


@jax.jit
def _where_runs(keep, new, old):
  """Per run, ``new`` where ``keep`` [R] is True, else ``old``."""
  return jax.tree.map(
      lambda a, b: jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


def runs_mesh(devices: int = 1) -> Optional[jax.sharding.Mesh]:
  """The one-axis mesh (axis :data:`RUNS_AXIS`) of the first ``devices`` local devices.

  Raises:
    ConfigError: a count that is not an integer >= 0, or more devices than exist.
  """
  if not isinstance(devices, int) or isinstance(devices, bool) or devices < 0:
    raise ConfigError(f"The runs' devices must be an integer >= 0 (0 = all local devices), "
                      f"got {devices!r}.")
  available = jax.local_devices()
  if devices > len(available):
    raise ConfigError(f"The runs are to be spread over {devices} devices, but only "
                      f"{len(available)} local {jax.default_backend().upper()} device(s) "
                      f"exist (on CPU: main.py --cpu_devices=N, or XLA_FLAGS="
                      f"--xla_force_host_platform_device_count=N).")
  chosen = available[:devices or len(available)]
  return None if len(chosen) == 1 else jax.sharding.Mesh(np.array(chosen), (RUNS_AXIS,))


def _diverged(setup: Setup, workdir: str, step: int, length: int, metrics: dict,
              saved: bool) -> TrainingDiverged:
  """The error for a chunk from ``step`` whose loss or model is not finite."""
  kept = (f"The last good checkpoint (step {step}) is kept in {workdir}" if step > 0 and saved
          else "No checkpoint was written")
  advice = ["lower optim.lr"]
  if setup.clip is None:
    advice.append("enable optim.clip")
  if setup.aggregator.name == "avg":
    advice.append("use a robust aggregator")
  return TrainingDiverged(
      f"Training diverged between steps {step} and {step + length}: the honest "
      f"workers' loss is {metrics['train_loss']} and the model is "
      f"{'finite' if metrics['finite'] else 'not finite'}. {kept}; "
      f"{', or '.join(advice)}.")


class _Run:
  """One run's workdir: its checkpointer, reporter, last row and bookkeeping."""

  def __init__(self, workdir: str, config, setup: Setup, console: bool, start_state):
    self.workdir, self.config = workdir, config
    self.checkpointer = checkpoint_lib.Checkpointer(workdir, enabled=config.checkpoint.enabled)
    self.meta = {"best_test_acc": -1.0, "best_step": 0, "wall_time": 0.0}
    restored = self.checkpointer.restore_latest(start_state)
    self.restored = restored is not None
    self.state = restored[0] if self.restored else None
    if self.restored:
      self.meta.update(restored[1])
    self.step = int(self.state.step) if self.restored else 0
    self.reporter = reporting.Reporter(
        workdir, total_steps=setup.num_steps, start_step=self.step, wandb_config=config.wandb,
        run_config=json.loads(config.to_json()), show_progress=console and config.progress,
        print_rows=console)
    self.row = self.reporter.rows[-1] if self.reporter.rows else {}
    self.wall_start = time.perf_counter() - self.meta["wall_time"]

  def record(self, row: dict, state) -> None:
    """Writes an evaluation row, then the latest (and, when best, the best) checkpoint.

    The row goes first: a crash between the two leaves a row past the
    checkpoint, which a resume drops."""
    self.reporter.write(row)
    self.row, self.step = row, row["step"]
    best = row["test_acc"] >= self.meta["best_test_acc"]
    if best:
      self.meta.update(best_test_acc=row["test_acc"], best_step=row["step"])
    self.meta["wall_time"] = row["wall_time"]
    self.checkpointer.save("latest", row["step"], state, self.meta)
    if best:
      self.checkpointer.save("best", row["step"], state, self.meta)

  def close(self, failing: bool) -> None:
    """Finishes the writes; a failed write must not mask the error already raised."""
    try:
      self.checkpointer.close()
    except checkpoint_lib.CheckpointWriteError:
      if not failing:
        raise
    finally:
      self.reporter.close()

  def summary(self) -> str:
    row = self.row
    return (f"Finished {self.workdir} at step {row.get('step', self.step)}: test accuracy "
            f"{row.get('test_acc', float('nan')):.4f} (best {self.meta['best_test_acc']:.4f} "
            f"at step {self.meta['best_step']}), {self.meta['wall_time']:.0f} s. Metrics in "
            f"{self.reporter.csv_path}; plot with `python -m ftjax.plot --workdir="
            f"{self.workdir}`.")


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


def x64_scope(configs):
  """64-bit JAX for float64 configs, around building and running them (nothing else changes)."""
  live = [c for c in configs if c is not None]
  return (jax.enable_x64(True) if live and live[0].dtype == "float64"
          else contextlib.nullcontext())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, dataset=None,
                       model=None) -> TrainResult:
  """Runs (or resumes) one training run: :func:`train_runs` with one run.

  A float64 config runs inside ``jax.enable_x64(True)``; nothing outside the
  call is changed. The run prints a header, a table row per evaluation above
  a progress bar, and a closing summary.

  Args:
    config: the run's config.
    workdir: output directory (config.json, metrics.csv/.jsonl, checkpoints/).
      If it already holds a checkpoint of the same config, training resumes.
    dataset: optional in-memory dataset overriding ``config.data``.
    model: optional Flax module overriding ``config.model.name`` (see :func:`build`).

  Returns:
    The final state and the last evaluation row.

  Raises:
    The run's error (:data:`RUN_ERRORS`).
  """
  [result] = train_runs([config], [workdir], dataset, model, console=True)
  if result.error is not None:
    raise result.error
  return TrainResult(result.state, result.metrics)


def train_runs(configs: list, workdirs: list, dataset=None, model=None, *,
               programs: Optional[loop_lib.ProgramCache] = None,
               on_rounds: Optional[Callable[[int], None]] = None,
               note: Optional[Callable[[str], None]] = None, devices: int = 1,
               attacks: Sequence[str] = (), console: bool = False) -> list:
  """Runs (or resumes) R runs of one config that differ only in their seed, as one program.

  The runs' states are stacked on a leading runs axis (:func:`ftjax.loop.make_chunk_fn`);
  the seed enters through ``state.rng``. Each run writes its own workdir
  (config.json, metrics, checkpoints of its own slice of the state), so every
  run can be resumed or inspected alone.

  A ``None`` config is an empty slot: it keeps the runs axis at R, so that a
  smaller last batch of seeds reuses the compiled program, and it computes a
  discarded copy of another run. A run that fails (a config error for its
  seed, or :class:`TrainingDiverged`) gets its error in its result and its slot
  computes copies from then on, while the other runs go on. On resume, runs
  interrupted between their saves may stand at different steps: the runs
  behind advance first until all stand at the same step, so every run goes
  through the same chunks as without the interruption.

  Args:
    configs: R configs, equal except ``seed``, or None for an empty slot.
    workdirs: the runs' workdirs (None for empty slots).
    dataset: optional in-memory dataset overriding ``config.data``.
    model: optional Flax module overriding ``config.model.name``.
    programs: a cache the caller keeps across calls, so that identical
      programs compile once (:class:`ftjax.loop.ProgramCache`).
    on_rounds: called with a number of rounds each time runs advance (summed
      over the runs), first with the rounds restored from checkpoints.
    note: receives one-line messages (resumes, divergences); default: the
      console (above the progress bar of a single run).
    devices: spread the runs axis over this many local devices (0 = all; 1 =
      one device); R must be a multiple of the device count, and each run's
      own ``config.devices`` must be 1.
    attacks: compile the round for these attacks (:func:`ftjax.build.build`),
      so that calls for runs that differ only in their attack share one program.
    console: print the header, the table rows, the progress bar and the
      closing summary (a single run from the command line).

  Returns:
    A :class:`RunResult` per slot (None for empty slots).
  """
  with x64_scope(configs):
    return _train_runs(configs, workdirs, dataset, model, programs or loop_lib.ProgramCache(),
                       on_rounds or (lambda n: None), note, runs_mesh(devices), tuple(attacks),
                       console)


def _build_runs(configs, workdirs, dataset, model, attacks, results) -> dict:
  """Every run's Setup, built and validated before compiling; errors go to ``results``."""
  setups = {}
  for i, config in enumerate(configs):
    if config is None:
      continue
    try:
      check_workdir(workdirs[i])
      check_resume_config(workdirs[i], config)
      shared = dataset if dataset is not None or not setups else next(iter(setups.values())).dataset
      setups[i] = build(config, shared, model, attacks=attacks)
    except ConfigError as e:
      if len(configs) == 1:
        raise
      results[i] = RunResult(workdirs[i], {}, e)
  return setups


def _stack_data(setups: dict, owner: list):
  """The device data, with one partition table per slot when the split depends on the seed."""
  first = setups[owner[0]]
  data = round_lib.make_device_data(first)
  if first.partition is None:
    return data
  tables = [setups[i].partition for i in owner]
  return data._replace(table=jnp.stack([jnp.asarray(p.table) for p in tables]),
                       sizes=jnp.stack([jnp.asarray(p.sizes) for p in tables]))


def _table_groups(setups: dict) -> list[list[int]]:
  """The runs grouped by the shape of their partition table (one program per group).

  Seeds split the data into shards of different sizes, and a worker's
  shuffle depends on its table's width, so runs whose tables differ in shape
  cannot share a program without changing their sample order.
  """
  groups = {}
  for i, setup in setups.items():
    shape = None if setup.partition is None else setup.partition.table.shape
    groups.setdefault(shape, []).append(i)
  return list(groups.values())


def _train_runs(configs, workdirs, dataset, model, programs, on_rounds, note, mesh, attacks,
                console):
  num_slots = len(configs)
  if mesh is not None and num_slots % mesh.devices.size:
    raise ValueError(f"{num_slots} runs cannot be spread evenly over {mesh.devices.size} "
                     f"devices; give a multiple of the device count (empty slots count).")
  results = [None] * num_slots
  setups = _build_runs(configs, workdirs, dataset, model, attacks, results)
  live = list(setups)
  if not live:
    return results
  first = setups[live[0]]
  c = configs[live[0]]
  if any(config_fields(configs[i], ["seed"]) != config_fields(c, ["seed"]) for i in live):
    raise ValueError("train_runs needs configs that differ only in their seed.")
  if mesh is not None and first.mesh is not None:
    raise ConfigError("Runs spread over devices each live on one device: set the runs' "
                      "config.devices = 1.")
  for i in live:
    _write_config(workdirs[i], configs[i], setups[i])
  for group in _table_groups(setups):
    _run_group(configs, workdirs, {i: setups[i] for i in group}, programs, on_rounds, note,
               mesh, console, results)
  return results


def _run_group(configs, workdirs, setups, programs, on_rounds, note, mesh, console, results):
  """Trains the runs of ``setups`` as one program; the other slots compute copies."""
  num_slots = len(configs)
  live = list(setups)
  first = setups[live[0]]
  c = configs[live[0]]
  # Every slot gets a run's seed and data; empty and failed slots borrow the first run's.
  owner = [i if i in setups else live[0] for i in range(num_slots)]
  train_data = _stack_data(setups, owner)
  seeds = jnp.asarray([configs[i].seed for i in owner])
  states = programs.get(("init", loop_lib.init_identity(first), num_slots), lambda: jax.jit(
      lambda s: round_lib.init_states(first, s)).lower(seeds).compile())(seeds)

  runs, host, restored_any = {}, None, False
  for i in live:
    runs[i] = _Run(workdirs[i], configs[i], first, console, _take_runs(states, i))
    if runs[i].restored:
      host = host if host is not None else jax.tree.map(np.array, jax.device_get(states))
      for leaf, value in zip(jax.tree.leaves(host), jax.tree.leaves(runs[i].state)):
        leaf[i] = np.asarray(value)
      restored_any = True
  if note is None:
    note = runs[live[0]].reporter.note if console else (
        lambda message: print(message, file=sys.stderr))
  if console:
    note(first.describe())
  for i in live:
    if runs[i].restored:
      done = " (already complete)" if runs[i].step >= first.num_steps else ""
      note(f"Resumed {workdirs[i]} from its checkpoint at step {runs[i].step}{done}.")
  if restored_any:
    states = jax.tree.map(jnp.asarray, host)
  on_rounds(sum(r.step for r in runs.values()))

  spread = _placement(first, mesh)
  states, train_data = spread(states), spread(train_data, data=True)
  eval_data = sharding.replicate(mesh if mesh is not None else first.mesh,
                                 loop_lib.make_eval_data(first.dataset, first.eval_batch_size))
  chunk_fn = loop_lib.make_chunk_fn(first, runs=True, programs=programs,
                                    runs_layout="vmap" if mesh is not None else None)
  evaluate = loop_lib.compile_eval(first, states, eval_data, programs)
  compiled = set()
  failing = True
  try:
    while any(runs[i].step < first.num_steps for i in live):
      # The runs furthest behind advance; every other slot computes a copy of one of them.
      step = min(runs[i].step for i in live if runs[i].step < first.num_steps)
      moving = [i for i in live if runs[i].step == step]
      length = min(first.eval_every - step % first.eval_every, first.num_steps - step)
      source = [i if i in moving else moving[0] for i in range(num_slots)]
      everyone = source == list(range(num_slots))
      tic = time.perf_counter()
      run_chunk = chunk_fn(states, train_data, length).run
      if console and length not in compiled:
        note(f"Compiled a chunk of {length} rounds in {time.perf_counter() - tic:.1f} s.")
      compiled.add(length)
      tic = time.perf_counter()
      # All slots moving: the state is donated; otherwise the copy is, and the rest is kept.
      new_states, metrics = run_chunk(
          states if everyone else spread(_take_runs(states, jnp.asarray(source))), train_data)
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - tic
      advanced = []
      for i in moving:
        if metrics["finite"][i] and np.isfinite(metrics["train_loss"][i]):
          advanced.append(i)
          continue
        error = _diverged(first, workdirs[i], step, length, {k: v[i] for k, v in metrics.items()},
                          c.checkpoint.enabled)
        if console:
          raise error
        note(f"{workdirs[i]}: {error}")
        results[i] = RunResult(workdirs[i], runs[i].row, error)
        live.remove(i)
        runs.pop(i).close(failing=True)
      keep = np.array([i in advanced for i in range(num_slots)])
      # A diverged slot's state is never read again, so donated states are simply replaced.
      states = spread(new_states if everyone else _where_runs(keep, new_states, states))
      if not advanced:
        continue
      evaluation = jax.device_get(evaluate(states.params, states.batch_stats, eval_data))
      for i in advanced:
        runs[i].reporter.advance(length)
        row = {"step": step + length,
               **{k: float(v[i]) for k, v in metrics.items() if k != "finite"},
               **{k: float(v[i]) for k, v in evaluation.items()},
               "wall_time": time.perf_counter() - runs[i].wall_start,
               "steps_per_sec": length / elapsed}
        runs[i].record(row, _take_runs(states, i))
      on_rounds(length * len(advanced))
    failing = False
  finally:
    for run in runs.values():
      run.close(failing=failing)
  for i in live:
    results[i] = RunResult(workdirs[i], runs[i].row, None, _take_runs(states, i))
    if console:
      note(runs[i].summary())


def _placement(setup: Setup, mesh) -> Callable:
  """Puts stacked states (and data) where the runs live.

  One device or the workers' mesh: :func:`ftjax.round.place`. A runs mesh:
  the runs axis (the leading axis of the states, and of a per-run partition)
  is split over the devices and the data replicated; XLA partitions the
  vmapped round along it, every device training its own runs.
  """
  if mesh is None:
    return lambda tree, data=False: round_lib.place(setup, tree)
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(RUNS_AXIS))

  def spread(tree, data=False):
    if not data:
      return jax.device_put(tree, split)
    tree = sharding.replicate(mesh, tree)
    if tree.table is None:
      return tree
    return tree._replace(table=jax.device_put(tree.table, split),
                         sizes=jax.device_put(tree.sizes, split))

  return spread
