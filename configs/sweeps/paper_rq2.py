r"""RQ2: does mu2sgd's double momentum make the workers' updates easier to aggregate?

mu2sgd against worker momentum (beta 0.9) and plain sgd, each with ctma(cwtm)
and with plain cwtm at the server, under lf, sf, ipm and alie, f=8, in the
paper's MNIST setting (configs/sweeps/paper_common.py: W=17, b=16, lr 0.1,
clip 2.0, 1000 rounds evaluated every 250, seeds 1, 2, 3).

Full grid: 4 attacks x 3 estimators x 2 metas = 24 cells, 72 runs:
  python -m ftjax.sweep --sweep=configs/sweeps/paper_rq2.py:mnist.npz \
    --workdir=/tmp/paper_rq2

Subset (docs/RESULTS.md): sf, cwtm and ctma(cwtm), the three estimators, 250
rounds: 6 cells, 18 runs:
  python -m ftjax.sweep --sweep=configs/sweeps/paper_rq2.py:mnist.npz,subset \
    --workdir=/tmp/paper_rq2

results.md's worst case per rule has one column per estimator.
"""

import ml_collections

try:
  from configs.sweeps import paper_common as paper  # a checkout
except ImportError:
  from ftjax.configs.sweeps import paper_common as paper  # installed with ftjax


def get_config(arg=None):
  """``arg``: ``PATH[,subset]`` (see configs/sweeps/paper_common.py)."""
  base, subset = paper.parse_arg(arg)
  s = ml_collections.ConfigDict()
  s.name = "paper_rq2" + (" (subset)" if subset else "")
  s.base = base
  s.overrides = paper.overrides(subset, ("aggregator.name", "cwtm"))
  s.grid = (("attack.name", ["sf"] if subset else paper.ATTACKS),
            ("optim.estimator", ["mu2sgd", "momentum", "sgd"]),
            ("aggregator.meta", ["none", "ctma"]))
  s.cells = []
  s.seeds = paper.SEEDS
  s.max_batch = len(paper.SEEDS)
  return s
