"""Sweeps: expansion, validation, batched runs, resume, failures, result tables."""

import csv
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ftjax import checkpoint as checkpoint_lib
from ftjax import results
from ftjax import sweep as sweep_lib
from ftjax import train
from ftjax import policy
from ftjax import round as round_lib
from tests.subprocess_env import with_devices

pytestmark = pytest.mark.slow  # minutes of compiling; CI runs it, -m "not slow" skips it

# Compiled programs shared by the tests, as by the runs of one sweep process: the
# tiny float32 config compiles once for the whole module.
PROGRAMS = train.ProgramCache()

TINY = {"num_steps": 20, "eval_every": 10, "workers.num": 5, "workers.byzantine": 1,
        "workers.batch_size": 4, "model.name": "mlp", "data.eval_batch_size": 512}


def spec(grid=(), cells=(), seeds=(1, 2), max_batch=8, **overrides):
  """A sweep config over the tiny digits setting of TINY."""
  s = ml_collections.ConfigDict()
  s.name = "test"
  s.base = "configs/default.py"
  s.overrides = tuple({**TINY, **overrides}.items())
  s.grid = tuple(grid)
  s.cells = list(cells)
  s.seeds = tuple(seeds)
  s.max_batch = max_batch
  return s


def _rows(path):
  return results.read_jsonl(os.path.join(path, "metrics.jsonl"))


def _run_dirs(workdir):
  sweep = results.read_sweep(workdir)
  return {(c["cell"], r["seed"]): os.path.join(workdir, r["workdir"])
          for c in sweep["cells"] for r in c["runs"]}


def _same_metrics(a, b):
  """Every logged value equal, except the timings."""
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    for key in ra:
      if key not in ("wall_time", "steps_per_sec"):
        assert ra[key] == rb[key], key


# --------------------------------------------------------------------------
# Expansion and validation
# --------------------------------------------------------------------------


def test_expansion_is_grid_times_cells_times_seeds():
  s = spec(grid=[("attack.name", ["alie", "sf"]), ("workers.byzantine", [1, 2])],
           cells=[{"aggregator.meta": "none"}, {"aggregator.meta": "ctma", "optim.lr": 0.05}],
           seeds=(3, 1))
  sweep = sweep_lib.expand(s)
  assert sweep.axes == ("attack.name", "workers.byzantine", "aggregator.meta", "optim.lr")
  expected = []
  for attack in ("alie", "sf"):
    for f in (1, 2):
      expected.append({"attack.name": attack, "workers.byzantine": f, "aggregator.meta": "none",
                       "optim.lr": 0.1})  # 0.1: the default config's lr
      expected.append({"attack.name": attack, "workers.byzantine": f, "aggregator.meta": "ctma",
                       "optim.lr": 0.05})
  assert [c.values for c in sweep.cells] == expected
  first = sweep.cells[0]
  assert first.name == "attack.name=alie,workers.byzantine=1,aggregator.meta=none,optim.lr=0.1"
  assert first.aggregator == "cwtm" and sweep.cells[1].aggregator == "ctma(cwtm)"
  assert [r.seed for r in first.runs] == [3, 1]
  assert first.runs[1].workdir == os.path.join("runs", first.name, "seed=1")
  config = sweep.cells[3].runs[0].config
  assert (config.seed, config.attack.name, config.workers.byzantine, config.optim.lr,
          config.num_steps, config.workers.num) == (3, "alie", 2, 0.05, 20, 5)
  assert len({c.name for c in sweep.cells}) == 8


