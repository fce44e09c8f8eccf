r"""Default config: the built-in offline dataset, a visible attack and defence.

17 workers, 8 of them Byzantine sending "a little is enough" (ALIE) updates,
mu2sgd on the workers and the server, CTMA over the coordinate-wise trimmed
mean at the server. The data is scikit-learn's bundled 8x8 handwritten digits,
so nothing is downloaded. About two minutes on two CPU cores.

Run:
  python main.py --config configs/default.py --workdir /tmp/ftjax/default

See the attack bite (no defence):
  python main.py --config configs/default.py --workdir /tmp/ftjax/avg \
    --config.aggregator.name=avg --config.aggregator.meta=none
"""

import ml_collections


def get_config(arg=None):
  """Returns the default config. ``arg`` is unused (kept for a uniform API)."""
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 1                   # root PRNG seed: init, data order, attacks, bucketing
  c.dtype = "float32"          # "float32", or "float64" for parity with the original
  c.num_steps = 600            # training rounds (iterations)
  c.eval_every = 50            # rounds per compiled chunk; evaluate + checkpoint after each
  c.progress = True            # draw a progress bar with ETA on stderr

  c.workers = ml_collections.ConfigDict()
  c.workers.num = 17           # W: number of workers
  c.workers.byzantine = 8      # f: Byzantine workers (the last f indices); f < W/2
  c.workers.batch_size = 16    # b: examples per worker per round

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"       # "digits" (built in, offline), "npz", or a TFDS name ("mnist", ...)
  c.data.path = ""             # the .npz file when name == "npz"
  c.data.data_dir = ""         # TFDS data_dir ("" = TFDS default, ~/tensorflow_datasets)
  c.data.eval_batch_size = 1000  # test-set evaluation batch
  c.data.partition = "iid"     # worker data split: "iid" (SPEC), "iid_split", "dirichlet", "shards"
  c.data.alpha = 0.5           # Dirichlet concentration for partition="dirichlet" (small = skewed)
  c.data.shards_per_worker = 2  # label-sorted shards per worker for partition="shards"
  c.data.shuffle = "permutation"  # per-epoch shuffle: "permutation" (exact) or "feistel" (cheap)

  c.model = ml_collections.ConfigDict()
  c.model.name = "simple_mnist"  # simple_mnist, simple_cifar10, resnet18, tiny_cnn, mlp
  c.model.conv_impl = "auto"   # "auto" (fastest for the backend), "xla" or "patches"

  c.optim = ml_collections.ConfigDict()
  c.optim.estimator = "mu2sgd"  # worker estimator: "mu2sgd", "momentum" or "sgd"
  c.optim.lr = 0.1             # server learning rate
  c.optim.momentum = 0.9       # beta of "momentum"; the fixed beta of mu2sgd if beta_schedule="fixed"
  c.optim.beta_schedule = "1/t"  # mu2sgd corrected-momentum weight: "1/t" or "fixed"
  c.optim.gamma_schedule = "anytime"  # mu2sgd query-point averaging: "anytime" (alpha_t = t) or "fixed"
  c.optim.gamma = 0.1          # the fixed gamma when gamma_schedule="fixed"
  c.optim.clip = 2.0           # per-worker gradient clipping to this L2 norm; None disables
  c.optim.weight_decay = 0.0   # lambda in w <- w - lr * (a + lambda * x)
  c.optim.reference_rounding = False  # reproduce the original's max(round(., 3), 0.01) schedules

  c.aggregator = ml_collections.ConfigDict()
  c.aggregator.name = "cwtm"   # base rule (or a full spec such as "arc(ctma(cwtm))" with meta="none")
  c.aggregator.meta = "ctma"   # "none", "ctma", "nnm", "nnm+ctma", "bucketing", "clip", "arc"
  c.aggregator.options = ml_collections.ConfigDict()  # per-rule options, see below
  c.aggregator.options.gm = dict(iters=3, nu=0.1, init="zero")  # Weiszfeld steps, smoothing, start
  c.aggregator.options.cwmed = dict(lower=False)   # True: the reference's lower median for even W
  c.aggregator.options.ctma = dict(keep_ties=False)  # True: the reference's tie quirk

  c.attack = ml_collections.ConfigDict()
  c.attack.name = "alie"       # none, lf, sf, ipm, alie, mimic, gaussian, inf, nan, optimal_ipm, ...
  c.attack.options = ml_collections.ConfigDict()  # per-attack options, see below
  c.attack.options.ipm = dict(eps=0.5)  # send -eps * mean(honest)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.enabled = True  # Orbax checkpoints of the latest and best state; resume from latest

  c.wandb = ml_collections.ConfigDict()
  c.wandb.enabled = False      # log to Weights & Biases
  c.wandb.mode = "offline"     # "online" or "offline" (sync later with `wandb sync`)
  c.wandb.project = "ftjax"    # W&B project
  c.wandb.entity = ""          # W&B entity ("" = your default)
  c.wandb.name = ""            # run name ("" = W&B's generated name)
  c.wandb.run_id = ""          # set to resume the same W&B run
  return c
