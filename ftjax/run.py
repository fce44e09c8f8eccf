"""Runs: one loop that trains one run or many, with metrics, checkpoints and resume.

:func:`train_runs` trains R runs of one config that differ only in their seed
as one program (their states stacked on a leading runs axis), each run with
its own workdir; :func:`train_and_evaluate` is its one-run case. Both check
the workdir, resume from the latest checkpoint, write ``config.json``, report,
stop a diverged run and close in the same place, here.
"""

from __future__ import annotations

import contextlib
import functools
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
from ftjax import workdir as workdir_lib
from ftjax.build import ConfigError, Setup, build

RUNS_AXIS = "runs"
"""The mesh axis :func:`train_runs` spreads its runs over."""


class TrainingDiverged(FloatingPointError):
  """The honest loss or the model became non-finite; the last good checkpoint is kept."""


RUN_ERRORS = (ConfigError, TrainingDiverged, checkpoint_lib.CheckpointWriteError,
              checkpoint_lib.CheckpointRestoreError, reporting.MetricsWriteError)
"""What a run raises for a problem the user must fix; each message is one line."""


def exit_code(error: Exception) -> int:
  """The command line's exit status for a run error: 2 for bad input, 1 for the rest."""
  return 2 if isinstance(error, ConfigError) else 1


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
# Runs stacked on a leading axis
# --------------------------------------------------------------------------


@jax.jit
def _take_runs(tree, index):
  """The runs ``index`` (an int, or an int array for a new runs axis) of a stacked tree."""
  return jax.tree.map(lambda a: a[index], tree)


_where_runs = jax.jit(round_lib.select_rows)  # per run: new where keep [R], else old


def runs_mesh(devices: int = 1) -> Optional[jax.sharding.Mesh]:
  """The one-axis mesh (axis :data:`RUNS_AXIS`) of the first ``devices`` local devices.

  Raises:
    ConfigError: a count that is not an integer >= 0, or more devices than exist.
  """
  try:
    return sharding.device_mesh(devices, RUNS_AXIS)
  except ValueError as e:
    raise ConfigError(f"The runs' devices: {e}") from None


