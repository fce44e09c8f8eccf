r"""Demo sweep: 2 attacks x 3 rules x 2 seeds on the default digits config, 100 rounds.

  python -m ftjax.sweep --sweep=configs/sweeps/demo.py --workdir=/tmp/sweep

The attacks form a grid axis; the rules are an explicit list of cells, since
each sets two fields (the base rule and its meta-aggregator). The 12 runs take
a few minutes on two CPU cores; see docs/sweeps.md.
"""

import ml_collections


def get_config():
  s = ml_collections.ConfigDict()
  s.name = "demo"
  s.base = "configs/default.py"          # a config file, optionally "file.py:arg"
  s.overrides = {"num_steps": 100, "eval_every": 50}  # applied to every cell
  s.grid = (("attack.name", ["alie", "sf"]),)  # (dotted field, values) pairs, in order
  s.cells = [                             # combined with every grid point
      {"aggregator.name": "avg", "aggregator.meta": "none"},
      {"aggregator.name": "cwmed", "aggregator.meta": "none"},
      {"aggregator.name": "cwtm", "aggregator.meta": "ctma"},
  ]
  s.seeds = (1, 2)
  s.max_batch = 8                        # seeds of a cell trained as one program
  return s
