r"""Beyond the paper: each rule's worst case over adaptive attacks, i.i.d. and non-i.i.d.

The rules cwtm, cwmed and gm, alone and under ctma, nnm and nnm+ctma, against
the adaptive attacks optimal_ipm, optimal_alie, min_max and min_sum
(docs/attacks.md), on the paper's i.i.d. split and on Dirichlet splits of the
labels with alpha 0.5 and 0.1 (docs/data.md), f=8, in the paper's MNIST
setting (configs/sweeps/paper_common.py: W=17, b=16, mu2sgd, lr 0.1, clip 2.0,
1000 rounds evaluated every 250, seeds 1, 2, 3). The answer is results.md's
worst case per rule over the attacks: one row per rule, one column per split.

Full grid: 4 attacks x 3 rules x 4 metas x 3 splits = 144 cells, 432 runs:
  python -m ftjax.sweep --sweep=configs/sweeps/paper_beyond.py:mnist.npz \
    --workdir=/tmp/paper_beyond

Subset: cwtm alone and under ctma, the i.i.d. and alpha 0.1 splits, 250
rounds: 16 cells, 48 runs:
  python -m ftjax.sweep --sweep=configs/sweeps/paper_beyond.py:mnist.npz,subset \
    --workdir=/tmp/paper_beyond

With a Dirichlet split every seed draws its own shards, so those seeds may
train one at a time (docs/sweeps.md, "Batching and compilation"). The i.i.d.
cells show the base config's data.alpha (0.5), which the i.i.d. split ignores.
"""

import ml_collections

try:
  from configs.sweeps import paper_common as paper  # a checkout
except ImportError:
  from ftjax.configs.sweeps import paper_common as paper  # installed with ftjax

SPLITS = [{"data.partition": "iid"},
          {"data.partition": "dirichlet", "data.alpha": 0.5},
          {"data.partition": "dirichlet", "data.alpha": 0.1}]


def get_config(arg=None):
  """``arg``: ``PATH[,subset]`` (see configs/sweeps/paper_common.py)."""
  base, subset = paper.parse_arg(arg)
  s = ml_collections.ConfigDict()
  s.name = "paper_beyond" + (" (subset)" if subset else "")
  s.base = base
  s.overrides = paper.overrides(subset)
  s.grid = (("attack.name", paper.ADAPTIVE_ATTACKS),
            ("aggregator.name", ["cwtm"] if subset else paper.RULES),
            ("aggregator.meta", ["none", "ctma"] if subset
             else ["none", "ctma", "nnm", "nnm+ctma"]))
  s.cells = [SPLITS[0], SPLITS[2]] if subset else SPLITS
  s.seeds = paper.SEEDS
  s.max_batch = len(paper.SEEDS)
  return s
