r"""Backdoor on MNIST: clean accuracy and attack success rate per rule (docs/attacks.md).

4 of the 17 workers are Byzantine and train on their own i.i.d. draws with a 5 x 5
trigger of maximum-intensity pixels in the bottom-right corner stamped on every
image, labelled 6 (FLPoison's trigger size and target), sending the update
computed on that data. The server holds 100 training examples of its own in every
cell (data.server_examples), so every rule sees the same worker data and fltrust has
its root set. The first cell trains with no Byzantine worker: the attack success
rate of a model that never saw the trigger. Workers use momentum 0.9 and clipping
to norm 2, server lr 0.1, b = 16, seeds 1, 2, 3.

  python -m ftjax.sweep --sweep=configs/sweeps/backdoor.py:mnist.npz \
    --workdir=/tmp/backdoor

The argument is ``PATH[,rounds=N]``: the MNIST .npz (docs/data.md; without it
TFDS "mnist") and the number of rounds (default 100, evaluated every 50).
"""

import ml_collections

try:
  from configs.sweeps.federated import _parse  # a checkout
except ImportError:
  from ftjax.configs.sweeps.federated import _parse  # installed with ftjax

RULES = ["avg", "cwtm", "cwmed", "gm", "krum", "multikrum", "centered_clipping", "dnc",
         "signguard", "clipped_clustering", "flame", "fltrust"]


def _cell(spec):
  name, meta = (spec[:-1].split("(")[::-1] if "(" in spec else (spec, "none"))
  return {"aggregator.name": name, "aggregator.meta": meta}


def get_config(arg=None):
  """``arg``: ``PATH[,rounds=N]``."""
  base, rounds = _parse(arg)
  s = ml_collections.ConfigDict()
  s.name = "backdoor"
  s.base = base
  s.overrides = (
      ("num_steps", rounds), ("eval_every", max(1, rounds // 2)), ("dtype", "float32"),
      ("workers.num", 17), ("workers.byzantine", 4), ("workers.batch_size", 16),
      ("data.server_examples", 100), ("attack.name", "backdoor"),
      ("attack.options.backdoor", {"size": 5, "position": "bottom_right", "target": 6,
                                   "fraction": 1.0, "boost": 1.0}),
      ("optim.estimator", "momentum"), ("optim.momentum", 0.9), ("optim.lr", 0.1),
      ("optim.clip", 2.0),
  )
  s.grid = ()
  s.cells = ([{"workers.byzantine": 0, **_cell("avg")}]
             + [_cell(r) for r in RULES] + [_cell(f"ctma({r})") for r in ("cwtm", "gm")])
  s.seeds = (1, 2, 3)
  s.max_batch = 3
  return s
