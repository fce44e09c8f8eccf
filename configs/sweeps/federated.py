r"""Federated MNIST: robust rules with local steps and client sampling (docs/federated.md).

The data is split by a Dirichlet(0.5) draw over the 13 honest workers only
(data.honest_only); 4 of the 17 workers are Byzantine. Rules: cwtm, ctma(cwtm),
nnm(cwtm) and centred clipping on the previous aggregate (the stateful form of
Karimireddy, He and Jaggi 2021); attacks sf (the Byzantine workers negate an
update computed on i.i.d. draws of the training set), alie and ipm; K = 1 or 5
local steps of rate 0.05 sending the pseudo-gradient; every worker or 9 of the
17 drawn per round (the rule built for ceil(4 * 9 / 17) = 3 Byzantine among
them). Workers use momentum 0.9 (mu2sgd is not defined with local steps),
clipping to norm 2, server lr 0.1, b = 16, seeds 1, 2, 3.

  python -m ftjax.sweep --sweep=configs/sweeps/federated.py:mnist.npz \
    --workdir=/tmp/federated

The argument is ``PATH[,rounds=N]``: the MNIST .npz (docs/data.md; without it
TFDS "mnist") and the number of rounds (default 100, evaluated every 50).
4 rules x 3 attacks x 2 K x 2 participations = 48 cells, 144 runs.
"""

import ml_collections

RULES = [
    {"aggregator.name": "cwtm", "aggregator.meta": "none"},
    {"aggregator.name": "cwtm", "aggregator.meta": "ctma"},
    {"aggregator.name": "cwtm", "aggregator.meta": "nnm"},
    {"aggregator.name": "centered_clipping", "aggregator.meta": "none"},
]


def _parse(arg, rounds=100):
  """``PATH[,rounds=N]`` -> (the base run config with the MNIST path, N or ``rounds``)."""
  path = ""
  for part in (arg or "").split(","):
    if part.startswith("rounds="):
      rounds = int(part[len("rounds="):])
    elif part:
      path = part
  return ("configs/mnist.py:" + path if path else "configs/mnist.py"), rounds


def get_config(arg=None):
  """``arg``: ``PATH[,rounds=N]``."""
  base, rounds = _parse(arg)
  s = ml_collections.ConfigDict()
  s.name = "federated"
  s.base = base
  s.overrides = (
      ("num_steps", rounds), ("eval_every", max(1, rounds // 2)), ("dtype", "float32"),
      ("workers.num", 17), ("workers.byzantine", 4), ("workers.batch_size", 16),
      ("data.partition", "dirichlet"), ("data.alpha", 0.5), ("data.honest_only", True),
      ("optim.estimator", "momentum"), ("optim.momentum", 0.9), ("optim.lr", 0.1),
      ("optim.clip", 2.0), ("federated.local_lr", 0.05),
      ("attack.options.ipm.eps", 0.5),
      ("aggregator.options.centered_clipping",
       {"tau": None, "iters": 1, "init": "previous"}),
  )
  s.grid = (("attack.name", ["sf", "alie", "ipm"]),
            ("federated.local_steps", [1, 5]),
            ("federated.participants", [0, 9]))
  s.cells = RULES
  s.seeds = (1, 2, 3)
  s.max_batch = 3
  return s
