"""Tests for ftjax.data: loaders (digits, npz, TFDS under mocking), sampling, augmentation."""
import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import sampling
from ftjax import data


# ----------------------------------------------------------------------------
# TFDS under tfds.testing.mock_data


@contextlib.contextmanager
def mock_tfds(num_examples):
  """`tfds.testing.mock_data` with its batched read repaired.

  In tensorflow-datasets 4.9.10 `mock_data` does mock `tfds.data_source`, but the
  mocked ArrayRecord reader gets `__getitems__` as a plain instance attribute
  (MagicMock only binds the dunders it knows), so the batched read that
  `BaseDataSource.__getitems__` forwards to it is called without `self` and fails
  with a TypeError. Single-record `__getitem__` works. We patch the module
  function the mock wraps so the batched read returns the same generated records.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import mocking

  def getitems(record_keys, generator, serialized=False):
    assert not serialized
    return [generator[k] for k in record_keys]

  with tfds.testing.mock_data(num_examples=num_examples), \
      mock.patch.object(mocking, "_getitems", getitems):
    yield tfds


@pytest.mark.parametrize("name,shape,augment", [
    ("mnist", (28, 28, 1), "none"),
    ("cifar10", (32, 32, 3), "crop_flip"),
    ("fashion_mnist", (28, 28, 1), "none"),
])
def test_tfds_loader_reads_all_records_in_order(monkeypatch, name, shape, augment):
  # A read chunk smaller than the split exercises the chunk boundaries.
  monkeypatch.setattr(data, "_READ_BATCH", 2)
  with mock_tfds(num_examples=5) as tfds:
    ds = data.load_dataset(name)
    direct = {s: tfds.data_source(name, split=s) for s in ("train", "test")}
    for split in ("train", "test"):
      images = getattr(ds, f"{split}_images")
      labels = getattr(ds, f"{split}_labels")
      assert images.shape == (5,) + shape and images.dtype == np.uint8
      assert labels.shape == (5,) and labels.dtype == np.int32
      for i in range(5):
        record = direct[split][i]
        np.testing.assert_array_equal(images[i], record["image"])
        assert labels[i] == record["label"]
  assert ds.num_classes == 10
  assert ds.augment == augment
  spec = data.DATASETS[name]
  if spec.mean is not None:
    assert ds.mean == spec.mean and ds.std == spec.std
  else:  # no table constants: statistics of the train split
    x = ds.train_images / 255.0
    np.testing.assert_allclose(ds.mean, [x.mean()], rtol=1e-10)
    np.testing.assert_allclose(ds.std, [x.std()], rtol=1e-10)


@pytest.mark.parametrize("name", sorted(n for n, s in data.DATASETS.items() if s.source == "tfds"))
def test_every_tfds_entry_names_real_features(name):
  spec = data.DATASETS[name]
  with mock_tfds(num_examples=3) as tfds:
    ds = data.load_dataset(name)
    features = tfds.builder(spec.tfds_name).info.features
  assert ds.train_images.shape[1:] == tuple(features[spec.image_key].shape)
  assert ds.num_classes == features[spec.label_key].num_classes
  assert len(ds.mean) == len(ds.std) == ds.train_images.shape[-1]
  if name == "cifar100/coarse":
    assert ds.num_classes == 20


def test_tfds_large_split_shows_progress(monkeypatch, capsys):
  monkeypatch.setattr(data, "_PROGRESS_MIN_RECORDS", 4)
  with mock_tfds(num_examples=5):
    data.load_dataset("mnist")
  assert "mnist train" in capsys.readouterr().err


def test_tfds_missing_data_raises_one_clear_error(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as info:
    data.load_dataset("mnist", data_dir=str(tmp_path))
  err = info.value
  assert isinstance(err, FileNotFoundError)
  message = str(err)
  assert str(tmp_path) in message
  assert "no prepared copy" in message
  assert "tfds build mnist" in message and "download_and_prepare" in message
  assert "--config.data.data_dir" in message
  # Raised `from None`: no chained TFDS traceback is printed above it.
  assert err.__cause__ is None and err.__suppress_context__


# ----------------------------------------------------------------------------
# .npz


def _write_npz(path, **overrides):
  rng = np.random.default_rng(0)
  arrays = dict(
      train_images=rng.integers(0, 256, (12, 6, 6, 1), dtype=np.uint8),
      train_labels=rng.integers(0, 4, 12).astype(np.int64),
      test_images=rng.integers(0, 256, (5, 6, 6, 1), dtype=np.uint8),
      test_labels=np.array([0, 1, 2, 3, 3], np.int64),
  )
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return arrays


def test_npz_loader(tmp_path):
  path = tmp_path / "tiny.npz"
  arrays = _write_npz(path)
  ds = data.load_dataset("npz", path=str(path))
  np.testing.assert_array_equal(ds.train_images, arrays["train_images"])
  np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])
  assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
  assert ds.num_classes == 4 and ds.augment == "none"
  x = arrays["train_images"] / 255.0
  np.testing.assert_allclose(ds.mean, [x.mean()], rtol=1e-10)
  np.testing.assert_allclose(ds.std, [x.std()], rtol=1e-10)
  # Explicit normalisation and augmentation override the computed ones.
  ds = data.load_dataset("npz", path=str(path), mean=[0.5], std=[0.25], augment="crop_flip")
  assert ds.mean == (0.5,) and ds.std == (0.25,) and ds.augment == "crop_flip"


def test_npz_accepts_grayscale_without_channel_axis(tmp_path):
  path = tmp_path / "gray.npz"
  arrays = _write_npz(path, train_images=np.zeros((12, 6, 6), np.uint8),
                      test_images=np.full((5, 6, 6), 9, np.uint8))
  ds = data.load_dataset("npz", path=str(path))
  assert ds.train_images.shape == (12, 6, 6, 1)
  np.testing.assert_array_equal(ds.test_images[..., 0], arrays["test_images"])
  # A constant train split gets std 1 (centred only) instead of a division by 0.
  assert ds.mean == (0.0,) and ds.std == (1.0,)


@pytest.mark.parametrize("overrides,match", [
    (dict(test_labels=None), r"lacks \['test_labels'\]"),
    (dict(train_images=np.zeros((12, 6, 6, 1), np.float32)), "must be uint8"),
    (dict(train_labels=np.zeros(11, np.int64)), r"must be integer \[12\]"),
    (dict(train_labels=np.zeros(12, np.float32)), "must be integer"),
    (dict(test_images=np.zeros((5, 7, 7, 1), np.uint8)), "one shape"),
])
def test_npz_errors(tmp_path, overrides, match):
  path = tmp_path / "bad.npz"
  _write_npz(path, **overrides)
  with pytest.raises(ValueError, match=match):
    data.load_dataset("npz", path=str(path))


def test_npz_missing_file_and_path(tmp_path):
  missing = tmp_path / "nope.npz"
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    data.load_dataset("npz", path=str(missing))
  with pytest.raises(ValueError, match="config.data.path"):
    data.load_dataset("npz")


# ----------------------------------------------------------------------------
# Built-in digits, the name table, Dataset validation


def test_digits_loader_is_a_deterministic_stratified_split():
  from sklearn.datasets import load_digits
  ds = data.load_dataset("digits")
  again = data.load_dataset("digits")
  assert ds.train_images.shape[1:] == (8, 8, 1) and ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32 and ds.num_classes == 10
  assert ds.train_images.max() == 255 and ds.train_images.min() == 0
  np.testing.assert_array_equal(ds.train_images, again.train_images)
  np.testing.assert_array_equal(ds.test_labels, again.test_labels)
  # Train and test together are exactly the original examples, each once: no
  # example is in both splits and none is lost.
  raw = load_digits()
  original = np.concatenate([np.round(raw.images * 255 / 16).reshape(-1, 64),
                             raw.target[:, None]], axis=1).astype(np.int64)
  ours = np.concatenate([
      np.concatenate([ds.train_images.reshape(-1, 64), ds.train_labels[:, None]], 1),
      np.concatenate([ds.test_images.reshape(-1, 64), ds.test_labels[:, None]], 1),
  ]).astype(np.int64)
  np.testing.assert_array_equal(np.unique(ours, axis=0, return_counts=True)[1],
                                np.unique(original, axis=0, return_counts=True)[1])
  np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(original, axis=0))
  # Stratified 80/20: every class has ~20% of its examples in test.
  for c in range(10):
    n_test, n_all = (ds.test_labels == c).sum(), (raw.target == c).sum()
    assert abs(n_test - 0.2 * n_all) <= 0.5
  x = ds.train_images / 255.0
  np.testing.assert_allclose(ds.mean, [x.mean()], rtol=1e-10)
  np.testing.assert_allclose(ds.std, [x.std()], rtol=1e-10)


def test_unknown_names_and_misplaced_arguments(tmp_path):
  with pytest.raises(ValueError, match="valid names: .*cifar10.*digits.*mnist"):
    data.load_dataset("imagenet")
  with pytest.raises(ValueError, match="valid names: crop_flip, none"):
    data.load_dataset("digits", augment="mixup")
  with pytest.raises(ValueError, match="only applies to dataset 'npz'"):
    data.load_dataset("digits", path="x.npz")
  with pytest.raises(ValueError, match="only applies to TFDS"):
    data.load_dataset("digits", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="together"):
    data.load_dataset("digits", mean=[0.5])


def _tiny_dataset(n=10, **kw):
  args = dict(name="tiny", train_images=np.zeros((n, 4, 4, 1), np.uint8),
              train_labels=np.arange(n) % 3, test_images=np.zeros((2, 4, 4, 1), np.uint8),
              test_labels=np.array([0, 2]), num_classes=3, mean=(0.5,), std=(0.5,))
  args.update(kw)
  return data.Dataset(**args)


def test_dataset_validation():
  ds = _tiny_dataset()
  assert ds.train_labels.dtype == np.int32
  with pytest.raises(ValueError, match="uint8"):
    _tiny_dataset(train_images=np.zeros((10, 4, 4, 1), np.float32))
  with pytest.raises(ValueError, match="num_classes=3"):
    _tiny_dataset(test_labels=np.array([0, 3]))
  with pytest.raises(ValueError, match="one value per channel"):
    _tiny_dataset(mean=(0.1, 0.2), std=(0.1, 0.2))
  with pytest.raises(ValueError, match="valid names"):
    _tiny_dataset(augment="cutout")


def test_check_batch():
  ds = _tiny_dataset(n=10)
  sampling.check_batch(ds, 2, 5)
  with pytest.raises(ValueError, match=r"3 \* 4 = 12 .* only 10 .* at most 3"):
    sampling.check_batch(ds, 3, 4)
  with pytest.raises(ValueError, match="positive"):
    sampling.check_batch(ds, 0, 4)


def test_channel_stats_matches_numpy():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
  mean, std = data.channel_stats(x)
  f = x.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(mean, f.mean(0), rtol=1e-12)
  np.testing.assert_allclose(std, f.std(0), rtol=1e-12)


# ----------------------------------------------------------------------------
# round_indices (the i.i.d. round sampler)

N, W, B = 50, 3, 4  # 12 per round, 4 rounds per epoch, 2 examples dropped per epoch
KEY = jax.random.key(7)


def _rounds(key, steps, shuffle="permutation"):
  return np.stack([np.asarray(sampling.round_indices(key, s, N, W, B, shuffle=shuffle))
                   for s in steps])


@pytest.mark.slow
@pytest.mark.parametrize("shuffle", sorted(sampling.SHUFFLES))
def test_round_indices_epoch_structure(shuffle):
  rounds = _rounds(KEY, range(8), shuffle)
  assert rounds.shape == (8, W, B) and rounds.dtype == np.int32
  for epoch in range(2):
    drawn = rounds[4 * epoch: 4 * epoch + 4].reshape(-1)
    assert np.unique(drawn).size == drawn.size == 48  # no repeats within an epoch
    perm = np.asarray(sampling.epoch_permutation(KEY, epoch, N, shuffle))
    np.testing.assert_array_equal(np.sort(perm), np.arange(N))
    if shuffle == "permutation":  # the contract's exact definition
      np.testing.assert_array_equal(
          perm, jax.random.permutation(jax.random.fold_in(KEY, epoch), N))
    # The epoch is a prefix of its permutation; the incomplete tail is dropped.
    np.testing.assert_array_equal(drawn, perm[:48])
    assert not set(perm[48:]) & set(drawn.tolist())
    # Worker i of round r gets the i-th chunk of b.
    for r in range(4):
      for i in range(W):
        start = r * W * B + i * B
        np.testing.assert_array_equal(rounds[4 * epoch + r, i], perm[start:start + B])
  assert not np.array_equal(rounds[:4], rounds[4:])  # epochs reshuffle


def test_round_indices_deterministic_and_key_dependent():
  np.testing.assert_array_equal(_rounds(KEY, [0, 5]), _rounds(KEY, [0, 5]))
  assert not np.array_equal(_rounds(KEY, [0]), _rounds(jax.random.key(8), [0]))


@pytest.mark.slow
@pytest.mark.parametrize("shuffle", sorted(sampling.SHUFFLES))
def test_round_indices_jit_traced_step_no_recompile(shuffle):
  traces = []

  def f(step):
    traces.append(1)
    return sampling.round_indices(KEY, step, N, W, B, shuffle=shuffle)

  jitted = jax.jit(f)
  for s in range(6):
    np.testing.assert_array_equal(jitted(jnp.int32(s)), _rounds(KEY, [s], shuffle)[0])
  assert len(traces) == 1
  # Also inside lax.scan, the way the training loop calls it.
  _, scanned = jax.lax.scan(lambda c, s: (c, f(s)), 0, jnp.arange(6, dtype=jnp.int32))
  np.testing.assert_array_equal(scanned, _rounds(KEY, range(6), shuffle))


def test_round_indices_refuses_bad_arguments():
  with pytest.raises(ValueError, match="at most 16"):
    sampling.round_indices(KEY, 0, N, 3, 17)
  with pytest.raises(ValueError, match="valid names: feistel, permutation"):
    sampling.round_indices(KEY, 0, N, W, B, shuffle="sorted")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000])
def test_feistel_shuffle_is_a_permutation(n):
  perms = [np.asarray(sampling.epoch_permutation(KEY, e, n, "feistel")) for e in range(3)]
  for perm in perms:
    assert perm.dtype == np.int32
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
  if n >= 16:
    assert not np.array_equal(perms[0], perms[1])


def test_feistel_shuffle_looks_uniform():
  # Where element 0 lands and which element comes first, over 1000 epochs of
  # N = 10: each of the 10 outcomes should get ~100; a bias of the Feistel
  # rounds or of cycle-walking would show as a skewed count.
  perms = np.asarray(jax.jit(jax.vmap(
      lambda e: sampling.epoch_permutation(KEY, e, 10, "feistel")))(jnp.arange(1000)))
  first = np.bincount(perms[:, 0], minlength=10)
  position_of_0 = np.bincount(np.argmax(perms == 0, axis=1), minlength=10)
  for counts in (first, position_of_0):
    chi2 = ((counts - 100.0) ** 2 / 100.0).sum()
    assert chi2 < 30, counts  # 9 degrees of freedom: P(chi2 > 30) < 0.001


# ----------------------------------------------------------------------------
# Partitions and per-worker sampling


def _labels(n=2000, classes=5, seed=0):
  return np.random.default_rng(seed).integers(0, classes, n)


def _shards(part):
  return [part.table[i, :part.sizes[i]] for i in range(part.table.shape[0])]


@pytest.mark.parametrize("scheme", ["iid_split", "dirichlet", "shards", "gamma_similarity",
                                    "extreme"])
def test_partition_covers_every_index_once(scheme):
  labels = _labels()
  part = sampling.partition_indices(3, labels, 4, scheme=scheme, alpha=0.5)
  assert part.table.dtype == np.int32 and part.sizes.dtype == np.int32
  assert part.sizes.sum() == labels.size
  np.testing.assert_array_equal(np.sort(np.concatenate(_shards(part))), np.arange(labels.size))
  for i, size in enumerate(part.sizes):
    assert (part.table[i, size:] == -1).all()
  again = sampling.partition_indices(3, labels, 4, scheme=scheme, alpha=0.5)
  np.testing.assert_array_equal(part.table, again.table)


def test_partition_iid_means_shared_sampling():
  assert sampling.partition_indices(0, _labels(), 4, scheme="iid") is None


def test_dirichlet_alpha_controls_heterogeneity():
  labels = _labels()
  overall = np.bincount(labels, minlength=5) / labels.size

  def class_fractions(alpha):
    part = sampling.partition_indices(jax.random.key(0), labels, 4, scheme="dirichlet", alpha=alpha)
    return np.stack([np.bincount(labels[s], minlength=5) / s.size for s in _shards(part)]), part

  near_iid, part = class_fractions(1e5)
  np.testing.assert_allclose(near_iid, np.broadcast_to(overall, near_iid.shape), atol=0.01)
  np.testing.assert_allclose(part.sizes, labels.size / 4, rtol=0.02)
  skewed, _ = class_fractions(0.05)
  assert np.abs(skewed - overall).max() > 0.3


def test_shards_scheme_gives_few_classes_per_worker():
  labels = _labels(classes=10)
  part = sampling.partition_indices(1, labels, 5, scheme="shards", shards_per_worker=2)
  for shard in _shards(part):
    # Two label-sorted shards can each straddle one class boundary.
    assert np.unique(labels[shard]).size <= 4


def _histograms(part, labels, classes):
  return np.stack([np.bincount(labels[s], minlength=classes) for s in _shards(part)])


# 40 examples, 10 of each of 4 classes, interleaved so that label order is not index order.
_FORTY = np.tile(np.arange(4), 10)


def test_extreme_gives_each_worker_one_block_of_the_label_sorted_split():
  part = sampling.partition_indices(0, _FORTY, 4, scheme="extreme")
  np.testing.assert_array_equal(_histograms(part, _FORTY, 4), 10 * np.eye(4, dtype=int))
  # W = 3: blocks of 14, 13 and 13 of the sorted labels 0*10, 1*10, 2*10, 3*10.
  part = sampling.partition_indices(0, _FORTY, 3, scheme="extreme")
  np.testing.assert_array_equal(_histograms(part, _FORTY, 4),
                                [[10, 4, 0, 0], [0, 6, 7, 0], [0, 0, 3, 10]])


@pytest.mark.parametrize("gamma, spread", [(0.5, 5), (0.3, 3)])
def test_gamma_similarity_spreads_a_gamma_share_of_every_class(gamma, spread):
  # Per class, round(10 * gamma) = spread examples go to the i.i.d. pool (4 * spread in
  # all, spread per worker); the other 10 - spread of each class, label-sorted, form 4
  # blocks of 10 - spread, so block i is all class i.
  part = sampling.partition_indices(7, _FORTY, 4, scheme="gamma_similarity", gamma=gamma)
  pooled = _histograms(part, _FORTY, 4) - (10 - spread) * np.eye(4, dtype=int)
  assert (pooled >= 0).all()
  np.testing.assert_array_equal(pooled.sum(1), [spread] * 4)  # spread per worker
  np.testing.assert_array_equal(pooled.sum(0), [spread] * 4)  # spread of every class
  again = sampling.partition_indices(7, _FORTY, 4, scheme="gamma_similarity", gamma=gamma)
  np.testing.assert_array_equal(part.table, again.table)
  other = sampling.partition_indices(8, _FORTY, 4, scheme="gamma_similarity", gamma=gamma)
  assert not np.array_equal(part.table, other.table)


def test_gamma_similarity_edge_cases():
  # gamma = 0: nothing is pooled; the same draw as "extreme".
  zero = sampling.partition_indices(5, _FORTY, 4, scheme="gamma_similarity", gamma=0.0)
  np.testing.assert_array_equal(_histograms(zero, _FORTY, 4), 10 * np.eye(4, dtype=int))
  np.testing.assert_array_equal(
      zero.table, sampling.partition_indices(5, _FORTY, 4, scheme="extreme").table)
  # gamma = 1: everything is pooled; 10 random examples per worker, close to the overall
  # class mix on a larger split.
  one = sampling.partition_indices(5, _FORTY, 4, scheme="gamma_similarity", gamma=1.0)
  np.testing.assert_array_equal(one.sizes, [10] * 4)
  assert (_histograms(one, _FORTY, 4) < 10).all()  # one class only: P < 1e-8 per worker
  labels = _labels()
  overall = np.bincount(labels, minlength=5) / labels.size
  one = sampling.partition_indices(5, labels, 4, scheme="gamma_similarity", gamma=1.0)
  fractions = _histograms(one, labels, 5) / one.sizes[:, None]
  np.testing.assert_allclose(fractions, np.broadcast_to(overall, fractions.shape), atol=0.05)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan"), "half"])
def test_gamma_outside_the_unit_interval_is_refused(gamma):
  with pytest.raises(ValueError, match=r"gamma .* must be a number in \[0, 1\]"):
    sampling.partition_indices(0, _FORTY, 4, scheme="gamma_similarity", gamma=gamma)


def test_partition_errors():
  with pytest.raises(ValueError, match="valid names: dirichlet, extreme, gamma_similarity, "
                                       "iid, iid_split, shards"):
    sampling.partition_indices(0, _labels(), 4, scheme="pathological")
  with pytest.raises(ValueError, match="raise alpha"):
    sampling.partition_indices(0, _labels(n=40), 8, scheme="dirichlet", alpha=0.01, min_size=5)
  with pytest.raises(ValueError, match="alpha must be positive"):
    sampling.partition_indices(0, _labels(), 4, scheme="dirichlet", alpha=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("shuffle", sorted(sampling.SHUFFLES))
def test_worker_round_indices_draws_from_own_shard(shuffle):
  # Unequal shards: 10, 7 and 16 examples -> 3, 2 and 5 rounds per epoch at b = 3.
  shards = [np.arange(0, 10), np.arange(10, 17), np.arange(17, 33)]
  part = sampling._pack(shards)  # pylint: disable=protected-access
  b = 3
  sampling.check_partition(part, b)
  traces = []

  def f(step):
    traces.append(1)
    return sampling.worker_round_indices(KEY, step, part.table, part.sizes, b, shuffle=shuffle)

  jitted = jax.jit(f)
  out = np.stack([np.asarray(jitted(jnp.int32(s))) for s in range(30)])
  assert len(traces) == 1
  assert out.shape == (30, 3, b) and out.dtype == np.int32
  for i, shard in enumerate(shards):
    rounds = shard.size // b
    assert np.isin(out[:, i], shard).all()
    for e in range(30 // rounds):
      drawn = out[e * rounds:(e + 1) * rounds, i].reshape(-1)
      assert np.unique(drawn).size == drawn.size  # no repeats within its epoch
  # Every example of the 16-example shard is reached over its epochs.
  assert set(out[:, 2].reshape(-1).tolist()) == set(shards[2].tolist())
  np.testing.assert_array_equal(
      out[4], sampling.worker_round_indices(KEY, 4, part.table, part.sizes, b, shuffle=shuffle))


def test_check_partition_refuses_small_shards():
  part = sampling._pack([np.arange(5), np.arange(5, 7)])  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"Workers \[1\] .* \[2\] .* min_size=3"):
    sampling.check_partition(part, 3)


# ----------------------------------------------------------------------------
# Preprocessing and augmentation


def test_preprocess_formula():
  rng = np.random.default_rng(2)
  x = rng.integers(0, 256, (2, 3, 3, 3), dtype=np.uint8)
  out = data.preprocess(x, data.CIFAR10_MEAN, data.CIFAR10_STD, jnp.float32)
  expect = (x / 255.0 - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
  assert out.dtype == jnp.float32 and out.shape == x.shape
  np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="1 or 3"):
    data.preprocess(x, (0.1, 0.2), (0.3, 0.3))


def _windows(image, pad):
  """All crops (plain and mirrored) of a zero-padded image."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      crop = padded[dy:dy + h, dx:dx + w]
      yield crop
      yield crop[:, ::-1]


