r"""Tiny sweep: 2 attacks x 2 rules x 2 seeds of a small digits run (7 workers, tiny_cnn).

  python -m ftjax.sweep --sweep=configs/sweeps/tiny.py --workdir=/tmp/sweep_tiny

Small enough to run in about a minute on two CPU cores; benchmarks/reliability.py
kills it at random moments to check that a rerun resumes it exactly.
"""

import ml_collections


def get_config():
  s = ml_collections.ConfigDict()
  s.name = "tiny"
  s.base = "configs/default.py"
  s.overrides = (("num_steps", 60), ("eval_every", 10), ("workers.num", 7),
                 ("workers.byzantine", 3), ("model.name", "tiny_cnn"))
  s.grid = (("attack.name", ["alie", "sf"]),)
  s.cells = [
      {"aggregator.name": "avg", "aggregator.meta": "none"},
      {"aggregator.name": "cwtm", "aggregator.meta": "ctma"},
  ]
  s.seeds = (1, 2)
  s.max_batch = 8
  return s
