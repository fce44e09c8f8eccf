"""Shared pytest setup: CPU only, quiet logs, fixtures used by several modules."""
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture
def small_slices(monkeypatch):
  """Slice sizes small enough that test-sized rows take every sliced path of the distances."""
  from ftjax.kernels import distances  # after JAX_PLATFORMS is set above
  monkeypatch.setattr(distances, "SQDIST_SLICE", 8)
  monkeypatch.setattr(distances, "SQDIST_GROUP", 4)
  monkeypatch.setattr(distances, "SQDIST_MAX_SLICES", 12)
  # Blocks of 4 columns for 9 float32 rows, written out up to 3 at a time: rows
  # of a few dozen columns take the loop over groups and the remainder.
  monkeypatch.setattr(distances, "GRAM_BLOCK_BYTES", 256)
  monkeypatch.setattr(distances, "GRAM_MIN_BLOCK", 4)
  monkeypatch.setattr(distances, "GRAM_UNROLL", 3)
