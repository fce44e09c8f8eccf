r"""What the paper sweeps (configs/sweeps/paper_*.py) share; not a sweep itself.

The paper's MNIST setting, pinned field by field so that a change of the
defaults cannot change the grids: W=17 workers, b=16 examples per worker,
mu2sgd with the clean schedules (beta_t = 1/t, AnyTime alpha_t = t), server
lr 0.1, per-worker clipping to norm 2.0, IPM with eps 0.5, float32, 1000
rounds evaluated every 250, seeds 1, 2, 3.

Every paper sweep takes one config argument, ``PATH[,subset]``:

  --sweep=configs/sweeps/paper_rq1.py:mnist.npz          the full grid
  --sweep=configs/sweeps/paper_rq1.py:mnist.npz,subset   the subset of docs/RESULTS.md

PATH is an MNIST .npz (docs/data.md says how to get one); without a PATH the
base config reads TFDS "mnist". ``subset`` keeps the same axes with fewer
values and 250 rounds, so the full grid's command on the subset's workdir
reuses the subset's runs, extends them to 1000 rounds and adds the other cells.
"""

SEEDS = (1, 2, 3)
NUM_STEPS = 1000            # the paper's
SUBSET_STEPS = 250          # the subset's: the first evaluation of the full runs
EVAL_EVERY = 250

# (dotted field, value) pairs: the paper's setting, applied to every cell.
SETTING = (
    ("dtype", "float32"),
    ("workers.num", 17),
    ("workers.byzantine", 8),
    ("workers.batch_size", 16),
    ("data.partition", "iid"),
    ("optim.estimator", "mu2sgd"),
    ("optim.lr", 0.1),
    ("optim.momentum", 0.9),     # beta of the "momentum" estimator (RQ2)
    ("optim.beta_schedule", "1/t"),
    ("optim.gamma_schedule", "anytime"),
    ("optim.reference_rounding", False),
    ("optim.clip", 2.0),
    ("optim.weight_decay", 0.0),
    ("attack.options.ipm.eps", 0.5),
    ("checkpoint.enabled", True),  # the sweep resumes from the checkpoints
)

RULES = ["cwtm", "cwmed", "gm"]
ATTACKS = ["lf", "sf", "ipm", "alie"]
ADAPTIVE_ATTACKS = ["optimal_ipm", "optimal_alie", "min_max", "min_sum"]


def parse_arg(arg):
  """``"PATH[,subset]"`` -> (base config spec, whether the subset is asked for)."""
  parts = (arg or "").split(",")
  subset = "subset" in parts
  path = ",".join(p for p in parts if p != "subset")
  return ("configs/mnist.py:" + path if path else "configs/mnist.py"), subset


def overrides(subset, *extra):
  """The pinned setting, the number of rounds, then ``extra`` pairs."""
  steps = SUBSET_STEPS if subset else NUM_STEPS
  return SETTING + (("num_steps", steps), ("eval_every", EVAL_EVERY)) + tuple(extra)
