r"""RQ3: does NNM followed by CTMA (nnm+ctma) beat each of its two parts?

nnm+ctma against nnm and ctma alone, over the base rules cwtm, cwmed and gm,
under lf, sf, ipm and alie, f=8, in the paper's MNIST setting
(configs/sweeps/paper_common.py: W=17, b=16, mu2sgd, lr 0.1, clip 2.0, 1000
rounds evaluated every 250, seeds 1, 2, 3). RQ1 has these rules with no
meta-aggregator.

Full grid: 4 attacks x 3 rules x 3 metas = 36 cells, 108 runs:
  python -m ftjax.sweep --sweep=configs/sweeps/paper_rq3.py:mnist.npz \
    --workdir=/tmp/paper_rq3

Subset: alie and sf, cwtm, the three metas, 250 rounds: 6 cells, 18 runs:
  python -m ftjax.sweep --sweep=configs/sweeps/paper_rq3.py:mnist.npz,subset \
    --workdir=/tmp/paper_rq3
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
  s.name = "paper_rq3" + (" (subset)" if subset else "")
  s.base = base
  s.overrides = paper.overrides(subset)
  s.grid = (("attack.name", ["alie", "sf"] if subset else paper.ATTACKS),
            ("aggregator.name", ["cwtm"] if subset else paper.RULES),
            ("aggregator.meta", ["ctma", "nnm", "nnm+ctma"]))
  s.cells = []
  s.seeds = paper.SEEDS
  s.max_batch = len(paper.SEEDS)
  return s
