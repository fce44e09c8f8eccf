"""The config files: they load, echo the library's defaults, and their variants build."""

import inspect

import pytest

from configs import cifar10, default, mnist, reference
from ftjax import sampling
from ftjax import aggregators, attacks, data, estimators, results


def test_default_config_echoes_every_aggregator_default():
  # One place for defaults: the library's table; the config repeats it with comments.
  options = default.get_config().aggregator.options.to_dict()
  assert set(options) <= set(aggregators.DEFAULT_OPTIONS)
  for rule, given in options.items():
    assert dict(given) == dict(aggregators.DEFAULT_OPTIONS[rule]), rule
  # Every rule with options appears in the config, so a user finds them all there.
  with_options = {r for r, o in aggregators.DEFAULT_OPTIONS.items() if o}
  assert with_options <= set(options)


def test_default_config_echoes_every_attack_default():
  options = default.get_config().attack.options.to_dict()
  with_options = {name for name, spec in attacks.shipped().items()
                  if spec.defaults and spec.name == name}  # aliases share their spec
  assert with_options <= set(options)
  for name, given in options.items():
    assert dict(given) == dict(attacks.ATTACKS[name].defaults), name


def test_default_config_echoes_estimator_defaults():
  c = default.get_config().optim
  assert c.momentum == inspect.signature(estimators.momentum).parameters["beta"].default
  assert c.beta_schedule == "1/t"  # mu2sgd's default beta=None is the 1/t schedule
  assert inspect.signature(estimators.mu2sgd).parameters["beta"].default is None
  assert c.reference_rounding is False


def test_reference_config_turns_on_the_quirks_only():
  c, d = reference.get_config(), default.get_config()
  assert c.aggregator.options.gm.init == "zero" and d.aggregator.options.gm.init == "cwmed"
  assert c.aggregator.options.ctma.keep_ties and not d.aggregator.options.ctma.keep_ties
  assert c.optim.reference_rounding and c.dtype == "float64"


@pytest.mark.parametrize("get, arg, name", [
    (mnist.get_config, None, "mnist"), (mnist.get_config, "mnist.npz", "npz"),
    (cifar10.get_config, None, "cifar10"), (cifar10.get_config, "resnet18", "cifar10")])
def test_variants_override_only_what_differs(get, arg, name):
  c = get(arg)
  assert c.data.name == name
  assert c.kernels == default.get_config().kernels


def test_unknown_cifar10_variant_is_refused():
  with pytest.raises(ValueError, match="resnet18"):
    cifar10.get_config("vgg")


def test_default_config_echoes_partition_defaults_and_leaves_f_to_the_workers():
  c = default.get_config()
  params = inspect.signature(sampling.partition_indices).parameters
  for name in ("alpha", "shards_per_worker", "gamma"):
    assert c.data[name] == params[name].default, name
  assert c.data.partition in sampling.PARTITIONS
  # None: the aggregator is built for workers.byzantine, the number that attack.
  assert c.aggregator.f is None


def test_default_config_echoes_the_last_k_that_tables_assume_for_older_runs():
  # results.py reads k from each run's config.json, and DEFAULT_LAST_K when it predates it.
  assert default.get_config().report_last_k == results.DEFAULT_LAST_K
