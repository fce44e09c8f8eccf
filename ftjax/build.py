"""The config read once: :func:`build` turns a config into a validated :class:`Setup`.

Everything that can be checked before compiling is checked here, and every
later stage (the round, the loop, the run) reads the :class:`Setup`, never the
config: the resolved aggregator and attack objects, the estimator and server
optimiser, the model and dataset, the device layout, the dtype, the lengths
and the backend choices of :mod:`ftjax.policy`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from ftjax import sampling
from ftjax import aggregators as aggregators_lib
from ftjax import attacks as attacks_lib
from ftjax import data as data_lib
from ftjax import estimators
from ftjax import federated as federated_lib
from ftjax import kernels
from ftjax import models as models_lib
from ftjax import optim
from ftjax import policy
from ftjax import registry
from ftjax import results
from ftjax import sharding

# Sub-streams of the run's root key, one per purpose.
KEY_INIT, KEY_DATA, KEY_AUGMENT, KEY_ATTACK, KEY_AGGREGATOR, KEY_PARTICIPANTS = range(6)
KEY_MODEL = 6  # the model's own randomness (dropout): round.model_keys


class ConfigError(ValueError):
  """A config that cannot run; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static about a run, resolved from its config before compiling."""
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
  partition: Optional[sampling.Partition]  # per-worker shards; None for the i.i.d. split
  seed: int
  clip: Optional[float]      # per-worker gradient clipping norm, None: off
  needs_prev: bool           # the estimator differentiates at x_{t-1} too (mu2sgd)
  batch_stats_mode: str      # models.BATCH_STATS_MODES
  shuffle: str               # sampling.SHUFFLES
  num_steps: int
  eval_every: int
  eval_batch_size: int
  kernels: str               # the config's kernel set ("auto" resolves per backend)
  loop: str                  # "scan" or "host" (policy.loop_kind)
  worker_chunk: int          # workers differentiated at once, 0: all (policy.worker_chunk)
  fields: dict               # the config as given, as JSON (config.json, the resume check)
  mesh: Optional[Mesh] = None  # the workers are split over it; None: one device
  builtin_model: bool = True   # the model comes from models.MODELS (not the user's own)
  aggregation: str = "replicated"  # mesh.aggregation: the aggregator's layout on the mesh
  # The attacks one compiled round serves (a sweep's cells that differ only in
  # their attack), chosen by DeviceData.attack; empty: the round runs ``attack``.
  attacks: tuple = ()
  # Local steps, client sampling, data over the honest workers (docs/federated.md).
  federated: federated_lib.Federated = federated_lib.Federated()
  # data.server_examples: the server's own examples, set aside from the train split
  # (sampling.set_aside) and never drawn by a worker; 0: none.
  server_examples: int = 0
  # Evaluation (docs/sweeps.md, "Evaluation"): the steps evaluated besides every
  # eval_every, a row for the initial model, the k of the last-k mean; the examples held
  # out of the train split for validation (data.validation; ``dataset`` is the rest) and
  # the dataset as loaded, before that split (what later builds of the same data reuse).
  eval_steps: tuple = ()
  eval_at_start: bool = False
  report_last_k: int = 5
  validation: Optional[data_lib.Validation] = None
  source: Optional[data_lib.Dataset] = None

  @property
  def num_honest(self) -> int:
    return self.num_workers - self.num_byzantine

  @property
  def num_computed(self) -> int:
    """Workers whose gradients the round evaluates.

    Omniscient attacks overwrite the Byzantine rows from the honest ones, so
    their gradients would be thrown away: they are not computed.
    """
    if self.num_byzantine and self.attack.uses_own_updates:
      return self.num_workers
    return self.num_honest

  @property
  def num_with_data(self) -> int:
    """Workers the data is split over: W, or the honest ones (``data.honest_only``)."""
    return self.num_honest if self.federated.honest_only else self.num_workers

  @property
  def num_rows(self) -> int:
    """Rows the aggregator reduces each round: W, or the m drawn workers."""
    return self.federated.participants or self.num_workers

  @property
  def record(self) -> dict:
    """The config's fields with the aggregator resolved (its spec and f)."""
    record = json.loads(json.dumps(self.fields))
    record["aggregator"].update(spec=self.aggregator.spec, f=self.aggregator.f)
    return record

  @property
  def resolved(self) -> dict:
    """What the config resolved to, written beside it in config.json."""
    return {"aggregator": self.aggregator.spec, "f": self.aggregator.f,
            "attack": self.attack.name, "loop": self.loop, "worker_chunk": self.worker_chunk}

  @property
  def sharded(self) -> bool:
    """Whether the round runs in the parameter-sharded layout (docs/scaling.md)."""
    return self.mesh is not None and self.aggregation == "sharded"

  @property
  def num_devices(self) -> int:
    return 1 if self.mesh is None else self.mesh.devices.size

  def describe(self) -> str:
    """The run's header: what it trains, and the backend choices (one line each)."""
    what = (f"Training {self.record['model']['name'] if self.builtin_model else type(self.model).__name__}"
            f" on {self.dataset.name}: W={self.num_workers}, {self.num_byzantine} Byzantine "
            f"({self.attack.name}), aggregator {self.aggregator.spec} with f={self.aggregator.f}, "
            f"estimator {self.record['optim']['estimator']}, b={self.batch_size}, "
            f"{self.num_steps} rounds, {jnp.dtype(self.dtype).name}.")
    fed = self.federated
    if fed != federated_lib.Federated():
      what += (f"\nFederated: {fed.local_steps} local step(s) of rate {fed.local_lr} sending the "
               f"{fed.send.replace('_', ' ')}, {fed.participants or self.num_workers} of "
               f"{self.num_workers} workers per round, data over "
               f"{'the honest workers' if fed.honest_only else 'every worker'}.")
    return what + "\n" + policy.describe(
        kernels=self.kernels, loop=self.loop, chunk=self.worker_chunk,
        devices=self.num_devices, aggregation=self.aggregation)


