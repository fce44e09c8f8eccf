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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, NamedTuple, Optional

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
                     "devices")

LOOPS = ("auto", "scan", "host")


class ConfigError(ValueError):
  """A config that cannot run; the message says what to change."""


class TrainingDiverged(FloatingPointError):
  """The honest loss or the model became non-finite; the last good checkpoint is kept."""


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
  num_byzantine: int   # f
  batch_size: int      # b, per worker
  dtype: Any
  partition: Optional[data_lib.Partition]  # per-worker shards; None for the i.i.d. split
  mesh: Optional[Mesh] = None  # the workers' gradients are split over it; None: one device
  builtin_model: bool = True   # the model comes from models.MODELS (not the user's own)

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
          model: Optional[nn.Module] = None) -> Setup:
  """Validates ``config`` and builds the static parts of a run.

  Args:
    config: a full ftjax config (see ``configs/default.py``).
    dataset: train on these arrays instead of loading ``config.data``
      (notebooks, benchmarks on synthetic data).
    model: train this Flax module instead of ``config.model.name``. It is
      called as ``model.apply(variables, x, train=...)`` on NHWC float inputs
      and returns logits; BatchNorm-style state lives in ``"batch_stats"``.

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
    aggregator = aggregators_lib.make_aggregator(
        _aggregator_spec(c), f, num_workers=w, options=_to_dict(c.aggregator.options),
        kernels=c.kernels)
    attack = attacks_lib.make_attack(c.attack.name, **_to_dict(c.attack.options.get(
        attacks_lib.canonical_name(c.attack.name), None)))
    worker_tx = estimators.make_estimator(c.optim)
    server_tx = optim.make_server_optimizer(c.optim)
    if model is None and c.model.name not in models_lib.MODELS:  # before loading any data
      raise ValueError(f"Unknown model {c.model.name!r}; choose one of: "
                       f"{', '.join(models_lib.MODELS)}.")
    if dataset is None:
      dataset = data_lib.load_dataset(
          c.data.name, path=c.data.path or None, data_dir=c.data.data_dir or None)
    data_lib.check_batch(dataset, w, b)
    partition = data_lib.partition_indices(
        jax.random.fold_in(jax.random.key(c.seed), _KEY_DATA), dataset.train_labels, w,
        scheme=c.data.partition, alpha=c.data.alpha,
        shards_per_worker=c.data.shards_per_worker)
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
               partition=partition, mesh=mesh, builtin_model=builtin)


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
  """
  return sharding.replicate(setup.mesh, tree)


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


def make_device_data(setup: Setup) -> DeviceData:
  """Puts the training split (and the per-worker partition, if any) on device."""
  ds, partition = setup.dataset, setup.partition
  images, labels = jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels)
  if partition is None:
    return DeviceData(images, labels)
  return DeviceData(images, labels, jnp.asarray(partition.table), jnp.asarray(partition.sizes))


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


def make_worker_gradients(setup: Setup) -> Callable:
  """``(params, batch_stats, prev_params, x, y) -> (out, prev_grads)``.

  ``x`` [n, b, ...] and ``y`` [n, b] are the n computed workers' minibatches;
  ``out = ((loss, (logits, stats)), grads)`` has a leading worker axis, and
  ``prev_grads`` are the same workers' gradients at ``prev_params`` on the same
  minibatches (mu2sgd's second gradient), or None when ``prev_params`` is None.
  With a mesh, the worker axis is split over its devices
  (:func:`ftjax.sharding.split_over_workers`).
  """
  grads = jax.vmap(jax.value_and_grad(make_loss_fn(setup.model), has_aux=True),
                   in_axes=(None, None, 0, 0))

  def both(params, batch_stats, prev_params, x, y):
    out = grads(params, batch_stats, x, y)
    prev = None if prev_params is None else grads(prev_params, batch_stats, x, y)[1]
    return out, prev

  if setup.mesh is None:
    return both
  return sharding.split_over_workers(both, setup.mesh, num_shared=3)


