"""The default run with the rule and attack of ``docs/examples/custom_rule.py``.

  python main.py --config docs/examples/custom_config.py --workdir /tmp/ftjax/custom
"""

import docs.examples.custom_rule  # noqa: F401  (registers median_of_means and scaled_mean)
from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.aggregator.name = "median_of_means"   # wrapped in ctma, the default meta
  c.aggregator.options.median_of_means = dict(groups=3)
  c.attack.name = "scaled_mean"
  c.attack.options.scaled_mean = dict(scale=-3.0)
  return c