@pytest.mark.parametrize("change, message", [
    ({"grid": [("attack.nmae", ["alie"])]}, "no field 'attack.nmae' (did you mean 'attack.name'?)"),
    ({"cells": [{"workers.num": "ten"}]}, "workers.num='ten' is not a valid value"),
    ({"overrides": (("optim.learning_rate", 0.1),)}, "sweep.overrides: the config has no field"),
    ({"seeds": ()}, "sweep.seeds must be a non-empty list"),
    ({"cells": [{"attack.name": "sf"}, {"attack.name": "sf"}]}, "is the same setting"),
    ({"grid": [("seed", [1, 2])]}, "sweep.seeds"),
    ({"base": "configs/nope.py"}, "'configs/nope.py' does not exist"),
    ({"share_programs": "yes"}, "sweep.share_programs must be True or False"),
])
def test_bad_sweep_configs_give_one_line_naming_the_field(change, message):
  s = spec()
  for key, value in change.items():
    s[key] = value
  with pytest.raises(train.ConfigError) as err:
    sweep_lib.expand(s)
  assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_sweep_field_is_refused():
  s = spec()
  s.seed = 1
  with pytest.raises(train.ConfigError, match="no field 'seed' \\(did you mean 'seeds'\\?\\)"):
    sweep_lib.expand(s)


# --------------------------------------------------------------------------
# Batched runs
# --------------------------------------------------------------------------


def _tiny(seed, dtype):
  s = sweep_lib.expand(spec(seeds=(seed,), dtype=dtype))
  return s.cells[0].runs[0].config


@pytest.fixture(scope="module")
def separate_float64_runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("separate")
  return tmp, [train.train_and_evaluate(_tiny(s, "float64"), str(tmp / f"alone{s}"))
               for s in (1, 2)]


# The runs of one program in each layout (make_chunk_fn(runs_layout=...)): vmapped,
# looped inside it, or one copy of the round per run.
@pytest.mark.parametrize("layout", policy.RUNS_LAYOUTS)
def test_two_seeds_batched_equal_two_separate_runs_in_float64(tmp_path, separate_float64_runs,
                                                              layout, monkeypatch):
  dtype, tolerance = "float64", 1e-12
  monkeypatch.setattr(policy, "runs_layout", lambda *_: layout)
  alone_dir, separate = separate_float64_runs
  batched = train.train_runs([_tiny(1, dtype), _tiny(2, dtype)],
                             [str(tmp_path / "b1"), str(tmp_path / "b2")])
  for s, alone, together in zip((1, 2), separate, batched):
    assert together.error is None
    for a, b in zip(jax.tree.leaves(alone.state.params), jax.tree.leaves(together.state.params)):
      assert a.dtype == b.dtype == np.dtype(dtype)
      np.testing.assert_allclose(b, a, rtol=tolerance, atol=tolerance)
    rows_a, rows_b = _rows(str(alone_dir / f"alone{s}")), _rows(str(tmp_path / f"b{s}"))
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [0, 10, 20]
    assert rows_b[0]["test_loss"] == pytest.approx(rows_a[0]["test_loss"], rel=1e-12)
    for ra, rb in zip(rows_a[1:], rows_b[1:]):
      for key in ("train_loss", "test_loss", "aggregate_norm"):
        assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
  # The two seeds really are different runs.
  assert _rows(str(tmp_path / "b1"))[-1]["train_loss"] != _rows(str(tmp_path / "b2"))[-1][
      "train_loss"]


def test_the_runs_layout_is_the_backends_choice_and_checked():
  # On CPU a few runs are unrolled, more are vmapped (kernels.policy.runs_layout).
  assert jax.default_backend() == "cpu"
  assert [policy.runs_layout(r) for r in (1, policy.UNROLL_MAX_RUNS,
                                          policy.UNROLL_MAX_RUNS + 1)] == ["unroll", "unroll",
                                                                           "vmap"]
  with pytest.raises(ValueError, match="Unknown runs_layout 'scan'"):
    train.make_chunk_fn(train.build(_tiny(1, "float32")), runs=True, runs_layout="scan")


