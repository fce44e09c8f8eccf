"""The training system: one pure, jit-compiled synchronous round, scanned.

Sections:

1. :func:`build` turns a config into a :class:`Setup` (data, model, estimator,
   aggregator, attack, server optimiser), refusing bad input before any
   compilation.
2. :class:`TrainState` and :func:`init_state`.
3. :func:`make_train_step`: the pure round ``(state, data) -> (state, metrics)``.
   Workers are a vmapped axis; Byzantine rows are overwritten by the attack;
   the robust aggregator reduces the worker axis; the server optax chain steps.
4. :func:`make_chunk_fn` runs the rounds between evaluations (a ``lax.scan``,
   or an asynchronous host loop over the jitted round) and
   :func:`make_eval_fn` evaluates on the whole test split in batches.
   With several local devices the workers' gradients are split over them
   (``shard_map`` over a one-axis mesh; the rest of the round is replicated).
5. :func:`train_and_evaluate`: the loop, with metrics, checkpoints and resume.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ftjax import aggregators as aggregators_lib
from ftjax import attacks as attacks_lib
from ftjax import checkpoint as checkpoint_lib
from ftjax import conv as conv_lib
from ftjax import data as data_lib
from ftjax import estimators
from ftjax import models as models_lib
from ftjax import optim
from ftjax import reporting

PyTree = Any

# Sub-streams of the run's root key, one per purpose (DESIGN principle 4).
_KEY_INIT, _KEY_DATA, _KEY_AUGMENT, _KEY_ATTACK, _KEY_AGGREGATOR = range(5)

# Config fields that may change between an interrupted run and its resume.
_RESUMABLE_FIELDS = ("num_steps", "eval_every", "wandb", "checkpoint", "progress", "loop",
                     "devices")

# The mesh axis the worker axis is split over.
WORKER_AXIS = "workers"


class ConfigError(ValueError):
  """A config that cannot run; the message says what to change."""


# --------------------------------------------------------------------------
# 1. Setup
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


def build(config: ml_collections.ConfigDict,
          dataset: Optional[data_lib.Dataset] = None) -> Setup:
  """Validates ``config`` and builds the static parts of a run.

  Args:
    config: a full ftjax config (see ``configs/default.py``).
    dataset: use these arrays instead of loading ``config.data`` (notebooks,
      benchmarks on synthetic data).

  Returns:
    The :class:`Setup`.

  Raises:
    ValueError: with a sentence saying what to change, for any config that
      cannot run (unknown names, f >= W/2, batch larger than the data, ...).
  """
  c = config
  w, f, b = c.workers.num, c.workers.byzantine, c.workers.batch_size
  for name, value in (("workers.num", w), ("workers.byzantine", f),
                      ("workers.batch_size", b), ("num_steps", c.num_steps),
                      ("eval_every", c.eval_every)):
    if not isinstance(value, int) or isinstance(value, bool):
      raise ConfigError(f"{name} must be an integer, got {value!r}.")
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
  if c.loop not in LOOPS:
    raise ConfigError(f"Unknown loop {c.loop!r}; valid: {', '.join(LOOPS)}.")
  if c.dtype not in ("float32", "float64"):
    raise ConfigError(f"dtype must be 'float32' or 'float64', got {c.dtype!r}.")
  if c.dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  mesh = _worker_mesh(c.get("devices", 0))
  dtype = jnp.float64 if c.dtype == "float64" else jnp.float32
  if c.optim.clip is not None and c.optim.clip < 0:
    raise ConfigError(f"optim.clip must be positive, or 0 / None for no clipping, got "
                      f"{c.optim.clip}.")

  try:  # The libraries' own ValueErrors carry the sentence to show the user.
    aggregator = aggregators_lib.make_aggregator(
        _aggregator_spec(c), f, num_workers=w, options=_to_dict(c.aggregator.options))
    attack = attacks_lib.make_attack(c.attack.name, **_to_dict(c.attack.options.get(
        attacks_lib.canonical_name(c.attack.name), None)))
    worker_tx = estimators.make_estimator(c.optim)
    server_tx = optim.make_server_optimizer(c.optim)
    model = models_lib.make_model(c.model.name, num_classes=10, dtype=dtype,
                                  conv_impl=c.model.conv_impl)  # checks the name early
    if dataset is None:
      dataset = data_lib.load_dataset(
          c.data.name, path=c.data.path or None, data_dir=c.data.data_dir or None)
    data_lib.check_batch(dataset, w, b)
    if c.data.shuffle not in data_lib.SHUFFLES:
      raise ConfigError(f"Unknown data.shuffle {c.data.shuffle!r}; valid: "
                        f"{', '.join(data_lib.SHUFFLES)}.")
    partition = data_lib.partition_indices(
        jax.random.fold_in(jax.random.key(c.seed), _KEY_DATA), dataset.train_labels, w,
        scheme=c.data.partition, alpha=c.data.alpha,
        shards_per_worker=c.data.shards_per_worker)
    if partition is not None:
      data_lib.check_partition(partition, b)
    if dataset.num_classes != 10:
      model = models_lib.make_model(c.model.name, num_classes=dataset.num_classes,
                                    dtype=dtype, conv_impl=c.model.conv_impl)
  except (ValueError, FileNotFoundError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(str(e)) from None
  return Setup(config=c, dataset=dataset, model=model, worker_tx=worker_tx,
               server_tx=server_tx, aggregator=aggregator, attack=attack,
               num_workers=w, num_byzantine=f, batch_size=b, dtype=dtype,
               partition=partition, mesh=mesh)


def _worker_mesh(devices) -> Optional[Mesh]:
  """The one-axis mesh of ``devices`` local devices (0 = all), or None for one device."""
  if not isinstance(devices, int) or isinstance(devices, bool) or devices < 0:
    raise ConfigError(f"devices must be a non-negative integer (0 = all local devices), "
                      f"got {devices!r}.")
  available = jax.local_devices()
  if devices > len(available):
    raise ConfigError(
        f"devices={devices} but only {len(available)} local "
        f"{jax.default_backend().upper()} device(s) exist; lower devices (0 = all). On CPU, "
        f"start the process with XLA_FLAGS=--xla_force_host_platform_device_count=N "
        f"(main.py --cpu_devices=N does that).")
  chosen = available[:devices or len(available)]
  if len(chosen) == 1:
    return None
  return Mesh(np.array(chosen), (WORKER_AXIS,))


def expose_cpu_devices(count: int = 0) -> None:
  """Asks for ``count`` CPU devices (0 = one per core) before JAX creates its CPU client.

  Sets ``XLA_FLAGS=--xla_force_host_platform_device_count``, so it only takes
  effect before JAX's first use of a device, and it leaves a count already in
  XLA_FLAGS alone. XLA:CPU runs each convolution on one core; with several
  devices, ``config.devices=0`` splits the workers over all of them. On 2 cores
  the simple_mnist mu2sgd step under sign flipping ran fastest on one device,
  momentum and the omniscient attacks on two (docs/performance_notes.md).
  """
  current = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in current:
    return
  count = count or os.cpu_count() or 1
  os.environ["XLA_FLAGS"] = f"{current} --xla_force_host_platform_device_count={count}".strip()


def place(setup: Setup, tree: PyTree) -> PyTree:
  """Puts ``tree`` on ``setup``'s devices, replicated (unchanged with one device).

  The jitted round takes its state and data replicated over the mesh; arrays
  from elsewhere (a restored checkpoint, a notebook) go through this first.
  """
  if setup.mesh is None:
    return tree
  return jax.device_put(tree, NamedSharding(setup.mesh, PartitionSpec()))


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


def _root_key(state: TrainState) -> jax.Array:
  return jax.random.wrap_key_data(state.rng)


def _purpose_key(state: TrainState, purpose: int) -> jax.Array:
  return jax.random.fold_in(_root_key(state), purpose)


def init_state(setup: Setup, seed: int) -> TrainState:
  """Initial state: model init, estimator and server states, root key."""
  root = jax.random.key(seed)
  ds = setup.dataset
  sample = jnp.zeros((1,) + ds.train_images.shape[1:], setup.dtype)
  variables = setup.model.init(jax.random.fold_in(root, _KEY_INIT), sample, train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  needs_prev = estimators.needs_previous_gradient(setup.config.optim.estimator)
  worker_state = jax.vmap(setup.worker_tx.init, in_axes=None,
                          axis_size=setup.num_computed)(params)
  return TrainState(
      step=jnp.zeros([], jnp.int32), params=params,
      prev_params=jax.tree.map(jnp.array, params) if needs_prev else (),
      batch_stats=batch_stats, server_state=setup.server_tx.init(params),
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


# Above this many int32 entries, per-chunk epoch permutations are not cached.
_MAX_CACHED_PERMUTATION_ENTRIES = 1 << 25


def make_chunk_indices(setup: Setup) -> Callable:
  """``indices(state, data, length) -> int32 [length, W, b]``: the chunk's minibatches.

  For the i.i.d. split (SPEC section 5) every epoch is one permutation of the
  train split; the permutations of the epochs a chunk touches are drawn once
  per chunk rather than once per round (a sort of N examples per round would
  cost more than the model's step on MNIST). The result equals
  :func:`ftjax.data.round_indices` round by round.
  """
  w, b = setup.num_workers, setup.batch_size
  num_examples = setup.dataset.train_images.shape[0]
  per_round = w * b
  rounds_per_epoch = num_examples // per_round
  shuffle = setup.config.data.shuffle

  def indices(state, data, length):
    key = _purpose_key(state, _KEY_DATA)
    steps = state.step + jnp.arange(length, dtype=jnp.int32)
    if data.table is not None:
      return jax.vmap(lambda s: data_lib.worker_round_indices(
          key, s, data.table, data.sizes, b, shuffle=shuffle))(steps)
    num_epochs = length // rounds_per_epoch + 2
    if shuffle != "permutation" or num_epochs * num_examples > _MAX_CACHED_PERMUTATION_ENTRIES:
      return jax.vmap(lambda s: data_lib.round_indices(
          key, s, num_examples, w, b, shuffle=shuffle))(steps)
    first_epoch = state.step // rounds_per_epoch
    perms = jax.vmap(lambda e: data_lib.epoch_permutation(key, e, num_examples))(
        first_epoch + jnp.arange(num_epochs, dtype=jnp.int32))

    def one(step):
      perm = perms[step // rounds_per_epoch - first_epoch]
      start = (step % rounds_per_epoch) * per_round
      return jax.lax.dynamic_slice(perm, (start,), (per_round,)).reshape(w, b)

    return jax.vmap(one)(steps)

  return indices


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
  """``(params, batch_stats, x, y, prev_params=None) -> (out, prev_grads)``.

  ``x`` [n, b, ...] and ``y`` [n, b] are the n computed workers' minibatches;
  ``out = ((loss, (logits, stats)), grads)`` has a leading worker axis, and
  ``prev_grads`` are the same workers' gradients at ``prev_params`` on the same
  minibatches (mu2sgd's second gradient), or None without ``prev_params``.

  Each worker differentiates its own loss (a vmapped axis). With a mesh the
  worker axis is split over its devices with ``shard_map``: each device runs
  the vmapped gradients of its own workers (on CPU each device is one core,
  and XLA:CPU runs a convolution on one core), and one all-gather of one flat
  row per worker brings every result back for the replicated rest of the
  round. A worker count that the device count does not divide is padded with
  repeated workers whose results are dropped.
  """
  grads = jax.vmap(jax.value_and_grad(make_loss_fn(setup.model), has_aux=True),
                   in_axes=(None, None, 0, 0))

  def both(params, batch_stats, x, y, prev_params):
    out = grads(params, batch_stats, x, y)
    prev = None if prev_params is None else grads(prev_params, batch_stats, x, y)[1]
    return out, prev

  mesh = setup.mesh
  if mesh is None:
    return lambda params, batch_stats, x, y, prev_params=None: both(
        params, batch_stats, x, y, prev_params)
  devices = mesh.devices.size
  spec = PartitionSpec(WORKER_AXIS)

  def split_grads(params, batch_stats, x, y, prev_params=None):
    n = x.shape[0]
    padded = -(-n // devices) * devices
    if padded != n:
      rows = np.arange(padded) % n
      x, y = x[rows], y[rows]
    one = jax.eval_shape(both, params, batch_stats, x[:1], y[:1], prev_params)
    unravel = jax.flatten_util.ravel_pytree(
        jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), one))[1]

    def local(params, batch_stats, x, y, prev_params):
      out = both(params, batch_stats, x, y, prev_params)
      return jax.vmap(lambda o: jax.flatten_util.ravel_pytree(o)[0])(out)

    flat = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(),) * 2 + (spec, spec) +
                         (PartitionSpec(),), out_specs=spec, check_vma=False)(
                             params, batch_stats, x, y, prev_params)
    # Gathered and replicated here: left to sharding propagation, the worker
    # axis would stay split into the aggregator, which then exchanges data at
    # every step of its selection network.
    flat = jax.lax.with_sharding_constraint(flat, NamedSharding(mesh, PartitionSpec()))[:n]
    return jax.vmap(unravel)(flat)

  return split_grads


def make_train_step(setup: Setup) -> Callable[[TrainState, DeviceData], tuple]:
  """Builds the pure synchronous round ``(state, data) -> (state, metrics)``."""
  c = setup.config
  ds = setup.dataset
  w, f, h, n, b = (setup.num_workers, setup.num_byzantine, setup.num_honest,
                   setup.num_computed, setup.batch_size)
  clip = c.optim.clip or None  # 0 (typeable on the command line) or None: no clipping
  needs_prev = estimators.needs_previous_gradient(c.optim.estimator)
  value_and_grad = make_worker_gradients(setup)
  clip_rows = jax.vmap(functools.partial(estimators.clip_by_global_norm, max_norm=clip))
  attack_ctx = attacks_lib.AttackContext(num_byzantine=f, aggregator=setup.aggregator,
                                         num_classes=ds.num_classes)
  chunk_indices = make_chunk_indices(setup)

  def worker_update(grads, worker_state, prev_grads):
    if needs_prev:
      return setup.worker_tx.update(grads, worker_state, prev_grads=prev_grads)
    return setup.worker_tx.update(grads, worker_state)

  def train_step(state: TrainState, data: DeviceData, idx: Optional[jax.Array] = None):
    """One round; ``idx`` int32 [W, b] are the workers' example indices."""
    step = state.step
    if idx is None:
      idx = chunk_indices(state, data, 1)[0]
    idx = idx[:n]
    x = data.images[idx]  # uint8 [n, b, H, W, C]
    if ds.augment == "crop_flip":
      # On the raw pixels, so the padding is black as in torchvision.
      key = jax.random.fold_in(_purpose_key(state, _KEY_AUGMENT), step)
      x = data_lib.augment_crop_flip(key, x)
    x = data_lib.preprocess(x, ds.mean, ds.std, setup.dtype)
    y = data.labels[idx]
    if f and setup.attack.flips_labels:
      y = y.at[h:].set(attacks_lib.flip_labels(y[h:], ds.num_classes))

    ((loss, (logits, new_stats)), grads), prev_grads = value_and_grad(
        state.params, state.batch_stats, x, y, state.prev_params if needs_prev else None)
    grads = clip_rows(grads)
    if needs_prev:
      prev_grads = clip_rows(prev_grads)
    updates, worker_state = jax.vmap(worker_update)(grads, state.worker_state, prev_grads)

    honest = jax.tree.map(lambda u: u[:h], updates)
    if f:
      own = jax.tree.map(lambda u: u[h:], updates) if setup.attack.uses_own_updates else None
      key = jax.random.fold_in(_purpose_key(state, _KEY_ATTACK), step)
      byzantine = setup.attack(honest, own, key, attack_ctx)
      rows = jax.tree.map(lambda a, z: jnp.concatenate([a, z.astype(a.dtype)]), honest, byzantine)
    else:
      rows = honest
    key = jax.random.fold_in(_purpose_key(state, _KEY_AGGREGATOR), step)
    # Materialise the rows: without the barrier XLA fuses the estimator and the
    # attack into the aggregator's selection network and recomputes them there.
    rows = jax.lax.optimization_barrier(rows)
    aggregate, diagnostics = setup.aggregator(rows, key)

    server_updates, server_state = setup.server_tx.update(
        aggregate, state.server_state, state.params)
    params = optax.apply_updates(state.params, server_updates)
    # Running BatchNorm statistics follow the honest workers' batches (see README).
    batch_stats = jax.tree.map(lambda s: s[:h].mean(0), new_stats)

    metrics = {
        "train_loss": loss[:h].mean().astype(jnp.float32),
        "train_acc": (jnp.argmax(logits[:h], -1) == y[:h]).mean(dtype=jnp.float32),
        "aggregate_norm": optax.tree.norm(aggregate).astype(jnp.float32),
        **summarize_diagnostics(diagnostics, h),
    }
    new_state = TrainState(
        step=step + 1, params=params,
        prev_params=state.params if needs_prev else (),
        batch_stats=batch_stats, server_state=server_state,
        worker_state=worker_state, rng=state.rng)
    return new_state, metrics

  return train_step


# --------------------------------------------------------------------------
# 4. Chunks of rounds and evaluation
# --------------------------------------------------------------------------


LOOPS = ("auto", "scan", "host")


def _check_loop(loop: str) -> None:
  if loop not in LOOPS:
    raise ValueError(f"Unknown loop {loop!r}; valid: {', '.join(LOOPS)}.")


def resolve_loop(loop: str, chunk_jaxpr) -> str:
  """The chunk loop: "scan" or "host".

  "auto" is "scan" (the rounds inside one ``lax.scan``) except on CPU when the
  round has a convolution that XLA:CPU would run on its slow generic path inside
  a loop body (``conv.scan_friendly`` on ``chunk_jaxpr``, the scanned chunk's jaxpr).
  There "host" (a Python loop that dispatches the jitted, donated round without
  waiting) keeps the fast library convolutions: autodiff's transposed
  convolutions made the scanned simple_mnist step about 12x slower. The CPU
  formulations write every convolution of the gradient as a plain one (strided
  ones phase by phase), and for them the scanned chunk ran as fast as the host
  loop or up to 27% faster (docs/performance_notes.md). ``conv_impl="xla"`` and
  more than 64 workers (a grouped weight gradient) keep the host loop on CPU.
  """
  _check_loop(loop)
  if loop != "auto":
    return loop
  if jax.default_backend() != "cpu":
    return "scan"
  return "scan" if conv_lib.scan_friendly(chunk_jaxpr) else "host"


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]))


