r"""The benchmark sweep: 4 attacks x 3 rules x 2 seeds of the default config (24 runs).

  python -m ftjax.sweep --sweep=configs/sweeps/default_24.py --workdir=/tmp/sweep24

benchmarks/sweep.py times it against the same 24 runs as separate main.py
processes (with --sweep.overrides.num_steps=N to shorten both sides).
"""

import ml_collections


def get_config():
  s = ml_collections.ConfigDict()
  s.name = "default_24"
  s.base = "configs/default.py"
  s.overrides = {"num_steps": 600}        # the default's; lowered by the benchmark
  s.grid = (("attack.name", ["alie", "sf", "ipm", "lf"]),
            ("aggregator.name", ["cwtm", "cwmed", "gm"]))  # each under ctma (the default meta)
  s.cells = []
  s.seeds = (1, 2)
  s.max_batch = 8
  s.share_programs = True  # cells that differ only in the attack share a compiled round
  return s
