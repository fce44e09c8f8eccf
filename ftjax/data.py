"""Datasets in host memory and the per-round worker batches drawn from them.

Three sources, all resolved through the :data:`DATASETS` table:

* ``"digits"``: the built-in offline default, scikit-learn's bundled 8x8
  handwritten digits (1,797 images), so a fresh machine trains with no download.
* ``"npz"``: a local ``.npz`` file with ``train_images`` uint8 [N, H, W, C]
  (or [N, H, W]), ``train_labels`` int [N], ``test_images``, ``test_labels``.
* TFDS image-classification sets by name (``"mnist"``, ``"cifar10"``, ...),
  read with ``tfds.data_source``, which needs no TensorFlow once the dataset is
  prepared (in the array_record file format).

A :class:`Dataset` keeps the whole split as uint8 numpy arrays; the training
step puts them on device once and indexes them there. The functions below that
take a ``key`` are pure JAX and jittable: :func:`chunk_indices` (the i.i.d.
sampler of the paper's setting; :func:`round_indices` is one round of it),
:func:`worker_round_indices` (per-worker shards for non-i.i.d. splits made by
:func:`partition_indices`), :func:`preprocess` and :func:`augment_crop_flip`.

Two shuffles are offered (:data:`SHUFFLES`). "permutation", the default, is
``jax.random.permutation`` of the whole split, one per epoch: exact, at the
cost of a sort of N. "feistel" evaluates a keyed bijection only at the round's
W*b positions, O(W*b) per round whatever N is, a pseudo-random rather than
exactly uniform shuffle.

The digits split is stratified 80/20 per class with ``np.random.default_rng(0)``
(1,438 train, 359 test images). MNIST's fixed normalisation constants are mean
0.1307 and std 0.3081 (its train split's statistics, 0.130660 and 0.308108,
rounded).
"""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

# Below this many records a TFDS split loads without a progress bar.
_PROGRESS_MIN_RECORDS = 10_000
# Records fetched per `__getitems__` call when reading a TFDS split.
_READ_BATCH = 2_048

