"""A rule and an attack registered from the user's own module train like the built-in ones."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import aggregators as agg
from ftjax import attacks
from ftjax import train
from tests.test_train import tiny_config

import docs.examples.custom_rule  # noqa: F401  (outside the package: registers the example)
from docs.examples import custom_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _median_of_means(x, groups):
  """NumPy: the coordinate-wise median of the group means (groups of rounded bounds)."""
  bounds = [round(i * len(x) / groups) for i in range(groups + 1)]
  return np.median(np.stack([x[a:b].mean(0) for a, b in zip(bounds, bounds[1:])]), axis=0)


def test_a_registered_rule_is_named_in_specs_with_options_from_its_signature():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 5))
  rule = agg.make_aggregator("median_of_means", f=2, options={"median_of_means": {"groups": 4}})
  np.testing.assert_allclose(rule({"w": jnp.asarray(x)})[0]["w"], _median_of_means(x, 4),
                             rtol=1e-6)
  assert agg.options_of("median_of_means") == {"groups": 3}
  # Under ctma: the mean of the W - f rows nearest the inner rule's output.
  x0 = _median_of_means(x, 3)
  kept = np.argsort(((x - x0) ** 2).sum(1), kind="stable")[:5]
  out, diag = agg.make_aggregator("ctma(median_of_means)", f=2)({"w": jnp.asarray(x)})
  np.testing.assert_allclose(out["w"], x[kept].mean(0), rtol=1e-6)


def test_a_registered_rule_is_checked_like_a_built_in_one():
  with pytest.raises(ValueError, match=r"median_of_means.groups=2.5 is invalid: use a value of "
                                       r"type int"):
    agg.make_aggregator("median_of_means", f=1, options={"median_of_means": {"groups": 2.5}})
  with pytest.raises(ValueError, match="median_of_means needs W > 2f, i.e. at least 9 rows"):
    agg.make_aggregator("median_of_means", f=4, num_workers=7)
  with pytest.raises(ValueError, match="exists already"):
    agg.register(name="cwtm")(lambda updates, key, *, f: (updates, {}))
  with pytest.raises(ValueError, match=r"must be a function \(updates, key, \*, f, \.\.\.\)"):
    agg.register(name="no_f")(lambda updates, key: (updates, {}))


def test_a_registered_attack_sends_what_its_function_computes():
  honest = {"w": jnp.arange(6.0).reshape(3, 2)}
  attack = attacks.make_attack("scaled_mean", scale=-2.0)
  rows = attack(honest, None, jax.random.key(0), attacks.AttackContext(num_byzantine=2))
  np.testing.assert_allclose(rows["w"], np.full((2, 2), -2.0) * np.array([2.0, 3.0]))
  with pytest.raises(ValueError, match="scaled_mean.scale='x' is invalid"):
    attacks.make_attack("scaled_mean", scale="x")


@pytest.mark.slow
def test_the_example_config_trains_through_train_and_evaluate(tmp_path):
  c = custom_config.get_config()
  base = tiny_config()
  for section in ("workers", "model", "data"):
    c[section] = base[section]
  c.num_steps, c.eval_every, c.progress = 4, 2, False
  result = train.train_and_evaluate(c, str(tmp_path))
  assert np.isfinite(result.metrics["test_loss"])
  with open(tmp_path / "config.json") as fh:
    resolved = json.load(fh)["resolved"]
  assert resolved["aggregator"] == "ctma(median_of_means)" and resolved["attack"] == "scaled_mean"


@pytest.mark.slow
def test_the_example_config_trains_from_the_command_line(tmp_path):
  out = subprocess.run(
      [sys.executable, "main.py", "--config", "docs/examples/custom_config.py",
       f"--workdir={tmp_path}", "--config.num_steps=2", "--config.eval_every=2",
       "--config.progress=False", "--config.workers.num=5", "--config.workers.byzantine=1",
       "--config.model.name=mlp"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "aggregator ctma(median_of_means)" in out.stderr
