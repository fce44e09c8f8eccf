"""Property searches over the inputs a user can give (hypothesis, with its shrinking).

* Every generated config either trains a few rounds with finite metrics, or is
  refused by ``build`` before anything compiles, with one line.
* Every workdir state (empty, interrupted, finished, damaged) under every
  rerun (same config, more or fewer steps, another config) either resumes
  exactly, refuses in one line, or does nothing and says so; the record of a
  finished run is never rewritten.
"""

import json
import os
import shutil

import hypothesis
import jax
import numpy as np
import pytest
from hypothesis import strategies as st

from configs import default
from ftjax import aggregators
from ftjax import attacks
from ftjax import data as data_lib
from ftjax import train

pytestmark = pytest.mark.slow

_RNG = np.random.default_rng(0)
TINY = data_lib.Dataset(
    name="tiny", train_images=_RNG.integers(0, 256, (96, 4, 4, 1), dtype=np.uint8),
    train_labels=np.arange(96, dtype=np.int32) % 3,
    test_images=_RNG.integers(0, 256, (12, 4, 4, 1), dtype=np.uint8),
    test_labels=np.arange(12, dtype=np.int32) % 3, num_classes=3, mean=(0.5,), std=(0.25,))

RULES = sorted(aggregators.AGGREGATORS) + ["ctma(cwtm)", "median", "arc(ctma(cwtm))"]
METAS = ["none", "ctma", "nnm", "bucketing", "clip", "arc", "nnm+ctma", "trim"]
ATTACKS = sorted({a.name for a in attacks.ATTACKS.values()}) + ["bitflip"]


def _mostly(valid, invalid):
  """Draws a valid value four times in five, so that many configs get as far as training."""
  return st.one_of(st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(valid),
                   st.sampled_from(valid), st.sampled_from(invalid))


@st.composite
def configs(draw):
  c = default.get_config()
  c.progress, c.checkpoint.enabled, c.model.name = False, False, "mlp"
  c.num_steps = draw(st.integers(1, 3))
  c.eval_every = draw(st.integers(1, 3))
  c.data.eval_batch_size = 12
  c.workers.num = w = draw(st.integers(1, 9))
  # Mostly below W/2 (the rule's own condition may still refuse it), sometimes not.
  c.workers.byzantine = draw(st.one_of(*[st.integers(0, max(0, (w - 1) // 2))] * 4,
                                       st.integers(0, 5)))
  c.workers.batch_size = draw(_mostly([1, 2, 4], [12, 0]))
  c.aggregator.name = draw(_mostly(RULES[:-3] + ["ctma(cwtm)"], ["median", "arc(ctma(cwtm))"]))
  c.aggregator.meta = draw(_mostly(METAS[:-1], ["trim"]))
  c.attack.name = draw(_mostly(ATTACKS[:-1], ["bitflip"]))
  c.optim.estimator = draw(_mostly(["sgd", "momentum", "mu2sgd"], ["adam"]))
  c.optim.clip = draw(_mostly([None, 0, 1.0], [-1.0]))
  c.data.partition = draw(_mostly(["iid", "iid_split", "dirichlet", "shards"], ["zipf"]))
  c.loop = draw(_mostly(["scan", "host"], ["while"]))
  return c


def _non_robust(c) -> bool:
  """Rules whose output a non-finite or unbounded row may make non-finite (documented)."""
  return "avg" in c.aggregator.name and c.aggregator.meta in ("none", "nnm", "bucketing")


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(configs())
def test_every_config_trains_finitely_or_is_refused_in_one_line(c):
  try:
    setup = train.build(c, dataset=TINY)
  except train.ConfigError as e:
    message = str(e)
    assert message and "\n" not in message and "Traceback" not in message, message
    hypothesis.event("refused before compiling")
    return
  state = train.init_state(setup, c.seed)
  data = train.make_device_data(setup)
  chunk = train.make_chunk_fn(setup)(state, data, c.num_steps)
  state, metrics = chunk.run(state, data)
  finite = bool(metrics["finite"]) and np.isfinite(float(metrics["train_loss"]))
  assert finite or _non_robust(c), (setup.aggregator.spec, setup.attack.name, metrics)
  hypothesis.event("trained" if finite else "diverged (non-robust rule)")


# --------------------------------------------------------------------------
# Workdir states x reruns
# --------------------------------------------------------------------------


def _config(num_steps=4, lr=0.1):
  c = default.get_config()
  c.progress, c.model.name, c.num_steps, c.eval_every = False, "mlp", num_steps, 2
  c.workers.num, c.workers.byzantine, c.workers.batch_size = 5, 1, 2
  c.data.eval_batch_size, c.optim.lr = 12, lr
  return c


def _files(workdir):
  return {name: open(os.path.join(workdir, name), "rb").read()
          for name in ("metrics.jsonl", "metrics.csv") if os.path.exists(
              os.path.join(workdir, name))}


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """A finished run of 4 steps, its copy interrupted after step 2, and a damaged one."""
  root = tmp_path_factory.mktemp("states")
  finished = str(root / "finished")
  full = train.train_and_evaluate(_config(), finished, dataset=TINY)
  interrupted = str(root / "interrupted")
  train.train_and_evaluate(_config(num_steps=2), interrupted, dataset=TINY)
  with open(os.path.join(interrupted, "config.json")) as fh:  # as a run of 4 steps left it
    fields = json.load(fh)
  fields["num_steps"] = 4
  with open(os.path.join(interrupted, "config.json"), "w") as fh:
    json.dump(fields, fh)
  damaged = str(root / "damaged")
  shutil.copytree(finished, damaged)
  with open(os.path.join(damaged, "config.json"), "w") as fh:
    fh.write("{not json")
  return {"empty": None, "interrupted": interrupted, "finished": finished,
          "damaged": damaged}, full


RERUNS = {"same": _config(), "more steps": _config(num_steps=6),
          "fewer steps": _config(num_steps=2), "another config": _config(lr=0.05)}


@pytest.mark.parametrize("state", ["empty", "interrupted", "finished", "damaged"])
@pytest.mark.parametrize("rerun", list(RERUNS))
def test_every_workdir_state_under_every_rerun(workdirs, tmp_path, state, rerun, capsys):
  sources, full = workdirs
  workdir = str(tmp_path / "run")
  if sources[state] is not None:
    shutil.copytree(sources[state], workdir)
  before = _files(workdir)
  c = RERUNS[rerun]
  try:
    result = train.train_and_evaluate(c, workdir, dataset=TINY)
  except train.ConfigError as e:
    assert "\n" not in str(e)
    assert state == "damaged" or (state != "empty" and rerun == "another config"), str(e)
    assert _files(workdir) == before  # refused: nothing written
    return
  assert state != "damaged" and not (state != "empty" and rerun == "another config")
  start = {"empty": 0, "interrupted": 2, "finished": 4}[state]
  assert result.metrics["step"] == max(start, c.num_steps)
  if start >= c.num_steps:  # nothing to do: it says so and the record stays as it was
    assert _files(workdir) == before
    assert "already complete" in capsys.readouterr().err
  if c.num_steps == 4 and rerun != "another config":  # resumed or not, the run ends where an uninterrupted one does
    assert result.metrics["train_loss"] == full.metrics["train_loss"]
    for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(full.state.params)):
      np.testing.assert_array_equal(a, b)