AUGMENTATIONS = {
    "none": "no augmentation",
    "crop_flip": "random crop with zero padding 2 and random horizontal flip (CIFAR-10)",
}

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is not on disk in a readable form and could not be fetched."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A whole image-classification dataset in host memory.

  Construct it directly to train on your own arrays (e.g. in a notebook); the
  fields are validated on construction and labels are cast to int32.

  Attributes:
    name: a label for logs.
    train_images: uint8 [N, H, W, C].
    train_labels: int32 [N], values in [0, num_classes).
    test_images: uint8 [M, H, W, C].
    test_labels: int32 [M].
    num_classes: number of classes.
    mean: per-channel mean on the [0, 1] scale (length C).
    std: per-channel standard deviation on the [0, 1] scale (length C).
    augment: a key of :data:`AUGMENTATIONS`.
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: str = "none"

  def __post_init__(self):
    channels = None
    for split in ("train", "test"):
      images = np.asarray(getattr(self, f"{split}_images"))
      labels = np.asarray(getattr(self, f"{split}_labels"))
      if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"Dataset {self.name!r}: {split}_images must be uint8 [N, H, W, C], got "
            f"{images.dtype} {list(images.shape)}; add a channel axis with "
            "images[..., None] and convert 0..1 floats with (x * 255).round().astype(np.uint8).")
      if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"Dataset {self.name!r}: {split}_labels must have shape [{images.shape[0]}] to match "
            f"{split}_images, got {list(labels.shape)}.")
      if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Dataset {self.name!r}: {split}_labels must be integers, got "
                         f"{labels.dtype}; convert class names to ids 0..C-1.")
      if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
        raise ValueError(
            f"Dataset {self.name!r}: {split}_labels span [{labels.min()}, {labels.max()}] but "
            f"num_classes={self.num_classes}; labels must lie in [0, num_classes).")
      if channels is not None and images.shape[1:] != channels:
        raise ValueError(f"Dataset {self.name!r}: train images are {list(channels)} but test "
                         f"images are {list(images.shape[1:])}; both splits need one shape.")
      channels = images.shape[1:]
      object.__setattr__(self, f"{split}_images", images)
      object.__setattr__(self, f"{split}_labels", labels.astype(np.int32, copy=False))
    if self.train_images.shape[0] == 0:
      raise ValueError(f"Dataset {self.name!r} has no training examples.")
    if self.test_images.shape[0] == 0:
      raise ValueError(f"Dataset {self.name!r} has no test examples; every evaluation needs "
                       f"some (hold out part of the training split).")
    c = channels[-1]
    mean = tuple(float(v) for v in np.atleast_1d(self.mean))
    std = tuple(float(v) for v in np.atleast_1d(self.std))
    if len(mean) != c or len(std) != c:
      raise ValueError(f"Dataset {self.name!r}: mean and std need one value per channel ({c}), "
                       f"got mean={mean}, std={std}.")
    if min(std) <= 0:
      raise ValueError(f"Dataset {self.name!r}: std must be positive, got {std}.")
    object.__setattr__(self, "mean", mean)
    object.__setattr__(self, "std", std)
    _check_name("augment", self.augment, AUGMENTATIONS)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to load one named dataset and its default preprocessing.

  Attributes:
    source: a key of the reader table: "digits", "npz" or "tfds".
    tfds_name: the TFDS name (with config, e.g. "emnist/balanced") for "tfds".
    mean: per-channel mean on [0, 1]; None computes it from the train split.
    std: per-channel std on [0, 1]; None computes it from the train split.
    augment: default training augmentation, a key of :data:`AUGMENTATIONS`.
    image_key: TFDS feature holding the image.
    label_key: TFDS feature holding the class label.
  """
  source: str
  tfds_name: Optional[str] = None
  mean: Optional[tuple[float, ...]] = None
  std: Optional[tuple[float, ...]] = None
  augment: str = "none"
  image_key: str = "image"
  label_key: str = "label"


def _tfds(name, mean=None, std=None, augment="none", label_key="label"):
  return DatasetSpec("tfds", name, mean, std, augment, label_key=label_key)


# Only MNIST and CIFAR-10 carry fixed constants (those of the original program); every other set is
# normalised with statistics computed exactly from its own train split at load.
DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits"),
    "npz": DatasetSpec("npz"),
    "mnist": _tfds("mnist", MNIST_MEAN, MNIST_STD),
    "fashion_mnist": _tfds("fashion_mnist"),
    "kmnist": _tfds("kmnist"),
    "emnist/balanced": _tfds("emnist/balanced"),
    "emnist/byclass": _tfds("emnist/byclass"),
    "emnist/bymerge": _tfds("emnist/bymerge"),
    "emnist/digits": _tfds("emnist/digits"),
    "emnist/letters": _tfds("emnist/letters"),
    "emnist/mnist": _tfds("emnist/mnist"),
    "cifar10": _tfds("cifar10", CIFAR10_MEAN, CIFAR10_STD, "crop_flip"),
    "cifar100": _tfds("cifar100", augment="crop_flip"),
    "cifar100/coarse": _tfds("cifar100", augment="crop_flip", label_key="coarse_label"),
    "svhn_cropped": _tfds("svhn_cropped"),
}


def _check_name(kind: str, name: Any, table: dict) -> None:
  if name not in table:
    raise ValueError(f"Unknown {kind} {name!r}; valid names: {', '.join(sorted(table))}.")


class _Arrays(NamedTuple):
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int


# ----------------------------------------------------------------------------
# Readers


def _read_digits(spec, *, path, data_dir, download) -> _Arrays:
  """scikit-learn's 8x8 digits, split 80/20 stratified by class with seed 0."""
  del spec, path, data_dir, download
  from sklearn import datasets as sk_datasets  # deferred: only this reader needs it
  digits = sk_datasets.load_digits()
  # Pixel values are integer counts 0..16; map them onto the uint8 range.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(0)
  test = []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    test.append(members[:int(round(0.2 * members.size))])
  is_test = np.zeros(labels.size, bool)
  is_test[np.concatenate(test)] = True
  return _Arrays(images[~is_test], labels[~is_test], images[is_test], labels[is_test], 10)