def _diverged(setup: Setup, workdir: str, step: int, length: int, metrics: dict,
              saved: bool) -> TrainingDiverged:
  """The error for a chunk from ``step`` whose loss or model is not finite."""
  recorded = step > 0 or setup.eval_at_start  # a row, and its checkpoint, at the chunk's start
  kept = (f"The last good checkpoint (step {step}) is kept in {workdir}" if recorded and saved
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
    programs: the cache of compiled programs (:class:`ftjax.loop.ProgramCache`);
      default :data:`ftjax.loop.SHARED`, the process's, so identical programs
      compile once.
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
    return _train_runs(configs, workdirs, dataset, model, programs or loop_lib.SHARED,
                       on_rounds or (lambda n: None), note, runs_mesh(devices), tuple(attacks),
                       console)


def _build_runs(configs, workdirs, dataset, model, attacks, results) -> dict:
  """Every run's Setup, built and validated before compiling; errors go to ``results``."""
  setups = {}
  for i, config in enumerate(configs):
    if config is None:
      continue
    try:
      workdir_lib.check_workdir(workdirs[i])
      shared = dataset if dataset is not None or not setups else next(iter(setups.values())).source
      setups[i] = build(config, shared, model, attacks=attacks)
      workdir_lib.check_resume_config(workdirs[i], setups[i].fields)
    except ConfigError as e:
      if len(configs) == 1:
        raise
      results[i] = RunResult(workdirs[i], {}, e)
  return setups


def _but_seed(setup: Setup) -> dict:
  return {k: v for k, v in setup.fields.items() if k != "seed"}


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
  if any(_but_seed(setups[i]) != _but_seed(first) for i in live):
    raise ValueError("train_runs needs configs that differ only in their seed.")
  if mesh is not None and first.mesh is not None:
    raise ConfigError("Runs spread over devices each live on one device: set the runs' "
                      "config.devices = 1.")
  for i in live:
    workdir_lib.write_config(workdirs[i], setups[i])
  for group in _table_groups(setups):
    _run_group(num_slots, workdirs, {i: setups[i] for i in group}, programs, on_rounds, note,
               mesh, console, results)
  return results


def _run_group(num_slots, workdirs, setups, programs, on_rounds, note, mesh, console, results):
  """Trains the runs of ``setups`` as one program; the other slots compute copies."""
  live = list(setups)
  first = setups[live[0]]
  # Every slot gets a run's seed and data; empty and failed slots borrow the first run's.
  owner = [i if i in setups else live[0] for i in range(num_slots)]
  states = _init_states(first, [setups[i].seed for i in owner], programs)
  runs = {i: workdir_lib.RunFiles(workdirs[i], setups[i], console, _take_runs(states, i))
          for i in live}
  if note is None:
    note = runs[live[0]].reporter.note if console else (
        lambda message: print(message, file=sys.stderr))
  if console:
    note(first.describe())
  states = _restored(states, runs, first.num_steps, note)
  on_rounds(sum(r.step for r in runs.values()))
  group = _Group(first, _stack_data(setups, owner), states, programs, mesh, console, note)
  failing = True
  try:
    group.record_start(runs)
    while any(runs[i].step < first.num_steps for i in runs):
      for i, error in group.advance(runs, on_rounds).items():
        results[i] = RunResult(workdirs[i], runs[i].row, error)
        runs.pop(i).close(failing=True)
    failing = False
  finally:
    for run in runs.values():
      run.close(failing=failing)
  for i, run in runs.items():
    results[i] = RunResult(workdirs[i], run.row, None, _take_runs(group.states, i))
    if console:
      note(run.summary())


def _init_states(setup: Setup, seeds: list, programs: loop_lib.ProgramCache):
  seeds = jnp.asarray(seeds)
  key = ("init", loop_lib.init_identity(setup), len(seeds))
  return programs.get(key, lambda: jax.jit(
      lambda s: round_lib.init_states(setup, s)).lower(seeds).compile())(seeds)


def _restored(states, runs: dict, num_steps: int, note: Callable):
  """``states`` with each run's slot replaced by its restored checkpoint, if any."""
  restored = [i for i, run in runs.items() if run.restored]
  if not restored:
    return states
  host = jax.tree.map(np.array, jax.device_get(states))
  for i in restored:
    for leaf, value in zip(jax.tree.leaves(host), jax.tree.leaves(runs[i].state)):
      leaf[i] = np.asarray(value)
    done = " (already complete)" if runs[i].step >= num_steps else ""
    note(f"Resumed {runs[i].workdir} from its checkpoint at step {runs[i].step}{done}.")
  return jax.tree.map(jnp.asarray, host)


class _Group:
  """The stacked states of a group of runs, and the chunk and evaluation programs."""

  def __init__(self, setup: Setup, data, states, programs, mesh, console, note):
    self.setup, self.console, self.note = setup, console, note
    self.spread = sharding.runs_placement(mesh, RUNS_AXIS,
                                          functools.partial(round_lib.place, setup))
    self.states, self.data = self.spread(states), self.spread(data, data=True)
    self.chunk_fn = loop_lib.make_chunk_fn(setup, runs=True, programs=programs,
                                           runs_layout="vmap" if mesh is not None else None)
    # The test split, and the validation split when the run holds one out: (program, data).
    self.evaluations = []
    for split, held in (("test", None), ("val", setup.validation)):
      if split == "val" and held is None:
        continue
      data = sharding.replicate(mesh if mesh is not None else setup.mesh,
                                loop_lib.make_eval_data(setup.dataset, setup.eval_batch_size,
                                                        held))
      self.evaluations.append((loop_lib.compile_eval(setup, self.states, data, programs, split),
                               data))
    self.compiled = set()

  def evaluate(self) -> dict:
    """Every slot's evaluation: {name: [R] values} (test, and validation when held out)."""
    out = {}
    for program, data in self.evaluations:
      out.update(jax.device_get(program(self.states.params, self.states.batch_stats, data)))
    return out

  def record_start(self, runs: dict) -> None:
    """The row at step 0 (the initial model) of the runs that start from it and have none
    (a run resumed from step 0 has its row already)."""
    starting = [i for i, r in runs.items() if self.setup.eval_at_start and r.step == 0
                and not any(row["step"] == 0 for row in r.reporter.rows)]
    if starting:
      evaluation = self.evaluate()
      for i in starting:
        runs[i].record({"step": 0, **{k: float(v[i]) for k, v in evaluation.items()},
                        "wall_time": time.perf_counter() - runs[i].wall_start},
                       _take_runs(self.states, i))

  def _length(self, step: int) -> int:
    """Rounds from ``step`` to the next evaluation: the next multiple of eval_every, the
    next of eval_steps, or the last step, whichever comes first."""
    setup = self.setup
    ends = [step + setup.eval_every - step % setup.eval_every, setup.num_steps]
    ends += [s for s in setup.eval_steps if s > step][:1]
    return min(ends) - step

  def _chunk(self, length: int) -> Callable:
    tic = time.perf_counter()
    run_chunk = self.chunk_fn(self.states, self.data, length).run
    if self.console and length not in self.compiled:
      self.note(f"Compiled a chunk of {length} rounds in {time.perf_counter() - tic:.1f} s.")
    self.compiled.add(length)
    return run_chunk

  def advance(self, runs: dict, on_rounds: Callable) -> dict:
    """One chunk for the runs furthest behind (the other slots compute copies of one).

    Records the advanced runs' rows and checkpoints; returns the runs that
    diverged, with their errors (a single run from the console raises it).
    """
    setup = self.setup
    step = min(r.step for r in runs.values() if r.step < setup.num_steps)
    moving = [i for i, r in runs.items() if r.step == step]
    length = self._length(step)
    slots = jax.tree.leaves(self.states.step)[0].shape[0]
    source = [i if i in moving else moving[0] for i in range(slots)]
    everyone = source == list(range(slots))
    run_chunk = self._chunk(length)
    tic = time.perf_counter()
    # All slots moving: the state is donated; otherwise the copy is, and the rest is kept.
    new_states, metrics = run_chunk(self.states if everyone else self.spread(
        _take_runs(self.states, jnp.asarray(source))), self.data)
    metrics = jax.device_get(metrics)
    elapsed = time.perf_counter() - tic
    failed = {}
    for i in moving:
      if not (metrics["finite"][i] and np.isfinite(metrics["train_loss"][i])):
        failed[i] = _diverged(setup, runs[i].workdir, step, length,
                              {k: v[i] for k, v in metrics.items()},
                              runs[i].checkpointer.enabled)
        if self.console:
          raise failed[i]
        self.note(f"{runs[i].workdir}: {failed[i]}")
    advanced = [i for i in moving if i not in failed]
    keep = np.array([i in advanced for i in range(slots)])
    # A diverged slot's state is never read again, so donated states are simply replaced.
    self.states = self.spread(new_states if everyone
                              else _where_runs(keep, new_states, self.states))
    if advanced:
      evaluation = self.evaluate()
      for i in advanced:
        runs[i].reporter.advance(length)
        runs[i].record({"step": step + length,
                        **{k: float(v[i]) for k, v in metrics.items() if k != "finite"},
                        **{k: float(v[i]) for k, v in evaluation.items()},
                        "wall_time": time.perf_counter() - runs[i].wall_start,
                        "steps_per_sec": length / elapsed}, _take_runs(self.states, i))
      on_rounds(length * len(advanced))
    return failed
