"""The training system: one pure, jit-compiled synchronous round, looped.

Sections, in the order a run uses them:

1. Build and validate: :func:`build` turns a config into a :class:`Setup`
   (data, model, estimator, aggregator, attack, server optimiser), refusing
   bad input with one sentence before anything is compiled.
2. State: :class:`TrainState` and :func:`init_state`.
3. The round: :func:`make_train_step`, the pure function
   ``(state, data, indices) -> (state, metrics)``. Every worker differentiates
   its own loss (a vmapped axis), the estimator turns gradients into updates,
   the attack overwrites the Byzantine rows, the robust aggregator reduces the
   worker axis and the server optax chain takes its step.
4. The loop: :func:`make_chunk_fn` runs the rounds between two evaluations,
   inside one ``lax.scan`` or as a host loop over the jitted round.
5. Evaluation: :func:`make_eval_fn` on the whole test split.
6. The run: :func:`train_and_evaluate`, with metrics, checkpoints and resume.
7. Several runs of one config at once: :func:`train_runs` stacks the states of
   R seeds on a leading runs axis and vmaps the round over it (the sweeps of
   ``ftjax.sweep`` use it); each run keeps its own workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from ftjax import aggregators as aggregators_lib
from ftjax import attacks as attacks_lib
from ftjax import checkpoint as checkpoint_lib
from ftjax import data as data_lib
from ftjax import estimators
from ftjax import kernels
from ftjax import models as models_lib
from ftjax import optim
from ftjax import reporting
from ftjax import sharding
from ftjax.kernels import layers

PyTree = Any

# Sub-streams of the run's root key, one per purpose.
_KEY_INIT, _KEY_DATA, _KEY_AUGMENT, _KEY_ATTACK, _KEY_AGGREGATOR = range(5)

# Config fields that may change between an interrupted run and its resume.
_RESUMABLE_FIELDS = ("num_steps", "eval_every", "wandb", "checkpoint", "progress", "loop",
                     "devices", "mesh")

LOOPS = ("auto", "scan", "host")


class ConfigError(ValueError):
  """A config that cannot run; the message says what to change."""


class TrainingDiverged(FloatingPointError):
  """The honest loss or the model became non-finite; the last good checkpoint is kept."""


RUN_ERRORS = (ConfigError, TrainingDiverged, checkpoint_lib.CheckpointWriteError,
              checkpoint_lib.CheckpointRestoreError, reporting.MetricsWriteError)
"""What a run raises for a problem the user must fix; each message is one line."""


def _close(checkpointer: checkpoint_lib.Checkpointer, reporter: reporting.Reporter,
           failing: bool) -> None:
  """Finishes a run's writes; a failed write must not mask the error already raised."""
  try:
    checkpointer.close()
  except checkpoint_lib.CheckpointWriteError:
    if not failing:
      raise
  finally:
    reporter.close()


