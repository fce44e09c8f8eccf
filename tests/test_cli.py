"""The ftjax command (train, sweep, plot, list), shipped configs and packaging."""

import os
import re
import subprocess
import sys
import tomllib

import pytest

from ftjax import sampling
from ftjax import aggregators, attacks, commands, configfiles, data, estimators, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.num_steps=2", "--config.eval_every=2", "--config.workers.num=5",
        "--config.workers.byzantine=1", "--config.workers.batch_size=4",
        "--config.model.name=tiny_cnn", "--config.progress=False",
        "--config.checkpoint.enabled=False"]


# One cell, one seed, two rounds; its base is the checkout-relative path the shipped sweeps use.
SWEEP = """
import ml_collections

def get_config():
  s = ml_collections.ConfigDict()
  s.name = "cli"
  s.base = "configs/default.py"
  s.overrides = (("num_steps", 2), ("eval_every", 2), ("workers.num", 5),
                 ("workers.byzantine", 1), ("workers.batch_size", 4), ("model.name", "tiny_cnn"))
  s.grid = (("attack.name", ["sf"]),)
  s.seeds = (1,)
  return s
"""


def _ftjax(args, cwd, timeout=300):
  """``python -m ftjax ARGS`` from ``cwd`` with the checkout importable, as after pip install."""
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "ftjax", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _listing(capsys, *section):
  commands.main(["ftjax", "list", *section])
  return capsys.readouterr().out


def _row(text, name):
  """The line of a listing table whose first column is ``name``."""
  return next(l for l in text.splitlines() if l.split() and l.split()[0] == name)


# --------------------------------------------------------------------------
# ftjax list
# --------------------------------------------------------------------------


def test_list_rules_shows_each_condition_and_option_default(capsys):
  text = _listing(capsys, "rules")
  assert set(aggregators.AGGREGATORS) <= {l.split()[0] for l in text.splitlines() if l.split()}
  assert "W > 2f + 2" in _row(text, "krum")
  gm = _row(text, "gm")
  assert "iters=3" in gm and "init='cwmed'" in gm and "tol=None" in gm
  assert "rfa = gm" in text


def test_list_metas_starts_with_none_and_has_every_meta(capsys):
  text = _listing(capsys, "metas")
  names = [l.split()[0] for l in text.splitlines()[3:] if l.split()]
  assert names == ["none", *aggregators.META_AGGREGATORS]
  assert "W >= 4f (f <= W/4)" in _row(text, "bucketing")
  assert "keep_ties=False" in _row(text, "ctma")


def test_list_attacks_splits_models_estimators_datasets(capsys):
  text = _listing(capsys, "attacks")
  canonical = {spec.name for spec in attacks.ATTACKS.values()}
  assert canonical == {l.split()[0] for l in text.splitlines()[3:] if l.split()}
  assert "empire" in _row(text, "ipm") and "eps=0.5" in _row(text, "ipm")
  text = _listing(capsys, "splits")
  assert "data.alpha=0.5" in _row(text, "dirichlet")
  assert "data.shards_per_worker=2" in _row(text, "shards")
  assert set(sampling.PARTITIONS) == {l.split()[0] for l in text.splitlines()[3:] if l.split()}
  assert _listing(capsys, "models").split("\n\n", 1)[1].split() == list(models.MODELS)
  assert _listing(capsys, "estimators").split("\n\n", 1)[1].split() == list(estimators.ESTIMATORS)
  text = _listing(capsys, "datasets")
  assert "built in" in _row(text, "digits") and "TFDS" in _row(text, "cifar10")
  assert set(data.DATASETS) == {l.split()[0] for l in text.splitlines()[3:] if l.split()}


def test_list_everything_and_bad_sections(capsys):
  text = _listing(capsys)
  for heading in ("Base rules:", "Meta-aggregators:", "Attacks:", "Data partitions",
                  "Models:", "Worker estimators:", "Datasets:", "Shipped configs:"):
    assert heading in text
  assert ":func:" not in text and "``" not in text
  for argv in (["ftjax", "list", "rulez"], ["ftjax", "list", "rules", "metas"],
               ["ftjax", "nope"]):
    with pytest.raises(SystemExit) as e:
      commands.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftjax: error:"), err


# --------------------------------------------------------------------------
# Config names
# --------------------------------------------------------------------------


def test_config_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  shipped = os.path.join(ROOT, "configs")
  assert configfiles.configs_dir() == shipped
  assert configfiles.resolve("default") == os.path.join(shipped, "default.py")
  assert configfiles.resolve("mnist.py:mnist.npz") == (
      os.path.join(shipped, "mnist.py") + ":mnist.npz")
  assert configfiles.resolve("configs/cifar10.py:resnet18") == (
      os.path.join(shipped, "cifar10.py") + ":resnet18")
  assert configfiles.resolve("tiny", "sweep") == os.path.join(shipped, "sweeps", "tiny.py")
  own = tmp_path / "default.py"  # a file of that name here wins over the shipped one
  own.write_text("")
  assert configfiles.resolve("default.py:x") == "default.py:x"
  assert configfiles.resolve("elsewhere/mine.py") == "elsewhere/mine.py"  # left to the loader
  with pytest.raises(configfiles.ConfigNotFound, match="cifar10, default, mnist, reference"):
    configfiles.resolve("defualt")
  assert "paper_common" not in configfiles.shipped("sweep")
  assert {"tiny", "demo", "paper_rq1"} <= set(configfiles.shipped("sweep"))


