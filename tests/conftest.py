"""Shared pytest setup: CPU only, quiet logs, fixtures used by several modules."""
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The suite compiles hundreds of small programs and runs each for a few rounds, so
# compiling is most of its time: the tests (and the processes they start, which
# inherit the environment) compile with XLA:CPU's LLVM optimisation off. The HLO
# (fusion, layouts, collectives, buffers) the tests inspect is the same.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


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
  monkeypatch.setattr(distances, "MIX_BLOCK_MIN_BYTES", 0)  # mix takes its blocks too


@pytest.fixture(autouse=True)
def _programs_compiled_before_a_patch_are_not_reused(request):
  """A test that monkeypatches may change what a program traces to, so it starts and
  ends with an empty process-wide program cache (``ftjax.loop.SHARED``); the other
  tests share compiled programs, as the runs of one notebook do."""
  if "monkeypatch" not in request.fixturenames:
    yield
    return
  from ftjax import loop  # after JAX_PLATFORMS is set above
  loop.SHARED.clear()
  yield
  loop.SHARED.clear()