_NPZ_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _read_npz(spec, *, path, data_dir, download) -> _Arrays:
  """A local .npz with the four split arrays; optional scalar `num_classes`."""
  del spec, data_dir, download
  if not path:
    raise ValueError("Dataset 'npz' needs a file: pass path=... "
                     "(--config.data.path=/path/to/file.npz).")
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No .npz file at {path!r}; check --config.data.path.")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
    raise ValueError(f"Cannot read {path!r} as a .npz archive of plain arrays ({err}); the file "
                     f"may be truncated or not an .npz, write it again with np.savez.") from None
  missing = [k for k in _NPZ_KEYS if k not in arrays]
  if missing:
    raise ValueError(f"{path!r} lacks {missing}; it needs the keys {list(_NPZ_KEYS)} "
                     f"(found {sorted(arrays)}).")
  out = {}
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.ndim == 3:  # [N, H, W] grayscale: give it the channel axis the models expect
      images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f"{path!r}: {split}_images must be uint8 [N, H, W, C] (or [N, H, W]), "
                       f"got {images.dtype} {list(images.shape)}.")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != images.shape[:1]:
      raise ValueError(f"{path!r}: {split}_labels must be integer [{images.shape[0]}], got "
                       f"{labels.dtype} {list(labels.shape)}.")
    if labels.size and labels.min() < 0:
      raise ValueError(f"{path!r}: {split}_labels must be non-negative class ids.")
    out[split] = images, labels.astype(np.int32)
  if "num_classes" in arrays:
    num_classes = int(arrays["num_classes"])
  else:
    num_classes = int(max(out["train"][1].max(initial=0), out["test"][1].max(initial=0))) + 1
    _check_inferred_classes(path, out["train"][1], out["test"][1], num_classes)
  return _Arrays(*out["train"], *out["test"], num_classes)


# A class with fewer training examples than this fraction of the median class
# is taken for a labelling error when the number of classes is inferred.
_RARE_CLASS_FRACTION = 0.05


def _check_inferred_classes(path, train_labels, test_labels, num_classes) -> None:
  """Refuses labels that would silently change the inferred number of classes.

  One stray label (say 10 in a 10-class file) would make an 11-way model;
  when the file does not state ``num_classes``, every class must appear in the
  training split about as often as a real class does.
  """
  counts = np.bincount(train_labels, minlength=num_classes)
  typical = float(np.median(counts[counts > 0])) if counts.any() else 0.0
  rare = [c for c in range(num_classes) if counts[c] < max(1.0, _RARE_CLASS_FRACTION * typical)]
  if rare:
    c = rare[-1]
    in_test = int(np.sum(test_labels == c))
    raise ValueError(
        f"{path!r}: label {c} appears {int(counts[c])} times in train_labels (and {in_test} "
        f"in test_labels) against a median of {typical:.0f} per class, so the {num_classes} "
        f"classes inferred from the largest label look wrong; fix the labels, or store "
        f"num_classes in the file (np.savez(..., num_classes={num_classes})) to keep them.")


def _not_prepared(tfds_name: str, data_dir: Optional[str], reason: str) -> DatasetNotPreparedError:
  where = data_dir or "the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  return DatasetNotPreparedError(
      f"TFDS dataset {tfds_name!r} could not be read from data_dir={where} ({reason}). "
      "Reading needs no TensorFlow, but preparing it once does (and internet): on such a "
      f"machine (e.g. Colab) run `tfds build {tfds_name} --file_format=array_record "
      f"--data_dir=DIR` or `tfds.builder({tfds_name!r}, data_dir=DIR).download_and_prepare("
      "file_format='array_record')`, make DIR available here and pass "
      "--config.data.data_dir=DIR (data_dir=DIR in Python); or, from Python, call "
      "ftjax.data.load_dataset(..., download=True) where TensorFlow and internet exist "
      "(no config field sets it).")


