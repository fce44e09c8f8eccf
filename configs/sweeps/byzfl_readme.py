r"""ByzFL's README example, rerun in ftjax (docs/RESULTS.md, "Other people's results, rerun").

ByzFL (LPD-EPFL/byzfl) documents its federated-learning framework with one
program: 3 honest clients and 1 Byzantine (W = 4, f = 1), MNIST split over the
honest clients by a per-class Dirichlet(0.5) draw, ByzFL's `cnn_mnist`, batch
25, client momentum 0.9 started at zero (m_t = 0.9 m_{t-1} + 0.1 g_t), server
SGD with lr 0.1 and weight decay 1e-4, the sent rows clipped to norm 2 (ByzFL's
`Clipping` pre-aggregator, which also clips the Byzantine row), then NNM, then
the trimmed mean with f = 1; the Byzantine client sends IPM with tau = 3
(-3 times the honest mean). 1000 rounds; the accuracy is evaluated every 100.
The same settings in ftjax's words:

* the clipping is on the rows the server receives, so it is the `clip` meta-rule
  outermost (`clip(nnm(cwtm))`, tau 2), and `optim.clip` (per-gradient clipping
  before the momentum) is off;
* `optim.momentum_init="zero"` with the default dampening (1 - momentum);
* `data.honest_only`: the Dirichlet split is over the 3 honest workers.

  python -m ftjax.sweep --sweep=configs/sweeps/byzfl_readme.py:mnist.npz \
    --workdir=/tmp/byzfl_readme

The argument is ``PATH[,rounds=N]``: the MNIST .npz (docs/data.md; without it
TFDS "mnist") and the number of rounds (default 1000). Seeds 1-5, one cell.
"""

import ml_collections

try:
  from configs.sweeps.federated import _parse  # a checkout
except ImportError:
  from ftjax.configs.sweeps.federated import _parse  # installed with ftjax


def get_config(arg=None):
  """``arg``: ``PATH[,rounds=N]``."""
  base, rounds = _parse(arg, rounds=1000)
  s = ml_collections.ConfigDict()
  s.name = "byzfl_readme"
  s.base = base
  s.overrides = (
      ("num_steps", rounds), ("eval_every", max(1, min(100, rounds))), ("dtype", "float32"),
      ("workers.num", 4), ("workers.byzantine", 1), ("workers.batch_size", 25),
      ("data.partition", "dirichlet"), ("data.alpha", 0.5), ("data.honest_only", True),
      ("model.name", "cnn_mnist"),
      ("optim.estimator", "momentum"), ("optim.momentum", 0.9), ("optim.momentum_init", "zero"),
      ("optim.lr", 0.1), ("optim.weight_decay", 1e-4), ("optim.clip", 0.0),
      ("aggregator.name", "clip(nnm(cwtm))"), ("aggregator.meta", "none"),
      ("aggregator.options.clip", {"tau": 2.0}),
      ("attack.name", "ipm"), ("attack.options.ipm", {"eps": 3.0}),
  )
  s.grid = ()
  s.seeds = (1, 2, 3, 4, 5)
  return s