def aggregator_spec(name: str, meta: Optional[str]) -> str:
  """The spec of ``aggregator.name`` wrapped in ``aggregator.meta``.

  Refuses a name that already holds a meta-aggregator while ``meta`` adds
  another (``name="ctma(cwtm)"`` with the default ``meta="ctma"`` would train
  ``ctma(ctma(cwtm))``), and a spec that repeats a meta-aggregator.
  """
  meta = (meta or "none").strip()
  name = name.strip()
  if meta.lower() != "none" and aggregators_lib.canonical(meta) not in (
      aggregators_lib.META_AGGREGATORS):
    raise ConfigError(f"aggregator.meta={meta!r} is not a meta-aggregator; valid: none, "
                      f"{', '.join(sorted(aggregators_lib.META_AGGREGATORS))} "
                      f"(ftjax list metas).")
  nested = aggregators_lib.spec_layers(name)
  if meta.lower() != "none" and len(nested) > 1:
    raise ConfigError(
        f"aggregator.name={name!r} already names a meta-aggregator and aggregator.meta="
        f"{meta!r} would wrap it again; set aggregator.meta='none' to train {name!r}, or "
        f"aggregator.name={nested[-1]!r} to train {meta}({nested[-1]}).")
  spec = name if meta.lower() == "none" else f"{meta}({name})"
  layers = aggregators_lib.spec_layers(spec)
  repeated = sorted({n for n in layers if layers.count(n) > 1})
  if repeated:
    raise ConfigError(f"The aggregator spec {spec!r} applies {repeated[0]!r} twice; "
                      f"name each meta-aggregator once.")
  return spec


def _to_dict(section) -> dict:
  if section is None:
    return {}
  return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def _check_int(name: str, value: Any, lowest: int, hint: str = "") -> int:
  try:
    return registry.int_at_least(lowest, hint)(name, value)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_counts(c) -> tuple[int, int, int]:
  w = _check_int("workers.num", c.workers.num, 1)
  f = _check_int("workers.byzantine", c.workers.byzantine, 0)
  b = _check_int("workers.batch_size", c.workers.batch_size, 1)
  _check_int("num_steps", c.num_steps, 1)
  _check_int("eval_every", c.eval_every, 1)
  _check_int("data.eval_batch_size", c.data.eval_batch_size, 1)
  _check_int("seed", c.seed, 0)
  if 2 * f >= w:
    raise ConfigError(
        f"workers.byzantine={f} with workers.num={w}: robust training needs fewer than "
        f"half of the workers Byzantine (f < W/2); lower workers.byzantine to at most "
        f"{(w - 1) // 2} or raise workers.num to at least {2 * f + 1}.")
  chunk = c.workers.get("chunk", None)
  if chunk is not None:
    _check_int("workers.chunk", chunk, 0, "0: all workers at once; None: the backend's choice")
  return w, f, b