class CompiledChunk(NamedTuple):
  """``run(state, data) -> (state, mean metrics)`` for one chunk length."""
  run: Callable
  flops_per_step: float    # XLA's cost analysis of one round
  memory_bytes: float      # XLA's memory analysis (arguments + outputs + temporaries)
  loop: str                # "scan" or "host"


def _cost(compiled, length: int) -> tuple[float, float]:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = float((analysis or {}).get("flops", float("nan"))) / length
  mem = compiled.memory_analysis()
  memory = (float(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                  + mem.output_size_in_bytes) if mem is not None else float("nan"))
  return flops, memory


def make_chunk_fn(setup: Setup, loop: str = "auto") -> Callable:
  """``compile(state, data, length) -> CompiledChunk``: rounds between evaluations.

  With ``loop="scan"`` the ``length`` rounds run inside one jitted
  ``lax.scan``; with ``loop="host"`` a host loop dispatches the jitted round
  ``length`` times without waiting for it; "auto" picks one (``resolve_loop``)
  and ``CompiledChunk.loop`` says which. Either way the state buffers are
  donated, the example indices of the whole chunk are drawn on device first,
  and the returned metrics are the means over the chunk plus ``finite``
  (whether the new parameters are all finite). Compiling for a length twice
  returns the cached executable.
  """
  _check_loop(loop)
  train_step = make_train_step(setup)
  chunk_indices = make_chunk_indices(setup)
  cache = {}

  def scan_chunk(state, data, length):
    indices = chunk_indices(state, data, length)
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

  def compile_chunk(state, data, length):
    if length in cache:
      return cache[length]
    # With a mesh, the compiled chunk takes replicated inputs; run() places them.
    state, data = place(setup, state), place(setup, data)
    resolved = loop
    if loop != "host":
      traced = jax.jit(scan_chunk, static_argnums=2, donate_argnums=0).trace(
          state, data, length)
      resolved = resolve_loop(loop, traced.jaxpr.jaxpr)
    if resolved == "scan":
      compiled = traced.lower().compile()

      def run(state, data):
        return compiled(place(setup, state), place(setup, data))

      # XLA's cost analysis counts a while loop's body once, i.e. one round.
      result = CompiledChunk(run, *_cost(compiled, 1), "scan")
    else:
      indices_fn = jax.jit(chunk_indices, static_argnums=2).lower(state, data, length).compile()
      indices = jax.eval_shape(functools.partial(chunk_indices, length=length), state, data)
      if setup.mesh is not None:
        indices = jax.ShapeDtypeStruct(indices.shape, indices.dtype,
                                       sharding=NamedSharding(setup.mesh, PartitionSpec()))
      step = jax.jit(one_round, donate_argnums=0).lower(
          state, data, indices, jnp.int32(0)).compile()
      _, step_metrics = jax.eval_shape(one_round, state, data, indices, jnp.int32(0))
      summary = jax.jit(summarize).lower(state, [step_metrics] * length).compile()

      def run(state, data):
        state, data = place(setup, state), place(setup, data)
        idx = indices_fn(state, data)
        metrics = []
        for i in range(length):
          state, m = step(state, data, idx, jnp.int32(i))
          if setup.mesh is not None and metrics:
            # At most two rounds in flight. With dozens of multi-device calls
            # queued, XLA:CPU's device threads deadlock in the all-gather and
            # XLA aborts the process after its rendezvous timeout (a bare
            # shard_map all-gather on 2 CPU devices aborts with 64 calls queued
            # and runs 20,000 calls with up to 16 queued).
            jax.block_until_ready(metrics[-1])
          metrics.append(m)
        return state, summary(state, metrics)

      result = CompiledChunk(run, *_cost(step, 1), "host")
    cache[length] = result
    return result

  return compile_chunk