def _diagnose(tfds, name: str, data_dir: Optional[str], download: bool, err: Exception) -> str:
  """A one-line reason why `tfds.data_source` failed."""
  message = str(err).strip().splitlines()
  short = f"{type(err).__name__}: {message[0] if message else ''}"[:300]
  if download:
    return f"downloading and preparing failed with {short}"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      return f"no prepared copy in {builder.data_dir}"
    file_format = builder.info.file_format
    if file_format is not None and file_format.value not in ("array_record", "parquet"):
      return (f"the copy in {builder.data_dir} is in {file_format.value} format, which has no "
              "random access; prepare it again with file_format='array_record'")
  except Exception:  # pylint: disable=broad-except
    pass  # fall back to TFDS's own words
  return short


def _read_split(source, image_key: str, label_key: str, desc: str):
  """All records of one TFDS data source as (uint8 images, int32 labels)."""
  total = len(source)
  images, labels = [], []
  from tqdm import auto as tqdm_auto  # deferred: only big TFDS reads show progress
  with tqdm_auto.tqdm(total=total, desc=desc, unit="img", leave=False,
                      disable=total < _PROGRESS_MIN_RECORDS) as bar:
    for start in range(0, total, _READ_BATCH):
      # One `__getitems__` per chunk lets ArrayRecord read in parallel.
      records = source.__getitems__(list(range(start, min(start + _READ_BATCH, total))))
      images.extend(np.asarray(r[image_key]) for r in records)
      labels.extend(int(r[label_key]) for r in records)
      bar.update(len(records))
  if not images:
    raise ValueError(f"{desc} is empty.")
  return np.stack(images).astype(np.uint8, copy=False), np.asarray(labels, np.int32)


def _read_tfds(spec: DatasetSpec, *, path, data_dir, download) -> _Arrays:
  """A TFDS image-classification set via `tfds.data_source`; both splits in memory."""
  del path
  import tensorflow_datasets as tfds  # deferred: slow import, only this reader needs it
  name = spec.tfds_name
  # Preparing through data_source with an explicit data_dir would otherwise pick
  # TFRecord, which has no random access.
  builder_kwargs = {"file_format": "array_record"} if download else None
  try:
    sources = tfds.data_source(name, split=["train", "test"], data_dir=data_dir,
                               download=download, builder_kwargs=builder_kwargs)
    features = sources[0].dataset_info.features
    num_classes = int(features[spec.label_key].num_classes)
  except Exception as err:  # pylint: disable=broad-except
    # TFDS fails in many ways here (missing folder, TFRecord-only files, no
    # TensorFlow to prepare, no network); all mean the same thing to the user.
    raise _not_prepared(name, data_dir, _diagnose(tfds, name, data_dir, download, err)) from None
  train = _read_split(sources[0], spec.image_key, spec.label_key, f"{name} train")
  test = _read_split(sources[1], spec.image_key, spec.label_key, f"{name} test")
  return _Arrays(*train, *test, num_classes)


_READERS: dict[str, Callable[..., _Arrays]] = {
    "digits": _read_digits,
    "npz": _read_npz,
    "tfds": _read_tfds,
}


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Exact per-channel mean and (population) std of uint8 images on [0, 1].

  Args:
    images: uint8 [N, H, W, C].

  Returns:
    (mean, std), each a tuple of C floats.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"channel_stats needs uint8 [N, H, W, C], got {images.dtype} "
                     f"{list(images.shape)}.")
  values = np.arange(256, dtype=np.float64) / 255.0
  means, stds = [], []
  for c in range(images.shape[-1]):
    # A 256-bin histogram gives exact float64 moments without a float copy of
    # the whole split (CIFAR-10 would need 1.2 GB for that).
    counts = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
    mean = counts @ values / counts.sum()
    means.append(float(mean))
    stds.append(float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum())))
  return tuple(means), tuple(stds)