# --------------------------------------------------------------------------
# 1. Build and validate
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run, built from its config before compiling."""
  config: ml_collections.ConfigDict
  dataset: data_lib.Dataset
  model: nn.Module
  worker_tx: optax.GradientTransformationExtraArgs
  server_tx: optax.GradientTransformation
  aggregator: aggregators_lib.Aggregator
  attack: attacks_lib.Attack
  num_workers: int     # W
  num_byzantine: int   # workers that attack (workers.byzantine); aggregator.f is the declared f
  batch_size: int      # b, per worker
  dtype: Any
  partition: Optional[data_lib.Partition]  # per-worker shards; None for the i.i.d. split
  mesh: Optional[Mesh] = None  # the workers' gradients are split over it; None: one device
  builtin_model: bool = True   # the model comes from models.MODELS (not the user's own)
  aggregation: str = "replicated"  # config.mesh.aggregation: the aggregator's layout on the mesh
  # The attacks one compiled round serves (a sweep's cells that differ only in
  # their attack), chosen by DeviceData.attack; empty: the round runs ``attack``.
  attacks: tuple = ()

  @property
  def num_honest(self) -> int:
    return self.num_workers - self.num_byzantine

  @property
  def num_computed(self) -> int:
    """Workers whose gradients the step evaluates.

    Omniscient attacks overwrite the Byzantine rows from the honest ones, so
    their gradients would be thrown away: they are not computed.
    """
    if self.num_byzantine and self.attack.uses_own_updates:
      return self.num_workers
    return self.num_honest


def _aggregator_spec(c) -> str:
  meta = (c.aggregator.meta or "none").strip()
  name = c.aggregator.name.strip()
  return name if meta.lower() == "none" else f"{meta}({name})"


def _to_dict(section) -> dict:
  if section is None:
    return {}
  return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def _check_ints(c) -> None:
  for name, value in (("workers.num", c.workers.num), ("workers.byzantine", c.workers.byzantine),
                      ("workers.batch_size", c.workers.batch_size), ("num_steps", c.num_steps),
                      ("eval_every", c.eval_every)):
    if not isinstance(value, int) or isinstance(value, bool):
      raise ConfigError(f"{name} must be an integer, got {value!r}.")
  w, f, b = c.workers.num, c.workers.byzantine, c.workers.batch_size
  if w < 1:
    raise ConfigError(f"workers.num must be at least 1, got {w}.")
  if f < 0:
    raise ConfigError(f"workers.byzantine must be >= 0, got {f}.")
  if 2 * f >= w:
    raise ConfigError(
        f"workers.byzantine={f} with workers.num={w}: robust training needs fewer than "
        f"half of the workers Byzantine (f < W/2); lower workers.byzantine to at most "
        f"{(w - 1) // 2} or raise workers.num to at least {2 * f + 1}.")
  if b < 1:
    raise ConfigError(f"workers.batch_size must be at least 1, got {b}.")
  if c.num_steps < 1 or c.eval_every < 1:
    raise ConfigError("num_steps and eval_every must be at least 1.")


def build(config: ml_collections.ConfigDict, dataset: Optional[data_lib.Dataset] = None,
          model: Optional[nn.Module] = None, *, attacks: Sequence[str] = ()) -> Setup:
  """Validates ``config`` and builds the static parts of a run.

  Args:
    config: a full ftjax config (see ``configs/default.py``).
    dataset: train on these arrays instead of loading ``config.data``
      (notebooks, benchmarks on synthetic data).
    model: train this Flax module instead of ``config.model.name``. It is
      called as ``model.apply(variables, x, train=...)`` on NHWC float inputs
      and returns logits; BatchNorm-style state lives in ``"batch_stats"``.
    attacks: attack names, ``config.attack.name`` among them, for one compiled
      round that serves all of them (:func:`attack_family`): the round picks
      the run's attack with ``lax.switch`` on ``DeviceData.attack``, so runs
      that differ only in their attack share one compilation. Each attack
      takes its options from ``config.attack.options``. Empty: the round
      runs ``config.attack.name`` alone.

  Returns:
    The :class:`Setup`.

  Raises:
    ConfigError: with a sentence saying what to change, for any config that
      cannot run (unknown names, f >= W/2, batch larger than the data, float64
      without 64-bit JAX, ...).
  """
  c = config
  _check_ints(c)
  w, f, b = c.workers.num, c.workers.byzantine, c.workers.batch_size
  chunk = c.workers.get("chunk", None)
  if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0):
    raise ConfigError(f"workers.chunk must be an integer >= 0 (0: all workers at once; None: "
                      f"the backend's choice), "
                      f"got {chunk!r}.")
  if c.dtype not in ("float32", "float64"):
    raise ConfigError(f"dtype must be 'float32' or 'float64', got {c.dtype!r}.")
  if c.dtype == "float64" and not jax.config.read("jax_enable_x64"):
    raise ConfigError("dtype float64 needs 64-bit JAX: build inside `with jax.enable_x64(True):` "
                      "(train_and_evaluate does this itself), or use dtype float32.")
  dtype = jnp.float64 if c.dtype == "float64" else jnp.float32
  if c.optim.clip is not None and c.optim.clip < 0:
    raise ConfigError(f"optim.clip must be positive, or 0 / None for no clipping, got "
                      f"{c.optim.clip}.")
  if c.data.shuffle not in data_lib.SHUFFLES:
    raise ConfigError(f"Unknown data.shuffle {c.data.shuffle!r}; valid: "
                      f"{', '.join(data_lib.SHUFFLES)}.")

  try:  # The libraries' own ValueErrors carry the sentence to show the user.
    _check_loop(c.loop)
    kernels.check(c.kernels)
    mesh = sharding.worker_mesh(c.get("devices", 0))
    aggregation = (c.get("mesh") or {}).get("aggregation", "replicated")
    if aggregation not in sharding.AGGREGATION_LAYOUTS:
      raise ConfigError(f"Unknown mesh.aggregation {aggregation!r}; valid: "
                        f"{', '.join(sharding.AGGREGATION_LAYOUTS)}.")
    # The rule is built for the declared f (aggregator.f); the attack, and the split of
    # the logged diagnostics into honest and Byzantine rows, use the actual count f.
    declared_f = c.aggregator.get("f", None)
    declared_f = f if declared_f is None else declared_f
    if not isinstance(declared_f, int) or isinstance(declared_f, bool) or declared_f < 0:
      raise ConfigError(f"aggregator.f must be an integer >= 0, or None for "
                        f"workers.byzantine, got {declared_f!r}.")
    aggregator = aggregators_lib.make_aggregator(
        _aggregator_spec(c), declared_f, num_workers=w, options=_to_dict(c.aggregator.options),
        kernels=c.kernels)
    attack = _make_attack(c, c.attack.name)
    family = _attack_family(c, attack, attacks, aggregation)
    worker_tx = estimators.make_estimator(c.optim)
    server_tx = optim.make_server_optimizer(c.optim)
    if model is None and c.model.name not in models_lib.MODELS:  # before loading any data
      raise ValueError(f"Unknown model {c.model.name!r}; choose one of: "
                       f"{', '.join(models_lib.MODELS)}.")
    _check_batch_stats_mode(c.model.get("batch_stats", "honest_mean"), builtin=model is None)
    if dataset is None:
      dataset = data_lib.load_dataset(
          c.data.name, path=c.data.path or None, data_dir=c.data.data_dir or None)
    data_lib.check_batch(dataset, w, b)
    partition = data_lib.partition_indices(
        jax.random.fold_in(jax.random.key(c.seed), _KEY_DATA), dataset.train_labels, w,
        scheme=c.data.partition, alpha=c.data.alpha,
        shards_per_worker=c.data.shards_per_worker, gamma=c.data.get("gamma", 0.5))
    if partition is not None:
      data_lib.check_partition(partition, b)
    builtin = model is None
    if builtin:
      model = models_lib.make_model(c.model.name, num_classes=dataset.num_classes, dtype=dtype,
                                    kernels=c.kernels)
    _check_model_fits(model, dataset, dtype, c.model.name if builtin else type(model).__name__,
                      builtin)
  except (ValueError, FileNotFoundError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(str(e)) from None
  return Setup(config=c, dataset=dataset, model=model, worker_tx=worker_tx,
               server_tx=server_tx, aggregator=aggregator, attack=attack,
               num_workers=w, num_byzantine=f, batch_size=b, dtype=dtype,
               partition=partition, mesh=mesh, builtin_model=builtin, aggregation=aggregation,
               attacks=family)


def _make_attack(c, name: str) -> attacks_lib.Attack:
  return attacks_lib.make_attack(name, **_to_dict(c.attack.options.get(
      attacks_lib.canonical_name(name), None)))


def _attack_family(c, attack: attacks_lib.Attack, names: Sequence[str],
                   aggregation: str) -> tuple:
  """The attacks of one compiled round (``build(attacks=...)``), or () for ``attack`` alone."""
  family = tuple(dict.fromkeys(_make_attack(c, name) for name in names))
  if family and attack not in family:
    raise ConfigError(f"build(attacks={list(names)}) must include the run's own attack "
                      f"{c.attack.name!r}.")
  if len(family) < 2:
    return ()
  if len({a.uses_own_updates for a in family}) > 1:
    raise ConfigError(f"The attacks {[a.name for a in family]} cannot share one round: some "
                      f"send the Byzantine workers' own updates and some do not, so their "
                      f"rounds compute different workers (attack_family groups them apart).")
  if aggregation == "sharded":
    raise ConfigError("Attacks share one round only in the replicated layout "
                      "(mesh.aggregation='replicated').")
  return family


def attack_family(names: Sequence[str], num_honest: Optional[int] = None
                  ) -> list[tuple[str, ...]]:
  """Groups attack names into the families that can share one compiled round.

  Attacks that send the Byzantine workers' own updates (``none``, ``lf``,
  ``sf``) and omniscient ones compute different workers, so they never share
  a round; every other pair can (``build(attacks=...)``). An attack that
  needs more than ``num_honest`` honest rows stays alone, so that its error
  cannot stop the others' round. Order is kept.
  """
  groups = {}
  for name in names:
    attack = attacks_lib.make_attack(name)
    alone = num_honest is not None and attack.min_honest > num_honest
    groups.setdefault(name if alone else attack.uses_own_updates, []).append(name)
  return [tuple(g) for g in groups.values()]


def _check_batch_stats_mode(mode: str, builtin: bool) -> None:
  if mode not in models_lib.BATCH_STATS_MODES:
    raise ValueError(f"Unknown model.batch_stats {mode!r}; valid: "
                     f"{', '.join(models_lib.BATCH_STATS_MODES)}.")
  if mode == "sequential" and not builtin:
    # The fold assumes ftjax's BatchNorm momentum, which a model of one's own may not use.
    raise ValueError("model.batch_stats='sequential' needs one of ftjax's models (it assumes "
                     "their BatchNorm momentum, PyTorch's 0.1); with your own model use "
                     "model.batch_stats='honest_mean'.")


def _check_model_fits(model: nn.Module, dataset: data_lib.Dataset, dtype, name: str,
                      builtin: bool) -> None:
  """Refuses images on which the model has a zero-size layer (traced, not compiled)."""
  sample = jax.ShapeDtypeStruct((1,) + dataset.train_images.shape[1:], dtype)
  try:
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), sample)
  except Exception as e:  # pylint: disable=broad-except
    if not builtin:  # a user's own model: its traceback is theirs to read
      raise
    raise ValueError(f"Model {name!r} cannot run on images of shape "
                     f"{list(dataset.train_images.shape[1:])}: {str(e).splitlines()[0]}") from None
  empty = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(shapes)
           if 0 in leaf.shape]
  if empty:
    raise ValueError(f"Images of shape {list(dataset.train_images.shape[1:])} are too small "
                     f"for model {name!r} (the layer {empty[0]} would be empty); use larger "
                     f"images or a smaller model (e.g. model.name='mlp').")


def place(setup: Setup, tree: PyTree) -> PyTree:
  """Puts ``tree`` on ``setup``'s devices, replicated (unchanged with one device).

  The jitted round takes its state and data replicated over the mesh; arrays
  from elsewhere (a restored checkpoint, a notebook) go through this first.
  In the sharded layout (``mesh.aggregation = "sharded"``) a
  :class:`TrainState`'s ``worker_state`` is split over the workers instead,
  its worker axis padded with zero rows to :func:`worker_state_rows` (a state
  with a leading runs axis, :func:`init_states`, is split on its second axis).
  """
  if not (_sharded(setup) and isinstance(tree, TrainState)):
    return sharding.replicate(setup.mesh, tree)
  axis = jnp.ndim(tree.step)  # 1 with a leading runs axis
  worker_state = jax.device_put(
      _pad_workers(tree.worker_state, worker_state_rows(setup), axis),
      sharding.worker_split(setup.mesh, axis))
  return sharding.replicate(setup.mesh, tree._replace(worker_state=()))._replace(
      worker_state=worker_state)


def _sharded(setup: Setup) -> bool:
  """Whether the round runs in the parameter-sharded layout (docs/scaling.md)."""
  return setup.mesh is not None and setup.aggregation == "sharded"


def worker_state_rows(setup: Setup) -> int:
  """Rows of ``TrainState.worker_state`` in the round: the computed workers, padded.

  ``setup.num_computed``; in the sharded layout rounded up to a multiple of
  the device count, so that the rows split evenly over the devices (the
  padding rows are computed and thrown away, and a checkpoint holding them is
  restored into any layout, :meth:`ftjax.checkpoint.Checkpointer.restore_latest`).
  """
  if not _sharded(setup):
    return setup.num_computed
  return sharding.padded_workers(setup.num_computed, setup.mesh.devices.size)


def _pad_workers(tree: PyTree, rows: int, axis: int = 0) -> PyTree:
  """``tree``'s leaves with zero rows appended on ``axis`` up to ``rows`` rows."""
  def pad(a):
    if a.shape[axis] == rows:
      return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, rows - a.shape[axis])
    return jnp.pad(a, widths)
  return jax.tree.map(pad, tree)


