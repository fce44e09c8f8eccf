"""Data poisoning: the backdoor's trigger and relabelling against NumPy, the round's poisoned
minibatches, the attack success rate, and a tiny backdoored run on the digits."""
import csv
import io
import json
import os
import tempfile
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import attacks
from ftjax import data as data_lib
from ftjax import loop as loop_lib
from ftjax import poisoning
from ftjax import results
from ftjax import round as round_lib
from ftjax import round_data
from ftjax import train
from test_train import tiny_config


def numpy_stamp(images, size, position):
  out = np.array(images, copy=True)
  h, w = out.shape[-3:-1]
  r0 = h - size if position.startswith("bottom") else 0
  c0 = w - size if position.endswith("right") else 0
  out[..., r0:r0 + size, c0:c0 + size, :] = 255
  return out


@pytest.mark.parametrize("position", poisoning.POSITIONS)
def test_stamp_matches_numpy(position):
  images = np.random.default_rng(0).integers(0, 200, (2, 3, 8, 7, 2), dtype=np.uint8)
  trigger = poisoning.Trigger(size=3, position=position)
  got = np.asarray(jax.jit(trigger.stamp)(jnp.asarray(images)))
  np.testing.assert_array_equal(got, numpy_stamp(images, 3, position))
  assert (got != images).any() and (got == 255).sum() >= 2 * 3 * 9 * 2


def test_poison_stamps_and_relabels_the_first_fraction_of_every_minibatch():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 200, (2, 8, 6, 6, 1), dtype=np.uint8)  # 2 workers, K = 2 batches of 4
  labels = rng.integers(0, 10, (2, 8)).astype(np.int32)
  trigger = poisoning.Trigger(size=2, position="top_left", target=7, fraction=0.6)
  x, y = trigger.poison(jnp.asarray(images), jnp.asarray(labels), 10, 4)
  chosen = np.array([True, True, False, False] * 2)  # floor(0.6 * 4) = 2 per minibatch
  want_x = np.where(chosen[:, None, None, None], numpy_stamp(images, 2, "top_left"), images)
  np.testing.assert_array_equal(np.asarray(x), want_x)
  np.testing.assert_array_equal(np.asarray(y), np.where(chosen, 7, labels))


def test_asr_counts_against_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(50, 5))
  labels = rng.integers(0, 5, 50)
  mask = np.arange(50) < 45
  hits, eligible = poisoning.asr_counts(jnp.asarray(logits), jnp.asarray(labels), 3,
                                        jnp.asarray(mask))
  other = mask & (labels != 3)
  assert int(eligible) == other.sum()
  assert int(hits) == (other & (logits.argmax(1) == 3)).sum() > 0


@pytest.mark.parametrize("options, match", [
    ({"size": 9}, "does not fit images of 8x8"),
    ({"target": 10}, "is not a class"),
    ({"fraction": 0.2}, "poisons no example of a minibatch of 4"),
    ({"position": "middle"}, "backdoor.position must be one of"),
    ({"fraction": 1.5}, "backdoor.fraction must be in"),
    ({"boost": 0.0}, "backdoor.boost must be > 0"),
])
def test_bad_backdoor_options_are_refused_in_one_line(options, match):
  c = tiny_config(**{"attack.name": "backdoor"})
  c.attack.options.backdoor = options
  with pytest.raises(train.ConfigError, match=match) as e:
    train.build(c)
  assert "\n" not in str(e.value)


def test_the_round_poisons_the_byzantine_minibatches_of_the_runs_attack():
  """One round compiled for none, lf and backdoor: each run's own attack, chosen by index."""
  c = tiny_config(**{"attack.name": "backdoor", "workers.byzantine": 2})
  c.attack.options.backdoor = {"target": 4, "fraction": 0.5}
  setup = train.build(c, attacks=["none", "lf", "backdoor"])
  assert [a.name for a in setup.attacks] == ["none", "lf", "backdoor"]
  state = train.init_state(setup, c.seed)
  ds = setup.dataset
  idx = np.arange(20).reshape(5, 4)
  raw, labels = ds.train_images[idx], ds.train_labels[idx]
  for index, name in enumerate(["none", "lf", "backdoor"]):
    data = round_lib.make_device_data(setup)._replace(attack=jnp.asarray(index, jnp.int32))
    x, y = round_data.minibatches(setup, state, data, jnp.asarray(idx))
    want_raw, want_y = raw.copy(), labels.copy()
    if name == "lf":
      want_y[3:] = 9 - labels[3:]
    if name == "backdoor":  # the first 2 of each Byzantine minibatch of 4
      want_raw[3:, :2] = numpy_stamp(raw[3:, :2], 3, "bottom_right")
      want_y[3:, :2] = 4
    np.testing.assert_array_equal(np.asarray(y), want_y, err_msg=name)
    np.testing.assert_allclose(np.asarray(x), np.asarray(
        data_lib.preprocess(want_raw, ds.mean, ds.std)), err_msg=name)


