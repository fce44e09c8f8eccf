"""Shared pytest setup: CPU only, quiet logs, fixtures used by several modules."""
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture
def small_slices(monkeypatch):
  """Slice sizes small enough that test-sized rows take every sliced path of kernels.rows."""
  from ftjax.kernels import rows  # after JAX_PLATFORMS is set above
  monkeypatch.setattr(rows, "SQDIST_SLICE", 8)
  monkeypatch.setattr(rows, "SQDIST_GROUP", 4)
  monkeypatch.setattr(rows, "SQDIST_MAX_SLICES", 12)
  monkeypatch.setattr(rows, "GRAM_MIN_SLICE", 8)