# --------------------------------------------------------------------------
# 2. State
# --------------------------------------------------------------------------


class TrainState(NamedTuple):
  """The whole state of a run; a pytree of arrays."""
  step: jax.Array          # int32 []: rounds done so far
  params: PyTree           # the query point x_t (the evaluated model)
  prev_params: PyTree      # x_{t-1} for mu2sgd's second gradient; () otherwise
  batch_stats: PyTree      # BatchNorm running statistics ({} without BatchNorm)
  server_state: PyTree     # server optax state (holds the anchor w_t for mu2sgd)
  worker_state: PyTree     # estimator states stacked on a leading axis [num_computed]
  rng: jax.Array           # uint32 key data of the run's root key


def _purpose_key(state: TrainState, purpose: int) -> jax.Array:
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), purpose)


def init_state(setup: Setup, seed: int) -> TrainState:
  """Initial state: model init, estimator and server states, root key."""
  root = jax.random.key(seed)
  sample = jnp.zeros((1,) + setup.dataset.train_images.shape[1:], setup.dtype)
  variables = setup.model.init(jax.random.fold_in(root, _KEY_INIT), sample, train=False)
  params = variables["params"]
  needs_prev = estimators.needs_previous_gradient(setup.config.optim.estimator)
  worker_state = jax.vmap(setup.worker_tx.init, in_axes=None,
                          axis_size=setup.num_computed)(params)
  return TrainState(
      step=jnp.zeros([], jnp.int32), params=params,
      prev_params=jax.tree.map(jnp.array, params) if needs_prev else (),
      batch_stats=variables.get("batch_stats", {}), server_state=setup.server_tx.init(params),
      worker_state=worker_state, rng=jax.random.key_data(root))


# --------------------------------------------------------------------------
# 3. One round
# --------------------------------------------------------------------------


class DeviceData(NamedTuple):
  """The training split, resident on device; the step gathers from it."""
  images: jax.Array   # uint8 [N, H, W, C]
  labels: jax.Array   # int32 [N]
  table: Optional[jax.Array] = None  # int32 [W, S] per-worker shards (non-i.i.d.), or None
  sizes: Optional[jax.Array] = None  # int32 [W] shard sizes
  attack: Optional[jax.Array] = None  # int32 []: the run's attack in Setup.attacks, or None


def make_device_data(setup: Setup) -> DeviceData:
  """Puts the training split (and the per-worker partition, if any) on device."""
  ds, partition = setup.dataset, setup.partition
  images, labels = jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels)
  attack = (jnp.asarray(setup.attacks.index(setup.attack), jnp.int32) if setup.attacks
            else None)
  if partition is None:
    return DeviceData(images, labels, attack=attack)
  return DeviceData(images, labels, jnp.asarray(partition.table), jnp.asarray(partition.sizes),
                    attack)


def sample_chunk(setup: Setup, state: TrainState, data: DeviceData, length: int) -> jax.Array:
  """The workers' example indices for the ``length`` rounds from ``state.step``: [length, W, b]."""
  key = _purpose_key(state, _KEY_DATA)
  shuffle = setup.config.data.shuffle
  if data.table is not None:
    steps = state.step + jnp.arange(length, dtype=jnp.int32)
    return jax.vmap(lambda s: data_lib.worker_round_indices(
        key, s, data.table, data.sizes, setup.batch_size, shuffle=shuffle))(steps)
  return data_lib.chunk_indices(key, state.step, length, setup.dataset.train_images.shape[0],
                                setup.num_workers, setup.batch_size, shuffle=shuffle)


def make_loss_fn(model: nn.Module) -> Callable:
  """One worker's loss on its minibatch: ``(params, stats, x, y) -> (loss, aux)``."""

  def loss_fn(params, batch_stats, x, y):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    logits, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, mutated.get("batch_stats", {}))

  return loss_fn


def summarize_diagnostics(diagnostics: dict, num_honest: int) -> dict:
  """Turns an aggregator's diagnostics into scalars for logging.

  Scalars pass through; a per-worker vector ``v`` [W] becomes
  ``v_honest`` and ``v_byzantine``, its sums over the honest and the Byzantine
  rows (e.g. how many Byzantine rows CTMA kept).
  """
  out = {}
  for name, value in diagnostics.items():
    value = jnp.asarray(value)
    if value.ndim == 0:
      out[name] = value.astype(jnp.float32)
    elif value.ndim == 1:
      value = value.astype(jnp.float32)
      out[f"{name}_honest"] = value[:num_honest].sum()
      out[f"{name}_byzantine"] = value[num_honest:].sum()
  return out


def make_worker_gradients(setup: Setup, split: bool = True) -> Callable:
  """``(params, batch_stats, prev_params, x, y) -> (out, prev_grads, prev_stats)``.

  ``x`` [n, b, ...] and ``y`` [n, b] are the n computed workers' minibatches;
  ``out = ((loss, (logits, stats)), grads)`` has a leading worker axis, and
  ``prev_grads`` and ``prev_stats`` are the same workers' gradients and updated
  running statistics at ``prev_params`` on the same minibatches (mu2sgd's
  second pass), or None when ``prev_params`` is None.
  With a mesh, the worker axis is split over its devices
  (:func:`ftjax.sharding.split_over_workers`); ``split=False`` returns the
  one-device function anyway (for a caller already inside ``shard_map``).

  With a chunk size k (:func:`worker_chunk`), the workers go through a
  ``lax.map`` in chunks of k, each chunk a vmap over its k workers (the last
  one takes the remainder), so that only k workers' activations are live at a
  time: the same per-worker values, with peak memory bounded in W.
  """
  value_and_grad = jax.value_and_grad(make_loss_fn(setup.model), has_aux=True)

  def passes(grads, params, batch_stats, prev_params, x, y):
    out = grads(params, batch_stats, x, y)
    if prev_params is None:
      return out, None, None
    (_, (_, prev_stats)), prev_grads = grads(prev_params, batch_stats, x, y)
    return out, prev_grads, prev_stats

  def both(params, batch_stats, prev_params, x, y):
    chunk = worker_chunk(setup, x.shape[0])  # x.shape[0]: the workers of this device
    if 0 < chunk < x.shape[0]:
      # lax.map vmaps the one-worker passes over each chunk of workers in turn.
      return jax.lax.map(lambda xy: passes(value_and_grad, params, batch_stats, prev_params,
                                           *xy), (x, y), batch_size=chunk)
    return passes(jax.vmap(value_and_grad, in_axes=(None, None, 0, 0)), params, batch_stats,
                  prev_params, x, y)

  if setup.mesh is None or not split:
    return both
  return sharding.split_over_workers(both, setup.mesh, num_shared=3)