@pytest.mark.parametrize("layout", ["map", "unroll"])
def test_looped_runs_with_per_worker_shards_equal_separate_runs(tmp_path, monkeypatch, layout):
  # The runs looped inside the program or unrolled, each with its own seed's partition table.
  monkeypatch.setattr(policy, "runs_layout", lambda *_: layout)
  configs = []
  for seed in (1, 2):
    c = _tiny(seed, "float32")
    c.data.partition, c.num_steps = "iid_split", 10
    configs.append(c)
  alone = [train.train_and_evaluate(c, str(tmp_path / f"alone{i}")) for i, c in enumerate(configs)]
  together = train.train_runs(configs, [str(tmp_path / "b0"), str(tmp_path / "b1")])
  for a, b in zip(alone, together):
    assert b.error is None
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
      np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
  assert not np.allclose(jax.tree.leaves(together[0].state.params)[0],
                         jax.tree.leaves(together[1].state.params)[0])


def test_runs_that_differ_only_in_the_learning_rate_share_the_chunk_program():
  # optim.lr lives in the server optimizer's state, so it is not a constant of the round.
  programs, params = train.ProgramCache(), {}
  for lr in (0.1, 0.02):
    c = _tiny(1, "float32")
    c.optim.lr = lr
    setup = train.build(c)
    state = train.init_state(setup, c.seed)
    data = train.make_device_data(setup)
    before = programs.compiled
    run = train.make_chunk_fn(setup, "scan", programs=programs)(state, data, 3).run
    params[lr] = jax.tree.leaves(run(state, data)[0].params)
    assert programs.compiled == (1 if lr == 0.1 else before)
  # The same program, yet each run trained with its own rate.
  assert not np.allclose(params[0.1][0], params[0.02][0])


def _compiled_names(records):
  return [r.getMessage() for r in records if "Finished XLA compilation" in r.getMessage()]