def load_dataset(name: str, *, path: Optional[str] = None, data_dir: Optional[str] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 augment: Optional[str] = None, download: bool = False) -> Dataset:
  """Loads a named dataset into host memory.

  Args:
    name: a key of :data:`DATASETS`: "digits", "npz" or a TFDS name.
    path: the .npz file; required for (and only accepted with) name "npz".
    data_dir: TFDS data directory; only for TFDS names. None uses the TFDS
      default.
    mean: per-channel mean on [0, 1] overriding the table (and the computed
      train-split statistics; a constant channel there gets std 1).
    std: per-channel std on [0, 1], likewise.
    augment: training augmentation overriding the table, a key of
      :data:`AUGMENTATIONS`.
    download: for TFDS names, download and prepare the dataset when missing
      (needs TensorFlow and internet).

  Returns:
    The :class:`Dataset`.

  Raises:
    ValueError: unknown name, arguments that do not apply, malformed files.
    FileNotFoundError: a missing .npz; :class:`DatasetNotPreparedError` (a
      subclass) for a TFDS set that is not prepared, with how to prepare it.
  """
  _check_name("dataset", name, DATASETS)
  spec = DATASETS[name]
  if path and spec.source != "npz":
    raise ValueError(f"path={path!r} only applies to dataset 'npz', not {name!r}; "
                     "clear --config.data.path or set --config.data.name=npz.")
  if data_dir and spec.source != "tfds":
    raise ValueError(f"data_dir={data_dir!r} only applies to TFDS datasets, not {name!r}; "
                     "clear --config.data.data_dir.")
  if augment is not None:
    _check_name("augment", augment, AUGMENTATIONS)
  if (mean is None) != (std is None):
    raise ValueError("Pass mean and std together (or neither, to use the dataset's own).")
  arrays = _READERS[spec.source](spec, path=path, data_dir=data_dir, download=download)
  if mean is None:
    mean, std = spec.mean, spec.std
  if mean is None:
    mean, std = channel_stats(arrays.train_images)
    # A constant channel carries no signal; centre it without dividing by 0.
    std = tuple(s if s > 0 else 1.0 for s in std)
  return Dataset(name=name, train_images=arrays.train_images, train_labels=arrays.train_labels,
                 test_images=arrays.test_images, test_labels=arrays.test_labels,
                 num_classes=arrays.num_classes, mean=tuple(mean), std=tuple(std),
                 augment=augment if augment is not None else spec.augment)


# ----------------------------------------------------------------------------
# Per-round sampling


def check_batch(dataset: Dataset, num_workers: int, batch_size: int) -> None:
  """Refuses a round that needs more distinct examples than the train split has.

  Args:
    dataset: the dataset.
    num_workers: W.
    batch_size: b, examples per worker per round.

  Raises:
    ValueError: if W or b is not positive or W * b exceeds the train split.
  """
  _check_round(dataset.train_images.shape[0], num_workers, batch_size, dataset.name)


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
  _check_name("shuffle", shuffle, SHUFFLES)
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
  _check_name("shuffle", shuffle, SHUFFLES)
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
  _check_name("partition scheme", scheme, PARTITIONS)
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
  _check_name("shuffle", shuffle, SHUFFLES)
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


# ----------------------------------------------------------------------------
# Preprocessing and augmentation (JAX)


