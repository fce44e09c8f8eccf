"""Random uint8 image datasets for the benchmarks (no download; the arithmetic of a
training step does not depend on the pixel values)."""

import numpy as np

from ftjax import data as data_lib


def synthetic_dataset(shape, num_train=4096, num_test=256, seed=0):
  """A 10-class ``ftjax.data.Dataset`` of random images of ``shape`` (H, W, C)."""
  rng = np.random.default_rng(seed)
  return data_lib.Dataset(
      name="synthetic",
      train_images=rng.integers(0, 256, (num_train,) + shape, dtype=np.uint8),
      train_labels=rng.integers(0, 10, num_train).astype(np.int32),
      test_images=rng.integers(0, 256, (num_test,) + shape, dtype=np.uint8),
      test_labels=rng.integers(0, 10, num_test).astype(np.int32),
      num_classes=10, mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1], augment="none")