def test_a_second_batch_of_the_same_cell_reuses_the_compiled_programs(tmp_path):
  configs = [_tiny(s, "float32") for s in (1, 2, 3)]
  programs = PROGRAMS
  batched = train.train_runs(configs[:2], [str(tmp_path / "1"), str(tmp_path / "2")],
                             programs=programs)
  compiled = programs.compiled
  # float32: batched and separate runs agree to rounding.
  alone = train.train_and_evaluate(configs[0], str(tmp_path / "alone"))
  for a, b in zip(jax.tree.leaves(alone.state.params), jax.tree.leaves(batched[0].state.params)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logging.getLogger("jax").addHandler(handler)
  try:
    with jax.log_compiles():
      # The last batch of a cell: one seed and an empty slot, so the same shapes.
      last = train.train_runs([configs[2], None], [str(tmp_path / "3"), None],
                              programs=programs)
  finally:
    logging.getLogger("jax").removeHandler(handler)
  assert last[1] is None and last[0].error is None and last[0].metrics["step"] == 20
  assert programs.compiled == compiled
  names = _compiled_names(records)
  assert not [n for n in names if "scan_chunk" in n or "one_round" in n or "evaluate" in n
              or "init_states" in n], names
  # The run in slot 0 beside an empty slot is the run it is beside a sibling.
  train.train_runs([configs[2], configs[0]], [str(tmp_path / "3b"), str(tmp_path / "1b")],
                   programs=programs)
  _same_metrics(_rows(str(tmp_path / "3")), _rows(str(tmp_path / "3b")))


def test_a_diverging_seed_fails_alone_and_its_sibling_goes_on(tmp_path, monkeypatch):
  configs = [_tiny(s, "float32") for s in (1, 2)]
  # Reference: seed 1 with an empty slot beside it.
  train.train_runs([configs[0], None], [str(tmp_path / "ref"), None], programs=PROGRAMS)
  init_states = train.init_states

  def seed_2_is_infinite(setup, seeds):
    states = init_states(setup, seeds)
    bad = (jnp.asarray(seeds) == 2).reshape(-1, 1)
    params = jax.tree.map(lambda p: jnp.where(bad.reshape((-1,) + (1,) * (p.ndim - 1)),
                                              jnp.inf, p), states.params)
    return states._replace(params=params)

  monkeypatch.setattr(round_lib, "init_states", seed_2_is_infinite)
  out = train.train_runs(configs, [str(tmp_path / "s1"), str(tmp_path / "s2")])
  assert out[0].error is None and out[0].metrics["step"] == 20
  assert isinstance(out[1].error, train.TrainingDiverged)
  assert "between steps 0 and 10" in str(out[1].error)
  assert [r["step"] for r in _rows(str(tmp_path / "s2"))] == [0]  # the initial model's row
  _same_metrics(_rows(str(tmp_path / "s1")), _rows(str(tmp_path / "ref")))


# --------------------------------------------------------------------------
# Sweeps: resume, failures
# --------------------------------------------------------------------------


class _Interrupt(Exception):
  pass


def test_interrupted_sweep_resumes_to_the_same_metrics(tmp_path, monkeypatch):
  s = spec(grid=[("attack.name", ["alie", "sf"])], seeds=(1, 2))
  full = str(tmp_path / "full")
  sweep_lib.run_sweep(s, full, progress=False, programs=PROGRAMS, write=lambda line: None)

  # Interrupt the second cell after its first chunk, between the two runs' saves:
  # seed 1 has its checkpoint at step 10, seed 2 none.
  second = sweep_lib.expand(s).cells[1]
  victim = os.path.abspath(os.path.join(str(tmp_path / "parts"), second.runs[1].workdir))
  original = checkpoint_lib.Checkpointer

  class Interrupting(original):
    def __init__(self, workdir, enabled=True):
      super().__init__(workdir, enabled)
      self.workdir = os.path.abspath(workdir)

    def save(self, which, step, state, meta):
      if self.workdir == victim and which == "latest" and step == 10:
        raise _Interrupt()
      super().save(which, step, state, meta)

  monkeypatch.setattr(checkpoint_lib, "Checkpointer", Interrupting)
  parts = str(tmp_path / "parts")
  with pytest.raises(_Interrupt):
    sweep_lib.run_sweep(s, parts, progress=False, programs=PROGRAMS, write=lambda line: None)
  monkeypatch.setattr(checkpoint_lib, "Checkpointer", original)
  dirs = _run_dirs(parts)
  assert sorted(os.listdir(os.path.join(dirs[(second.name, 1)], "checkpoints", "latest"))) == [
      "10"]
  status = results.read_status(parts)
  assert set(status) == {(sweep_lib.expand(s).cells[0].name, 1),
                         (sweep_lib.expand(s).cells[0].name, 2)}

  lines = []
  # The rerun compiles afresh, as a new process would.
  sweep_lib.run_sweep(s, parts, progress=False, programs=train.ProgramCache(), write=lines.append)
  assert any("Resumed" in line and "step 10" in line for line in lines)
  for key, path in _run_dirs(full).items():
    _same_metrics(_rows(path), _rows(dirs[key]))
  assert all(e["status"] == "ok" for e in results.read_status(parts).values())

  # A rerun of a finished sweep runs nothing; a changed sweep is refused in one line.
  lines = []
  sweep_lib.run_sweep(s, parts, progress=False, programs=PROGRAMS, write=lines.append)
  assert not any("Resumed" in line for line in lines)
  with pytest.raises(train.ConfigError, match="optim.lr"):
    sweep_lib.run_sweep(spec(grid=[("attack.name", ["alie", "sf"])], **{"optim.lr": 0.2}),
                        parts, progress=False, programs=PROGRAMS, write=lambda line: None)
  with pytest.raises(train.ConfigError, match=r"this one drops \[2\]"):
    sweep_lib.run_sweep(spec(grid=[("attack.name", ["alie", "sf"])], seeds=(1,)),
                        parts, progress=False, programs=PROGRAMS, write=lambda line: None)
  # A seed added to the finished sweep trains alone; the others stay as they were.
  before = {key: _rows(path) for key, path in _run_dirs(parts).items()}
  out = sweep_lib.run_sweep(spec(grid=[("attack.name", ["alie", "sf"])], seeds=(1, 2, 3)),
                            parts, progress=False, programs=PROGRAMS, write=lambda line: None)
  assert sorted(seed for _, seed in out["status"]) == [1, 1, 2, 2, 3, 3]
  for key, rows in before.items():
    assert _rows(_run_dirs(parts)[key]) == rows
  assert all(e["status"] == "ok" for e in results.read_status(parts).values())


def test_cells_that_differ_only_in_the_attack_share_one_program(tmp_path, monkeypatch):
  # alie and ipm are omniscient, sf and lf send the Byzantine workers' own updates
  # (lf on flipped labels): two families, so two chunk programs instead of four.
  s = spec(grid=[("attack.name", ["alie", "ipm", "sf", "lf"])], seeds=(1,), num_steps=10)
  assert sorted(set(sweep_lib.attack_families(sweep_lib.expand(s), {}).values())) == [
      ("alie", "ipm"), ("sf", "lf")]
  quiet = {"progress": False, "write": lambda line: None}
  traced = []
  make_round = round_lib.make_round
  monkeypatch.setattr(round_lib, "make_round", lambda *a, **k: traced.append(1) or
                      make_round(*a, **k))
  shared = sweep_lib.run_sweep(s, str(tmp_path / "shared"), programs=train.ProgramCache(),
                               **quiet)
  s.share_programs = False
  alone = sweep_lib.run_sweep(s, str(tmp_path / "alone"), programs=train.ProgramCache(), **quiet)
  # Either way: one evaluation program, and one initialisation per family (the
  # workers' state has a row per computed worker: 4 for alie and ipm, 5 for sf and lf).
  assert (shared["compilations"], alone["compilations"]) == (3 + 2, 3 + 4)
  assert len(traced) == 2 + 4  # the second cell of a family reuses the compiled round
  dirs_shared, dirs_alone = _run_dirs(str(tmp_path / "shared")), _run_dirs(str(tmp_path / "alone"))
  losses = []
  for key, path in dirs_alone.items():
    a, b = _rows(path), _rows(dirs_shared[key])
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 10]
    for key_ in ("train_loss", "test_loss", "aggregate_norm"):
      assert b[-1][key_] == pytest.approx(a[-1][key_], rel=1e-5), (key, key_)
    losses.append(a[-1]["train_loss"])
  assert len(set(losses)) == 4  # each cell ran its own attack


