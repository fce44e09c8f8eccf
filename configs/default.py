r"""Default config: the built-in offline dataset, a visible attack and defence.

17 workers, 8 of them Byzantine flipping the sign of their own updates (sf),
mu2sgd on the workers and the server, CTMA over the coordinate-wise trimmed
mean at the server. The data is scikit-learn's bundled 8x8 handwritten digits,
so nothing is downloaded. About a minute on two CPU cores.

Sign flipping is the default attack because on this data it visibly separates
the two runs below (docs/benchmarks/default_demo.md): ALIE, the paper's other
attack, leaves the plain average as accurate as the defended run here.

Run:
  python main.py --config configs/default.py --workdir /tmp/ftjax/default

See the attack bite (no defence):
  python main.py --config configs/default.py --workdir /tmp/ftjax/avg \
    --config.aggregator.name=avg --config.aggregator.meta=none
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config(arg=None):
  """Returns the default config. ``arg`` is unused (kept for a uniform API)."""
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 1                   # root PRNG seed: init, data order, attacks, bucketing
  c.dtype = "float32"          # "float32", or "float64" for parity with the original
  c.num_steps = 600            # training rounds (iterations)
  c.eval_every = 50            # rounds per compiled chunk; evaluate + checkpoint after each
  c.eval_steps = ""            # more steps to evaluate at, besides every eval_every: "100,500,1000"
                               # (chunks end there); "" = none (docs/sweeps.md, "Evaluation")
  c.eval_at_start = True       # evaluate the initial model: a row at step 0, before any round
  c.report_last_k = 5          # summaries add the mean test accuracy of the last k evaluations
  c.progress = True            # draw a progress bar with ETA on stderr
  c.loop = "auto"              # rounds between evaluations: "scan" (lax.scan), "host" (async
                               # dispatch of the jitted round); "auto" = scan, except on CPU
                               # with the plain kernels, > 64 workers per chunk or a
                               # user's own model
  c.devices = 0                # local devices the worker axis is split over (0 = all of them);
                               # main.py --cpu_devices=N exposes N CPU devices (see README)
  c.kernels = "auto"           # primitives under the maths: "plain" (plain JAX everywhere),
                               # "cpu" (XLA:CPU fast versions), "auto" = cpu on CPU, plain elsewhere
  c.mesh = ml_collections.ConfigDict()
  c.mesh.aggregation = "replicated"  # with several devices: "replicated" (every device aggregates
                               # all W x d rows) or "sharded" (estimators on their workers'
                               # devices, attack and aggregator on slices of the coordinates;
                               # docs/scaling.md); one device: no effect

  c.workers = ml_collections.ConfigDict()
  c.workers.num = 17           # W: number of workers
  c.workers.byzantine = 8      # Byzantine workers that attack (the last ones); < W/2; also the
                               # aggregator's f unless aggregator.f is set
  c.workers.batch_size = 16    # b: examples per worker per round
  c.workers.chunk = placeholder(int)  # workers differentiated at once: 0 = all, None = the
                               # backend's choice (CPU: 16 above 64 workers); bounds memory

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"       # "digits" (built in, offline), "npz", or a TFDS name ("mnist", ...)
  c.data.path = ""             # the .npz file when name == "npz"
  c.data.data_dir = ""         # TFDS data_dir ("" = TFDS default, ~/tensorflow_datasets)
  c.data.eval_batch_size = 1000  # test-set (and validation) evaluation batch
  c.data.validation = 0.0      # fraction v of the train split held out for validation: floor(v N)
                               # examples, the same for every seed, never a worker's or the
                               # server's; rows gain val_acc/val_loss and "best" is chosen on
                               # them (0 = none; ByzFL's benchmark holds out 0.2; docs/data.md)
  c.data.partition = "iid"     # worker data split: "iid" (the paper's), "iid_split", "dirichlet",
                               # "shards", "gamma_similarity", "extreme" (docs/data.md)
  c.data.alpha = 0.5           # Dirichlet concentration for partition="dirichlet" (small = skewed)
  c.data.shards_per_worker = 2  # label-sorted shards per worker for partition="shards"
  c.data.gamma = 0.5           # share of each class spread i.i.d. for partition="gamma_similarity"
                               # (the rest label-sorted; 1 = i.i.d., 0 = "extreme")
  c.data.shuffle = "permutation"  # per-epoch shuffle: "permutation" (exact) or "feistel" (cheap)
  c.data.honest_only = False   # split the data over the honest workers only (Byzantine workers
                               # that compute, as in sf/lf, draw i.i.d. from the whole split)
  c.data.server_examples = 0   # train examples set aside for the server, drawn from the seed and
                               # never a worker's; fltrust's g0 is computed on them (0 = none)

  c.model = ml_collections.ConfigDict()
  c.model.name = "simple_mnist"  # simple_mnist, simple_cifar10, resnet18, resnet20, cnn_mnist,
                               # torch_mnist, fc_mnist, blades_mlp, logreg, tiny_cnn, mlp
                               # (ftjax list models; docs/architecture.md, "Models")
  c.model.batch_stats = "honest_mean"  # BatchNorm running stats: "honest_mean" of the honest
                               # workers, or "sequential" (every pass in turn, as the original)

  c.optim = ml_collections.ConfigDict()
  c.optim.estimator = "mu2sgd"  # worker estimator: "mu2sgd", "momentum" or "sgd"
  c.optim.lr = 0.1             # server learning rate
  c.optim.momentum = 0.9       # beta of "momentum"; the fixed beta of mu2sgd if beta_schedule="fixed"
  c.optim.beta_schedule = "1/t"  # mu2sgd corrected-momentum weight: "1/t" or "fixed"
  c.optim.gamma_schedule = "anytime"  # mu2sgd query-point averaging: "anytime" (alpha_t = t) or "fixed"
  c.optim.gamma = 0.1          # the fixed gamma when gamma_schedule="fixed"
  c.optim.clip = 2.0           # per-worker gradient clipping to this L2 norm; 0 (or None) disables
  c.optim.weight_decay = 0.0   # lambda in w <- w - lr * (a + lambda * x)
  c.optim.reference_rounding = False  # reproduce the original's max(round(., 3), 0.01) schedules
  c.optim.beta_min = 0.0       # mu2sgd: beta_t = max(beta_t, beta_min); 0.01 = the original's floor
  c.optim.gamma_min = 0.0      # mu2sgd: gamma_t = max(gamma_t, gamma_min); 0.01 = the original's floor
  c.optim.momentum_init = "gradient"  # "momentum": m_1 = g_1 ("gradient"), or m_0 = 0 ("zero",
                               # ByzFL's); docs/estimators.md
  c.optim.dampening = placeholder(float)  # "momentum": g_t's weight is 1 - dampening (None =
                               # 1 - momentum, an average; 0 = PyTorch's SGD default)
  c.optim.server_momentum = 0.0  # server: v_t = mu v_{t-1} + a_t before the lr step (0 = none)

  c.federated = ml_collections.ConfigDict()  # docs/federated.md; the defaults are the paper's round
  c.federated.local_steps = 1  # K: local SGD steps per worker per round, on K minibatches
  c.federated.local_lr = 0.1   # the workers' local learning rate (K > 1)
  c.federated.send = "pseudo_gradient"  # after K steps send "pseudo_gradient" (the mean of the
                               # K clipped gradients) or "model_change" (x_t - x_t,K; FedAvg)
  c.federated.participants = 0  # m workers drawn per round without replacement (0 = all W);
                               # the rule is built for m rows and aggregator.f (None = ceil(f m / W))

  c.aggregator = ml_collections.ConfigDict()
  c.aggregator.name = "cwtm"   # base rule (or a full spec such as "arc(ctma(cwtm))" with meta="none")
  c.aggregator.meta = "ctma"   # "none", "ctma", "nnm", "nnm+ctma", "bucketing", "clip", "arc"
  c.aggregator.f = placeholder(int)  # the f the rule is built to tolerate (None = workers.byzantine,
                               # the number that actually attack); docs/aggregators.md
  c.aggregator.weights = placeholder(object)  # per-worker weights: None (unweighted), "examples"
                               # (shard sizes) or W numbers, for avg, cwmed, cwtm, gm, ctma
  c.aggregator.options = ml_collections.ConfigDict()  # per-rule options (docs/aggregators.md)
  o = c.aggregator.options
  o.cwmed = dict(lower=False)  # True: the reference's lower median for even W
  o.gm = dict(iters=3,         # Weiszfeld iterations T
              nu=0.1,          # smoothing: weights 1 / max(distance, nu)
              init="cwmed",    # start: "cwmed", "mean", or "zero" (the original program)
              tol=placeholder(float),  # set to iterate until the step is below tol ...
              max_iters=100)   # ... for at most this many iterations
  o.krum = dict(num_neighbours=placeholder(int))  # rows in a score (None = W - f - 1, the
                               # original's; Blanchard et al. sum W - f - 2)
  o.multikrum = dict(num_selected=placeholder(int),  # rows averaged (None = W - f)
                     num_neighbours=placeholder(int))  # rows in a score, as krum's
  o.centered_clipping = dict(tau=placeholder(float),  # clipping radius (None = the rows' median
                                                    # distance to the centre, scale-free)
                             iters=1,   # clipping iterations
                             init="cwmed")  # first centre: "cwmed", "mean", "zero", or
                                            # "previous" (the last aggregate, kept as state)
  o.ctma = dict(keep_ties=False)  # True: the reference's tie quirk (keeps every tied row)
  o["nnm+ctma"] = dict(keep_ties=False)  # same switch for nnm+ctma
  o.bucketing = dict(bucket_size=placeholder(int))  # s (None = floor(W / (2f)))
  o.clip = dict(tau=1.0)       # static clipping of every row to this norm
  o.bulyan = dict(num_neighbours=placeholder(int))  # Krum's count per step (None = W - f - 2)
  o.monna = dict(idx=0)        # the trusted worker whose nearest rows are averaged
  o.dnc = dict(num_iters=5,    # random coordinate subsamples
               subsample=10_000,  # coordinates per subsample
               c=1.0)          # rows removed per subsample: c * f
  o.signguard = dict(lower=0.1, upper=3.0,  # kept norms: [lower, upper] x the median norm
                     linkage="average")  # clustering of the sign statistics
  o.clustering = dict(linkage="complete")  # agglomerative linkage on cosine distances
  o.clipped_clustering = dict(linkage="average",  # as clustering, after clipping every row
                              max_tau=1e5)  # to the median norm (at most max_tau)
  o.flame = dict(noise=0.001)  # Gaussian noise, times the median norm (0: none)

  c.attack = ml_collections.ConfigDict()
  c.attack.name = "sf"         # none, lf, sf, ipm, alie, mimic, gaussian, inf, nan,
                               # optimal_ipm, optimal_alie, min_max, min_sum, fang_krum,
                               # fang_trmean, signguard_adaptive, clipped_clustering_adaptive,
                               # backdoor (docs/attacks.md)
  c.attack.options = ml_collections.ConfigDict()  # per-attack options
  a = c.attack.options
  a.backdoor = dict(size=3,     # the trigger: a size x size square of max-intensity pixels
                    position="bottom_right",  # in this corner ("top_left", ... )
                    target=0,    # the label the poisoned examples get
                    fraction=1.0,  # share of each Byzantine minibatch poisoned (the first ones)
                    boost=1.0)   # the Byzantine workers send boost x their update
  a.ipm = dict(eps=0.5)        # send -eps * mean(honest); 0.5 as the reference's command line
  a.alie = dict(z=placeholder(float))  # send mean - z * std (None = the z of docs/attacks.md)
  a.mimic = dict(index=placeholder(int))  # the honest row to copy (None = the row farthest
                               # along the honest rows' top principal direction, each round)
  a.gaussian = dict(sigma=1.0,  # noise standard deviation
                    center="mean")  # "mean" (honest mean + noise) or "zero" (pure noise)
  for name in ("optimal_ipm", "optimal_alie"):
    a[name] = dict(low=0.0,    # smallest scale tried
                   high=10.0,  # largest scale tried
                   num_candidates=21,  # grid evaluated in one vmap
                   refine_steps=8,     # golden-section steps after the grid
                   batch_size=placeholder(int))  # grid points per lax.map batch (None = all)
  for name in ("min_max", "min_sum"):
    a[name] = dict(perturbation="unit",  # "unit", "std" or "sign"
                   solver="bisection",   # "bisection" or "exact"
                   gamma_init=10.0,      # first upper bound of the bisection
                   steps=40)             # bisection steps
  a.fang_krum = dict(threshold=1e-5,  # the search stops once lambda is at most this
                     halvings=30,      # at most this many halvings of the paper's bound
                     epsilon=0.0,      # rows 2..f at this distance from row 1 (0 = copies)
                     batch_size=placeholder(int))  # candidates per lax.map batch (None = all)
  a.fang_trmean = dict(b=2.0)  # values between the honest extreme and b (or 1/b) times it
  a.signguard_adaptive = dict(magnitude="uniform")  # "uniform" (U[0, 1), Blades) or
                               # "median_norm" (rescaled to the honest rows' median norm)
  a.clipped_clustering_adaptive = dict(linkage="single",  # clustering the chain is built for
                                       margin=0.1,   # radians below the smallest honest angle
                                       scale=10.0)   # norm of the chain's rows

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
