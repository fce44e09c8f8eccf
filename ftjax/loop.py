"""The compiled programs of a run: the rounds between two evaluations, and the evaluation.

:func:`make_chunk_fn` compiles the rounds of one chunk for R runs at once
(the runs axis leads every state leaf; one run is R = 1), as one ``lax.scan``
or as a host loop over the jitted round (:func:`ftjax.policy.loop_kind`).
Compiled programs are kept in a :class:`ProgramCache` under a key holding
everything that changes the program: the round's identity (the resolved
config but the seed, the rule, attack and model objects, the dataset's
shapes and constants, the devices), the loop, the runs layout, the chunk
length, the shapes, dtypes and shardings of every argument, and the JAX
settings that change a traced program. A call that passes no cache uses the
process's :data:`SHARED` one, so that running a config again in the same
process (a notebook cell, a test, a resumed run) compiles nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ftjax import data as data_lib
from ftjax import optim
from ftjax import poisoning
from ftjax import policy
from ftjax import round as round_lib
from ftjax import sharding
from ftjax.build import Setup

PyTree = Any


# Config fields that do not change the compiled round (the chunk length is keyed apart).
_NOT_IN_ROUND = ("num_steps", "eval_every", "wandb", "checkpoint", "progress", "eval_steps",
                 "eval_at_start", "report_last_k")
# JAX settings that change what a function traces to (float64 enters through the dtypes).
_TRACE_FLAGS = ("jax_default_matmul_precision", "jax_default_prng_impl",
                "jax_threefry_partitionable", "jax_numpy_rank_promotion")


class CompiledChunk(NamedTuple):
  """``run(state, data) -> (state, mean metrics)`` for one chunk length."""
  run: Callable
  flops_per_step: float    # XLA's cost analysis of one round
  memory_bytes: float      # XLA's memory analysis (arguments + outputs + temporaries)
  loop: str                # "scan" or "host"
  executables: tuple = ()  # the compiled XLA programs (for their memory analyses)


class ProgramCache:
  """Compiled programs by a key of everything that changes them (module docstring).

  One cache serves every call of a process that wants to share programs (a
  sweep's cells, the runs of a notebook); :attr:`compiled` counts the
  compilations. With ``max_programs`` the least recently used program is
  dropped when a new one would exceed it.
  """

  def __init__(self, max_programs: Optional[int] = None):
    self._programs = collections.OrderedDict()
    self.max_programs = max_programs
    self.compiled = 0

  def get(self, key: tuple, compile_fn: Callable[[], Any]) -> Any:
    if key in self._programs:
      self._programs.move_to_end(key)
      return self._programs[key]
    program = compile_fn()
    self.compiled += 1
    self._programs[key] = program
    if self.max_programs is not None and len(self._programs) > self.max_programs:
      self._programs.popitem(last=False)
    return program

  def clear(self) -> None:
    """Drops every program (after changing code that a program was traced from)."""
    self._programs.clear()


SHARED = ProgramCache(max_programs=64)
"""The process's programs, used by every call that is given no cache."""


def _hashable(obj) -> Any:
  """``obj`` when it can key a dict (compared by value), else a key equal to nothing else."""
  try:
    hash(obj)
    return obj
  except TypeError:
    return object()


def _identity(setup: Setup, sections: Optional[tuple] = None) -> tuple:
  """The record's ``sections`` (all but the seed when None), the dataset's constants,
  a user's model and the devices: what a program of the run closes over."""
  record = json.loads(json.dumps(setup.record))
  record.pop("seed", None)
  for field in _NOT_IN_ROUND:
    record.pop(field, None)
  for field in optim.STATE_FIELDS:  # values the state holds, not the program
    record["optim"].pop(field, None)
  if sections is not None:
    record = {k: v for k, v in record.items() if k in sections}
  ds = setup.dataset
  flags = tuple(getattr(jax.config, name) for name in _TRACE_FLAGS)
  return (json.dumps(record, sort_keys=True), flags,
          (ds.name, ds.train_images.shape, ds.test_images.shape, ds.num_classes,
           tuple(map(float, ds.mean)), tuple(map(float, ds.std)), ds.augment),
          None if setup.builtin_model else _hashable(setup.model),
          None if setup.mesh is None else tuple(d.id for d in setup.mesh.devices.flat))


def round_identity(setup: Setup) -> tuple:
  """What the compiled round depends on besides its arguments.

  Runs that differ only in their seed (which enters through the state) share
  it; within an attack family (``setup.attacks``) the attack is an index the
  round reads, so the run's own attack name is left out too.
  """
  identity = _identity(setup)
  if setup.attacks:
    record = json.loads(identity[0])
    record["attack"].pop("name", None)
    identity = (json.dumps(record, sort_keys=True),) + identity[1:]
  return identity + (setup.aggregator, setup.attacks or setup.attack, setup.loop,
                     setup.worker_chunk)


def init_identity(setup: Setup) -> tuple:
  """What the initial state's program depends on: model, dtype, optimisers, computed
  workers, and the rule when it keeps a state (``TrainState.aggregator_state``)."""
  return _identity(setup, ("model", "dtype", "optim", "kernels")) + (
      setup.num_computed, setup.aggregator if setup.aggregator.stateful else None)


def eval_identity(setup: Setup) -> tuple:
  """What the evaluation program depends on: the model, dtype and test data, and a
  backdoor's trigger (:func:`trigger`)."""
  return _identity(setup, ("model", "dtype", "kernels")) + (trigger(setup),)


def _signature(*args) -> tuple:
  """The structure, shapes, dtypes and shardings of ``args``."""
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple((jnp.shape(a), jnp.result_type(a), getattr(a, "sharding", None))
                        for a in leaves)


def _cost(compiled) -> tuple[float, float]:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = float((analysis or {}).get("flops", float("nan")))
  mem = compiled.memory_analysis()
  memory = (float(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                  + mem.output_size_in_bytes) if mem is not None else float("nan"))
  return flops, memory


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))