def test_a_shared_round_refuses_attacks_it_cannot_serve():
  c = _tiny(1, "float32")
  assert c.attack.name == "sf"
  with pytest.raises(train.ConfigError, match="own updates"):
    train.build(c, attacks=["alie", "sf"])
  with pytest.raises(train.ConfigError, match="own attack"):
    train.build(c, attacks=["alie", "ipm"])
  assert train.build(c, attacks=["sf"]).attacks == ()
  assert [a.name for a in train.build(c, attacks=["lf", "sf"]).attacks] == ["lf", "sf"]


def test_an_impossible_cell_is_recorded_and_the_sweep_goes_on(tmp_path):
  s = spec(cells=[{"workers.byzantine": 3}, {"workers.byzantine": 1}], seeds=(1,))
  lines = []
  sweep_lib.run_sweep(s, str(tmp_path), progress=False, programs=PROGRAMS, write=lines.append)
  status = results.read_status(str(tmp_path))
  bad, good = status[("workers.byzantine=3", 1)], status[("workers.byzantine=1", 1)]
  assert bad["status"] == "failed" and "fewer than half" in bad["reason"]
  assert "\n" not in bad["reason"] and good["status"] == "ok"
  assert not os.path.exists(tmp_path / "runs" / "workers.byzantine=3")
  with open(tmp_path / "results.csv") as fh:
    table = {row["cell"]: row for row in csv.DictReader(fh)}
  assert table["workers.byzantine=3"]["status"] == "failed"
  assert table["workers.byzantine=1"]["status"] == "ok"
  final = _rows(str(tmp_path / "runs" / "workers.byzantine=1" / "seed=1"))[-1]["test_acc"]
  assert float(table["workers.byzantine=1"]["final_test_acc_mean"]) == final
  assert any(line.startswith("workers.byzantine") for line in lines)  # the table header