class EvalData(NamedTuple):
  """The test split padded to whole batches: [num_batches, batch, ...]."""
  images: jax.Array
  labels: jax.Array
  mask: jax.Array


def make_eval_data(dataset: data_lib.Dataset, batch_size: int) -> EvalData:
  """Pads and reshapes the test split for :func:`make_eval_fn` (host side, once)."""
  images, labels = dataset.test_images, dataset.test_labels
  total = images.shape[0]
  batch_size = max(1, min(batch_size, total))
  num_batches = math.ceil(total / batch_size)
  pad = num_batches * batch_size - total
  mask = np.concatenate([np.ones(total, bool), np.zeros(pad, bool)])
  images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
  shape = (num_batches, batch_size)
  return EvalData(jnp.asarray(images.reshape(shape + images.shape[1:])),
                  jnp.asarray(labels.reshape(shape)), jnp.asarray(mask.reshape(shape)))


def make_eval_fn(setup: Setup) -> Callable:
  """``evaluate(params, batch_stats, eval_data) -> {test_loss, test_acc}``, jitted."""
  ds = setup.dataset

  def batch_sums(params, batch_stats, x, y, mask):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    logits = setup.model.apply(variables, data_lib.preprocess(x, ds.mean, ds.std, setup.dtype),
                               train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = jnp.argmax(logits, -1) == y
    return jnp.where(mask, losses, 0).sum(), jnp.where(mask, correct, False).sum()

  def evaluate(params, batch_stats, data: EvalData):
    losses, correct = jax.lax.map(
        lambda batch: batch_sums(params, batch_stats, *batch),
        (data.images, data.labels, data.mask))
    count = data.mask.sum()
    return {"test_loss": (losses.sum() / count).astype(jnp.float32),
            "test_acc": (correct.sum() / count).astype(jnp.float32)}

  return jax.jit(evaluate)


# --------------------------------------------------------------------------
# 5. The run
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


def _config_for_comparison(config: ml_collections.ConfigDict) -> dict:
  d = json.loads(config.to_json())
  for field in _RESUMABLE_FIELDS:
    d.pop(field, None)
  return d


def _check_resume_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as fh:
    saved = json.load(fh)
  for field in _RESUMABLE_FIELDS:
    saved.pop(field, None)
  now = _config_for_comparison(config)
  if saved != now:
    diffs = sorted(_diff_keys(saved, now))
    raise ConfigError(
        f"The workdir {workdir!r} holds a run with a different config "
        f"(fields {', '.join(diffs)} differ); resume it with the same config or use "
        f"another --workdir.")


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
  keys = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      keys += _diff_keys(va, vb, f"{prefix}{k}.")
    elif va != vb:
      keys.append(prefix + k)
  return keys


class TrainingDiverged(FloatingPointError):
  """The honest loss or the model became non-finite; the last good checkpoint is kept."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: Optional[data_lib.Dataset] = None) -> dict:
  """Runs (or resumes) one training run and returns its last evaluation row.

  Args:
    config: the run's config.
    workdir: output directory (config.json, metrics.csv/.jsonl, checkpoints/).
      If it already holds a checkpoint of the same config, training resumes.
    dataset: optional in-memory dataset overriding ``config.data``.

  Returns:
    The final evaluation row (step, train/test loss and accuracy, ...).
  """
  # Build and validate everything before compiling anything.
  _check_workdir(workdir)
  _check_resume_config(workdir, config)
  setup = build(config, dataset)
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
        raise TrainingDiverged(
            f"Training diverged between steps {step} and {step + length}: the honest "
            f"workers' loss is {metrics['train_loss']} and the model is "
            f"{'finite' if metrics['finite'] else 'not finite'}. The last good checkpoint "
            f"(step {step}) is kept in {workdir}; lower optim.lr, enable optim.clip, or "
            f"use a robust aggregator.")
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
  return row