def _run_data_axes(data: round_lib.DeviceData):
  """vmap axes of the data over a runs axis: shared, except a per-run partition."""
  return None if data.table is None else round_lib.DeviceData(None, None, 0, 0, None)


def _run_data(data: round_lib.DeviceData, r: int) -> round_lib.DeviceData:
  return data if data.table is None else data._replace(table=data.table[r], sizes=data.sizes[r])


class RunsRound(NamedTuple):
  """The round over R runs, with the form their states take between rounds.

  ``enter`` turns the stacked states ``[R, ...]`` into the carry, ``step(carry,
  data, indices [R, W, b]) -> (carry, metrics [R])`` is one round, ``leave``
  stacks the carry again. Unrolled runs travel as a tuple of R states, so that
  no round slices the states out of the stack and stacks them again (a copy of
  every state buffer per round).
  """
  enter: Callable
  step: Callable
  leave: Callable


def _stack(trees):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def make_runs_round(train_step: Callable, layout: str) -> RunsRound:
  """The round over a leading runs axis R.

  ``layout`` (:func:`ftjax.policy.runs_layout`): "vmap", "map" (the runs one
  after another inside the program) or "unroll" (one copy of the round per
  run) of ``train_step`` (:func:`ftjax.round.make_round`). The data is shared,
  except a per-run partition table.
  """
  if layout == "unroll":
    def enter(state):
      return tuple(jax.tree.map(lambda a: a[r], state) for r in range(state.step.shape[0]))

    def unrolled(carry, data, idx):
      outs = [train_step(s, _run_data(data, r), idx[r]) for r, s in enumerate(carry)]
      return tuple(state for state, _ in outs), _stack([metrics for _, metrics in outs])

    return RunsRound(enter, unrolled, _stack)

  def step(state, data, idx):
    if layout == "vmap":
      return jax.vmap(train_step, in_axes=(0, _run_data_axes(data), 0))(state, data, idx)
    if data.table is None:
      return jax.lax.map(lambda a: train_step(a[0], data, a[1]), (state, idx))
    return jax.lax.map(lambda a: train_step(a[0], data._replace(table=a[2], sizes=a[3]), a[1]),
                       (state, idx, data.table, data.sizes))

  return RunsRound(lambda state: state, step, lambda state: state)


def make_chunk_fn(setup: Setup, loop: Optional[str] = None, *, runs: bool = False,
                  programs: Optional[ProgramCache] = None,
                  runs_layout: Optional[str] = None) -> Callable:
  """``compile(states, data, length) -> CompiledChunk``: the rounds between evaluations.

  With ``runs=True`` the states carry a leading runs axis R
  (:func:`ftjax.round.init_states`), and so does every returned metric; a
  single state (``runs=False``) runs as R = 1. With loop "scan" the
  ``length`` rounds run inside one jitted ``lax.scan``; with "host" a Python
  loop dispatches the jitted round ``length`` times without waiting for it.
  Either way the state buffers are donated, the example indices of the whole
  chunk are drawn on device first, and the metrics are the means over the
  chunk plus ``finite`` (whether each run's parameters are all finite). The
  chunk is compiled ahead of time, so that the caller can report compile
  time and XLA's cost analysis.

  Args:
    setup: the built run.
    loop: "auto", "scan" or "host" instead of ``setup.loop``, the config's.
    runs: whether the states have a leading runs axis.
    programs: the cache that keeps the compiled programs (:data:`SHARED` if None).
    runs_layout: how the runs share the program (:func:`ftjax.policy.runs_layout`
      when None).
  """
  policy.check_runs_layout(runs_layout)
  if loop is not None:
    setup = with_loop(setup, loop)
  if not runs:
    return _one_run(make_chunk_fn(setup, programs=programs, runs=True, runs_layout=runs_layout))
  programs = programs if programs is not None else SHARED
  identity = round_identity(setup)

  def compile_chunk(state, data, length):
    # The compiled chunk takes its inputs in place()'s layout; run() places them.
    state, data = round_lib.place(setup, state), round_lib.place(setup, data)
    layout = runs_layout or policy.runs_layout(state.step.shape[0])
    key = ("chunk", identity, layout, length, _signature(state, data))
    build_chunk = _compile_scan if setup.loop == "scan" else _compile_host
    return programs.get(key, lambda: build_chunk(setup, round_lib.make_round(setup), layout,
                                                 state, data, length))

  return compile_chunk