def make_train_step(setup: Setup) -> Callable:
  """The pure synchronous round ``(state, data, indices) -> (state, metrics)``.

  ``indices`` int32 [W, b] are the workers' examples of this round (one entry
  of :func:`sample_chunk`); without them the round samples its own.
  """
  c = setup.config
  ds = setup.dataset
  f, h, n = setup.num_byzantine, setup.num_honest, setup.num_computed
  clip = c.optim.clip or None  # 0 (typeable on the command line) or None: no clipping
  needs_prev = estimators.needs_previous_gradient(c.optim.estimator)
  worker_gradients = make_worker_gradients(setup)
  clip_rows = jax.vmap(functools.partial(estimators.clip_by_global_norm, max_norm=clip))
  attack_ctx = attacks_lib.AttackContext(num_byzantine=f, aggregator=setup.aggregator,
                                         num_classes=ds.num_classes)

  def worker_update(grads, worker_state, prev_grads):
    if needs_prev:
      return setup.worker_tx.update(grads, worker_state, prev_grads=prev_grads)
    return setup.worker_tx.update(grads, worker_state)

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
    if f and setup.attack.flips_labels:
      y = y.at[h:].set(attacks_lib.flip_labels(y[h:], ds.num_classes))

    # Workers: clipped gradients, then the estimator (mu2sgd needs x_{t-1} too).
    ((loss, (logits, new_stats)), grads), prev_grads = worker_gradients(
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
      byzantine = setup.attack(honest, own, key, attack_ctx)
      rows = jax.tree.map(lambda a, z: jnp.concatenate([a, z.astype(a.dtype)]), honest, byzantine)
    else:
      rows = honest

    # Server: robust aggregate, then the server optax chain.
    key = jax.random.fold_in(_purpose_key(state, _KEY_AGGREGATOR), step)
    aggregate, diagnostics = setup.aggregator(rows, key)
    server_updates, server_state = setup.server_tx.update(
        aggregate, state.server_state, state.params)
    params = optax.apply_updates(state.params, server_updates)
    # Running BatchNorm statistics follow the honest workers' batches (docs/data.md).
    batch_stats = jax.tree.map(lambda s: s[:h].mean(0), new_stats)

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
    return new_state, metrics

  return train_step


# --------------------------------------------------------------------------
# 4. The loop between evaluations
# --------------------------------------------------------------------------


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
  friendly = setup.builtin_model and layers.scan_friendly(setup.config.kernels,
                                                           setup.num_computed)
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


def make_chunk_fn(setup: Setup, loop: str = "auto") -> Callable:
  """``compile(state, data, length) -> CompiledChunk``: the rounds between evaluations.

  With "scan" the ``length`` rounds run inside one jitted ``lax.scan``; with
  "host" a Python loop dispatches the jitted round ``length`` times without
  waiting for it; "auto" picks one (:func:`resolve_loop`). Either way the
  state buffers are donated, the example indices of the whole chunk are drawn
  on device first, and the returned metrics are the means over the chunk plus
  ``finite`` (whether the new parameters are all finite). The chunk is
  compiled ahead of time, so that the caller can report compile time and XLA's
  cost analysis; a length compiled before is returned from a cache.
  """
  resolved = resolve_loop(setup, loop)
  train_step = make_train_step(setup)
  mesh = setup.mesh
  cache = {}

  def scan_chunk(state, data, length):
    indices = sample_chunk(setup, state, data, length)
    state, metrics = jax.lax.scan(lambda s, idx: train_step(s, data, idx), state, indices)
    metrics = jax.tree.map(lambda m: m.mean(0), metrics)
    metrics["finite"] = _all_finite(state.params)
    return state, metrics

  def one_round(state, data, indices, i):
    return train_step(state, data, indices[i])

  def summarize(state, metrics):
    metrics = jax.tree.map(lambda *m: jnp.stack(m).mean(0), *metrics)
    metrics["finite"] = _all_finite(state.params)
    return metrics

  def compile_scan(state, data, length):
    compiled = jax.jit(scan_chunk, static_argnums=2, donate_argnums=0).lower(
        state, data, length).compile()
    # XLA's cost analysis counts a while loop's body once, i.e. one round.
    return CompiledChunk(lambda s, d: compiled(place(setup, s), place(setup, d)),
                         *_cost(compiled), "scan")

  def compile_host(state, data, length):
    sample = jax.jit(functools.partial(sample_chunk, setup), static_argnums=2).lower(
        state, data, length).compile()
    indices = sharding.replicated_struct(mesh, jax.eval_shape(
        functools.partial(sample_chunk, setup, length=length), state, data))
    step = jax.jit(one_round, donate_argnums=0).lower(
        state, data, indices, jnp.int32(0)).compile()
    _, step_metrics = jax.eval_shape(one_round, state, data, indices, jnp.int32(0))
    summary = jax.jit(summarize).lower(state, [step_metrics] * length).compile()

    def run(state, data):
      state, data = place(setup, state), place(setup, data)
      idx = sample(state, data)
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
                  f"{jax.default_backend().upper()} devices.")

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
        kept = (f"The last good checkpoint (step {step}) is kept in {workdir}"
                if step > 0 and config.checkpoint.enabled else "No checkpoint was written")
        raise TrainingDiverged(
            f"Training diverged between steps {step} and {step + length}: the honest "
            f"workers' loss is {metrics['train_loss']} and the model is "
            f"{'finite' if metrics['finite'] else 'not finite'}. {kept}; lower optim.lr, "
            f"enable optim.clip, or use a robust aggregator.")
      state = new_state
      reporter.advance(length)
      evaluation = jax.device_get(eval_fn(state.params, state.batch_stats, eval_data))
      row = {"step": step + length,
             **{k: float(v) for k, v in metrics.items() if k != "finite"},
             **{k: float(v) for k, v in evaluation.items()},
             "wall_time": time.perf_counter() - wall_start,
             "steps_per_sec": length / elapsed}
      reporter.write(row)
      meta = {"best_test_acc": max(meta["best_test_acc"], row["test_acc"]),
              "wall_time": row["wall_time"]}
      checkpointer.save("latest", row["step"], state, meta)
      if row["test_acc"] >= meta["best_test_acc"]:
        checkpointer.save("best", row["step"], state, meta)
  finally:
    checkpointer.close()
    reporter.close()
  return TrainResult(state, row)
