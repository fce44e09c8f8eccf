"""The training system end to end: step semantics, attacks wired, resume, errors."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from ftjax import sampling
from ftjax import attacks
from ftjax import data as data_lib
from ftjax import build as build_lib
from ftjax import loop as loop_lib
from ftjax import round as round_lib
from ftjax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """A config that compiles and runs in seconds on two CPU cores."""
  c = default.get_config()
  c.num_steps = 6
  c.eval_every = 3
  c.progress = False
  c.workers.num = 5
  c.workers.byzantine = 1
  c.workers.batch_size = 4
  c.model.name = "tiny_cnn"
  c.data.eval_batch_size = 512
  for key, value in overrides.items():
    section = c
    *path, last = key.split(".")
    for p in path:
      section = section[p]
    section[last] = value
  return c


@pytest.mark.slow
def test_f0_avg_sgd_step_equals_plain_minibatch_sgd():
  c = tiny_config(**{"workers.byzantine": 0, "aggregator.name": "avg", "aggregator.meta": "none",
                     "attack.name": "none", "optim.estimator": "sgd", "optim.clip": None,
                     "model.name": "mlp"})
  setup = train.build(c)
  state = train.init_state(setup, c.seed)
  ds = setup.dataset
  data = train.DeviceData(jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels))
  new_state, _ = jax.jit(train.make_round(setup))(state, data)

  idx = sampling.round_indices(round_lib.purpose_key(state, build_lib.KEY_DATA), state.step,
                               ds.train_images.shape[0], 5, 4).reshape(-1)
  x = data_lib.preprocess(ds.train_images[np.asarray(idx)], ds.mean, ds.std, jnp.float32)
  y = jnp.asarray(ds.train_labels[np.asarray(idx)])

  def loss(params):
    logits = setup.model.apply({"params": params}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  want = jax.tree.map(lambda p, g: p - c.optim.lr * g, state.params, jax.grad(loss)(state.params))
  for got_leaf, want_leaf in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=2e-5, atol=2e-6)
  assert int(new_state.step) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted({spec.name for spec in attacks.ATTACKS.values()}))
def test_every_attack_runs_through_the_step(name):
  # Each attack once under its own name (test_attacks checks that aliases resolve to it);
  # an MLP, since no attack depends on the model's layers.
  c = tiny_config(**{"attack.name": name, "num_steps": 2, "eval_every": 2,
                     "model.name": "mlp"})
  setup = train.build(c)
  state = train.init_state(setup, c.seed)
  ds = setup.dataset
  data = train.DeviceData(jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels))
  state, metrics = train.make_chunk_fn(setup)(state, data, 2).run(state, data)
  assert int(state.step) == 2
  assert bool(metrics["finite"]), name  # ctma(cwtm) with f=1 survives every attack
  assert np.isfinite(metrics["train_loss"])
  # Omniscient attacks skip the Byzantine gradients; own-update attacks keep them.
  expected_rows = 5 if setup.attack.uses_own_updates else 4
  assert jax.tree.leaves(state.worker_state)[0].shape[0] == expected_rows


def test_label_flipping_changes_the_byzantine_labels_only():
  c = tiny_config(**{"attack.name": "lf"})
  setup = train.build(c)
  assert setup.attack.flips_labels and setup.num_computed == 5


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    return [json.loads(line) for line in fh]


@pytest.mark.slow
def test_resume_gives_identical_metrics(tmp_path):
  c = tiny_config()
  full = str(tmp_path / "full")
  train.train_and_evaluate(c, full)
  parts = str(tmp_path / "parts")
  c_half = tiny_config(num_steps=3)
  train.train_and_evaluate(c_half, parts)
  assert [r["step"] for r in _rows(parts)] == [0, 3]  # the initial model's row, then step 3
  train.train_and_evaluate(c, parts)  # same workdir: resumes at step 3
  a, b = _rows(full), _rows(parts)
  assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 3, 6]
  for ra, rb in zip(a, b):
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
      assert ra.get(key) == rb.get(key), key
  assert os.path.isdir(os.path.join(parts, "checkpoints", "best"))


@pytest.mark.slow
def test_resume_refuses_a_different_config(tmp_path):
  c = tiny_config(num_steps=3)
  train.train_and_evaluate(c, str(tmp_path))
  with pytest.raises(train.ConfigError, match="attack.name"):
    train.train_and_evaluate(tiny_config(**{"attack.name": "ipm"}), str(tmp_path))


@pytest.mark.slow
def test_a_record_without_a_newer_field_resumes_at_its_default(tmp_path):
  c = tiny_config(num_steps=2, eval_every=2, **{"model.name": "mlp"})
  train.train_and_evaluate(c, str(tmp_path))
  path = tmp_path / "config.json"
  record = json.loads(path.read_text())
  # Written before these existed (the evaluation fields may change on resume anyway).
  del record["federated"], record["aggregator"]["weights"], record["data"]["validation"]
  del record["eval_steps"], record["eval_at_start"], record["report_last_k"]
  path.write_text(json.dumps(record))
  longer = tiny_config(num_steps=4, eval_every=2, **{"model.name": "mlp"})
  assert train.train_and_evaluate(longer, str(tmp_path)).metrics["step"] == 4
  with pytest.raises(train.ConfigError, match="federated.local_steps was 1, now 2"):
    train.train_and_evaluate(tiny_config(num_steps=4, eval_every=2, **{
        "model.name": "mlp", "federated.local_steps": 2, "optim.estimator": "momentum"}),
        str(tmp_path))


def test_config_fields_drop_only_the_named_fields():
  c = tiny_config(seed=3)
  c.attack.name = "alie"
  fields = train.config_fields(c, ["seed", "attack.name", "no.such"])
  assert "seed" not in fields and "name" not in fields["attack"]
  assert fields["attack"]["options"] == c.attack.options.to_dict()
  assert fields["workers"] == c.workers.to_dict()
  assert c.seed == 3 and c.attack.name == "alie"  # the config is not changed
  other = tiny_config(seed=4)
  other.attack.name = "ipm"
  assert train.config_fields(other, ["seed", "attack.name"]) == fields
  assert train.config_fields(other, ["seed"]) != train.config_fields(c, ["seed"])


@pytest.mark.parametrize("overrides, message", [
    ({"workers.byzantine": 3}, "fewer than half"),
    ({"aggregator.name": "mean_of_medians"}, "mean_of_medians"),
    ({"attack.name": "teleport"}, "teleport"),
    ({"model.name": "vit"}, "vit"),
    ({"optim.estimator": "adam"}, "adam"),
    ({"workers.batch_size": 10_000}, "batch_size"),
    ({"data.partition": "by_colour"}, "by_colour"),
    ({"aggregator.options": {"gm": {"iterations": 3}}}, "iterations"),
    ({"data.name": "npz", "data.path": "/nonexistent/mnist.npz"}, "mnist.npz"),
    ({"dtype": "bfloat16"}, "float32"),
])
def test_bad_configs_are_refused_before_compiling(overrides, message, tmp_path):
  with pytest.raises(train.ConfigError, match=message):
    train.train_and_evaluate(tiny_config(**overrides), str(tmp_path))


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(train.ConfigError, match="workdir"):
    train.train_and_evaluate(tiny_config(), str(blocker / "run"))


@pytest.mark.slow
def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
  # No defence, no clipping and a huge learning rate: the model blows up.
  c = tiny_config(**{"workers.byzantine": 0, "aggregator.name": "avg", "aggregator.meta": "none",
                     "attack.name": "none", "optim.clip": None, "optim.lr": 1e30,
                     "optim.estimator": "sgd", "model.name": "mlp", "eval_every": 1,
                     "num_steps": 20})
  with pytest.raises(train.TrainingDiverged) as err:
    train.train_and_evaluate(c, str(tmp_path))
  rows = _rows(str(tmp_path)) if os.path.exists(tmp_path / "metrics.jsonl") else []
  assert all(np.isfinite(r["train_loss"]) for r in rows if r["step"] > 0)
  if rows:  # the message names the checkpoint that exists
    assert f"last good checkpoint (step {rows[-1]['step']})" in str(err.value)
    assert str(rows[-1]["step"]) in os.listdir(tmp_path / "checkpoints" / "latest")
  else:
    assert "No checkpoint was written" in str(err.value)


@pytest.mark.slow
def test_divergence_in_the_first_chunk_names_the_initial_checkpoint_or_none(tmp_path):
  c = tiny_config(**{"workers.byzantine": 0, "aggregator.name": "avg", "aggregator.meta": "none",
                     "attack.name": "none", "optim.clip": None, "optim.lr": 1e30,
                     "optim.estimator": "sgd", "model.name": "mlp", "eval_every": 5,
                     "num_steps": 5})
  with pytest.raises(train.TrainingDiverged, match=r"last good checkpoint \(step 0\)"):
    train.train_and_evaluate(c, str(tmp_path / "a"))  # the initial model's, eval_at_start
  assert "0" in os.listdir(tmp_path / "a" / "checkpoints" / "latest")
  c.eval_at_start = False
  with pytest.raises(train.TrainingDiverged, match="No checkpoint was written"):
    train.train_and_evaluate(c, str(tmp_path / "b"))


@pytest.mark.slow
def test_main_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config",
         os.path.join(ROOT, "configs", "default.py"), "--workdir", str(workdir),
         "--config.num_steps=4", "--config.eval_every=2", "--config.workers.num=5",
         "--config.workers.byzantine=1", "--config.workers.batch_size=4",
         "--config.model.name=tiny_cnn", "--config.attack.name=ipm",
         "--config.aggregator.name=cwmed", "--config.aggregator.meta=nnm+ctma",
         "--config.eval_steps=1,3", "--config.data.validation=0.2"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = _rows(str(workdir))
  # eval_at_start: the initial model's row; eval_steps as written on the command line.
  assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
  assert 0.0 <= rows[-1]["test_acc"] <= 1.0
  with open(workdir / "metrics.csv") as fh:
    header = fh.readline().strip().split(",")
  for column in ("step", "train_loss", "train_acc", "test_loss", "test_acc", "wall_time",
                 "steps_per_sec", "val_loss", "val_acc"):
    assert column in header
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["aggregator"]["meta"] == "nnm+ctma"
  assert (saved["eval_steps"], saved["data"]["validation"]) == ("1,3", 0.2)
  assert "(on validation)" in out.stderr


def test_main_reports_bad_input_in_one_line(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config",
         os.path.join(ROOT, "configs", "default.py"), "--workdir", str(tmp_path),
         "--config.workers.byzantine=9"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 2
  assert "Traceback" not in out.stderr
  assert "ftjax: error:" in out.stderr and "fewer than half" in out.stderr


def test_the_program_cache_drops_the_least_recently_used_program():
  cache = loop_lib.ProgramCache(max_programs=2)
  made = []
  get = lambda key: cache.get(key, lambda: made.append(key) or f"program {key}")
  assert [get("a"), get("b"), get("a")] == ["program a", "program b", "program a"]
  get("c")                      # over the bound: "b" is the least recently used
  assert get("a") == "program a" and made == ["a", "b", "c"]
  get("b")                      # compiled again
  assert made == ["a", "b", "c", "b"] and cache.compiled == 4


@pytest.mark.slow
def test_a_config_run_again_in_the_process_compiles_nothing(tmp_path):
  c = tiny_config(num_steps=3)
  first = train.train_and_evaluate(c, str(tmp_path / "first"))
  compiled = loop_lib.SHARED.compiled
  again = train.train_and_evaluate(c, str(tmp_path / "again"))
  assert loop_lib.SHARED.compiled == compiled
  assert again.metrics["test_loss"] == first.metrics["test_loss"]
  # A JAX setting that changes what the round traces to gets its own programs:
  # initialisation, chunk and evaluation.
  with jax.default_matmul_precision("highest"):
    train.train_and_evaluate(c, str(tmp_path / "precise"))
  assert loop_lib.SHARED.compiled == compiled + 3


def test_nothing_after_build_reads_the_config(tmp_path, monkeypatch):
  # Every read of a ConfigDict after build() returns is recorded: the run, its
  # workdir, reporting and programs work from the Setup alone.
  from ml_collections import config_dict
  from ftjax import run as run_lib
  reads, built = [], []
  real_getattr, real_getitem = config_dict.ConfigDict.__getattr__, config_dict.ConfigDict.__getitem__

  def getattr_(self, name):
    if built and not name.startswith("_"):
      reads.append(name)
    return real_getattr(self, name)

  def getitem_(self, key):
    if built:
      reads.append(key)
    return real_getitem(self, key)

  def build(*args, **kwargs):
    setup = build_lib.build(*args, **kwargs)
    built.append(setup)
    return setup

  monkeypatch.setattr(config_dict.ConfigDict, "__getattr__", getattr_)
  monkeypatch.setattr(config_dict.ConfigDict, "__getitem__", getitem_)
  monkeypatch.setattr(run_lib, "build", build)
  c = tiny_config(num_steps=3)
  result = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert built and reads == []
  with open(tmp_path / "run" / "config.json") as fh:
    record = json.load(fh)
  assert record["resolved"]["aggregator"] == "ctma(cwtm)" and record["aggregator"]["f"] is None
  assert result.metrics["step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["scan", "host"])
def test_second_chunk_does_not_recompile(loop):
  setup = train.build(tiny_config(loop=loop))
  state = train.init_state(setup, 1)
  data = train.make_device_data(setup)
  chunk_fn = train.make_chunk_fn(setup, loop)
  first = chunk_fn(state, data, 3)
  state, _ = first.run(state, data)
  with jax.log_compiles():
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("jax").addHandler(handler)
    try:
      again = chunk_fn(state, data, 3)
      state, metrics = again.run(state, data)
      jax.block_until_ready(metrics)
    finally:
      logging.getLogger("jax").removeHandler(handler)
  assert again is first
  assert not [r for r in records if "Compiling" in r.getMessage()], records
  assert int(state.step) == 6 and first.flops_per_step > 0


@pytest.mark.slow
def test_auto_loop_scans_unless_a_convolution_would_be_slow_in_a_loop():
  # On CPU, "auto" scans when every convolution of the round is a plain one
  # (the cpu kernels) and takes the host loop for autodiff's transposed
  # convolutions (the plain kernels), which XLA:CPU runs far slower in a loop.
  cpu = jax.default_backend() == "cpu"
  expected = {"auto": "scan", "cpu": "scan", "plain": "host" if cpu else "scan"}
  for kernel_set, want in expected.items():
    setup = train.build(tiny_config(kernels=kernel_set))
    state = train.init_state(setup, 1)
    data = train.make_device_data(setup)
    assert train.make_chunk_fn(setup, "auto")(state, data, 2).loop == want, kernel_set
  assert train.make_chunk_fn(setup, "host")(state, data, 2).loop == "host"
  with pytest.raises(ValueError, match="Unknown loop"):
    train.make_chunk_fn(setup, "while")


def test_unknown_kernel_set_is_refused(tmp_path):
  with pytest.raises(train.ConfigError, match="kernel set"):
    train.train_and_evaluate(tiny_config(kernels="gpu"), str(tmp_path))


@pytest.mark.slow
def test_plain_and_cpu_kernels_train_alike_in_float64():
  # The seam's promise on the whole round: the same maths through both kernel sets.
  results = {}
  with jax.enable_x64(True):
    for kernel_set in ("plain", "cpu"):
      c = tiny_config(kernels=kernel_set, dtype="float64", loop="host")
      setup = train.build(c)
      state = train.init_state(setup, 1)
      data = train.make_device_data(setup)
      state, metrics = train.make_chunk_fn(setup, "host")(state, data, 4).run(state, data)
      results[kernel_set] = jax.device_get((state.params, metrics))
  (pa, ma), (pb, mb) = results["plain"], results["cpu"]
  for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    assert a.dtype == np.float64
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=1e-10)


class _UserMLP(nn.Module):
  """A user's own model, unknown to ftjax's tables."""

  @nn.compact
  def __call__(self, x, train):
    del train
    hidden = nn.relu(nn.Dense(16, name="hidden")(x.reshape(x.shape[0], -1)))
    return nn.Dense(3, name="logits")(hidden)


def _user_dataset():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 300)
  images = (rng.integers(0, 60, (300, 6, 6, 1)) + 60 * labels[:, None, None, None])
  return data_lib.Dataset(
      name="three_bands", train_images=images[:240].astype(np.uint8),
      train_labels=labels[:240], test_images=images[240:].astype(np.uint8),
      test_labels=labels[240:], num_classes=3, mean=(0.4,), std=(0.3,))


@pytest.mark.slow
def test_own_model_and_arrays_train_and_return_state(tmp_path):
  c = tiny_config(num_steps=40, eval_every=20, **{"attack.name": "sf"})
  result = train.train_and_evaluate(c, str(tmp_path), dataset=_user_dataset(), model=_UserMLP())
  assert isinstance(result, train.TrainResult)
  assert int(result.state.step) == 40 and result.metrics["step"] == 40
  assert result.state.params["logits"]["kernel"].shape == (16, 3)
  # The three classes are separable by brightness: a defended run learns them.
  assert result.metrics["test_acc"] > 0.9


@pytest.mark.slow
def test_float64_run_leaves_64_bit_mode_off(tmp_path):
  assert not jax.config.read("jax_enable_x64")
  result = train.train_and_evaluate(
      tiny_config(dtype="float64", num_steps=2, eval_every=2, **{"model.name": "mlp"}),
      str(tmp_path))
  assert result.state.params["Dense_0"]["kernel"].dtype == np.float64
  assert not jax.config.read("jax_enable_x64")
  assert jnp.zeros(1).dtype == jnp.float32
  with pytest.raises(train.ConfigError, match="64-bit"):
    train.build(tiny_config(dtype="float64"))


@pytest.mark.slow
def test_scan_and_host_loops_agree():
  results = []
  for loop in ("scan", "host"):
    setup = train.build(tiny_config(loop=loop))
    state = train.init_state(setup, 1)
    data = train.make_device_data(setup)
    state, metrics = train.make_chunk_fn(setup, loop)(state, data, 3).run(state, data)
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (pa, ma), (pb, mb) = results
  for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_wandb_offline_run_is_recorded(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_SILENT", "true")
  c = tiny_config(**{"wandb.enabled": True, "wandb.mode": "offline", "num_steps": 2,
                     "eval_every": 2, "model.name": "mlp"})
  train.train_and_evaluate(c, str(tmp_path))
  runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
  assert len(runs) == 1
  files = os.listdir(tmp_path / "wandb" / runs[0])
  assert any(f.endswith(".wandb") for f in files), files


def test_images_too_small_for_the_model_are_refused_before_compiling(tmp_path):
  rng = np.random.default_rng(0)
  tiny = data_lib.Dataset(
      name="tiny_images", train_images=rng.integers(0, 255, (200, 3, 3, 1), dtype=np.uint8),
      train_labels=rng.integers(0, 10, 200), test_images=np.zeros((20, 3, 3, 1), np.uint8),
      test_labels=np.zeros(20, int), num_classes=10, mean=(0.5,), std=(0.25,))
  c = tiny_config(**{"model.name": "simple_mnist"})
  with pytest.raises(train.ConfigError, match="too small for model 'simple_mnist'"):
    train.train_and_evaluate(c, str(tmp_path), dataset=tiny)
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_damaged_workdirs_are_refused_in_one_sentence(tmp_path):
  c = tiny_config(num_steps=3, **{"model.name": "mlp"})
  corrupt = tmp_path / "corrupt"
  train.train_and_evaluate(c, str(corrupt))
  (corrupt / "config.json").write_text('{"seed": 1, "dty')
  with pytest.raises(train.ConfigError, match="cannot be read as JSON"):
    train.train_and_evaluate(c, str(corrupt))
  orphan = tmp_path / "orphan"
  train.train_and_evaluate(c, str(orphan))
  os.remove(orphan / "config.json")
  with pytest.raises(train.ConfigError, match="checkpoints but no config.json"):
    train.train_and_evaluate(c, str(orphan))


@pytest.mark.parametrize("args, message", [
    (["--config.aggregator.nmae=cwtm"], 'Did you mean "name"'),
    (["--config.nonexistent=1"], "'nonexistent'"),
    (["--config.workers.num=3.5"], "workers.num"),
])
def test_main_reports_bad_flags_in_one_line(tmp_path, args, message):
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config",
         os.path.join(ROOT, "configs", "default.py"), "--workdir", str(tmp_path), *args]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("ftjax: error:") and message in lines[0], lines


def test_main_reports_a_missing_config_file_in_one_line(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config",
         os.path.join(ROOT, "configs", "nope.py"), "--workdir", str(tmp_path)]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and "cannot load the --config file" in lines[0] and "nope.py" in lines[0]


@pytest.mark.slow
def test_unreachable_wandb_leaves_a_warning_and_local_logs(tmp_path, monkeypatch, capsys):
  import wandb

  def refuse(**kwargs):
    raise wandb.errors.CommError("Network error: cannot reach the W&B server")

  monkeypatch.setattr(wandb, "init", refuse)
  c = tiny_config(**{"wandb.enabled": True, "wandb.mode": "online", "num_steps": 2,
                     "eval_every": 2, "model.name": "mlp"})
  result = train.train_and_evaluate(c, str(tmp_path))
  assert result.metrics["step"] == 2 and [r["step"] for r in _rows(str(tmp_path))] == [0, 2]
  warnings = [l for l in capsys.readouterr().err.splitlines() if "Weights & Biases" in l]
  assert len(warnings) == 1 and "CommError" in warnings[0]


def test_declared_f_and_the_attacking_workers_are_separate():
  # The rule tolerates aggregator.f; workers.byzantine is how many actually attack.
  for declared, actual in ((2, 1), (1, 2), (2, 0)):
    setup = train.build(tiny_config(**{"aggregator.f": declared, "workers.byzantine": actual}))
    assert setup.aggregator.f == declared and setup.aggregator.inner.f == declared  # ctma(cwtm)
    assert setup.num_byzantine == actual and setup.num_honest == 5 - actual
  setup = train.build(tiny_config(**{"workers.byzantine": 2}))  # None: the actual count
  assert setup.aggregator.f == 2


@pytest.mark.slow
def test_declared_f_with_no_attackers_trains_and_logs_every_row_as_honest(tmp_path):
  c = tiny_config(**{"aggregator.f": 2, "workers.byzantine": 0})
  result = train.train_and_evaluate(c, str(tmp_path))
  assert int(result.state.step) == 6
  rows = _rows(str(tmp_path))
  assert [r["step"] for r in rows] == [0, 3, 6]
  for row in rows[1:]:  # the rounds' rows (the step-0 row has no round metrics)
    # CTMA built for f = 2 keeps W - f = 3 of the 5 rows, all of them honest.
    assert row["ctma_kept_honest"] == 3.0 and row["ctma_kept_byzantine"] == 0.0
    assert np.isfinite(row["test_loss"])


@pytest.mark.parametrize("overrides, message", [
    ({"aggregator.f": 3}, "ctma needs W > 2f"),  # the rule's own check, W = 5
    ({"aggregator.f": -1}, "aggregator.f must be an integer >= 0"),
    ({"data.partition": "gamma_similarity", "data.gamma": 1.5}, r"gamma .* in \[0, 1\]"),
])
def test_declared_f_and_gamma_are_checked_before_compiling(overrides, message):
  with pytest.raises(train.ConfigError, match=message):
    train.build(tiny_config(**overrides))


def test_gamma_similarity_config_reaches_the_partition():
  c = tiny_config(**{"data.partition": "gamma_similarity", "data.gamma": 0.0})
  setup = train.build(c)
  labels = setup.dataset.train_labels
  # gamma = 0: the label-sorted split in 5 contiguous blocks, so worker i's labels all lie
  # between worker i-1's and worker i+1's.
  shards = [setup.partition.table[i, :setup.partition.sizes[i]] for i in range(5)]
  for lower, upper in zip(shards, shards[1:]):
    assert labels[lower].max() <= labels[upper].min()


@pytest.mark.parametrize("name, meta, message", [
    ("ctma(cwtm)", "ctma", r"already names a meta-aggregator and aggregator.meta='ctma' would "
                           r"wrap it again; set aggregator.meta='none' to train 'ctma\(cwtm\)'"),
    ("arc(ctma(cwtm))", "ctma", r"already names a meta-aggregator"),
    ("ctma(cwtm)", "arc", r"aggregator.name='cwtm' to train arc\(cwtm\)"),
    ("ctma(ctma(cwtm))", "none", r"applies 'ctma' twice"),
    ("arc(nnm(arc(cwtm)))", "none", r"applies 'arc' twice"),
    ("cwtm", "ctma+", r"aggregator.meta='ctma\+' is not a meta-aggregator; valid: none, arc"),
])
def test_every_double_wrapping_spec_is_refused_in_one_line(name, meta, message):
  with pytest.raises(train.ConfigError, match=message) as e:
    train.build(tiny_config(**{"aggregator.name": name, "aggregator.meta": meta}))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, meta, spec", [
    ("cwtm", "ctma", "ctma(cwtm)"), ("ctma(cwtm)", "none", "ctma(cwtm)"),
    ("arc(ctma(cwtm))", "none", "arc(ctma(cwtm))"), ("cwtm", "none", "cwtm"),
    ("nnm(cwtm)", "None", "nnm(cwtm)")])
def test_the_resolved_spec_is_what_the_two_fields_say(name, meta, spec):
  setup = train.build(tiny_config(**{"aggregator.name": name, "aggregator.meta": meta}))
  assert setup.aggregator.spec == spec and setup.record["aggregator"]["spec"] == spec


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["scan", "host"])
def test_one_state_with_a_partition_table_runs_as_its_run_does(tmp_path, loop):
  # Found by the property search: a single state's chunk gave the per-worker table to
  # the runs axis. The library chunk must equal the run's own training.
  c = tiny_config(**{"data.partition": "iid_split", "loop": loop, "num_steps": 3,
                     "eval_every": 3})
  setup = train.build(c)
  state = train.init_state(setup, c.seed)
  data = train.make_device_data(setup)
  state, metrics = train.make_chunk_fn(setup)(state, data, 3).run(state, data)
  alone = train.train_and_evaluate(c, str(tmp_path))
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(alone.state.params)):
    np.testing.assert_array_equal(a, b)
  assert float(metrics["train_loss"]) == pytest.approx(alone.metrics["train_loss"], rel=1e-6)