# --------------------------------------------------------------------------
# Result tables
# --------------------------------------------------------------------------


def _write_run(workdir, rows):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as fh:
    for row in rows:
      fh.write(json.dumps(row) + "\n")


def _row(step, acc, speed, wall, **diag):
  return {"step": step, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0, "test_acc": acc,
          "aggregate_norm": 1.0, "wall_time": wall, "steps_per_sec": speed, **diag}


def test_result_tables_from_a_fake_workdir(tmp_path):
  w = str(tmp_path)
  cells = []
  for attack, rule in (("alie", "ctma(cwtm)"), ("sf", "ctma(cwtm)"), ("alie", "avg"),
                       ("sf", "avg")):
    name = f"attack.name={attack},rule={rule}"
    cells.append({"cell": name, "values": {"attack.name": attack, "aggregator.name": rule},
                  "aggregator": rule,
                  "runs": [{"seed": s, "workdir": f"runs/{name}/seed={s}"} for s in (1, 2)]})
  with open(os.path.join(w, "sweep.json"), "w") as fh:
    json.dump({"name": "fake", "axes": ["attack.name", "aggregator.name"], "seeds": [1, 2],
               "cells": cells}, fh)
  accs = {  # per cell and seed: the test accuracy at steps 10, 20, 30
      (0, 1): [0.5, 0.9, 0.8], (0, 2): [0.6, 0.7, 0.7],
      (1, 1): [0.4, 0.6, 0.6], (1, 2): [0.5, 0.5, 0.8],
      (2, 1): [0.3, 0.2, 0.1], (2, 2): [0.1, 0.1, 0.1],
  }
  status = []
  for (c, s), acc in accs.items():
    rows = [_row(10 * (i + 1), a, speed=10.0 * s + i, wall=3.0 * s * (i + 1),
                 ctma_kept_byzantine=float(c + s + i)) for i, a in enumerate(acc)]
    _write_run(os.path.join(w, cells[c]["runs"][s - 1]["workdir"]), rows)
    status.append({"cell": cells[c]["cell"], "seed": s, "status": "ok", "reason": ""})
  status.append({"cell": cells[3]["cell"], "seed": 1, "status": "failed",
                 "reason": "Training diverged"})
  status.append({"cell": cells[3]["cell"], "seed": 2, "status": "failed",
                 "reason": "Training diverged"})
  # Seed 2 of cell 2 failed after an earlier "ok": the last line counts.
  status.append({"cell": cells[2]["cell"], "seed": 2, "status": "failed", "reason": "boom"})
  with open(os.path.join(w, "status.jsonl"), "w") as fh:
    fh.write("".join(json.dumps(e) + "\n" for e in status))

  results.write_results(w)
  with open(os.path.join(w, "results.csv")) as fh:
    table = list(csv.DictReader(fh))
  first, second, third, fourth = table
  # Cell 0: finals 0.8 and 0.7, bests 0.9 (step 20) and 0.7 (first at step 20).
  assert float(first["final_test_acc_mean"]) == pytest.approx(0.75)
  assert (float(first["final_test_acc_min"]), float(first["final_test_acc_max"])) == (0.7, 0.8)
  assert float(first["best_test_acc_mean"]) == pytest.approx(0.8)
  # Seed means per step: 0.55, 0.8, 0.75: the mean curve peaks at step 20.
  assert float(first["best_step"]) == 20 and first["best_steps"] == "20;20"
  assert first["final_steps"] == "30;30"
  # Medians of the runs' medians: seed 1 chunks 10, 11, 12 -> 11; seed 2 -> 21; median 16.
  assert float(first["steps_per_sec"]) == 16
  assert float(first["wall_time"]) == pytest.approx((9.0 + 18.0) / 2)
  # ctma_kept_byzantine, cell 0: seed 1 (1+2+3)/3 = 2, seed 2 (2+3+4)/3 = 3: mean 2.5.
  assert float(first["diag.ctma_kept_byzantine"]) == pytest.approx(2.5)
  assert first["seeds"] == "1;2" and first["status"] == "ok" and first["reason"] == ""
  # Cell 1: bests 0.6 at step 20 and 0.8 at step 30; seed means 0.45, 0.55, 0.7 peak at 30
  # (the median of the seeds' best steps, 25, was never evaluated).
  assert float(second["best_step"]) == 30 and second["best_steps"] == "20;30"
  assert float(second["final_test_acc_mean"]) == pytest.approx(0.7)
  # Cell 2: only seed 1 counts.
  assert third["status"] == "partial" and third["reason"] == "seed 2: boom"
  assert float(third["final_test_acc_mean"]) == pytest.approx(0.1)
  assert fourth["status"] == "failed" and fourth["final_test_acc_mean"] == ""

  with open(os.path.join(w, "results.md")) as fh:
    md = fh.read()
  # One column per axis (no cell name), seeds as a list, the rounds evaluated.
  assert ("| alie | ctma(cwtm) | 1, 2 | ok | 75.0 (70.0-80.0) | 30 | 80.0 (70.0-90.0) | 20, 20 |"
          in md)
  assert "| sf | ctma(cwtm) | 1, 2 | ok | 70.0 (60.0-80.0) | 30 | 70.0 (60.0-80.0) | 20, 30 |" in md
  assert "attack.name=alie,rule" not in md
  assert "| ctma kept, Byzantine (rows/round) |" in md.splitlines()[
      next(i for i, l in enumerate(md.splitlines()) if l.startswith("| attack.name"))]
  worst = md.split("## Worst case per rule over the attacks")[1]
  # ctma(cwtm): alie 0.75, sf 0.7 -> 70.0 (sf); avg: alie 0.1, sf failed -> failed (sf).
  assert "| ctma(cwtm) | 70.0 (sf) |" in worst
  assert "| avg | failed (sf) |" in worst