def _sample(setup: Setup, state, data, length: int) -> jax.Array:
  """Every run's example indices of the chunk, [length, R, W, b] (rounds lead)."""
  indices = jax.vmap(lambda s, d: round_lib.sample_chunk(setup, s, d, length),
                     in_axes=(0, _run_data_axes(data)))(state, data)
  return jnp.swapaxes(indices, 0, 1)


def _compile_scan(setup: Setup, train_step: Callable, layout: str, state, data,
                  length: int) -> CompiledChunk:
  """The chunk as one jitted ``lax.scan`` over its rounds, the state donated."""
  runs = make_runs_round(train_step, layout)

  def scan_chunk(state, data):
    indices = _sample(setup, state, data, length)
    carry, metrics = jax.lax.scan(lambda c, idx: runs.step(c, data, idx), runs.enter(state),
                                  indices)
    state = runs.leave(carry)
    metrics = jax.tree.map(lambda m: m.mean(0), metrics)
    metrics["finite"] = jax.vmap(_all_finite)(state.params)
    return state, metrics

  compiled = jax.jit(scan_chunk, donate_argnums=0).lower(state, data).compile()
  # XLA's cost analysis counts a while loop's body once, i.e. one round.
  return CompiledChunk(lambda s, d: compiled(round_lib.place(setup, s),
                                             round_lib.place(setup, d)),
                       *_cost(compiled), "scan", (compiled,))


def _compile_host(setup: Setup, train_step: Callable, layout: str, state, data,
                  length: int) -> CompiledChunk:
  """The chunk as a host loop dispatching the jitted, donated round without waiting."""
  runs = make_runs_round(train_step, layout)
  sample = functools.partial(_sample, setup, length=length)
  sampler = jax.jit(sample).lower(state, data).compile()
  indices = sharding.replicated_struct(setup.mesh, jax.eval_shape(sample, state, data))
  enter, leave, carry = runs.enter, runs.leave, state
  if layout == "unroll":  # compiled once here, not dispatched leaf by leaf on every call
    enter = jax.jit(enter).lower(state).compile()
    carry = jax.eval_shape(runs.enter, state)
    if setup.mesh is not None:  # compiled for the shardings the split gives the states
      carry = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           carry, enter.output_shardings)
    leave = jax.jit(leave).lower(carry).compile()

  def one_round(carry, data, indices, i):
    return runs.step(carry, data, indices[i])

  rnd = jax.jit(one_round, donate_argnums=0).lower(carry, data, indices, jnp.int32(0)).compile()
  _, step_metrics = jax.eval_shape(one_round, carry, data, indices, jnp.int32(0))

  def summarize(carry, metrics):
    metrics = jax.tree.map(lambda *m: jnp.stack(m).mean(0), *metrics)
    metrics["finite"] = jax.vmap(_all_finite)(runs.leave(carry).params)
    return metrics

  summary = jax.jit(summarize).lower(carry, [step_metrics] * length).compile()

  def run(state, data):
    state, data = round_lib.place(setup, state), round_lib.place(setup, data)
    idx = sampler(state, data)
    carry = enter(state)
    metrics = []
    for i in range(length):
      carry, m = rnd(carry, data, idx, jnp.int32(i))
      if setup.mesh is not None and len(metrics) >= policy.MAX_ROUNDS_IN_FLIGHT - 1:
        jax.block_until_ready(metrics[-1])
      metrics.append(m)
    return leave(carry), summary(carry, metrics)

  return CompiledChunk(run, *_cost(rnd), "host", (sampler, rnd, summary))


