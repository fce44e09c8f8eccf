r"""RQ1: does CTMA upgrade a robust rule as well as bucketing and NNM, at less cost?

CTMA against bucketing, NNM and no meta-aggregator, over the base rules cwtm,
cwmed and gm, under the attacks lf, sf, ipm and alie, in the paper's MNIST
setting (configs/sweeps/paper_common.py: W=17, b=16, mu2sgd, lr 0.1, clip
2.0, 1000 rounds evaluated every 250, seeds 1, 2, 3). Bucketing's rule needs
f <= W/4, so f=8 runs the metas none, ctma and nnm and f=4 runs all four.

Full grid: 4 attacks x 3 rules x 7 (f, meta) cells = 84 cells, 252 runs:
  python -m ftjax.sweep --sweep=configs/sweeps/paper_rq1.py:mnist.npz \
    --workdir=/tmp/paper_rq1

Subset (docs/RESULTS.md): alie and sf, cwtm, f=8 with none/ctma/nnm, 250
rounds: 6 cells, 18 runs:
  python -m ftjax.sweep --sweep=configs/sweeps/paper_rq1.py:mnist.npz,subset \
    --workdir=/tmp/paper_rq1

results.md's worst case per rule has one column per f.
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
  s.name = "paper_rq1" + (" (subset)" if subset else "")
  s.base = base
  s.overrides = paper.overrides(subset)
  s.grid = (("attack.name", ["alie", "sf"] if subset else paper.ATTACKS),
            ("aggregator.name", ["cwtm"] if subset else paper.RULES))
  cells = [{"workers.byzantine": 8, "aggregator.meta": m} for m in ("none", "ctma", "nnm")]
  if not subset:
    cells += [{"workers.byzantine": 4, "aggregator.meta": m}
              for m in ("none", "ctma", "nnm", "bucketing")]
  s.cells = cells
  s.seeds = paper.SEEDS
  s.max_batch = len(paper.SEEDS)
  return s