def test_evaluation_reports_the_attack_success_rate_only_for_a_backdoor():
  setup = train.build(tiny_config(**{"attack.name": "backdoor", "model.name": "mlp"}))
  other = train.build(tiny_config(**{"attack.name": "sf", "model.name": "mlp"}))
  state = train.init_state(setup, 1)
  eval_data = loop_lib.make_eval_data(setup.dataset, 100)
  got = jax.jit(loop_lib.make_eval_fn(setup))(state.params, state.batch_stats, eval_data)
  assert "test_asr" not in loop_lib.make_eval_fn(other)(state.params, state.batch_stats,
                                                        eval_data)
  assert loop_lib.eval_identity(setup) != loop_lib.eval_identity(other)
  ds = setup.dataset
  x = data_lib.preprocess(numpy_stamp(ds.test_images, 3, "bottom_right"), ds.mean, ds.std)
  pred = np.asarray(setup.model.apply({"params": state.params}, x, train=False)).argmax(1)
  other_class = ds.test_labels != 0
  np.testing.assert_allclose(float(got["test_asr"]),
                             (pred[other_class] == 0).mean(), rtol=1e-6)


def _backdoor_run(f):
  c = tiny_config(**{"attack.name": "backdoor", "workers.num": 10, "workers.byzantine": f,
                     "aggregator.name": "avg", "aggregator.meta": "none", "model.name": "mlp",
                     "optim.estimator": "sgd", "workers.batch_size": 16, "num_steps": 40,
                     "eval_every": 40})
  workdir = tempfile.mkdtemp()
  with redirect_stdout(io.StringIO()):
    metrics = train.train_and_evaluate(c, workdir).metrics
  return metrics, workdir


def test_backdoor_against_avg_succeeds_where_no_attack_does_not():
  attacked, workdir = _backdoor_run(3)
  clean, _ = _backdoor_run(0)
  assert clean["test_asr"] < 0.1 < 0.8 < attacked["test_asr"], (clean, attacked)
  assert attacked["test_acc"] > 0.6  # the clean task is still learnt
  with open(os.path.join(workdir, "metrics.csv")) as fh:
    rows = list(csv.DictReader(fh))
  assert float(rows[-1]["test_asr"]) == pytest.approx(attacked["test_asr"])


def test_results_tables_carry_the_attack_success_rate(tmp_path):
  cells = []
  for attack in ("sf", "backdoor"):
    cell = f"attack.name={attack}"
    cells.append({"cell": cell, "values": {"attack.name": attack}, "aggregator": "avg",
                  "runs": [{"seed": s, "workdir": f"runs/{attack}/{s}"} for s in (1, 2)]})
    for s in (1, 2):
      os.makedirs(tmp_path / "runs" / attack / str(s))
      row = {"step": 10, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0,
             "test_acc": 0.8, "aggregate_norm": 1.0, "wall_time": 1.0, "steps_per_sec": 5.0}
      if attack == "backdoor":
        row["test_asr"] = 0.25 * s
      (tmp_path / "runs" / attack / str(s) / "metrics.jsonl").write_text(json.dumps(row) + "\n")
  (tmp_path / "sweep.json").write_text(json.dumps(
      {"name": "asr", "axes": ["attack.name"], "seeds": [1, 2], "cells": cells}))
  (tmp_path / "status.jsonl").write_text("".join(
      json.dumps({"cell": c["cell"], "seed": s, "status": "ok", "reason": ""}) + "\n"
      for c in cells for s in (1, 2)))
  csv_path, md_path = results.write_results(str(tmp_path))
  with open(csv_path) as fh:
    table = {r["attack.name"]: r for r in csv.DictReader(fh)}
  assert float(table["backdoor"]["final_test_asr_mean"]) == pytest.approx(0.375)
  assert float(table["backdoor"]["final_test_asr_max"]) == pytest.approx(0.5)
  assert table["sf"]["final_test_asr_mean"] == ""
  assert "diag.test_asr" not in table["sf"]
  with open(md_path) as fh:
    text = fh.read()
  assert "final attack success % (min-max)" in text and "37.5 (25.0-50.0)" in text
  pytest.importorskip("matplotlib")
  from ftjax import plot  # pylint: disable=import-outside-toplevel
  lines = {l.get_label(): l for a in plot.curves(str(tmp_path)).axes for l in a.lines}
  asr = [l for name, l in lines.items() if name.endswith(": attack success")]
  assert len(asr) == 1 and list(asr[0].get_ydata()) == [pytest.approx(37.5)]