def update_batch_stats(mode: str, old: PyTree, stats: PyTree, prev_stats: Optional[PyTree],
                       num_honest: int) -> PyTree:
  """The running BatchNorm statistics after a round (``model.batch_stats``; docs/data.md).

  Args:
    mode: "honest_mean": the mean of the honest workers' updated statistics,
      one EMA step with their mean batch statistics; "sequential": the
      original program's, every computed worker's pass folded into the EMA one
      after another in worker order, each worker's pass at x_t followed by its
      mu2sgd pass at x_{t-1} (:func:`ftjax.models.fold_batch_stats`).
    old: the running statistics the round started from.
    stats: [n, ...] each computed worker's updated statistics after its pass at x_t.
    prev_stats: [n, ...] the same after its pass at x_{t-1}, or None.
    num_honest: h; the first h workers are honest.

  Returns:
    The new running statistics, like ``old``.
  """
  if mode == "honest_mean":
    return jax.tree.map(lambda s: s[:num_honest].mean(0), stats)
  passes = stats
  if prev_stats is not None:  # [n, 2, ...] -> [2n, ...]: worker 0 at x_t, at x_{t-1}, worker 1 ...
    passes = jax.tree.map(lambda a, b: jnp.stack([a, b], 1).reshape((-1,) + a.shape[1:]),
                          stats, prev_stats)
  return models_lib.fold_batch_stats(old, models_lib.batch_stats_of_pass(old, passes))


def make_train_step(setup: Setup) -> Callable:
  """The pure synchronous round ``(state, data, indices) -> (state, metrics)``.

  ``indices`` int32 [W, b] are the workers' examples of this round (one entry
  of :func:`sample_chunk`); without them the round samples its own. In the
  sharded layout the returned ``worker_state`` has :func:`worker_state_rows`
  rows, split over the workers.
  """
  c = setup.config
  ds = setup.dataset
  f, h, n = setup.num_byzantine, setup.num_honest, setup.num_computed
  clip = c.optim.clip or None  # 0 (typeable on the command line) or None: no clipping
  needs_prev = estimators.needs_previous_gradient(c.optim.estimator)
  worker_gradients = make_worker_gradients(setup)
  aggregate_rows = setup.aggregator
  clip_rows = jax.vmap(functools.partial(estimators.clip_by_global_norm, max_norm=clip))
  attack_ctx = attacks_lib.AttackContext(num_byzantine=f, aggregator=setup.aggregator,
                                         num_classes=ds.num_classes)

  def worker_update(grads, worker_state, prev_grads):
    if needs_prev:
      return setup.worker_tx.update(grads, worker_state, prev_grads=prev_grads)
    return setup.worker_tx.update(grads, worker_state)

  sharded_round = (_make_sharded_round(setup, clip_rows, worker_update, attack_ctx)
                   if _sharded(setup) else None)

  def train_step(state: TrainState, data: DeviceData, idx: Optional[jax.Array] = None):
    step = state.step
    if idx is None:
      idx = sample_chunk(setup, state, data, 1)[0]

    # Each computed worker's minibatch; Byzantine label flippers flip theirs.
    idx = idx[:n]
    x = data.images[idx]  # uint8 [n, b, H, W, C]
    if ds.augment == "crop_flip":
      # On the raw pixels, so the padding is black as in torchvision.
      x = data_lib.augment_crop_flip(jax.random.fold_in(_purpose_key(state, _KEY_AUGMENT), step), x)
    x = data_lib.preprocess(x, ds.mean, ds.std, setup.dtype)
    y = data.labels[idx]
    members = setup.attacks or (setup.attack,)
    if f and any(a.flips_labels for a in members):
      # In a round for several attacks, whether this run's attack flips is an index away.
      flips = (jnp.asarray([a.flips_labels for a in members])[data.attack] if setup.attacks
               else True)
      y = y.at[h:].set(jnp.where(flips, attacks_lib.flip_labels(y[h:], ds.num_classes), y[h:]))

    if sharded_round is not None:
      # The same workers, attack and aggregator in the parameter-sharded layout.
      (aggregate, diagnostics, (loss, logits, new_stats, prev_stats),
       worker_state) = sharded_round(state, x, y)
    else:
      # Workers: clipped gradients, then the estimator (mu2sgd needs x_{t-1} too).
      ((loss, (logits, new_stats)), grads), prev_grads, prev_stats = worker_gradients(
          state.params, state.batch_stats, state.prev_params if needs_prev else None, x, y)
      grads = clip_rows(grads)
      if needs_prev:
        prev_grads = clip_rows(prev_grads)
      updates, worker_state = jax.vmap(worker_update)(grads, state.worker_state, prev_grads)

      # Byzantine rows: the attack sees the honest updates (and its own, if it uses them).
      honest = jax.tree.map(lambda u: u[:h], updates)
      if f:
        own = jax.tree.map(lambda u: u[h:], updates) if setup.attack.uses_own_updates else None
        key = jax.random.fold_in(_purpose_key(state, _KEY_ATTACK), step)
        if setup.attacks:  # one round for several runs' attacks: this run's, by index
          byzantine = jax.lax.switch(
              data.attack, [functools.partial(a, ctx=attack_ctx) for a in setup.attacks],
              honest, own, key)
        else:
          byzantine = setup.attack(honest, own, key, attack_ctx)
        rows = jax.tree.map(lambda a, z: jnp.concatenate([a, z.astype(a.dtype)]), honest,
                            byzantine)
      else:
        rows = honest

      # Server: robust aggregate, then the server optax chain.
      key = jax.random.fold_in(_purpose_key(state, _KEY_AGGREGATOR), step)
      aggregate, diagnostics = aggregate_rows(rows, key)
    server_updates, server_state = setup.server_tx.update(
        aggregate, state.server_state, state.params)
    params = optax.apply_updates(state.params, server_updates)
    batch_stats = update_batch_stats(c.model.get("batch_stats", "honest_mean"),
                                     state.batch_stats, new_stats, prev_stats, h)

    metrics = {
        "train_loss": loss[:h].mean().astype(jnp.float32),
        "train_acc": (jnp.argmax(logits[:h], -1) == y[:h]).mean(dtype=jnp.float32),
        "aggregate_norm": optax.tree.norm(aggregate).astype(jnp.float32),
        **summarize_diagnostics(diagnostics, h),
    }
    new_state = TrainState(
        step=step + 1, params=params, prev_params=state.params if needs_prev else (),
        batch_stats=batch_stats, server_state=server_state,
        worker_state=worker_state, rng=state.rng)
    if sharded_round is not None:
      # The layout place() gives, which the host loop's compiled round takes back.
      new_state = sharding.constrain_replicated(setup.mesh, new_state._replace(
          worker_state=()))._replace(worker_state=jax.lax.with_sharding_constraint(
              worker_state, sharding.worker_split(setup.mesh)))
    return new_state, metrics

  return train_step