# --------------------------------------------------------------------------
# Runs spread over devices
# --------------------------------------------------------------------------

_SPREAD_SCRIPT = """
import json, sys
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
from ftjax import loop as loop_lib, sweep as sweep_lib, train
from tests.test_sweep import spec

out = {"devices": jax.device_count()}
tmp = sys.argv[1]
s = spec(seeds=(1, 2, 3), dtype="float64", devices=1, **{"workers.num": 5, "num_steps": 10})
configs = [r.config for r in sweep_lib.expand(s).cells[0].runs]
make_chunk_fn, specs = loop_lib.make_chunk_fn, []


def spy(*args, **kwargs):  # records how the states reach the compiled chunk
  compile_chunk = make_chunk_fn(*args, **kwargs)

  def wrapped(state, data, length):
    specs.append(str(getattr(jax.tree.leaves(state.params)[0].sharding, "spec", None)))
    return compile_chunk(state, data, length)
  return wrapped


loop_lib.make_chunk_fn = spy
params = {}
for devices in (1, 0):
  results = train.train_runs(configs, [f"{tmp}/d{devices}_{i}" for i in range(3)],
                             devices=devices)
  params[devices] = [[np.asarray(p) for p in jax.tree.leaves(r.state.params)] for r in results]
out["max_diff"] = max(float(np.abs(a - b).max()) for ra, rb in zip(params[1], params[0])
                      for a, b in zip(ra, rb))
out["seeds_differ"] = bool(np.abs(params[0][0][0] - params[0][1][0]).max() > 0)
out["specs"] = sorted(set(specs))
try:
  train.train_runs(configs[:2], [f"{tmp}/odd_{i}" for i in range(2)], devices=0)
except ValueError as e:
  out["uneven"] = str(e)
# A sweep of two seeds over the three devices: one batch padded with an empty slot.
two = spec(seeds=(1, 2), dtype="float64", **{"workers.num": 5, "num_steps": 10})
two.devices = 0
sweep_lib.run_sweep(two, f"{tmp}/sweep", progress=False, write=lambda line: None)
ran = sweep_lib.expand(two).cells[0].runs
out["sweep_devices"] = [r.config.devices for r in ran]
rows = {}
for r in ran:
  with open(f"{tmp}/sweep/{r.workdir}/metrics.jsonl") as fh:
    rows[r.seed] = [json.loads(line) for line in fh][-1]["train_loss"]
for i, seed in enumerate((1, 2)):
  with open(f"{tmp}/d1_{i}/metrics.jsonl") as fh:
    out[f"loss_{seed}"] = [rows[seed], [json.loads(line) for line in fh][-1]["train_loss"]]
print("RESULT " + json.dumps(out))
"""