def _check_scalars(c):
  if c.dtype not in ("float32", "float64"):
    raise ConfigError(f"dtype must be 'float32' or 'float64', got {c.dtype!r}.")
  if c.dtype == "float64" and not jax.config.read("jax_enable_x64"):
    raise ConfigError("dtype float64 needs 64-bit JAX: build inside `with jax.enable_x64(True):` "
                      "(train_and_evaluate does this itself), or use dtype float32.")
  clip = c.optim.clip
  if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                           or clip < 0):
    raise ConfigError(f"optim.clip must be a positive number, or 0 / None for no clipping, "
                      f"got {clip!r}.")
  if c.data.shuffle not in sampling.SHUFFLES:
    raise ConfigError(f"Unknown data.shuffle {c.data.shuffle!r}; valid: "
                      f"{', '.join(sampling.SHUFFLES)}.")
  return (jnp.float64 if c.dtype == "float64" else jnp.float32), (clip or None)


def _check_evaluation(c, num_steps: int) -> tuple[tuple, bool, int, float]:
  """eval_steps (a string of steps, or a sequence), eval_at_start, report_last_k and
  data.validation, each checked; the steps sorted and without repeats."""
  at_start = c.get("eval_at_start", True)  # a config without the fields: their defaults
  if not isinstance(at_start, bool):
    raise ConfigError(f"eval_at_start must be True or False, got {at_start!r}.")
  last_k = _check_int("report_last_k", c.get("report_last_k", results.DEFAULT_LAST_K), 1)
  given = c.get("eval_steps", "") or ()
  items = (given.replace(",", " ").split() if isinstance(given, str)
           else list(given) if isinstance(given, (list, tuple)) else [given])
  steps = []
  for item in items:
    try:
      step = int(item) if isinstance(item, str) or not isinstance(item, bool) else None
    except (TypeError, ValueError):
      step = None
    if step is None or step != float(item) or not 1 <= step <= num_steps:
      raise ConfigError(f"eval_steps={given!r}: {item!r} is not a step in [1, num_steps="
                        f"{num_steps}]; give steps as \"100,500,1000\" (step 0 is eval_at_start).")
    steps.append(step)
  fraction = c.data.get("validation", 0.0)
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
      0 <= fraction < 1):
    raise ConfigError(f"data.validation must be a fraction of the train split in [0, 1) "
                      f"(0 = no validation split; 0.2 holds out 20%), got {fraction!r}.")
  return tuple(sorted(set(steps))), at_start, last_k, float(fraction)


