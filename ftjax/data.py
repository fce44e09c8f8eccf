"""Datasets in host memory, their preprocessing in JAX, and the evaluation batches.

Three sources, all resolved through the :data:`DATASETS` table:

* ``"digits"``: the built-in offline default, scikit-learn's bundled 8x8
  handwritten digits (1,797 images), so a fresh machine trains with no download.
* ``"npz"``: a local ``.npz`` file with ``train_images`` uint8 [N, H, W, C]
  (or [N, H, W]), ``train_labels`` int [N], ``test_images``, ``test_labels``.
* TFDS image-classification sets by name (``"mnist"``, ``"cifar10"``, ...),
  read with ``tfds.data_source``, which needs no TensorFlow once the dataset is
  prepared (in the array_record file format).

A :class:`Dataset` keeps the whole split as uint8 numpy arrays; the training
step puts them on device once and indexes them there (:mod:`ftjax.sampling`
draws each round's examples). :func:`preprocess` and :func:`augment_crop_flip`
are pure JAX and jittable.

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
    check_name("augment", self.augment, AUGMENTATIONS)


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


def check_name(kind: str, name: Any, table: dict) -> None:
  """Refuses a name that is not a key of ``table``, listing the valid ones."""
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
  check_name("dataset", name, DATASETS)
  spec = DATASETS[name]
  if path and spec.source != "npz":
    raise ValueError(f"path={path!r} only applies to dataset 'npz', not {name!r}; "
                     "clear --config.data.path or set --config.data.name=npz.")
  if data_dir and spec.source != "tfds":
    raise ValueError(f"data_dir={data_dir!r} only applies to TFDS datasets, not {name!r}; "
                     "clear --config.data.data_dir.")
  if augment is not None:
    check_name("augment", augment, AUGMENTATIONS)
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
# The validation split

# Seeds the order that picks the validation examples: a constant, so that every run on
# one dataset (every seed of a sweep) holds out the same examples.
VALIDATION_SEED = 0


class Validation(NamedTuple):
  """Examples held out of the train split for model selection (``data.validation``)."""
  indices: np.ndarray  # int64 [n], sorted: their positions in the loaded train split
  images: np.ndarray   # uint8 [n, H, W, C]
  labels: np.ndarray   # int32 [n]


def validation_count(fraction: float, num_examples: int) -> int:
  """floor(fraction * N): the examples ``data.validation = fraction`` holds out."""
  return int(math.floor(fraction * num_examples))


_SPLITS: dict = {}  # (id(dataset), n) -> (dataset, (rest, validation)): the last few splits


def split_validation(dataset: Dataset, count: int) -> tuple[Dataset, Validation]:
  """The train split less ``count`` held-out examples, and those examples.

  The held-out positions are the first ``count`` of
  ``np.random.default_rng(VALIDATION_SEED).permutation(N)``, sorted: they depend
  on N alone, never on a run's seed. The rest keeps the train split's order,
  so every later draw (the partitions, the server's examples, the workers'
  shuffles) works on it as on a smaller train split. The last few splits are
  kept, so the runs of a sweep share one copy.
  """
  key = (id(dataset), count)
  if key not in _SPLITS:
    num = dataset.train_images.shape[0]
    held = np.sort(np.random.default_rng(VALIDATION_SEED).permutation(num)[:count])
    rest = np.delete(np.arange(num), held)
    split = (dataclasses.replace(dataset, train_images=dataset.train_images[rest],
                                 train_labels=dataset.train_labels[rest]),
             Validation(held, dataset.train_images[held], dataset.train_labels[held]))
    while len(_SPLITS) >= 4:
      del _SPLITS[next(iter(_SPLITS))]
    _SPLITS[key] = (dataset, split)  # the dataset kept alive, so its id is not reused
  return _SPLITS[key][1]


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