def preprocess(images_uint8: jax.Array, mean: Sequence[float], std: Sequence[float],
               dtype: Any = jnp.float32) -> jax.Array:
  """Normalises uint8 images: ``(x / 255 - mean) / std`` per channel.

  Args:
    images_uint8: uint8 [..., H, W, C] (any integer or float array in 0..255).
    mean: per-channel means on [0, 1], length C (or 1).
    std: per-channel stds on [0, 1], length C (or 1).
    dtype: the output dtype.

  Returns:
    ``dtype`` array of the input's shape.
  """
  mean = jnp.asarray(mean, dtype)
  std = jnp.asarray(std, dtype)
  c = images_uint8.shape[-1]
  if mean.ndim != 1 or std.ndim != 1 or mean.size not in (1, c) or std.size not in (1, c):
    raise ValueError(f"mean and std need 1 or {c} (channels) values, got {mean.size} and "
                     f"{std.size}.")
  return (jnp.asarray(images_uint8).astype(dtype) / 255 - mean) / std


def augment_crop_flip(key: jax.Array, images: jax.Array, pad: int = 2,
                      fill: Union[float, Sequence[float]] = 0.0) -> jax.Array:
  """Per-example random crop (after padding) and random horizontal flip.

  Every image is padded by ``pad`` on each side, cropped back to H x W at a
  uniform random offset in [0, 2*pad]^2 and mirrored left-right with
  probability 1/2, as torchvision's ``RandomCrop(H, padding=pad)`` followed by
  ``RandomHorizontalFlip()``.

  Args:
    key: PRNG key; the same key gives the same crops and flips.
    images: [..., H, W, C], any dtype (one leading axis or more).
    pad: padding on each side.
    fill: value of padded pixels, scalar or per channel. The reference pads
      raw images with black: 0 on uint8 input, or ``-mean / std`` on already
      normalised input.

  Returns:
    Augmented images, same shape and dtype.
  """
  if images.ndim < 4:
    raise ValueError(f"augment_crop_flip needs [..., H, W, C] with a batch axis, got shape "
                     f"{list(images.shape)}.")
  if not isinstance(pad, (int, np.integer)) or pad < 0:
    raise ValueError(f"pad must be a non-negative int, got {pad!r}.")
  lead, (h, w, c) = images.shape[:-3], images.shape[-3:]
  x = images.reshape((-1, h, w, c))
  n = x.shape[0]
  k_crop, k_flip = jax.random.split(key)
  offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(k_flip, 0.5, (n,))
  padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  padded = jnp.pad(x, padding)
  fill_arr = np.asarray(fill, np.float64)
  if np.any(fill_arr != 0):
    inside = jnp.pad(jnp.ones((1, h, w, 1), bool), padding)
    padded = jnp.where(inside, padded, jnp.asarray(fill_arr, x.dtype))
  crops = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(
      padded, offsets)
  out = jnp.where(flips[:, None, None, None], crops[:, :, ::-1, :], crops)
  return out.reshape(lead + (h, w, c))


# ----------------------------------------------------------------------------
# Evaluation


class EvalBatches(NamedTuple):
  """Index batches covering a split once, the last one padded.

  Attributes:
    indices: int32 [num_batches, batch_size]; padded entries point at 0.
    mask: bool [num_batches, batch_size]; False on padded entries.
  """
  indices: np.ndarray
  mask: np.ndarray


def eval_batches(num_examples: int, batch_size: int) -> EvalBatches:
  """Batches of example indices for a full, static-shape pass over a split.

  Args:
    num_examples: the split size M.
    batch_size: examples per batch; clamped to M so a small split is one
      unpadded batch.

  Returns:
    :class:`EvalBatches` with ceil(M / batch) rows; every index in [0, M)
    appears exactly once under a True mask.
  """
  if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
    raise ValueError(f"num_examples must be a positive int, got {num_examples!r}.")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"eval batch_size must be a positive int, got {batch_size!r}.")
  batch_size = min(int(batch_size), int(num_examples))
  num_batches = math.ceil(num_examples / batch_size)
  flat = np.arange(num_batches * batch_size, dtype=np.int32)
  mask = flat < num_examples
  indices = np.where(mask, flat, 0).astype(np.int32)
  shape = (num_batches, batch_size)
  return EvalBatches(indices.reshape(shape), mask.reshape(shape))
