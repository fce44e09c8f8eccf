"""The data a round reads: the training split on device, the rounds' example indices,
and each computed worker's minibatches (poisoned for a data-poisoning attack).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ftjax import data as data_lib
from ftjax import sampling
from ftjax.build import KEY_AUGMENT, KEY_DATA, Setup
from ftjax.state import TrainState, purpose_key


def attack_members(setup: Setup) -> tuple:
  """The attacks the round serves: the run's, or its attack family (``Setup.attacks``)."""
  return setup.attacks or (setup.attack,)


class DeviceData(NamedTuple):
  """The training split, resident on device; the round gathers from it."""
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
  """The workers' example indices for the ``length`` rounds from ``state.step``.

  int32 [length, W', K b]: K local minibatches of b for each of the W' workers
  that compute on data. With ``data.honest_only`` the partition covers the
  honest workers; Byzantine workers that run the honest algorithm (``sf``,
  ``lf``, ``none``) hold no shard and draw theirs i.i.d. from the whole split.
  With ``data.server_examples`` the server's examples are never drawn
  (:func:`ftjax.sampling.set_aside`).
  """
  key = purpose_key(state, KEY_DATA)
  per_round = setup.batch_size * setup.federated.local_steps
  num_examples = setup.dataset.train_images.shape[0]
  held_out = setup.server_examples

  def iid(stream, workers):  # i.i.d. draws from the examples the server does not hold
    idx = sampling.chunk_indices(stream, state.step, length, num_examples - held_out, workers,
                                 per_round, shuffle=setup.shuffle)
    return sampling.set_aside(key, held_out + idx, num_examples) if held_out else idx

  if data.table is None:  # i.i.d.: honest_only leaves out the workers that compute nothing
    return iid(key, setup.num_computed if setup.federated.honest_only else setup.num_workers)
  steps = state.step + jnp.arange(length, dtype=jnp.int32)
  idx = jax.vmap(lambda s: sampling.worker_round_indices(
      key, s, data.table, data.sizes, per_round, shuffle=setup.shuffle))(steps)
  without = setup.num_computed - data.table.shape[-2]  # computed workers without a shard
  if without > 0:
    idx = jnp.concatenate([idx, iid(jax.random.fold_in(key, 1), without)], axis=1)
  return idx


def _poison(setup: Setup, data: DeviceData, x: jax.Array, y: jax.Array):
  """The Byzantine workers' raw minibatches poisoned by the run's attack, if it poisons
  (``lf``, ``backdoor``: :mod:`ftjax.poisoning`); the honest ones unchanged."""
  h, members = setup.num_honest, attack_members(setup)
  xb, yb, stamped = x[h:], y[h:], False
  for i, a in enumerate(members):
    if a.poisoning is None:
      continue
    px, py = a.poisoning.poison(xb, yb, setup.dataset.num_classes, setup.batch_size)
    # In a round for several attacks, whether this run's attack poisons is an index away.
    mine = data.attack == i if setup.attacks else True
    if px is not xb:
      xb, stamped = jnp.where(mine, px, xb), True
    yb = jnp.where(mine, py, yb)
  return (x.at[h:].set(xb) if stamped else x), y.at[h:].set(yb)


def minibatches(setup: Setup, state: TrainState, data: DeviceData, idx: jax.Array):
  """The computed workers' inputs and labels; the Byzantine workers' poisoned by a data
  poisoning attack (:func:`_poison`)."""
  ds = setup.dataset
  idx = idx[:setup.num_computed]
  x, y = data.images[idx], data.labels[idx]  # uint8 [n, b, H, W, C], int32 [n, b]
  if setup.num_byzantine and any(a.poisoning is not None for a in attack_members(setup)):
    x, y = _poison(setup, data, x, y)
  if ds.augment == "crop_flip":
    # On the raw pixels, so the padding is black as in torchvision.
    x = data_lib.augment_crop_flip(
        jax.random.fold_in(purpose_key(state, KEY_AUGMENT), state.step), x)
  x = data_lib.preprocess(x, ds.mean, ds.std, setup.dtype)
  k = setup.federated.local_steps
  if k > 1:  # [n, K b, ...] -> [n, K, b, ...]: K local minibatches
    x = x.reshape((x.shape[0], k, -1) + x.shape[2:])
    y = y.reshape((y.shape[0], k, -1))
  return x, y


def server_batch(setup: Setup, state: TrainState, data: DeviceData):
  """The server's own examples (``data.server_examples``, :func:`ftjax.sampling.set_aside`)
  as one preprocessed, unaugmented batch: (inputs, labels)."""
  ds = setup.dataset
  idx = sampling.set_aside(purpose_key(state, KEY_DATA), jnp.arange(setup.server_examples),
                           ds.train_images.shape[0])
  return data_lib.preprocess(data.images[idx], ds.mean, ds.std, setup.dtype), data.labels[idx]
