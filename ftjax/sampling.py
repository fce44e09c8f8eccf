"""The workers' examples of each round, drawn on device, and non-i.i.d. splits.

The functions that take a ``key`` are pure JAX and jittable:
:func:`chunk_indices` (the i.i.d. sampler of the paper's setting;
:func:`round_indices` is one round of it) and :func:`worker_round_indices`
(per-worker shards of a non-i.i.d. split made by :func:`partition_indices` on
the host).

Two shuffles are offered (:data:`SHUFFLES`). "permutation", the default, is
``jax.random.permutation`` of the whole split, one per epoch: exact, at the
cost of a sort of N. "feistel" evaluates a keyed bijection only at the round's
W*b positions, O(W*b) per round whatever N is, a pseudo-random rather than
exactly uniform shuffle.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.data import Dataset, check_name


# ----------------------------------------------------------------------------
# Per-round sampling


def check_batch(dataset: Dataset, num_workers: int, batch_size: int, held_out: int = 0) -> None:
  """Refuses a round that needs more distinct examples than the train split has.

  Args:
    dataset: the dataset.
    num_workers: W.
    batch_size: b, examples per worker per round.
    held_out: examples of the split the workers never draw (the server's).

  Raises:
    ValueError: if W or b is not positive or W * b exceeds the train split.
  """
  what = dataset.name if not held_out else f"{dataset.name} less the server's {held_out}"
  _check_round(dataset.train_images.shape[0] - held_out, num_workers, batch_size, what)


def _check_round(num_examples, num_workers, batch_size, what="the dataset"):
  for label, v in (("num_workers", num_workers), ("batch_size", batch_size)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{label} must be a positive int, got {v!r}.")
  if num_workers * batch_size > num_examples:
    raise ValueError(
        f"A round draws num_workers * batch_size = {num_workers} * {batch_size} = "
        f"{num_workers * batch_size} distinct examples but {what} has only {num_examples} "
        f"training examples; lower workers.batch_size to at most "
        f"{num_examples // num_workers} or use fewer workers.")


_FEISTEL_ROUNDS = 8


def _mix32(x: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a cheap, well-avalanched bijection of uint32."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _feistel_permute(x: jax.Array, round_keys: jax.Array, half_bits: jax.Array,
                     size: jax.Array) -> jax.Array:
  """Images of ``x`` (all < size) under a keyed permutation of [0, size).

  A balanced Feistel network on 2 * half_bits bits is a bijection of
  [0, 4**half_bits) for any round function; cycle-walking (re-applying it until
  the value falls below ``size``) restricts it to a bijection of [0, size).
  With 4**half_bits < 4 * size a walk takes under 4 applications on average.
  ``half_bits`` and ``size`` may be traced and broadcast against ``x``.
  """
  half_bits = jnp.asarray(half_bits, jnp.uint32)
  mask = (jnp.uint32(1) << half_bits) - jnp.uint32(1)

  def encrypt(v):
    left, right = v >> half_bits, v & mask
    for k in range(_FEISTEL_ROUNDS):
      left, right = right, left ^ (_mix32(right ^ round_keys[k]) & mask)
    return (left << half_bits) | right

  def walk(state):
    v, _ = state
    out = jnp.where(v >= size, encrypt(v), v)
    return out, jnp.any(out >= size)

  v = encrypt(x.astype(jnp.uint32))
  v, _ = jax.lax.while_loop(lambda state: state[1], walk, (v, jnp.any(v >= size)))
  return v.astype(jnp.int32)


def _half_bits(size: jax.Array) -> jax.Array:
  """Smallest h >= 1 with 4**h >= size (size >= 1, may be traced)."""
  bits = 32 - jax.lax.clz(jnp.maximum(jnp.asarray(size, jnp.uint32) - 1, 1))
  return (bits + 1) // 2


def _shuffle_permutation(key, epoch, num_examples, start, count):
  perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
  return jax.lax.dynamic_slice(perm, (start,), (count,)).astype(jnp.int32)


def _shuffle_feistel(key, epoch, num_examples, start, count):
  round_keys = jax.random.bits(jax.random.fold_in(key, epoch), (_FEISTEL_ROUNDS,), jnp.uint32)
  positions = jnp.asarray(start, jnp.uint32) + jnp.arange(count, dtype=jnp.uint32)
  return _feistel_permute(positions, round_keys, _half_bits(num_examples),
                          jnp.uint32(num_examples))


# Both give every epoch a fresh uniform-looking permutation of the train split.
SHUFFLES: dict[str, Callable[..., jax.Array]] = {
    # jax.random.permutation of all N per round: a sort of N, ~O(N log N).
    "permutation": _shuffle_permutation,
    # Keyed Feistel bijection evaluated only at the W*b positions of the round:
    # O(W*b) per round whatever N is (a pseudo-random, not exactly uniform, shuffle).
    "feistel": _shuffle_feistel,
}


def epoch_permutation(key: jax.Array, epoch: Union[int, jax.Array], num_examples: int,
                      shuffle: str = "permutation") -> jax.Array:
  """The whole shuffle of one epoch that :func:`round_indices` walks through.

  Args:
    key: the data PRNG key.
    epoch: the epoch number; may be traced.
    num_examples: N (static).
    shuffle: a key of :data:`SHUFFLES`.

  Returns:
    int32 [N], a permutation of 0..N-1.
  """
  check_name("shuffle", shuffle, SHUFFLES)
  return SHUFFLES[shuffle](key, jnp.asarray(epoch, jnp.int32), num_examples, 0, num_examples)


def round_indices(key: jax.Array, step: Union[int, jax.Array], num_examples: int,
                  num_workers: int, batch_size: int, *, shuffle: str = "permutation"
                  ) -> jax.Array:
  """Example indices of one i.i.d. round, jittable: :func:`chunk_indices` of one round.

  Returns:
    int32 [W, b] indices into the train split, all distinct.
  """
  return chunk_indices(key, step, 1, num_examples, num_workers, batch_size,
                       shuffle=shuffle)[0]


# Above this many int32 entries, the epoch permutations of a chunk are not
# drawn up front (the memory would grow with the chunk length times N).
_MAX_CACHED_PERMUTATION_ENTRIES = 1 << 25


def chunk_indices(key: jax.Array, first_step: Union[int, jax.Array], length: int,
                  num_examples: int, num_workers: int, batch_size: int, *,
                  shuffle: str = "permutation") -> jax.Array:
  """Example indices of ``length`` consecutive i.i.d. rounds, jittable.

  The i.i.d. sampler: each epoch is a fresh permutation of the train split,
  seeded by ``fold_in(key, epoch)`` (:func:`epoch_permutation`); round r of
  the epoch takes its W*b entries from position r*W*b on, worker i getting the
  i-th chunk of b. The last incomplete round of an epoch is dropped, so there
  are N // (W*b) rounds per epoch. With the "permutation" shuffle the
  permutations of the epochs the chunk touches are drawn once for the whole
  chunk (a permutation of N per round would cost more than the model's step
  on MNIST); the indices are the same either way.

  Args:
    key: the data PRNG key (the same for every step).
    first_step: the first round's number, 0-based; may be a traced int32.
    length: the number of rounds (static).
    num_examples: N, the train split size (static).
    num_workers: W (static).
    batch_size: b (static).
    shuffle: a key of :data:`SHUFFLES`; "permutation" (exact uniform
      shuffles) or "feistel" (O(W*b) per round whatever N is).

  Returns:
    int32 [length, W, b] indices into the train split; within a round all
    distinct.
  """
  _check_round(num_examples, num_workers, batch_size)
  check_name("shuffle", shuffle, SHUFFLES)
  per_round = num_workers * batch_size
  rounds_per_epoch = num_examples // per_round
  steps = jnp.asarray(first_step, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
  epochs, starts = steps // rounds_per_epoch, (steps % rounds_per_epoch) * per_round
  num_epochs = length // rounds_per_epoch + 2  # epochs one chunk can touch
  if shuffle == "permutation" and num_epochs * num_examples <= _MAX_CACHED_PERMUTATION_ENTRIES:
    first_epoch = epochs[0]
    perms = jax.vmap(lambda e: epoch_permutation(key, e, num_examples))(
        first_epoch + jnp.arange(num_epochs, dtype=jnp.int32))
    rounds = jax.vmap(lambda e, start: jax.lax.dynamic_slice(
        perms[e - first_epoch], (start,), (per_round,)))(epochs, starts)
  else:
    rounds = jax.vmap(lambda e, start: SHUFFLES[shuffle](
        key, e, num_examples, start, per_round))(epochs, starts)
  return rounds.reshape(length, num_workers, batch_size)


# Folded into the data key for the order that sets the server's examples aside (far
# from the epoch numbers the shuffles fold in).
_SET_ASIDE_SALT = 0x5E7A51DE


def set_aside(key: jax.Array, positions: jax.Array, num_examples: int) -> jax.Array:
  """The train-split examples at ``positions`` of a keyed order of the split, jittable.

  The order is a keyed Feistel bijection of [0, N) (the "feistel" shuffle's),
  evaluated only at ``positions``, O(len(positions)). With
  ``data.server_examples = n`` the server holds the examples at positions
  [0, n) and the workers' example p (p in [0, N - n)) is the one at position
  n + p, so no worker ever draws one of the server's.

  Args:
    key: the run's data key (build.KEY_DATA); the order depends on it alone.
    positions: int [...] positions in [0, N).
    num_examples: N (static).

  Returns:
    int32 example indices, the shape of ``positions``.
  """
  round_keys = jax.random.bits(jax.random.fold_in(key, _SET_ASIDE_SALT), (_FEISTEL_ROUNDS,),
                               jnp.uint32)
  return _feistel_permute(jnp.asarray(positions, jnp.uint32), round_keys,
                          _half_bits(num_examples), jnp.uint32(num_examples))


class Partition(NamedTuple):
  """Disjoint per-worker shards of the train split, padded to one width.

  Attributes:
    table: int32 [W, S]; row i holds worker i's example indices in its first
      ``sizes[i]`` slots and -1 after them.
    sizes: int32 [W], the shard sizes.
  """
  table: np.ndarray
  sizes: np.ndarray


def _rng(key_or_seed) -> np.random.Generator:
  if isinstance(key_or_seed, (int, np.integer)):
    return np.random.default_rng(int(key_or_seed))
  # A JAX key: draw a host seed from it so partitions follow the root key.
  return np.random.default_rng(int(jax.random.bits(key_or_seed, (), jnp.uint32)))


def _pack(shards: list[np.ndarray]) -> Partition:
  sizes = np.array([s.size for s in shards], np.int32)
  table = np.full((len(shards), max(int(sizes.max()), 1)), -1, np.int32)
  for i, s in enumerate(shards):
    table[i, :s.size] = np.sort(s)
  return Partition(table, sizes)


def _partition_iid(rng, labels, num_workers, **unused) -> None:
  del rng, labels, num_workers, unused
  return None


def _partition_iid_split(rng, labels, num_workers, **unused) -> Partition:
  del unused
  return _pack(np.array_split(rng.permutation(labels.size), num_workers))


def _partition_dirichlet(rng, labels, num_workers, *, alpha, min_size, max_tries=100,
                         **unused) -> Partition:
  del unused
  classes = np.unique(labels)
  for _ in range(max_tries):
    shards = [[] for _ in range(num_workers)]
    for c in classes:
      members = rng.permutation(np.flatnonzero(labels == c))
      share = rng.dirichlet(np.full(num_workers, alpha))
      cuts = np.round(np.cumsum(share)[:-1] * members.size).astype(int)
      for i, part in enumerate(np.split(members, cuts)):
        shards[i].append(part)
    shards = [np.concatenate(s) for s in shards]
    # Small alpha can leave a worker (nearly) empty; redraw rather than hand it
    # a shard too small for one batch.
    if min(s.size for s in shards) >= min_size:
      return _pack(shards)
  raise ValueError(
      f"Dirichlet(alpha={alpha}) over {num_workers} workers left a worker with fewer than "
      f"min_size={min_size} examples in {max_tries} draws; raise alpha, or lower min_size "
      "(the batch size) or the number of workers.")


def _partition_shards(rng, labels, num_workers, *, shards_per_worker, **unused) -> Partition:
  del unused
  # Sorting a shuffled copy by label makes ties (same class) land in random order.
  by_label = rng.permutation(labels.size)
  by_label = by_label[np.argsort(labels[by_label], kind="stable")]
  pieces = np.array_split(by_label, num_workers * shards_per_worker)
  owner = rng.permutation(len(pieces)).reshape(num_workers, shards_per_worker)
  return _pack([np.concatenate([pieces[j] for j in row]) for row in owner])


def _partition_gamma_similarity(rng, labels, num_workers, *, gamma, **unused) -> Partition:
  del unused
  # Per class, round(gamma * n_c) random members join the i.i.d. pool and the rest stay
  # in label order: the label-sorted part then holds exactly the (1 - gamma) share of
  # every class, whatever the draw.
  pool, rest = [], []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    k = int(round(gamma * members.size))
    pool.append(members[:k])
    rest.append(members[k:])
  spread = np.array_split(rng.permutation(np.concatenate(pool)), num_workers)
  # Classes ascend (np.unique) and are shuffled within, so `rest` is label-sorted.
  blocks = np.array_split(np.concatenate(rest), num_workers)
  return _pack([np.concatenate([a, z]) for a, z in zip(spread, blocks)])


def _partition_extreme(rng, labels, num_workers, **unused) -> Partition:
  del unused
  return _partition_gamma_similarity(rng, labels, num_workers, gamma=0.0)


PARTITIONS: dict[str, Callable[..., Optional[Partition]]] = {
    # The paper's i.i.d. default: no shards; every worker samples the shared per-epoch shuffle
    # with round_indices.
    "iid": _partition_iid,
    # Disjoint random shards of (almost) equal size: i.i.d. but not shared.
    "iid_split": _partition_iid_split,
    # Per class, Dirichlet(alpha) proportions over workers (Hsu et al., 2019).
    "dirichlet": _partition_dirichlet,
    # Label-sorted shards, shards_per_worker per worker (McMahan et al., 2017).
    "shards": _partition_shards,
    # A fraction gamma of every class spread i.i.d., the rest label-sorted in W contiguous
    # blocks (ByzFL's gamma-similarity split): gamma=1 is iid_split, gamma=0 is "extreme".
    "gamma_similarity": _partition_gamma_similarity,
    # The split sorted by label and cut into W contiguous equal parts: each worker sees one
    # class, or two at a block boundary (ByzFL's extreme non-i.i.d. split).
    "extreme": _partition_extreme,
}


def partition_indices(key_or_seed, labels, num_workers: int, *, scheme: str = "iid",
                      alpha: float = 0.5, shards_per_worker: int = 2,
                      gamma: float = 0.5, min_size: int = 1) -> Optional[Partition]:
  """Splits the train split into per-worker shards (host side, once per run).

  Args:
    key_or_seed: an int seed or a JAX PRNG key.
    labels: int [N] train labels.
    num_workers: W.
    scheme: a key of :data:`PARTITIONS`.
    alpha: Dirichlet concentration for "dirichlet"; small is skewed, large is
      close to i.i.d.
    shards_per_worker: label-sorted shards per worker for "shards".
    gamma: for "gamma_similarity", the fraction in [0, 1] of the data spread
      i.i.d. From every class c (n_c examples) round(gamma * n_c) random
      examples form a pool that is shuffled and cut into W near-equal parts;
      the remaining examples, sorted by label (in random order within a
      class), are cut into W contiguous near-equal blocks; worker i gets pool
      part i and block i. gamma=1 is an i.i.d. split, gamma=0 is "extreme".
    min_size: smallest allowed shard for "dirichlet" (pass the batch size).

  Returns:
    None for "iid" (sample with :func:`round_indices`), else a
    :class:`Partition` for :func:`worker_round_indices`. Every example belongs
    to exactly one worker.
  """
  check_name("partition scheme", scheme, PARTITIONS)
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be an integer vector [N], got {labels.dtype} "
                     f"{list(labels.shape)}.")
  if not isinstance(num_workers, (int, np.integer)) or not 1 <= num_workers <= labels.size:
    raise ValueError(f"num_workers must be an int in [1, {labels.size}], got {num_workers!r}.")
  if not alpha > 0:
    raise ValueError(f"alpha must be positive, got {alpha!r}.")
  if not isinstance(shards_per_worker, (int, np.integer)) or shards_per_worker < 1:
    raise ValueError(f"shards_per_worker must be a positive int, got {shards_per_worker!r}.")
  if (isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.number))
      or not 0 <= gamma <= 1):
    raise ValueError(f"gamma (the fraction of the data spread i.i.d. by gamma_similarity) "
                     f"must be a number in [0, 1], got {gamma!r}.")
  return PARTITIONS[scheme](_rng(key_or_seed), labels, num_workers, alpha=float(alpha),
                            min_size=int(min_size), shards_per_worker=int(shards_per_worker),
                            gamma=float(gamma))


def check_partition(partition: Partition, batch_size: int) -> None:
  """Refuses shards smaller than one batch (before any tracing).

  Args:
    partition: from :func:`partition_indices`.
    batch_size: b.

  Raises:
    ValueError: naming the workers whose shard is smaller than b.
  """
  sizes = np.asarray(partition.sizes)
  small = np.flatnonzero(sizes < batch_size)
  if small.size:
    raise ValueError(
        f"Workers {small.tolist()} have shards of {sizes[small].tolist()} examples, fewer than "
        f"batch_size={batch_size}; lower the batch size or partition with min_size={batch_size}.")


def _shard_slots_permutation(key, size, width, start, count):
  perm = jax.random.permutation(key, width)
  # Keep the permuted slots that hold data, in permuted order: a scatter to
  # their rank among valid slots (O(S), no second sort).
  valid = perm < size
  rank = jnp.cumsum(valid) - 1
  compact = jnp.zeros(width, jnp.int32).at[jnp.where(valid, rank, width)].set(
      perm.astype(jnp.int32), mode="drop")
  return jax.lax.dynamic_slice(compact, (start,), (count,))


def _shard_slots_feistel(key, size, width, start, count):
  del width
  round_keys = jax.random.bits(key, (_FEISTEL_ROUNDS,), jnp.uint32)
  positions = jnp.asarray(start, jnp.uint32) + jnp.arange(count, dtype=jnp.uint32)
  return _feistel_permute(positions, round_keys, _half_bits(size), size.astype(jnp.uint32))


# Same names as SHUFFLES; shard sizes are traced here, hence separate versions.
_SHARD_SLOTS = {"permutation": _shard_slots_permutation, "feistel": _shard_slots_feistel}


def worker_round_indices(key: jax.Array, step: Union[int, jax.Array], table: jax.Array,
                         sizes: jax.Array, batch_size: int, *, shuffle: str = "permutation"
                         ) -> jax.Array:
  """Example indices of one round with per-worker shards, jittable.

  Worker i walks its own shard in per-epoch shuffles (seeded by
  ``fold_in(fold_in(key, i), epoch_i)``), b examples per round without
  replacement within an epoch; its epoch has ``sizes[i] // b`` rounds and the
  incomplete last one is dropped. Shards must hold at least b examples
  (:func:`check_partition`).

  Args:
    key: the data PRNG key.
    step: the round number, 0-based; may be traced.
    table: int32 [W, S] from :class:`Partition`.
    sizes: int32 [W] shard sizes.
    batch_size: b (static).
    shuffle: a key of :data:`SHUFFLES`; "permutation" shuffles all S slots
      per round, "feistel" costs O(b) per worker and round.

  Returns:
    int32 [W, b] indices into the train split.
  """
  check_name("shuffle", shuffle, SHUFFLES)
  num_workers, width = table.shape
  if batch_size > width:
    raise ValueError(f"batch_size={batch_size} exceeds the largest shard ({width}); "
                     "lower the batch size.")
  table = jnp.asarray(table, jnp.int32)
  sizes = jnp.asarray(sizes, jnp.int32)
  step = jnp.asarray(step, jnp.int32)
  slots_fn = _SHARD_SLOTS[shuffle]

  def one_worker(i, row, size):
    rounds = jnp.maximum(size // batch_size, 1)
    epoch, r = step // rounds, step % rounds
    worker_key = jax.random.fold_in(jax.random.fold_in(key, i), epoch)
    return row[slots_fn(worker_key, size, width, r * batch_size, batch_size)]

  return jax.vmap(one_worker)(jnp.arange(num_workers), table, sizes)