def _make_sharded_round(setup: Setup, clip_rows: Callable, worker_update: Callable,
                        attack_ctx: attacks_lib.AttackContext) -> Callable:
  """The middle of the round in the parameter-sharded layout (docs/scaling.md).

  ``fn(state, x, y) -> (aggregate, diagnostics, (loss, logits, stats,
  prev_stats), worker_state)``: each device differentiates, clips and runs
  the estimator for its own workers with their own rows of
  ``state.worker_state``; one all-to-all gives every device all workers'
  updates for its slice of the coordinates, where the attack and the
  aggregator run (:func:`ftjax.sharding.shard_round`); the d-value aggregate
  and the per-worker losses, logits and BatchNorm statistics come back
  replicated, the new ``worker_state`` split over the workers
  (:func:`worker_state_rows` rows).
  """
  mesh = setup.mesh
  f, h, n = setup.num_byzantine, setup.num_honest, setup.num_computed
  rows_total = worker_state_rows(setup)
  num_devices = mesh.devices.size
  needs_prev = estimators.needs_previous_gradient(setup.config.optim.estimator)
  gradients = make_worker_gradients(setup, split=False)
  attack = setup.attack

  def worker_fn(shared, per_worker):
    params, batch_stats, prev_params = shared
    x, y, worker_state = per_worker
    ((loss, (logits, stats)), grads), prev_grads, prev_stats = gradients(
        params, batch_stats, prev_params, x, y)
    grads = clip_rows(grads)
    if needs_prev:
      prev_grads = clip_rows(prev_grads)
    updates, worker_state = jax.vmap(worker_update)(grads, worker_state, prev_grads)
    return updates, (loss, logits, stats, prev_stats), worker_state

  def fn(state: TrainState, x: jax.Array, y: jax.Array):
    step = state.step
    attack_key = jax.random.fold_in(_purpose_key(state, _KEY_ATTACK), step)
    aggregator_key = jax.random.fold_in(_purpose_key(state, _KEY_AGGREGATOR), step)
    sizes = [math.prod(p.shape) for p in jax.tree.leaves(state.params)]
    # The attack's random values (gaussian) are drawn for the whole rows, so
    # they are the ones one device draws, and laid out by coordinates like the
    # rows; with partitionable threefry (JAX's default) each value depends on
    # its index alone and XLA generates each device's slice in place.
    honest_shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct((h,) + p.shape, p.dtype),
                                 state.params)
    draws = attack.draw(honest_shapes, attack_key, attack_ctx) if f else None
    draws_def = None if draws is None else jax.tree.structure(draws)
    extras = [] if draws is None else sharding.shard_rows(draws, mesh, sharding.WORKER_AXIS)

    def coordinate_fn(rows, extras, keys):
      attack_key, aggregator_key = keys
      honest = jax.tree.map(lambda u: u[:h], rows)
      if not f:
        return setup.aggregator(honest, aggregator_key)
      own = jax.tree.map(lambda u: u[h:], rows) if attack.uses_own_updates else None
      local_draws = None if draws_def is None else jax.tree.unflatten(draws_def, extras)
      byzantine = attack(honest, own, attack_key, attack_ctx, draws=local_draws)
      # The zero columns that pad a leaf stay zero (an inf or nan attack fills them).
      byzantine = jax.tree.map(
          lambda z, size: z if size % num_devices == 0 else jnp.where(
              sharding.column_mask(z.shape[1], size, sharding.WORKER_AXIS), z,
              jnp.zeros((), z.dtype)),
          byzantine, jax.tree.unflatten(jax.tree.structure(byzantine), sizes))
      rows = jax.tree.map(lambda a, z: jnp.concatenate([a, z.astype(a.dtype)]), honest,
                          byzantine)
      return setup.aggregator(rows, aggregator_key)

    round_fn = sharding.shard_round(worker_fn, coordinate_fn, mesh, num_rows=n)
    worker_state = _pad_workers(state.worker_state, rows_total)
    x, y = sharding.repeat_workers((x, y), rows_total)
    aggregate, diagnostics, gathered, worker_state = round_fn(
        (state.params, state.batch_stats, state.prev_params if needs_prev else None),
        (x, y, worker_state), extras, (attack_key, aggregator_key))
    return aggregate, diagnostics, jax.tree.map(lambda g: g[:n], gathered), worker_state

  return fn


# --------------------------------------------------------------------------
# 4. The loop between evaluations
# --------------------------------------------------------------------------


def worker_chunk(setup: Setup, num_workers: int) -> int:
  """Workers differentiated at once on a device that computes ``num_workers``.

  ``workers.chunk`` when set (0: all at once); unset (None), the backend's
  choice, :func:`ftjax.kernels.layers.worker_chunk` (on CPU with the cpu
  kernels, chunks of 16 above 64 workers). 0 or a chunk of at least ``num_workers`` means one vmap.
  """
  chunk = setup.config.workers.get("chunk", None)
  if chunk is None:
    chunk = layers.worker_chunk(setup.config.kernels, num_workers)
  return chunk if 0 < chunk < num_workers else 0


def _check_loop(loop: str) -> None:
  if loop not in LOOPS:
    raise ValueError(f"Unknown loop {loop!r}; valid: {', '.join(LOOPS)}.")


def resolve_loop(setup: Setup, loop: str = "auto") -> str:
  """The chunk loop: "scan" (rounds inside one ``lax.scan``) or "host".

  "auto" scans, except on CPU when the round's convolutions would not all be
  plain forward convolutions (``kernels.layers.scan_friendly``): inside a loop
  body XLA:CPU runs the others on a slow generic path, while a host loop over
  the jitted, donated round keeps its fast convolution library. A user's own
  model is not known to be scan-friendly, so on CPU it takes the host loop.
  """
  _check_loop(loop)
  if loop != "auto":
    return loop
  if jax.default_backend() != "cpu":
    return "scan"
  workers = -(-setup.num_computed // (setup.mesh.devices.size if setup.mesh else 1))
  chunk = worker_chunk(setup, workers)
  if chunk:  # the vmapped worker axis is one chunk (make_worker_gradients)
    workers = chunk
  friendly = setup.builtin_model and layers.scan_friendly(setup.config.kernels, workers)
  return "scan" if friendly else "host"


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))


class CompiledChunk(NamedTuple):
  """``run(state, data) -> (state, mean metrics)`` for one chunk length."""
  run: Callable
  flops_per_step: float    # XLA's cost analysis of one round
  memory_bytes: float      # XLA's memory analysis (arguments + outputs + temporaries)
  loop: str                # "scan" or "host"


def _cost(compiled) -> tuple[float, float]:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = float((analysis or {}).get("flops", float("nan")))
  mem = compiled.memory_analysis()
  memory = (float(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                  + mem.output_size_in_bytes) if mem is not None else float("nan"))
  return flops, memory


def _run_data_axes(data: DeviceData):
  """vmap axes of the data over a runs axis: shared, except a per-run partition."""
  return None if data.table is None else DeviceData(None, None, 0, 0, None)


def compile_lowered(lowered, programs: Optional[dict] = None):
  """``lowered.compile()``, or a program compiled before from the same HLO.

  ``programs`` (a dict the caller keeps) maps a lowering's text and argument
  structure to its executable, so that runs whose programs are identical
  (e.g. the batches of one sweep cell) share one compilation.
  """
  if programs is None:
    return lowered.compile()
  key = hashlib.sha256(
      f"{lowered.in_tree}|{lowered.out_tree}|{lowered.as_text()}".encode()).hexdigest()
  if key not in programs:
    programs[key] = lowered.compile()
  return programs[key]


def num_compiled(programs: dict) -> int:
  """The executables in a ``programs`` dict (:func:`compile_lowered`).

  :func:`train_runs` also keeps its traced chunk functions there, under tuple
  keys; they are not compilations.
  """
  return sum(isinstance(key, str) for key in programs)