def test_runs_spread_over_devices_equal_the_runs_on_one_device(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=with_devices(3))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _SPREAD_SCRIPT, str(tmp_path)],
                        capture_output=True, text=True, cwd=root, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
  assert out["devices"] == 3
  assert out["max_diff"] <= 1e-12 and out["seeds_differ"]
  assert "P('runs',)" in out["specs"]  # the spread states, split on the runs axis
  assert "cannot be spread evenly over 3 devices" in out["uneven"]
  assert out["sweep_devices"] == [1, 1]
  for seed in (1, 2):
    spread, alone = out[f"loss_{seed}"]
    assert spread == pytest.approx(alone, rel=1e-12)


# --------------------------------------------------------------------------
# Non-i.i.d. sweeps: every seed and partition gets its own program where shapes differ
# --------------------------------------------------------------------------


def test_three_seed_dirichlet_sweep_runs_each_seed_as_alone(tmp_path):
  # Each seed's Dirichlet split has shards of its own sizes, so its table has its own shape.
  s = spec(seeds=(1, 2, 3), num_steps=10, **{"data.partition": "dirichlet"})
  out = sweep_lib.run_sweep(s, str(tmp_path / "sweep"), progress=False,
                            programs=train.ProgramCache(), write=lambda line: None)
  assert [e["status"] for e in out["status"].values()] == ["ok"] * 3
  for (cell, seed), path in _run_dirs(str(tmp_path / "sweep")).items():
    c = sweep_lib.expand(s).cells[0].runs[seed - 1].config
    alone = train.train_and_evaluate(c, str(tmp_path / f"alone{seed}"))
    assert _rows(path)[-1]["train_loss"] == pytest.approx(alone.metrics["train_loss"], rel=1e-5)


@pytest.mark.parametrize("loop", ["scan", "host"])
def test_a_sweep_mixing_partitions_runs_each_cells_own_program(tmp_path, loop):
  # Two cells whose rounds differ only in the partition table they read: the second must
  # not run the first one's executable.
  s = spec(grid=[("data.partition", ["dirichlet", "shards"])], seeds=(1,), num_steps=10,
           loop=loop)
  sweep_lib.run_sweep(s, str(tmp_path / "sweep"), progress=False,
                      programs=train.ProgramCache(), write=lambda line: None)
  for cell in sweep_lib.expand(s).cells:
    [run] = cell.runs
    alone = train.train_and_evaluate(run.config, str(tmp_path / cell.name))
    rows = _rows(os.path.join(str(tmp_path / "sweep"), run.workdir))
    assert rows[-1]["train_loss"] == pytest.approx(alone.metrics["train_loss"], rel=1e-5)
