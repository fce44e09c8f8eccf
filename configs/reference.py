r"""The original program's command-line defaults, for parity runs.

avg aggregator, no meta-aggregator, label flipping, 17 workers with 8 Byzantine,
MNIST, simple_mnist, mu2sgd with beta_t = 1/t and alpha_t = t, lr 0.1, batch 4
per worker, seed 1, ipm eps 0.5, clipping 2.0, float64, evaluation every
iteration, and the reference's quirks (rounded schedules, lower median, CTMA
keeping ties, Weiszfeld started at zero).

  python main.py --config configs/reference.py --workdir /tmp/ftjax/reference
  python main.py --config configs/reference.py:mnist.npz --workdir /tmp/ftjax/reference
"""

try:
  from configs import mnist  # a checkout
except ImportError:
  from ftjax.configs import mnist  # installed with ftjax


def get_config(arg=None):
  """Reference-parity config; ``arg`` is an optional path to an MNIST .npz."""
  c = mnist.get_config(arg)
  c.seed = 1
  c.dtype = "float64"
  c.eval_every = 1
  c.workers.num = 17
  c.workers.byzantine = 8
  c.workers.batch_size = 4
  c.optim.estimator = "mu2sgd"
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.beta_schedule = "1/t"
  c.optim.gamma_schedule = "anytime"
  c.optim.gamma = 0.1
  c.optim.clip = 2.0
  c.optim.weight_decay = 0.0
  c.optim.reference_rounding = True
  c.model.batch_stats = "sequential"  # running BatchNorm statistics through every forward pass
  c.aggregator.name = "avg"
  c.aggregator.meta = "none"
  c.aggregator.options.gm.init = "zero"
  c.aggregator.options.cwmed.lower = True
  c.aggregator.options.ctma.keep_ties = True
  c.aggregator.options["nnm+ctma"].keep_ties = True
  c.attack.name = "lf"
  c.attack.options.ipm.eps = 0.5
  return c