def make_chunk_fn(setup: Setup, loop: str = "auto", *, runs: bool = False,
                  programs: Optional[dict] = None,
                  runs_layout: Optional[str] = None) -> Callable:
  """``compile(state, data, length) -> CompiledChunk``: the rounds between evaluations.

  With "scan" the ``length`` rounds run inside one jitted ``lax.scan``; with
  "host" a Python loop dispatches the jitted round ``length`` times without
  waiting for it; "auto" picks one (:func:`resolve_loop`). Either way the
  state buffers are donated, the example indices of the whole chunk are drawn
  on device first, and the returned metrics are the means over the chunk plus
  ``finite`` (whether the new parameters are all finite). The chunk is
  compiled ahead of time, so that the caller can report compile time and XLA's
  cost analysis; a length compiled before is returned from a cache.

  With ``runs=True`` the state has a leading runs axis R (several seeds of one
  config, :func:`init_states`): the round is vmapped over it, the data is
  shared (except a per-worker partition, which depends on the seed), and
  every metric has shape [R]. ``runs_layout`` says how the runs share the
  program: "vmap", "map" (looped inside it) or "unroll" (one copy of the round
  per run); None: the backend's choice for R runs,
  :func:`ftjax.kernels.layers.runs_layout` (runs spread over devices need the
  vmap). ``programs`` is passed to
  :func:`compile_lowered`.
  """
  if runs_layout is not None and runs_layout not in layers.RUNS_LAYOUTS:
    raise ValueError(f"Unknown runs_layout {runs_layout!r}; valid: "
                     f"{', '.join(layers.RUNS_LAYOUTS)}.")
  resolved = resolve_loop(setup, loop)
  train_step = make_train_step(setup)
  mesh = setup.mesh
  cache = {}
  finite = jax.vmap(_all_finite) if runs else _all_finite

  def sample(state, data, length):
    if not runs:
      return sample_chunk(setup, state, data, length)
    indices = jax.vmap(lambda s, d: sample_chunk(setup, s, d, length),
                       in_axes=(0, _run_data_axes(data)))(state, data)
    return jnp.swapaxes(indices, 0, 1)  # [length, R, W, b]: rounds lead, as without runs

  def step_fn(state, data, idx):
    if not runs:
      return train_step(state, data, idx)
    layout = runs_layout or layers.runs_layout(idx.shape[0])
    if layout == "vmap":
      return jax.vmap(train_step, in_axes=(0, _run_data_axes(data), 0))(state, data, idx)
    if layout == "unroll":  # one copy of the round per run, independent of the others
      outs = [train_step(jax.tree.map(lambda a: a[r], state),
                         data if data.table is None else data._replace(
                             table=data.table[r], sizes=data.sizes[r]), idx[r])
              for r in range(idx.shape[0])]
      return jax.tree.map(lambda *a: jnp.stack(a), *outs)
    # The runs one after another inside the one program (a loop, not a vmap).
    if data.table is None:
      return jax.lax.map(lambda a: train_step(a[0], data, a[1]), (state, idx))
    return jax.lax.map(lambda a: train_step(a[0], data._replace(table=a[2], sizes=a[3]), a[1]),
                       (state, idx, data.table, data.sizes))

  def scan_chunk(state, data, length):
    indices = sample(state, data, length)
    state, metrics = jax.lax.scan(lambda s, idx: step_fn(s, data, idx), state, indices)
    metrics = jax.tree.map(lambda m: m.mean(0), metrics)
    metrics["finite"] = finite(state.params)
    return state, metrics

  def one_round(state, data, indices, i):
    return step_fn(state, data, indices[i])

  def summarize(state, metrics):
    metrics = jax.tree.map(lambda *m: jnp.stack(m).mean(0), *metrics)
    metrics["finite"] = finite(state.params)
    return metrics

  def compile_scan(state, data, length):
    compiled = compile_lowered(jax.jit(scan_chunk, static_argnums=2, donate_argnums=0).lower(
        state, data, length), programs)
    # XLA's cost analysis counts a while loop's body once, i.e. one round.
    return CompiledChunk(lambda s, d: compiled(place(setup, s), place(setup, d)),
                         *_cost(compiled), "scan")

  def compile_host(state, data, length):
    sampler = compile_lowered(jax.jit(sample, static_argnums=2).lower(
        state, data, length), programs)
    indices = sharding.replicated_struct(mesh, jax.eval_shape(
        functools.partial(sample, length=length), state, data))
    step = compile_lowered(jax.jit(one_round, donate_argnums=0).lower(
        state, data, indices, jnp.int32(0)), programs)
    _, step_metrics = jax.eval_shape(one_round, state, data, indices, jnp.int32(0))
    summary = compile_lowered(jax.jit(summarize).lower(state, [step_metrics] * length),
                              programs)

    def run(state, data):
      state, data = place(setup, state), place(setup, data)
      idx = sampler(state, data)
      metrics = []
      for i in range(length):
        state, m = step(state, data, idx, jnp.int32(i))
        if mesh is not None and len(metrics) >= sharding.MAX_ROUNDS_IN_FLIGHT - 1:
          jax.block_until_ready(metrics[-1])
        metrics.append(m)
      return state, summary(state, metrics)

    return CompiledChunk(run, *_cost(step), "host")

  def compile_chunk(state, data, length):
    if length not in cache:
      # With a mesh, the compiled chunk takes replicated inputs; run() places them.
      state, data = place(setup, state), place(setup, data)
      build_chunk = compile_scan if resolved == "scan" else compile_host
      cache[length] = build_chunk(state, data, length)
    return cache[length]

  return compile_chunk


# --------------------------------------------------------------------------
# 5. Evaluation
# --------------------------------------------------------------------------


class EvalData(NamedTuple):
  """The test split on device and the batches that cover it once."""
  images: jax.Array    # uint8 [M, H, W, C]
  labels: jax.Array    # int32 [M]
  indices: jax.Array   # int32 [num_batches, batch]; padded entries point at 0
  mask: jax.Array      # bool [num_batches, batch]; False on padded entries


def make_eval_data(dataset: data_lib.Dataset, batch_size: int) -> EvalData:
  """Puts the test split on device with the batches of :func:`ftjax.data.eval_batches`."""
  batches = data_lib.eval_batches(dataset.test_images.shape[0], batch_size)
  return EvalData(jnp.asarray(dataset.test_images), jnp.asarray(dataset.test_labels),
                  jnp.asarray(batches.indices), jnp.asarray(batches.mask))


def make_eval_fn(setup: Setup) -> Callable:
  """``evaluate(params, batch_stats, eval_data) -> {test_loss, test_acc}``, jitted."""
  ds = setup.dataset

  def evaluate(params, batch_stats, data: EvalData):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats

    def batch_sums(batch):
      idx, mask = batch
      x = data_lib.preprocess(data.images[idx], ds.mean, ds.std, setup.dtype)
      logits = setup.model.apply(variables, x, train=False)
      y = data.labels[idx]
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return jnp.where(mask, losses, 0).sum(), jnp.where(mask, jnp.argmax(logits, -1) == y,
                                                         False).sum()

    losses, correct = jax.lax.map(batch_sums, (data.indices, data.mask))
    count = data.mask.sum()
    return {"test_loss": (losses.sum() / count).astype(jnp.float32),
            "test_acc": (correct.sum() / count).astype(jnp.float32)}

  return jax.jit(evaluate)


# --------------------------------------------------------------------------
# 6. The run
# --------------------------------------------------------------------------


def _check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as fh:
      fh.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"Cannot write to workdir {workdir!r} ({e.strerror}); pass a "
                      f"writable --workdir.") from None


def _comparable(config_dict: dict) -> dict:
  return {k: v for k, v in config_dict.items() if k not in _RESUMABLE_FIELDS}


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
  keys = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      keys += _diff_keys(va, vb, f"{prefix}{k}.")
    elif va != vb:
      keys.append(prefix + k)
  return keys


def _check_resume_config(workdir: str, config: ml_collections.ConfigDict) -> None:
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
        f"(fields {', '.join(_diff_keys(saved, now))} differ); resume it with the same config "
        f"or use another --workdir.")


def _diverged(config, workdir: str, step: int, length: int, metrics: dict) -> TrainingDiverged:
  """The error for a chunk from ``step`` whose loss or model is not finite."""
  kept = (f"The last good checkpoint (step {step}) is kept in {workdir}"
          if step > 0 and config.checkpoint.enabled else "No checkpoint was written")
  return TrainingDiverged(
      f"Training diverged between steps {step} and {step + length}: the honest "
      f"workers' loss is {metrics['train_loss']} and the model is "
      f"{'finite' if metrics['finite'] else 'not finite'}. {kept}; lower optim.lr, "
      f"enable optim.clip, or use a robust aggregator.")


def _evaluation_row(step: int, metrics: dict, evaluation: dict, wall_time: float,
                    steps_per_sec: float) -> dict:
  """One row of metrics.csv: the chunk's training means, the evaluation, the timing."""
  return {"step": step, **{k: float(v) for k, v in metrics.items() if k != "finite"},
          **{k: float(v) for k, v in evaluation.items()},
          "wall_time": wall_time, "steps_per_sec": steps_per_sec}


def _record(reporter: reporting.Reporter, checkpointer: checkpoint_lib.Checkpointer,
            row: dict, meta: dict, state: TrainState) -> dict:
  """Writes an evaluation row, then the latest (and, when it is the best, the best)
  checkpoint; returns the checkpoints' bookkeeping. The row goes first: a crash
  between the two leaves a row past the checkpoint, which a resume drops."""
  reporter.write(row)
  meta = {"best_test_acc": max(meta["best_test_acc"], row["test_acc"]),
          "wall_time": row["wall_time"]}
  checkpointer.save("latest", row["step"], state, meta)
  if row["test_acc"] >= meta["best_test_acc"]:
    checkpointer.save("best", row["step"], state, meta)
  return meta