def test_packaging_lists_every_package_and_ships_the_configs():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
    project = tomllib.load(fh)
  setuptools = project["tool"]["setuptools"]
  assert project["project"]["scripts"]["ftjax"] == "ftjax.commands:main"
  found = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, files in
           os.walk(os.path.join(ROOT, "ftjax")) if "__init__.py" in files}
  assert set(setuptools["packages"]) == found | {"ftjax.configs", "ftjax.configs.sweeps"}
  assert setuptools["package-dir"] == {"ftjax.configs": "configs"}
  for folder in ("configs", os.path.join("configs", "sweeps")):
    assert os.path.isfile(os.path.join(ROOT, folder, "__init__.py"))


# --------------------------------------------------------------------------
# ftjax train / sweep / plot from outside the checkout
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_train_by_config_name_from_another_directory(tmp_path):
  out = _ftjax(["train", "--config=default", f"--workdir={tmp_path / 'run'}", *TINY],
               cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / "run" / "metrics.csv") as fh:
    assert len(fh.readlines()) == 3  # header, the initial model's row and the one at step 2
  out = _ftjax(["plot", f"--workdir={tmp_path / 'run'}"], cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / "run" / "plots")) == ["run.pdf", "run.png"]


@pytest.mark.slow
def test_sweep_and_plot_from_another_directory(tmp_path):
  (tmp_path / "s.py").write_text(SWEEP)
  out = _ftjax(["sweep", "--sweep=s.py", f"--workdir={tmp_path / 'sweep'}"], cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / "sweep" / "results.md") as fh:
    assert "| sf | 1 | ok |" in fh.read()
  out = _ftjax(["plot", f"--workdir={tmp_path / 'sweep'}"], cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "curves.png" in os.listdir(tmp_path / "sweep" / "plots")
  out = _ftjax(["sweep", "--sweep=tinny", f"--workdir={tmp_path / 'x'}"], cwd=str(tmp_path))
  assert out.returncode == 2 and "the shipped sweeps are" in out.stderr


@pytest.mark.slow
def test_train_reports_bad_names_in_one_line(tmp_path):
  out = _ftjax(["train", "--config=defualt", f"--workdir={tmp_path}"], cwd=str(tmp_path))
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and "shipped configs are cifar10, default" in lines[0], lines
  # name:arg reaches the config: mnist.py takes it as the .npz path.
  out = _ftjax(["train", "--config=mnist:nowhere.npz", f"--workdir={tmp_path}"],
               cwd=str(tmp_path))
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and "nowhere.npz" in lines[0], lines


@pytest.mark.slow
def test_help_of_every_command_names_its_fields_and_their_docs(tmp_path):
  out = _ftjax(["--help"], cwd=str(tmp_path))
  assert out.returncode == 0 and all(c in out.stdout for c in ("train", "sweep", "plot", "list"))
  out = _ftjax(["train", "--help"], cwd=str(tmp_path))
  assert out.returncode == 0
  assert "configs/default.py" in out.stdout and "aggregator.*" in out.stdout
  assert "--workdir" in out.stdout and "default, mnist, reference" in out.stdout
  out = _ftjax(["sweep", "--help"], cwd=str(tmp_path))
  assert out.returncode == 0 and "docs/sweeps.md" in out.stdout and "tiny" in out.stdout
  out = _ftjax(["plot", "--help"], cwd=str(tmp_path))
  assert out.returncode == 0 and "--workdir" in out.stdout
  for text in (out.stdout,):
    assert not re.search(r":(func|class|mod):", text)


def test_main_py_is_a_shim_over_ftjax_train():
  with open(os.path.join(ROOT, "main.py")) as fh:
    source = fh.read()
  assert "commands.train(sys.argv" in source and "DEFINE" not in source


# --------------------------------------------------------------------------
# A wheel in a fresh virtual environment
# --------------------------------------------------------------------------


@pytest.mark.slow
def test_wheel_installs_the_command_and_the_configs(tmp_path):
  """pip install of the checkout into a fresh venv (the dependencies from the system's
  site-packages), then the command from a directory without a checkout."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
  pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", ROOT],
                       capture_output=True, text=True, timeout=900)
  assert pip.returncode == 0, pip.stderr[-3000:]
  ftjax = str(venv / "bin" / "ftjax")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  run = lambda *args: subprocess.run([ftjax, *args], cwd=str(tmp_path), env=env,
                                     capture_output=True, text=True, timeout=600)
  out = run("list", "configs")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "site-packages" in out.stdout and "default" in out.stdout
  out = run("train", "--config=default", f"--workdir={tmp_path / 'run'}", *TINY)
  assert out.returncode == 0, out.stderr[-3000:]
  # mnist.py imports default as ftjax.configs.default when installed.
  out = run("train", "--config=mnist:nowhere.npz", f"--workdir={tmp_path / 'm'}")
  assert out.returncode == 2 and "nowhere.npz" in out.stderr, out.stderr[-3000:]
  (tmp_path / "s.py").write_text(SWEEP)
  out = run("sweep", f"--sweep={tmp_path / 's.py'}", f"--workdir={tmp_path / 'sweep'}")
  assert out.returncode == 0, out.stderr[-3000:]
  out = run("plot", f"--workdir={tmp_path / 'sweep'}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "curves.pdf" in os.listdir(tmp_path / "sweep" / "plots")