def with_loop(setup: Setup, loop: str) -> Setup:
  """``setup`` with the loop kind ``loop`` ("auto": :func:`ftjax.policy.loop_kind`'s choice)."""
  vmapped = setup.worker_chunk or -(-setup.num_computed // setup.num_devices)
  return dataclasses.replace(setup, loop=policy.loop_kind(loop, setup.kernels, vmapped,
                                                          setup.builtin_model))


def _one_run(compile_runs: Callable) -> Callable:
  """A chunk function over stacked runs, for one state without a runs axis."""
  def add(tree):
    return jax.tree.map(lambda a: a[None], tree)

  def drop(tree):
    return jax.tree.map(lambda a: a[0], tree)

  def add_to_data(data):  # the partition table is per run, so it gets the runs axis too
    return data if data.table is None else data._replace(table=data.table[None],
                                                         sizes=data.sizes[None])

  wrapped = {}  # one wrapper per compiled chunk, so a cached chunk comes back as itself

  def compile_chunk(state, data, length):
    chunk = compile_runs(add(state), add_to_data(data), length)
    if chunk not in wrapped:
      wrapped[chunk] = chunk._replace(
          run=lambda s, d: tuple(map(drop, chunk.run(add(s), add_to_data(d)))))
    return wrapped[chunk]

  return compile_chunk


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


class EvalData(NamedTuple):
  """A split to evaluate on (the test split, or the validation split) on device and the
  batches that cover it once."""
  images: jax.Array    # uint8 [M, H, W, C]
  labels: jax.Array    # int32 [M]
  indices: jax.Array   # int32 [num_batches, batch]; padded entries point at 0
  mask: jax.Array      # bool [num_batches, batch]; False on padded entries


def make_eval_data(dataset: data_lib.Dataset, batch_size: int,
                   split: Optional[data_lib.Validation] = None) -> EvalData:
  """Puts the test split (or ``split``, the validation split ``Setup.validation``) on
  device with the batches of :func:`ftjax.data.eval_batches`."""
  images, labels = ((dataset.test_images, dataset.test_labels) if split is None
                    else (split.images, split.labels))
  batches = data_lib.eval_batches(images.shape[0], batch_size)
  return EvalData(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(batches.indices),
                  jnp.asarray(batches.mask))


def trigger(setup: Setup) -> Optional[poisoning.Trigger]:
  """The run's backdoor trigger, whose attack success rate the evaluation reports; None
  for the other attacks. Reported even with no Byzantine worker (the rate without attack)."""
  found = setup.attack.poisoning
  return found if isinstance(found, poisoning.Trigger) else None


def make_eval_fn(setup: Setup, split: str = "test") -> Callable:
  """``evaluate(params, batch_stats, eval_data) -> {test_loss, test_acc[, test_asr]}``.

  For one run; ``test_asr`` (a backdoor's attack success rate,
  :func:`ftjax.poisoning.asr_counts`) only when the run's attack has a trigger.
  ``split="val"`` names the results ``val_loss`` and ``val_acc`` (the validation
  split's, without the attack success rate).
  """
  ds, stamp = setup.dataset, trigger(setup) if split == "test" else None

  def evaluate(params, batch_stats, data: EvalData):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats

    def logits_of(images):
      x = data_lib.preprocess(images, ds.mean, ds.std, setup.dtype)
      return setup.model.apply(variables, x, train=False)

    def batch_sums(batch):
      idx, mask = batch
      logits, y = logits_of(data.images[idx]), data.labels[idx]
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      sums = (jnp.where(mask, losses, 0).sum(),
              jnp.where(mask, jnp.argmax(logits, -1) == y, False).sum())
      if stamp is None:
        return sums
      return sums + poisoning.asr_counts(logits_of(stamp.stamp(data.images[idx])), y,
                                         stamp.target, mask)

    sums = jax.lax.map(batch_sums, (data.indices, data.mask))
    count = data.mask.sum()
    out = {f"{split}_loss": (sums[0].sum() / count).astype(jnp.float32),
           f"{split}_acc": (sums[1].sum() / count).astype(jnp.float32)}
    if stamp is not None:
      out["test_asr"] = (sums[2].sum() / jnp.maximum(sums[3].sum(), 1)).astype(jnp.float32)
    return out

  return evaluate


def compile_eval(setup: Setup, states: round_lib.TrainState, eval_data: EvalData,
                 programs: ProgramCache, split: str = "test") -> Callable:
  """The evaluation of every run of ``states`` (leading runs axis), compiled and cached;
  ``split`` as :func:`make_eval_fn`."""
  fn = jax.vmap(make_eval_fn(setup, split), in_axes=(0, 0, None))
  key = ("eval", split, eval_identity(setup),
         _signature(states.params, states.batch_stats, eval_data))
  return programs.get(key, lambda: jax.jit(fn).lower(
      states.params, states.batch_stats, eval_data).compile())