class TrainResult(NamedTuple):
  """What :func:`train_and_evaluate` returns."""
  state: TrainState    # the final state (model, estimator and server states, step)
  metrics: dict        # the last evaluation row (step, train/test loss and accuracy, ...)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: Optional[data_lib.Dataset] = None,
                       model: Optional[nn.Module] = None) -> TrainResult:
  """Runs (or resumes) one training run.

  A float64 config runs inside ``jax.enable_x64(True)``; nothing outside the
  call is changed.

  Args:
    config: the run's config.
    workdir: output directory (config.json, metrics.csv/.jsonl, checkpoints/).
      If it already holds a checkpoint of the same config, training resumes.
    dataset: optional in-memory dataset overriding ``config.data``.
    model: optional Flax module overriding ``config.model.name`` (see :func:`build`).

  Returns:
    The final state and the last evaluation row.
  """
  x64 = jax.enable_x64(True) if config.dtype == "float64" else contextlib.nullcontext()
  with x64:
    return _train_and_evaluate(config, workdir, dataset, model)


def _train_and_evaluate(config, workdir, dataset, model) -> TrainResult:
  # Build and validate everything before compiling anything.
  _check_workdir(workdir)
  _check_resume_config(workdir, config)
  setup = build(config, dataset, model)
  with open(os.path.join(workdir, "config.json"), "w") as fh:
    fh.write(config.to_json(indent=2))

  state = init_state(setup, config.seed)
  checkpointer = checkpoint_lib.Checkpointer(workdir, enabled=config.checkpoint.enabled)
  meta = {"best_test_acc": -1.0, "wall_time": 0.0}
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state, meta = restored
  start_step = int(state.step)

  state = place(setup, state)
  train_data = place(setup, make_device_data(setup))
  eval_data = place(setup, make_eval_data(setup.dataset, config.data.eval_batch_size))
  chunk_fn = make_chunk_fn(setup, config.loop)
  eval_fn = make_eval_fn(setup)
  reporter = reporting.Reporter(
      workdir, total_steps=config.num_steps, start_step=start_step,
      wandb_config=config.wandb, run_config=json.loads(config.to_json()),
      show_progress=config.progress)
  if restored is not None:
    reporter.note(f"Resumed from the checkpoint at step {start_step} in {workdir}.")
  if setup.mesh is not None:
    reporter.note(f"The workers' gradients are split over {setup.mesh.devices.size} "
                  f"{jax.default_backend().upper()} devices; the aggregation is "
                  f"{setup.aggregation}.")

  compiled_lengths = set()  # at most two: eval_every and a shorter last chunk

  def compiled_chunk(length):
    tic = time.perf_counter()
    run = chunk_fn(state, train_data, length).run
    if length not in compiled_lengths:
      compiled_lengths.add(length)
      reporter.note(f"Compiled a chunk of {length} rounds in {time.perf_counter() - tic:.1f} s.")
    return run

  row = reporter.rows[-1] if reporter.rows else {}
  wall_start = time.perf_counter() - meta["wall_time"]
  try:
    while int(state.step) < config.num_steps:
      step = int(state.step)
      length = min(config.eval_every - step % config.eval_every, config.num_steps - step)
      run_chunk = compiled_chunk(length)
      tic = time.perf_counter()
      new_state, metrics = run_chunk(state, train_data)
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - tic
      if not (metrics["finite"] and np.isfinite(metrics["train_loss"])):
        raise _diverged(config, workdir, step, length, metrics)
      state = new_state
      reporter.advance(length)
      evaluation = jax.device_get(eval_fn(state.params, state.batch_stats, eval_data))
      row = _evaluation_row(step + length, metrics, evaluation,
                            time.perf_counter() - wall_start, length / elapsed)
      meta = _record(reporter, checkpointer, row, meta, state)
  except BaseException:
    _close(checkpointer, reporter, failing=True)
    raise
  _close(checkpointer, reporter, failing=False)
  return TrainResult(state, row)


# --------------------------------------------------------------------------
# 7. Several runs of one config at once
# --------------------------------------------------------------------------


def init_states(setup: Setup, seeds) -> TrainState:
  """:func:`init_state` for several seeds, stacked on a leading runs axis [R]."""
  return jax.vmap(lambda seed: init_state(setup, seed))(jnp.asarray(seeds))


@jax.jit
def _take_runs(tree: PyTree, index: jax.Array) -> PyTree:
  """The runs ``index`` (an int, or an int array for a new runs axis) of a stacked tree."""
  return jax.tree.map(lambda a: a[index], tree)