def _declared_f(c, f: int) -> int:
  """The f the rule is built for (aggregator.f, default workers.byzantine)."""
  declared = c.aggregator.get("f", None)
  if declared is None:
    return f
  return _check_int("aggregator.f", declared, 0, "or None for workers.byzantine")


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
      that differ only in their attack share one compilation. Empty: the
      round runs ``config.attack.name`` alone.

  Returns:
    The :class:`Setup`.

  Raises:
    ConfigError: with a sentence saying what to change, for any config that
      cannot run (unknown names, f >= W/2, batch larger than the data, float64
      without 64-bit JAX, ...).
  """
  c = config
  w, f, b = _check_counts(c)
  dtype, clip = _check_scalars(c)
  eval_steps, eval_at_start, last_k, fraction = _check_evaluation(c, c.num_steps)
  try:  # The libraries' own ValueErrors carry the sentence to show the user.
    mesh, aggregation = _layout(c)
    attack = _make_attack(c, c.attack.name)
    attack.check_counts(w, f)
    batch_stats_mode = c.model.get("batch_stats", "honest_mean")
    _check_batch_stats_mode(batch_stats_mode, builtin=model is None)
    needs_prev = estimators.needs_previous_gradient(c.optim.estimator)
    fed = federated_lib.settings(c, w, attack, needs_prev, batch_stats_mode)
    aggregator, family = _rule_and_attacks(c, w, f, attack, attacks, fed)
    worker_tx = estimators.make_estimator(c.optim)
    server_tx = optim.make_server_optimizer(c.optim)
    if model is None and c.model.name not in models_lib.MODELS:  # before loading any data
      raise ValueError(f"Unknown model {c.model.name!r}; choose one of: "
                       f"{', '.join(models_lib.MODELS)}.")
    server_examples = _check_int("data.server_examples", c.data.get("server_examples", 0), 0)
    _check_server_rule(aggregator, fed, server_examples)  # before loading any data
    source, dataset, validation = _split(c, dataset, fraction)
    dataset, partition = _data(c, dataset, w - f if fed.honest_only else w,
                               b * fed.local_steps, server_examples)
    builtin = model is None
    if builtin:
      model = models_lib.make_model(c.model.name, num_classes=dataset.num_classes, dtype=dtype,
                                    kernels=c.kernels)
    _check_model_fits(model, dataset, dtype, c.model.name if builtin else type(model).__name__,
                      builtin)
    for member in family or (attack,):  # a trigger must fit the images (poisoning.Trigger)
      if hasattr(member.poisoning, "check"):
        member.poisoning.check(dataset.train_images.shape[1:], dataset.num_classes, b)
  except (ValueError, FileNotFoundError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(str(e)) from None

  _check_rule_layout(aggregator, fed, mesh is not None and aggregation == "sharded")
  num_computed = w if f and attack.uses_own_updates else w - f
  per_device = -(-num_computed // (1 if mesh is None else mesh.devices.size))
  chunk = policy.worker_chunk(c.kernels, per_device, c.workers.get("chunk", None))
  return Setup(
      dataset=dataset, model=model, worker_tx=worker_tx, server_tx=server_tx,
      aggregator=aggregator, attack=attack, num_workers=w, num_byzantine=f, batch_size=b,
      dtype=dtype, partition=partition, seed=c.seed, clip=clip,
      needs_prev=needs_prev,
      batch_stats_mode=batch_stats_mode, shuffle=c.data.shuffle, num_steps=c.num_steps,
      eval_every=c.eval_every, eval_batch_size=c.data.eval_batch_size, kernels=c.kernels,
      loop=policy.loop_kind(c.loop, c.kernels, chunk or per_device, builtin),
      worker_chunk=chunk, fields=json.loads(c.to_json()), mesh=mesh, builtin_model=builtin,
      aggregation=aggregation, attacks=family, federated=fed, server_examples=server_examples,
      eval_steps=eval_steps, eval_at_start=eval_at_start, report_last_k=last_k,
      validation=validation, source=source)


def _check_rule_layout(aggregator, fed: federated_lib.Federated, sharded: bool) -> None:
  """Weights need a stateless rule with a weighted version; state needs unsharded rows."""
  if fed.weights is not None:
    try:
      aggregators_lib.weighted.check(aggregator)
    except ValueError as e:
      raise ConfigError(f"aggregator.weights={fed.weights!r}: {e}") from None
    if aggregator.stateful or sharded:
      raise ConfigError("aggregator.weights needs a stateless rule in the one-device or "
                        "replicated layout (mesh.aggregation='replicated').")
  if aggregator.needs_server and sharded:
    raise ConfigError(f"{aggregator.spec!r} reads the server's own update, which the sharded "
                      f"aggregation (mesh.aggregation='sharded') does not pass to the rule; use "
                      f"mesh.aggregation='replicated'.")
  if aggregator.stateful and sharded:
    raise ConfigError(f"{aggregator.spec!r} keeps state across rounds, which the sharded "
                      f"aggregation (mesh.aggregation='sharded') does not hold; use "
                      f"mesh.aggregation='replicated'.")


def _check_server_rule(aggregator, fed: federated_lib.Federated, server_examples: int) -> None:
  """A rule that reads the server's update (fltrust) needs the server's examples and one
  gradient per round from every worker (the server's update is one gradient)."""
  if not aggregator.needs_server:
    return
  if not server_examples:
    raise ConfigError(f"{aggregator.spec!r} weighs the workers' updates against the server's "
                      f"own update, computed on examples the server holds: set "
                      f"data.server_examples > 0 (the FLTrust paper uses 100).")
  if fed.local:
    raise ConfigError(f"{aggregator.spec!r} compares one-gradient server updates with the "
                      f"workers' rows, so it needs federated.local_steps = 1.")


def _layout(c) -> tuple[Optional[Mesh], str]:
  """The kernel set and loop checked; the workers' mesh and the aggregation layout."""
  kernels.check(c.kernels)
  if c.loop not in policy.LOOPS:
    raise ConfigError(f"Unknown loop {c.loop!r}; valid: {', '.join(policy.LOOPS)}.")
  mesh = sharding.worker_mesh(c.get("devices", 0))
  aggregation = (c.get("mesh") or {}).get("aggregation", "replicated")
  if aggregation not in sharding.AGGREGATION_LAYOUTS:
    raise ConfigError(f"Unknown mesh.aggregation {aggregation!r}; valid: "
                      f"{', '.join(sharding.AGGREGATION_LAYOUTS)}.")
  return mesh, aggregation


def _rule_and_attacks(c, w: int, f: int, attack: attacks_lib.Attack, attacks: Sequence[str],
                      fed: federated_lib.Federated):
  """The aggregator (built for the declared f) and the round's attack family.

  The attack, and the split of the logged diagnostics into honest and
  Byzantine rows, use the actual count f (workers.byzantine). With client
  sampling the rule reduces the m drawn rows, built for
  :func:`ftjax.federated.sampled_f`.
  """
  spec = aggregator_spec(c.aggregator.name, c.aggregator.meta)
  rows, declared = w, _declared_f(c, f)
  if fed.participants:
    rows = fed.participants
    declared = federated_lib.sampled_f(c.aggregator.get("f", None), f, w, rows)
  aggregator = aggregators_lib.make_aggregator(
      spec, declared, num_workers=rows, options=_to_dict(c.aggregator.options),
      kernels=c.kernels)
  return aggregator, _attack_family(c, attack, attacks)


def _split(c, dataset: Optional[data_lib.Dataset], fraction: float):
  """The dataset as loaded (unless given), the train split the run trains on, and the
  validation split held out of it (None without ``data.validation``)."""
  if dataset is None:
    dataset = data_lib.load_dataset(
        c.data.name, path=c.data.path or None, data_dir=c.data.data_dir or None)
  if not fraction:
    return dataset, dataset, None
  num = dataset.train_images.shape[0]
  count = data_lib.validation_count(fraction, num)
  if not 1 <= count < num:
    raise ConfigError(f"data.validation={fraction} holds out {count} of the {num} training "
                      f"examples of {dataset.name}; choose a fraction that keeps at least one "
                      f"example on each side.")
  return (dataset, *data_lib.split_validation(dataset, count))


def _data(c, dataset: data_lib.Dataset, w: int, b: int, held_out: int = 0):
  """The dataset and the partition over ``w`` workers (None: i.i.d.).

  ``w`` counts the workers that hold data and ``b`` the examples each takes
  per round (K local minibatches of ``workers.batch_size``). The partition
  covers the examples left after the server's ``held_out``
  (:func:`ftjax.sampling.set_aside`), as indices into the whole split."""
  num = dataset.train_images.shape[0]
  if held_out >= num:
    raise ConfigError(f"data.server_examples={held_out} leaves no training examples for the "
                      f"workers ({dataset.name} has {num}); set it below {num}.")
  sampling.check_batch(dataset, w, b, held_out)
  key = jax.random.fold_in(jax.random.key(c.seed), KEY_DATA)
  pool = np.asarray(sampling.set_aside(key, np.arange(held_out, num), num)) if held_out else None
  partition = sampling.partition_indices(
      key, dataset.train_labels if pool is None else dataset.train_labels[pool], w,
      scheme=c.data.partition, alpha=c.data.alpha,
      shards_per_worker=c.data.shards_per_worker, gamma=c.data.get("gamma", 0.5))
  if partition is not None:
    sampling.check_partition(partition, b)
    if pool is not None:  # positions in the workers' pool -> examples of the split
      partition = partition._replace(table=np.where(
          partition.table >= 0, pool[np.maximum(partition.table, 0)], -1).astype(np.int32))
  return dataset, partition


def _make_attack(c, name: str) -> attacks_lib.Attack:
  return attacks_lib.make_attack(name, **_to_dict(c.attack.options.get(
      attacks_lib.canonical_name(name), None)))


def _attack_family(c, attack: attacks_lib.Attack, names: Sequence[str]) -> tuple:
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
  return family


def attack_family(names: Sequence[str], num_workers: Optional[int] = None,
                  num_byzantine: int = 0) -> list[tuple[str, ...]]:
  """Groups attack names into the families that can share one compiled round.

  Attacks that send the Byzantine workers' own updates (``none``, ``lf``,
  ``sf``) and omniscient ones compute different workers, so they never share
  a round; every other pair can (``build(attacks=...)``). An attack whose
  formula is not defined for W = ``num_workers`` and f = ``num_byzantine``
  (:meth:`ftjax.attacks.Attack.check_counts`) stays alone, so that its
  refusal cannot stop the others' round. Order is kept.
  """
  groups = {}
  for name in names:
    attack = attacks_lib.make_attack(name)
    alone = False
    if num_workers is not None:
      try:
        attack.check_counts(num_workers, num_byzantine)
      except ValueError:
        alone = True
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