def test_augment_crop_flip_outputs_are_padded_crops():
  rng = np.random.default_rng(3)
  x = rng.integers(1, 256, (24, 5, 5, 2), dtype=np.uint8)
  key = jax.random.key(0)
  out = np.asarray(data.augment_crop_flip(key, jnp.asarray(x), pad=2))
  assert out.shape == x.shape and out.dtype == np.uint8
  for img, aug in zip(x, out):
    assert any(np.array_equal(aug, win) for win in _windows(img, 2))
  # Some images are actually moved or mirrored.
  assert (out != x).any(axis=(1, 2, 3)).sum() > 12
  np.testing.assert_array_equal(out, data.augment_crop_flip(key, jnp.asarray(x), pad=2))
  assert not np.array_equal(out, data.augment_crop_flip(jax.random.key(1), jnp.asarray(x)))


def test_augment_flip_only_is_exact_mirror():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(64, 3, 4, 1)), jnp.float32)
  out = np.asarray(data.augment_crop_flip(jax.random.key(5), x, pad=0))
  same = np.all(out == np.asarray(x), axis=(1, 2, 3))
  mirrored = np.all(out == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
  assert (same ^ mirrored).all()  # each image is one or the other, never both
  assert 16 < mirrored.sum() < 48  # about half are flipped


def test_augment_fill_and_leading_axes():
  x = jnp.full((2, 3, 4, 4, 2), 7.0)
  out = data.augment_crop_flip(jax.random.key(0), x, pad=2, fill=(-1.0, -2.0))
  assert out.shape == x.shape
  assert set(np.unique(out[..., 0]).tolist()) <= {7.0, -1.0}
  assert set(np.unique(out[..., 1]).tolist()) <= {7.0, -2.0}
  assert (out[..., 0] == -1.0).any()
  # Leading axes are flattened in order: same as augmenting the flat batch.
  flat = data.augment_crop_flip(jax.random.key(0), x.reshape(6, 4, 4, 2), pad=2,
                                fill=(-1.0, -2.0))
  np.testing.assert_array_equal(out.reshape(6, 4, 4, 2), flat)
  with pytest.raises(ValueError, match="batch axis"):
    data.augment_crop_flip(jax.random.key(0), x[0, 0])


def test_eval_batches_cover_split_once():
  batches = data.eval_batches(10, 4)
  assert batches.indices.shape == batches.mask.shape == (3, 4)
  np.testing.assert_array_equal(batches.indices[batches.mask], np.arange(10))
  assert batches.mask.sum() == 10
  assert data.eval_batches(3, 100).indices.shape == (1, 3)
  with pytest.raises(ValueError, match="positive"):
    data.eval_batches(10, 0)


@pytest.mark.slow
@pytest.mark.parametrize("shuffle", ["permutation", "feistel"])
@pytest.mark.parametrize("first, length", [(0, 1), (3, 7), (10, 25)])
def test_chunk_indices_are_the_rounds_of_the_epoch_shuffles(shuffle, first, length):
  # N=100, W*b=12: 8 rounds per epoch, the last 4 examples of an epoch unused.
  n, w, b = 100, 3, 4
  key = jax.random.key(7)
  got = np.asarray(jax.jit(lambda s: sampling.chunk_indices(key, s, length, n, w, b,
                                                        shuffle=shuffle))(first))
  assert got.shape == (length, w, b)
  # Each function traced once, with the epoch and the step as arguments.
  permutation = jax.jit(lambda epoch: sampling.epoch_permutation(key, epoch, n, shuffle=shuffle))
  one_round = jax.jit(lambda step: sampling.round_indices(key, step, n, w, b, shuffle=shuffle))
  for i in range(length):
    step = first + i
    epoch, r = divmod(step, 8)
    perm = np.asarray(permutation(epoch))
    np.testing.assert_array_equal(got[i].reshape(-1), perm[12 * r:12 * (r + 1)])
    np.testing.assert_array_equal(got[i], np.asarray(one_round(step)))


def test_chunk_longer_than_the_permutation_cache_draws_the_same_rounds(monkeypatch):
  key = jax.random.key(1)
  cached = np.asarray(sampling.chunk_indices(key, 5, 30, 100, 3, 4))
  monkeypatch.setattr(sampling, "_MAX_CACHED_PERMUTATION_ENTRIES", 0)
  np.testing.assert_array_equal(np.asarray(sampling.chunk_indices(key, 5, 30, 100, 3, 4)), cached)


def test_empty_test_split_is_refused():
  with pytest.raises(ValueError, match="no test examples"):
    data.Dataset(name="x", train_images=np.zeros((10, 4, 4, 1), np.uint8),
                 train_labels=np.zeros(10, int), test_images=np.zeros((0, 4, 4, 1), np.uint8),
                 test_labels=np.zeros(0, int), num_classes=2, mean=(0.5,), std=(0.2,))


@pytest.mark.parametrize("damage", ["truncated", "not_a_zip"])
def test_damaged_npz_is_one_clear_error(tmp_path, damage):
  path = tmp_path / "mnist.npz"
  rng = np.random.default_rng(0)
  np.savez(path, train_images=rng.integers(0, 255, (50, 4, 4, 1), dtype=np.uint8),
           train_labels=rng.integers(0, 3, 50), test_images=np.zeros((5, 4, 4, 1), np.uint8),
           test_labels=np.zeros(5, int))
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"hello" * 100)
  with pytest.raises(ValueError, match="truncated or not an .npz"):
    data.load_dataset("npz", path=str(path))


def test_npz_with_a_stray_label_is_refused(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(10), 200)  # 1% of 200 per class: 2 examples
  labels[7] = 10  # one stray label: an 11-way model without the check
  arrays = dict(train_images=rng.integers(0, 255, (2000, 4, 4, 1), dtype=np.uint8),
                train_labels=labels, test_images=np.zeros((20, 4, 4, 1), np.uint8),
                test_labels=np.arange(20) % 10)
  np.savez(tmp_path / "stray.npz", **arrays)
  with pytest.raises(ValueError, match="label 10 appears 1 times"):
    data.load_dataset("npz", path=str(tmp_path / "stray.npz"))
  # Stating the classes in the file keeps them; clean labels need no statement.
  np.savez(tmp_path / "stated.npz", num_classes=11, **arrays)
  assert data.load_dataset("npz", path=str(tmp_path / "stated.npz")).num_classes == 11
  arrays["train_labels"] = np.repeat(np.arange(10), 200)
  np.savez(tmp_path / "clean.npz", **arrays)
  assert data.load_dataset("npz", path=str(tmp_path / "clean.npz")).num_classes == 10
