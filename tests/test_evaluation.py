"""Evaluation options: the step-0 row, chosen steps, the validation split, best on
validation, the mean of the last k evaluations, and their resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train import tiny_config
from ftjax import loop as loop_lib
from ftjax import plot
from ftjax import plot_run
from ftjax import reporting
from ftjax import results
from ftjax import round as round_lib
from ftjax import round_data
from ftjax import sampling
from ftjax import sweep as sweep_lib
from ftjax import train
from ftjax.build import KEY_DATA
from ftjax.state import purpose_key


def _config(**overrides):
  """A config of a few rounds of the mlp on the built-in digits; evaluation batches of
  100 (several batches, the last one padded)."""
  return tiny_config(**{"num_steps": 4, "eval_every": 2, "model.name": "mlp",
                        "data.eval_batch_size": 100, **overrides})


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    return [json.loads(line) for line in fh]


def _held_out(num, fraction):
  """The validation positions, recomputed: the first floor(v N) of a fixed permutation."""
  return np.sort(np.random.default_rng(0).permutation(num)[:int(np.floor(fraction * num))])


# --------------------------------------------------------------------------
# The validation split
# --------------------------------------------------------------------------


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_validation_is_disjoint_from_workers_and_server_and_equal_across_seeds(partition):
  over = {"data.validation": 0.2, "data.server_examples": 30, "data.partition": partition}
  first = train.build(_config(seed=1, **over))
  second = train.build(_config(seed=2, **over), first.source)
  source = first.source
  num = source.train_images.shape[0]
  held = _held_out(num, 0.2)
  rest = np.setdiff1d(np.arange(num), held)
  assert len(held) == int(0.2 * num) and len(rest) == first.dataset.train_images.shape[0]
  for setup in (first, second):
    np.testing.assert_array_equal(setup.validation.indices, held)
    np.testing.assert_array_equal(setup.validation.images, source.train_images[held])
    np.testing.assert_array_equal(setup.validation.labels, source.train_labels[held])
    np.testing.assert_array_equal(setup.dataset.train_images, source.train_images[rest])
  # One copy for the seeds of a sweep: the second build reuses the first's split.
  assert second.validation is first.validation and second.dataset is first.dataset
  for seed, setup in ((1, first), (2, second)):
    state = round_lib.init_state(setup, seed)
    data = round_lib.make_device_data(setup)
    drawn = np.asarray(round_data.sample_chunk(setup, state, data, 40)).ravel()
    server = np.asarray(sampling.set_aside(purpose_key(state, KEY_DATA),
                                           jnp.arange(setup.server_examples),
                                           setup.dataset.train_images.shape[0]))
    shards = [] if setup.partition is None else setup.partition.table[setup.partition.table >= 0]
    for name, positions in (("workers", drawn), ("server", server), ("shards", shards)):
      originals = rest[np.asarray(positions, int)]  # back to the loaded split's examples
      assert not np.intersect1d(originals, held).size, name
    assert not np.intersect1d(rest[drawn], rest[server]).size  # the server's stay its own


@pytest.mark.parametrize("bad, match", [
    ({"data.validation": 1.0}, "data.validation"), ({"data.validation": -0.1}, "data.validation"),
    ({"data.validation": 0.0001}, "holds out 0"), ({"eval_steps": "0"}, "eval_steps"),
    ({"eval_steps": "2,x"}, "eval_steps"), ({"eval_steps": "5"}, r"num_steps=4"),
    ({"eval_steps": "1.5"}, "eval_steps"), ({"report_last_k": 0}, "report_last_k"),
])
def test_bad_evaluation_options_are_one_line(bad, match):
  with pytest.raises(train.ConfigError, match=match) as e:
    train.build(_config(**bad))
  assert "\n" not in str(e.value)


def test_eval_at_start_must_be_a_bool():
  c = _config()
  c.eval_at_start = None  # a placeholder-free field refuses other types itself, but not None
  with pytest.raises(train.ConfigError, match="eval_at_start"):
    train.build(c)


def test_chosen_steps_parse_from_a_string_or_a_sequence():
  assert train.build(_config(num_steps=9, eval_steps=" 7,3, 3 ")).eval_steps == (3, 7)
  assert train.build(_config(num_steps=9)).eval_steps == ()
  c = _config(num_steps=9)
  del c["eval_steps"]  # a config file that gives a tuple instead of the string
  c.eval_steps = (7, 3, 3)
  assert train.build(c).eval_steps == (3, 7)
  c.eval_steps = (7, 3.5)
  with pytest.raises(train.ConfigError, match="3.5 is not a step"):
    train.build(c)


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------


def _np_eval(setup, params, images, labels):
  """Loss and accuracy of the model at ``params``, with NumPy around the forward pass."""
  ds = setup.dataset
  x = (images.astype(np.float64) / 255 - np.array(ds.mean)) / np.array(ds.std)
  logits = np.asarray(setup.model.apply({"params": params}, jnp.asarray(x, setup.dtype),
                                        train=False), np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return -log_p[np.arange(len(labels)), labels].mean(), (logits.argmax(-1) == labels).mean()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """A run of 7 rounds with a validation split, chosen steps and step 0, in float64."""
  workdir = str(tmp_path_factory.mktemp("evaluated"))
  c = _config(num_steps=7, eval_every=4, eval_steps="1,6", dtype="float64",
              report_last_k=3, **{"data.validation": 0.25})
  result = train.train_and_evaluate(c, workdir)
  with jax.enable_x64(True):
    setup = train.build(c)
    initial = round_lib.init_state(setup, c.seed)
  return workdir, setup, initial, result


def test_step_zero_row_is_the_initial_model_evaluated(evaluated):
  workdir, setup, initial, _ = evaluated
  row = _rows(workdir)[0]
  assert row["step"] == 0 and "train_loss" not in row and "steps_per_sec" not in row
  ds = setup.dataset
  with jax.enable_x64(True):
    test = _np_eval(setup, initial.params, ds.test_images, ds.test_labels)
    val = _np_eval(setup, initial.params, setup.validation.images, setup.validation.labels)
  # The evaluation reports float32 values.
  assert (row["test_loss"], row["test_acc"]) == pytest.approx(test, rel=1e-6)
  assert (row["val_loss"], row["val_acc"]) == pytest.approx(val, rel=1e-6)


def test_chosen_steps_give_exactly_those_rows(evaluated, tmp_path):
  rows = _rows(evaluated[0])
  # Step 0, eval_steps 1 and 6, every eval_every = 4 and the last step.
  assert [r["step"] for r in rows] == [0, 1, 4, 6, 7]
  assert all("val_acc" in r and "val_loss" in r for r in rows)
  c = _config(num_steps=5, eval_every=2, eval_steps="3", eval_at_start=False)
  train.train_and_evaluate(c, str(tmp_path))
  assert [r["step"] for r in _rows(str(tmp_path))] == [2, 3, 4, 5]


def test_best_is_the_test_accuracy_at_the_best_validation_accuracy(evaluated, capsys):
  workdir, _, _, _ = evaluated
  rows = _rows(workdir)
  val, test = np.array([r["val_acc"] for r in rows]), np.array([r["test_acc"] for r in rows])
  best = int(np.argmax(val))  # the first of equal values
  summary = results.run_summary(rows, 3)
  assert summary["best_on"] == "validation"
  assert (summary["best_step"], summary["best_test_acc"]) == (rows[best]["step"], test[best])
  assert summary["last_k_test_acc"] == pytest.approx(np.mean(test[-3:]), abs=1e-15)
  # The checkpoint named "best" holds the state of that step.
  assert os.listdir(os.path.join(workdir, "checkpoints", "best")) == [str(rows[best]["step"])]


def test_closing_line_reports_best_on_validation_and_the_last_k_mean(tmp_path, capsys):
  c = _config(report_last_k=2, **{"data.validation": 0.2})
  train.train_and_evaluate(c, str(tmp_path))
  rows = _rows(str(tmp_path))
  val, test = [r["val_acc"] for r in rows], [r["test_acc"] for r in rows]
  best = int(np.argmax(val))
  line = [l for l in capsys.readouterr().err.splitlines() if l.startswith("Finished")][0]
  assert (f"best {test[best]:.4f} at step {rows[best]['step']} (on validation), mean of the "
          f"last 2 evaluations {np.mean(test[-2:]):.4f}") in line


def test_resumed_run_with_the_options_equals_the_uninterrupted_one(tmp_path):
  over = {"num_steps": 6, "eval_every": 3, "eval_steps": "2", "data.validation": 0.2}
  full, parts = str(tmp_path / "full"), str(tmp_path / "parts")
  train.train_and_evaluate(_config(**over), full)
  train.train_and_evaluate(_config(**{**over, "num_steps": 3}), parts)
  assert [r["step"] for r in _rows(parts)] == [0, 2, 3]
  train.train_and_evaluate(_config(**over), parts)  # resumes at 3: no second step-0 row
  a, b = _rows(full), _rows(parts)
  assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 2, 3, 6]
  for ra, rb in zip(a, b):
    assert ({k: v for k, v in ra.items() if k not in ("wall_time", "steps_per_sec")}
            == {k: v for k, v in rb.items() if k not in ("wall_time", "steps_per_sec")})


def test_seeds_share_one_evaluation_program_per_split(tmp_path):
  programs = loop_lib.ProgramCache()
  over = {"num_steps": 2, "data.validation": 0.2}
  train.train_runs([_config(seed=1, **over), _config(seed=2, **over)],
                   [str(tmp_path / "a"), str(tmp_path / "b")], programs=programs)
  train.train_runs([_config(seed=3, **over), _config(seed=4, **over)],
                   [str(tmp_path / "c"), str(tmp_path / "d")], programs=programs)
  evals = [k for k in programs._programs if k[0] == "eval"]  # pylint: disable=protected-access
  assert sorted(k[1] for k in evals) == ["test", "val"]


def test_a_fresh_start_drops_a_stale_step_zero_row(tmp_path):
  r = reporting.Reporter(str(tmp_path), total_steps=4, show_progress=False, print_rows=False)
  r.write({"step": 0, "test_acc": 0.1})
  r.close()  # interrupted before any checkpoint: the run starts afresh
  r = reporting.Reporter(str(tmp_path), total_steps=4, show_progress=False, print_rows=False,
                         resumed=False)
  assert r.rows == []
  r.close()
  r = reporting.Reporter(str(tmp_path), total_steps=4, show_progress=False, print_rows=False)
  assert r.rows == []  # the files were rewritten empty


@pytest.mark.slow
def test_a_sweep_holds_out_the_same_validation_split_as_a_lone_run(tmp_path):
  """The sweep loads the data once and splits it per run: its runs' validation rows are
  those of the same runs trained alone."""
  import ml_collections
  s = ml_collections.ConfigDict()
  s.name, s.base, s.seeds, s.max_batch = "val", "configs/default.py", (1, 2), 8
  over = {"num_steps": 2, "eval_every": 2, "workers.num": 5, "workers.byzantine": 1,
          "workers.batch_size": 4, "model.name": "mlp", "data.validation": 0.2,
          "eval_steps": "1", "report_last_k": 2}
  s.overrides, s.grid, s.cells = tuple(over.items()), (), []
  programs = loop_lib.ProgramCache()
  sweep_lib.run_sweep(s, str(tmp_path / "sweep"), progress=False, programs=programs,
                      write=lambda line: None)
  [cell] = results.read_sweep(str(tmp_path / "sweep"))["cells"]
  for run in cell["runs"]:
    swept = _rows(str(tmp_path / "sweep" / run["workdir"]))
    alone = str(tmp_path / f"alone{run['seed']}")
    train.train_runs([_config(seed=run["seed"], **over)], [alone], programs=programs)
    lone = _rows(alone)
    assert [r["step"] for r in swept] == [r["step"] for r in lone] == [0, 1, 2]
    for a, b in zip(swept, lone):  # two runs evaluated at once round apart in float32
      assert (a["val_acc"], a["val_loss"], a["test_acc"]) == pytest.approx(
          (b["val_acc"], b["val_loss"], b["test_acc"]), rel=1e-6)
  [row] = results.cell_table(str(tmp_path / "sweep"))
  assert row["best_on"] == "validation" and row["last_k"] == "2"


# --------------------------------------------------------------------------
# Tables and plots
# --------------------------------------------------------------------------


def _fake_sweep(w, val_accs, test_accs, last_k):
  cell = {"cell": "c", "values": {"attack.name": "sf"}, "aggregator": "avg",
          "runs": [{"seed": s, "workdir": f"runs/{s}"} for s in (1, 2)]}
  with open(os.path.join(w, "sweep.json"), "w") as fh:
    json.dump({"name": "fake", "axes": ["attack.name"], "seeds": [1, 2], "cells": [cell]}, fh)
  with open(os.path.join(w, "status.jsonl"), "w") as fh:
    for s in (1, 2):
      fh.write(json.dumps({"cell": "c", "seed": s, "status": "ok", "reason": ""}) + "\n")
  for s in (1, 2):
    run = os.path.join(w, "runs", str(s))
    os.makedirs(run)
    with open(os.path.join(run, "config.json"), "w") as fh:
      json.dump({"report_last_k": last_k}, fh)
    with open(os.path.join(run, "metrics.jsonl"), "w") as fh:
      for i, (v, t) in enumerate(zip(val_accs[s], test_accs[s])):
        row = {"step": 10 * i, "test_acc": t, "test_loss": 1.0, "wall_time": 1.0 + i}
        if i:
          row.update(train_loss=1.0, steps_per_sec=5.0)
        if v is not None:
          row.update(val_acc=v, val_loss=1.0)
        fh.write(json.dumps(row) + "\n")


def test_tables_choose_best_on_validation_and_average_the_last_k(tmp_path):
  vals = {1: [0.1, 0.6, 0.9, 0.9, 0.7], 2: [0.2, 0.8, 0.5, 0.6, 0.7]}
  tests = {1: [0.1, 0.7, 0.5, 0.95, 0.6], 2: [0.1, 0.4, 0.9, 0.3, 0.2]}
  w = str(tmp_path)
  _fake_sweep(w, vals, tests, last_k=2)
  [row] = results.cell_table(w)
  at_best = [tests[s][int(np.argmax(vals[s]))] for s in (1, 2)]  # 0.5 (step 20), 0.4 (10)
  assert row["best_on"] == "validation"
  assert row["best_test_acc_mean"] == pytest.approx(np.mean(at_best))
  assert row["best_steps"] == "20;10"
  assert row["last_k_test_acc_mean"] == pytest.approx(np.mean([np.mean(tests[s][-2:])
                                                               for s in (1, 2)]))
  # The mean validation curve (0.15, 0.7, 0.7, 0.75, 0.7) peaks at step 30.
  assert row["best_step"] == 30
  _, md = results.write_results(w)
  text = open(md).read()
  assert "best (on validation) acc %" in text and "mean of last 2 evals" in text


def test_tables_without_validation_say_best_on_test(tmp_path):
  tests = {1: [0.1, 0.7, 0.5], 2: [0.1, 0.4, 0.9]}
  w = str(tmp_path)
  _fake_sweep(w, {1: [None] * 3, 2: [None] * 3}, tests, last_k=5)
  [row] = results.cell_table(w)
  assert row["best_on"] == "test"
  assert row["best_test_acc_mean"] == pytest.approx(np.mean([0.7, 0.9]))
  assert row["last_k_test_acc_mean"] == pytest.approx(np.mean([np.mean(tests[s]) for s in (1, 2)]))
  _, md = results.write_results(w)
  assert "best (on test) acc %" in open(md).read()


def test_plots_take_the_step_zero_row_and_the_validation_curves():
  rows = [{"step": 0, "test_acc": 0.1, "test_loss": 2.0, "val_acc": 0.1, "val_loss": 2.0,
           "wall_time": 1.0},
          {"step": 10, "test_acc": 0.5, "test_loss": 1.0, "val_acc": 0.4, "val_loss": 1.1,
           "train_acc": 0.5, "train_loss": 1.0, "wall_time": 3.0, "steps_per_sec": 5.0}]
  panels = dict(plot_run._panels(rows))  # pylint: disable=protected-access
  assert [s[0] for s in panels["accuracy (%)"]] == ["test_acc", "train_acc", "val_acc"]
  assert [s[0] for s in panels["loss"]] == ["test_loss", "train_loss", "val_loss"]
  assert plot.training_time(rows) == [0.0, 2.0]  # 10 rounds at 5 per second after step 0