@jax.jit
def _where_runs(keep: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """Per run, ``new`` where ``keep`` [R] is True, else ``old``."""
  return jax.tree.map(
      lambda a, b: jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


class RunResult(NamedTuple):
  """What :func:`train_runs` returns for each run."""
  workdir: str
  metrics: dict                # the last evaluation row ({} when there is none)
  error: Optional[Exception]   # the ConfigError or TrainingDiverged that stopped it, or None
  state: Optional[TrainState] = None  # the final state of a run that finished


RUNS_AXIS = "runs"
"""The mesh axis :func:`train_runs` spreads its runs over."""


def runs_mesh(devices: int = 1) -> Optional[jax.sharding.Mesh]:
  """The one-axis mesh (axis :data:`RUNS_AXIS`) of the first ``devices`` local devices.

  Args:
    devices: how many local devices (0 = all of them).

  Returns:
    The mesh, or None for a single device.

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


def train_runs(configs: list, workdirs: list, dataset: Optional[data_lib.Dataset] = None,
               model: Optional[nn.Module] = None, *, programs: Optional[dict] = None,
               on_rounds: Optional[Callable[[int], None]] = None,
               note: Optional[Callable[[str], None]] = None,
               devices: int = 1, attacks: Sequence[str] = ()) -> list[Optional[RunResult]]:
  """Runs (or resumes) R runs of one config that differ only in their seed, as one program.

  The runs' states are stacked on a leading runs axis and the round is
  vmapped over it (:func:`make_chunk_fn` with ``runs=True``); the seed enters
  through ``state.rng``. Each run writes its own workdir as
  :func:`train_and_evaluate` does (config.json, metrics, checkpoints of its own
  slice of the state), so every run can be resumed or inspected alone.

  A ``None`` config is an empty slot: it keeps the runs axis at R, so that a
  smaller last batch of seeds reuses the compiled program, and it computes a
  discarded copy of another run. A run that fails (a config error for its
  seed, or :class:`TrainingDiverged`) gets its error in its result and its slot
  computes copies from then on, while the other runs go on.

  On resume each run restores its latest checkpoint. Runs interrupted between
  their saves can stand at different steps: the runs behind advance first (the
  others' slots compute discarded copies) until all stand at the same step, so
  every run goes through the same chunks, in the same slot of the same program,
  as without the interruption.

  Args:
    configs: R configs, equal except ``seed``, or None for an empty slot.
    workdirs: the runs' workdirs (None for empty slots).
    dataset: optional in-memory dataset overriding ``config.data``.
    model: optional Flax module overriding ``config.model.name``.
    programs: a dict the caller keeps across calls, so that identical programs
      compile once (:func:`compile_lowered`; :func:`num_compiled` counts them),
      and calls for the same round (configs equal but the seed, and the attack
      within ``attacks``, on the same dataset object) skip tracing it again.
    on_rounds: called with a number of rounds each time runs advance (summed
      over the runs), first with the rounds restored from checkpoints.
    note: receives one-line messages (resumes, divergences); default: stderr.
    devices: spread the runs axis over this many local devices (0 = all; 1 =
      one device). Each device then trains R / devices of the runs, vmapped;
      R must be a multiple of the device count, and each run's own
      ``config.devices`` must be 1 (a run lives on one device).
    attacks: compile the round for these attacks (:func:`build`), so that
      calls for runs that differ only in their attack (one of these) share
      one compiled program through ``programs``.

  Returns:
    A :class:`RunResult` per slot (None for empty slots).

  Raises:
    ValueError: the configs differ in more than their seed, or their per-worker
      partitions have different shapes.
  """
  live = [c for c in configs if c is not None]
  x64 = (jax.enable_x64(True) if live and live[0].dtype == "float64"
         else contextlib.nullcontext())
  note = note or (lambda message: print(message, file=sys.stderr))
  with x64:
    return _train_runs(configs, workdirs, dataset, model, programs, on_rounds or (lambda n: None),
                       note, runs_mesh(devices), tuple(attacks))


def config_fields(config, drop: Sequence[str] = ()) -> dict:
  """The config as a JSON-able dict, without the dotted fields in ``drop``.

  Runs whose configs agree apart from ``seed`` share one program (as runs of
  :func:`train_runs`), and apart from ``attack.name`` too within an attack
  family (:func:`build` with ``attacks``); callers compare these dicts.
  """
  fields = json.loads(config.to_json())
  for name in drop:
    *parents, leaf = name.split(".")
    node = fields
    for p in parents:
      node = node.get(p, {})
    node.pop(leaf, None)
  return fields


def _train_runs(configs, workdirs, dataset, model, programs, on_rounds, note, mesh, attacks):
  num_slots = len(configs)
  if mesh is not None and num_slots % mesh.devices.size:
    raise ValueError(f"{num_slots} runs cannot be spread evenly over {mesh.devices.size} "
                     f"devices; give a multiple of the device count (empty slots count).")
  results = [None] * num_slots
  setups = {}
  for i, config in enumerate(configs):  # build and validate every run before compiling
    if config is None:
      continue
    try:
      _check_workdir(workdirs[i])
      _check_resume_config(workdirs[i], config)
      shared = dataset if dataset is not None or not setups else next(iter(setups.values())).dataset
      setups[i] = build(config, shared, model, attacks=attacks)
    except ConfigError as e:
      results[i] = RunResult(workdirs[i], {}, e)
  live = list(setups)
  if not live:
    return results
  first = setups[live[0]]
  c = first.config
  if any(config_fields(configs[i], ["seed"]) != config_fields(c, ["seed"]) for i in live):
    raise ValueError("train_runs needs configs that differ only in their seed.")
  if mesh is not None and first.mesh is not None:
    raise ConfigError("Runs spread over devices each live on one device: set the runs' "
                      "config.devices = 1.")
  for i in live:
    with open(os.path.join(workdirs[i], "config.json"), "w") as fh:
      fh.write(configs[i].to_json(indent=2))

  # Every slot gets a run's seed and data; empty and failed slots borrow the first run's.
  owner = [i if i in setups else live[0] for i in range(num_slots)]
  train_data = make_device_data(first)
  if first.partition is not None:  # per-worker shards depend on the seed: one table per run
    tables = [setups[i].partition for i in owner]
    if len({p.table.shape for p in tables}) > 1:
      raise ValueError("The runs' per-worker partitions have different shapes; run them "
                       "in separate calls.")
    train_data = train_data._replace(table=jnp.stack([jnp.asarray(p.table) for p in tables]),
                                     sizes=jnp.stack([jnp.asarray(p.sizes) for p in tables]))
  seeds = jnp.asarray([configs[i].seed for i in owner])
  states = compile_lowered(jax.jit(functools.partial(init_states, first)).lower(seeds),
                           programs)(seeds)

  checkpointers, reporters, metas, steps = {}, {}, {}, {}
  restored_any = False
  host = jax.tree.map(np.array, jax.device_get(states))
  for i in live:
    checkpointers[i] = checkpoint_lib.Checkpointer(workdirs[i], enabled=c.checkpoint.enabled)
    metas[i], steps[i] = {"best_test_acc": -1.0, "wall_time": 0.0}, 0
    restored = checkpointers[i].restore_latest(_take_runs(states, i))
    if restored is not None:
      for leaf, value in zip(jax.tree.leaves(host), jax.tree.leaves(restored[0])):
        leaf[i] = np.asarray(value)
      metas[i], steps[i] = restored[1], int(restored[0].step)
      restored_any = True
      note(f"Resumed {workdirs[i]} from its checkpoint at step {steps[i]}.")
    reporters[i] = reporting.Reporter(
        workdirs[i], total_steps=c.num_steps, start_step=steps[i], wandb_config=c.wandb,
        run_config=json.loads(configs[i].to_json()), show_progress=False, print_rows=False)
  if restored_any:
    states = jax.tree.map(jnp.asarray, host)
  on_rounds(sum(steps.values()))

  if mesh is None:
    states, train_data = place(first, states), place(first, train_data)
    eval_data = place(first, make_eval_data(first.dataset, c.data.eval_batch_size))

    def spread(tree):
      return tree
  else:
    # The runs axis (the leading axis of the states, and of a per-run partition)
    # is split over the devices; the data is replicated. XLA partitions the
    # vmapped round along it: every device trains its own runs.
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(RUNS_AXIS))

    def spread(tree):
      return jax.device_put(tree, split)

    states = spread(states)
    train_data = sharding.replicate(mesh, train_data)
    if train_data.table is not None:
      train_data = train_data._replace(table=spread(train_data.table),
                                       sizes=spread(train_data.sizes))
    eval_data = sharding.replicate(mesh, make_eval_data(first.dataset, c.data.eval_batch_size))
  # Tracing the round takes seconds; a call for the same round reuses the traced function.
  trace_key = None
  if programs is not None:
    # Within a family the attack is an index the round reads.
    fields = config_fields(c, ["seed", "attack.name"] if attacks else ["seed"])
    trace_key = ("chunk_fn", json.dumps(fields, sort_keys=True), attacks, num_slots,
                 id(first.dataset), id(model),
                 None if mesh is None else tuple(d.id for d in mesh.devices.flat))
  chunk_fn = programs.get(trace_key) if trace_key else None
  if chunk_fn is None:
    chunk_fn = make_chunk_fn(first, c.loop, runs=True, programs=programs,
                             runs_layout="vmap" if mesh is not None else None)
    if trace_key:
      programs[trace_key] = chunk_fn
  evaluate = compile_lowered(jax.jit(jax.vmap(make_eval_fn(first), in_axes=(0, 0, None))).lower(
      states.params, states.batch_stats, eval_data), programs)
  rows = {i: reporters[i].rows[-1] if reporters[i].rows else {} for i in live}
  wall_start = {i: time.perf_counter() - metas[i]["wall_time"] for i in live}

  def stop(i, error):
    results[i] = RunResult(workdirs[i], rows[i], error)
    live.remove(i)
    checkpointers.pop(i).close()
    reporters.pop(i).close()

  try:
    while any(steps[i] < c.num_steps for i in live):
      # The runs furthest behind advance; every other slot computes a copy of one of them.
      step = min(steps[i] for i in live if steps[i] < c.num_steps)
      moving = [i for i in live if steps[i] == step]
      length = min(c.eval_every - step % c.eval_every, c.num_steps - step)
      source = [i if i in moving else moving[0] for i in range(num_slots)]
      everyone = source == list(range(num_slots))
      run_chunk = chunk_fn(states, train_data, length).run
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
        else:
          error = _diverged(c, workdirs[i], step, length, {k: v[i] for k, v in metrics.items()})
          note(f"{workdirs[i]}: {error}")
          stop(i, error)
      keep = np.array([i in advanced for i in range(num_slots)])
      # A diverged slot's state is never read again, so donated states are simply replaced.
      states = spread(new_states if everyone else _where_runs(keep, new_states, states))
      if not advanced:
        continue
      evaluation = jax.device_get(evaluate(states.params, states.batch_stats, eval_data))
      for i in advanced:
        steps[i] = step + length
        rows[i] = _evaluation_row(steps[i], {k: v[i] for k, v in metrics.items()},
                                  {k: v[i] for k, v in evaluation.items()},
                                  time.perf_counter() - wall_start[i], length / elapsed)
        metas[i] = _record(reporters[i], checkpointers[i], rows[i], metas[i],
                           _take_runs(states, i))
      on_rounds(length * len(advanced))
  except BaseException:
    for i in list(checkpointers):
      _close(checkpointers[i], reporters[i], failing=True)
    raise
  for i in list(checkpointers):
    _close(checkpointers[i], reporters[i], failing=False)
  for i in live:
    results[i] = RunResult(workdirs[i], rows[i], None, _take_runs(states, i))
  return results
