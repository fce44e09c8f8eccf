r"""Training-step throughput, against the matmul roofline and plain SGD.

For simple_mnist at W=17 workers, f=8, b=16 (MNIST-shaped synthetic data, so no
download is needed; the arithmetic does not depend on pixel values) it measures
steps per second of the compiled chunk of rounds (``loop=auto``: a ``lax.scan``,
or the host loop where that would be slow; median of several timed chunks after
compilation) for the mu2sgd and momentum estimators with ctma(cwtm),
nnm(cwtm) and avg, under sf (every worker computes gradients) and alie (only
the honest ones do), in float32 and float64. Side by side, in the same run:

* the step's FLOP count from XLA's cost analysis divided by its time, against
  the FLOP rate of a large float32 matmul (the roofline ratio);
* a plain single-model SGD step on the same total batch of W*b examples (the
  cost of robustness);
* XLA's memory analysis of the step (peak temporary + argument buffers).

A second table times the key configuration (mu2sgd, ctma(cwtm), sf, float32)
at W = 17, 65, 257 and 1024 workers (``--scale_workers``; f = (W - 1) // 2, the
default ``workers.chunk``): steps/s, the cost per worker relative to W = 17,
compile seconds and memory.

Writes docs/benchmarks/throughput.md.

  python benchmarks/throughput.py            # full table
  python benchmarks/throughput.py --quick    # float32, the key rows only

On a GPU or TPU backend it skips the CPU-device split rows, keeps the CIFAR-10
rows (resnet18 included) even with --quick, names the device and writes
docs/benchmarks/throughput_<backend>.md unless --out is given.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import optax

from configs import default
from ftjax import sampling
from ftjax import data as data_lib
from ftjax import models as models_lib
from ftjax import sharding
from ftjax import train
from synthetic import synthetic_dataset  # pylint: disable=g-bad-import-order

# Idle extra CPU devices slow a one-device step by 5-8% (docs/performance.md), so
# this process exposes exactly one device and the rows split over N devices run in a
# child process that exposes N (main.py --cpu_devices=N); before JAX's first device use.
_CORES = os.cpu_count() or 1
_SPLIT_CHILD = next((int(a.split("=", 1)[1]) for a in sys.argv
                     if a.startswith("--split_child=")), 0)
_CALLER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")  # what a child process starts from
sharding.expose_cpu_devices(_SPLIT_CHILD or 1)

flags.DEFINE_bool("quick", False, "Only float32 and the key rows.")
flags.DEFINE_integer("chunk", 10, "Rounds per timed chunk.")
flags.DEFINE_integer("reps", 5, "Timed chunks per row (the median is reported).")
flags.DEFINE_bool("cifar", True, "Also time simple_cifar10 and resnet18.")
flags.DEFINE_integer("split_child", 0, "Internal: time only the split rows on this many "
                     "CPU devices and print them as JSON.")
flags.DEFINE_list("scale_workers", ["17", "65", "257", "1024"],
                  "W of the worker-count table (f = (W - 1) // 2).")
flags.DEFINE_string("out", "docs/benchmarks/throughput.md", "Markdown output.")
FLAGS = flags.FLAGS


class Chunks:
  """A compiled chunk of ``length`` rounds and its state, timed one call at a time."""

  def __init__(self, run, state, data, length):
    self.run, self.state, self.data, self.length = run, state, data, length

  def call(self) -> float:
    """Seconds of one chunk (the state carries over to the next call)."""
    tic = time.perf_counter()
    self.state, metrics = self.run(self.state, self.data)
    jax.block_until_ready(metrics)
    return time.perf_counter() - tic


def interleaved_steps_per_sec(chunks, reps):
  """Steps/s of each of ``chunks``: one untimed call each, then ``reps`` rounds of one
  timed call each, the order rotating, so that the machine's load falls on all alike."""
  for c in chunks:
    c.call()
  times = [[] for _ in chunks]
  for rep in range(reps):
    for k in range(len(chunks)):
      i = (k + rep) % len(chunks)
      times[i].append(chunks[i].call())
  return [c.length / statistics.median(t) for c, t in zip(chunks, times)]


def build_step(estimator, aggregator, attack, dtype, dataset, model="simple_mnist",
               kernels="auto", workers=17, byzantine=8, batch=16, length=None,
               loop="auto", devices=1):
  """The compiled chunk of one configuration and its static figures (FLOPs, bytes)."""
  length = length or FLAGS.chunk
  c = default.get_config()
  c.dtype = dtype
  c.progress = False
  c.workers.num, c.workers.byzantine, c.workers.batch_size = workers, byzantine, batch
  c.model.name, c.kernels = model, kernels
  c.optim.estimator = estimator
  name, _, meta = aggregator.partition("(")
  c.aggregator.name, c.aggregator.meta = (meta.rstrip(")"), name) if meta else (name, "none")
  c.attack.name = attack
  c.devices = devices
  setup = train.build(c, dataset)
  state = train.place(setup, train.init_state(setup, c.seed))
  data = train.place(setup, train.DeviceData(jnp.asarray(dataset.train_images),
                                             jnp.asarray(dataset.train_labels)))
  tic = time.perf_counter()
  compiled = train.make_chunk_fn(setup, loop)(state, data, length)
  compile_s = time.perf_counter() - tic
  figures = {"gflop_per_step": compiled.flops_per_step / 1e9,
             "memory_mib": compiled.memory_bytes / 2**20, "loop": compiled.loop,
             "compile_s": compile_s, "workers": workers, "byzantine": byzantine,
             "rounds": length}
  return Chunks(compiled.run, state, data, length), figures


def time_step(*args, plain=None, reps=None, **kwargs):
  """Steps per second, FLOPs per step and bytes of one configuration.

  With ``plain`` (the :func:`plain_sgd_chunks` of the same dtype) the step and
  plain SGD are timed interleaved, and ``plain_sgd`` is that paired figure.
  """
  chunks, r = build_step(*args, **kwargs)
  reps = reps or FLAGS.reps
  if plain is None:
    (r["steps_per_sec"],) = interleaved_steps_per_sec([chunks], reps)
  else:
    r["steps_per_sec"], r["plain_sgd"] = interleaved_steps_per_sec([chunks, plain], reps)
  r["gflops"] = r["gflop_per_step"] * r["steps_per_sec"]
  return r


def plain_sgd_chunks(dataset, dtype, total_batch, model="simple_mnist"):
  """One model's SGD on ``total_batch`` examples per step (no workers), as :class:`Chunks`."""
  dt = jnp.float64 if dtype == "float64" else jnp.float32
  net = models_lib.make_model(model, dtype=dt)
  x0 = jnp.zeros((1,) + dataset.train_images.shape[1:], dt)
  variables = net.init(jax.random.key(0), x0, train=False)
  n = dataset.train_images.shape[0]
  images, labels = jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels)

  def loss_fn(params, batch_stats, x, y):
    logits, mutated = net.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), mutated

  def step(carry, i):
    params, batch_stats = carry
    idx = sampling.round_indices(jax.random.key(1), i, n, 1, total_batch)[0]
    x = data_lib.preprocess(images[idx], dataset.mean, dataset.std, dt)
    (_, mutated), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, labels[idx])
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return params, mutated["batch_stats"]

  # A lax.scan over the donated state, as ftjax's own chunk.
  def chunk(carry):
    carry, _ = jax.lax.scan(lambda c, i: (step(c, i), None), carry,
                            jnp.arange(FLAGS.chunk, dtype=jnp.int32))
    return carry

  compiled = jax.jit(chunk, donate_argnums=0).lower(
      (variables["params"], variables["batch_stats"])).compile()

  def run(carry, _):
    carry = compiled(carry)
    return carry, carry[0]

  carry = jax.tree.map(jnp.array, (variables["params"], variables["batch_stats"]))
  return Chunks(run, carry, None, FLAGS.chunk)


def matmul_gflops(n=2048, reps=5):
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    tic = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - tic)
  return 2 * n**3 / statistics.median(times) / 1e9


def main(argv):
  del argv
  mnist = synthetic_dataset((28, 28, 1))
  num_devices = len(jax.local_devices())
  dtypes = ["float32"] if FLAGS.quick else ["float32", "float64"]
  estimators = ["mu2sgd", "momentum"]
  aggs = ["ctma(cwtm)"] if FLAGS.quick else ["ctma(cwtm)", "nnm(cwtm)", "avg"]
  if FLAGS.split_child:
    # The key aggregator's rows with the workers split over all of this process's devices.
    out = []
    for dtype in dtypes:
      if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
      plain = plain_sgd_chunks(mnist, dtype, 17 * 16)
      for estimator in estimators:
        for attack in ("sf", "alie"):
          r = time_step(estimator, "ctma(cwtm)", attack, dtype, mnist, devices=num_devices,
                        plain=plain)
          r.update(dtype=dtype, estimator=estimator, aggregator="ctma(cwtm)", attack=attack,
                   model="simple_mnist", kernels="auto", devices=num_devices)
          out.append(r)
          print(r, flush=True)
    print("RESULT " + json.dumps(out), flush=True)
    return
  on_cpu = jax.default_backend() == "cpu"
  out_path = FLAGS.out
  if not on_cpu and not FLAGS["out"].present:
    out_path = f"docs/benchmarks/throughput_{jax.default_backend()}.md"
  matmul_n = 2048 if on_cpu else 8192
  roof = matmul_gflops(matmul_n)
  print(f"float32 matmul {matmul_n}^3: {roof:.0f} GFLOP/s", flush=True)
  rows, plain_sgd = [], {}
  for dtype in dtypes:
    if dtype == "float64":
      jax.config.update("jax_enable_x64", True)
    plain = plain_sgd[dtype] = plain_sgd_chunks(mnist, dtype, 17 * 16)
    for estimator in estimators:
      for agg in aggs:
        for attack in ("sf", "alie"):
          r = time_step(estimator, agg, attack, dtype, mnist, plain=plain)
          r.update(dtype=dtype, estimator=estimator, aggregator=agg, attack=attack,
                   model="simple_mnist", kernels="auto", devices=1)
          rows.append(r)
          print(r, flush=True)
  # The key aggregator's rows with the workers split over one CPU device per core and
  # over one device more, each in a child process exposing exactly that many devices.
  for devices in sorted({_CORES, _CORES + 1} - {1}) if _CORES > 1 and on_cpu else []:
    cmd = [sys.executable, os.path.abspath(__file__), f"--split_child={devices}",
           f"--chunk={FLAGS.chunk}", f"--reps={FLAGS.reps}", f"--quick={FLAGS.quick}"]
    # The child starts from the caller's XLA_FLAGS, without this process's device count.
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env=dict(os.environ, XLA_FLAGS=_CALLER_XLA_FLAGS))
    if proc.returncode:
      raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    for r in json.loads(line[len("RESULT "):]):
      if r["devices"] != devices:
        raise SystemExit(f"the child process got {r['devices']} devices, not {devices}")
      # After the last row of the same configuration.
      at = max(i for i, o in enumerate(rows) if all(
          o[k] == r[k] for k in ("dtype", "estimator", "aggregator", "attack")))
      rows.insert(at + 1, r)
      print(r, flush=True)
  # The plain kernels (vmapped XLA convolutions), and the host loop instead of lax.scan,
  # for the key row: what each CPU choice buys.
  for kset, loop in (("plain", "auto"), ("auto", "host")):
    r = time_step("mu2sgd", "ctma(cwtm)", "sf", "float32", mnist, kernels=kset, loop=loop,
                  plain=plain_sgd["float32"])
    r.update(dtype="float32", estimator="mu2sgd", aggregator="ctma(cwtm)", attack="sf",
             model="simple_mnist", kernels=kset, devices=1)
    rows.append(r)
    print(r, flush=True)
  # XLA's cost analysis of a program split over devices counts one device's share;
  # a split row does the same arithmetic as its one-device row, so it uses that count.
  for r in rows:
    if r["devices"] > 1:
      one = next(o for o in rows if o["devices"] == 1 and all(
          o[k] == r[k] for k in ("dtype", "estimator", "aggregator", "attack", "kernels",
                                 "loop")))
      r["gflop_per_step"] = one["gflop_per_step"]
      r["gflops"] = r["gflop_per_step"] * r["steps_per_sec"]
  # The key row at more workers: a round takes about W times longer, so fewer rounds
  # per timed chunk, and one example per worker-batch slot of the largest round.
  # Every W is compiled first, then their chunks are timed interleaved.
  scale_rows, scale_chunks = [], []
  big = synthetic_dataset((28, 28, 1), 16 * max(int(w) for w in FLAGS.scale_workers))
  for w in (int(w) for w in FLAGS.scale_workers):
    chunks, r = build_step("mu2sgd", "ctma(cwtm)", "sf", "float32", big, workers=w,
                           byzantine=(w - 1) // 2, length=max(1, min(FLAGS.chunk, 200 // w)))
    scale_rows.append(r)
    scale_chunks.append(chunks)
    print(f"W={w} compiled", r, flush=True)
  for r, sps in zip(scale_rows, interleaved_steps_per_sec(scale_chunks, FLAGS.reps)):
    r["steps_per_sec"] = sps
    print(f"W={r['workers']}", r, flush=True)
  del scale_chunks
  cifar_rows = []
  if FLAGS.cifar and (not FLAGS.quick or not on_cpu):
    cifar = synthetic_dataset((32, 32, 3))
    for model, length, reps in (("simple_cifar10", FLAGS.chunk, FLAGS.reps), ("resnet18", 1, 3)):
      r = time_step("mu2sgd", "ctma(cwtm)", "sf", "float32", cifar, model=model,
                    length=length, reps=reps)
      r.update(model=model)
      cifar_rows.append(r)
      print(r, flush=True)

  lines = [
      "# Training-step throughput", "",
      f"Command: `python benchmarks/throughput.py {' '.join(sys.argv[1:])}`", "",
      f"Machine: {os.cpu_count()} CPU cores, JAX {jax.__version__}, backend "
      f"{jax.default_backend()}. Median of {FLAGS.reps} timed chunks of {FLAGS.chunk} "
      "rounds after compilation and one untimed chunk, each row's chunks alternating with "
      "plain SGD's (the step cost column is that paired ratio). simple_mnist, b=16, "
      "MNIST-shaped data; the first table at W=17, f=8.", "",
      f"Roofline: a {matmul_n}-square float32 matmul runs at "
      f"**{roof:.0f} GFLOP/s** here.", "",
      "| W | dtype | estimator | aggregator | attack | kernels | loop | devices | steps/s | "
      "GFLOP/step | GFLOP/s | roofline | plain SGD steps/s | step cost vs plain SGD | memory MiB |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ratio = r["plain_sgd"] / r["steps_per_sec"]
    lines.append(
        f"| {r['workers']} | {r['dtype']} | {r['estimator']} | {r['aggregator']} | {r['attack']} | "
        f"{r['kernels']} | {r['loop']} | {r['devices']} | {r['steps_per_sec']:.1f} | "
        f"{r['gflop_per_step']:.2f} | "
        f"{r['gflops']:.0f} | {r['gflops'] / roof:.0%} | {r['plain_sgd']:.1f} | "
        f"{ratio:.2f}x | {r['memory_mib']:.0f} |")
  lines += ["", "loop: what `loop=auto` chose (`scan` unless a convolution of the round would "
            "run on XLA:CPU's slow path inside a loop body), or the host loop forced for "
            "comparison. "
            + ("devices: 1 = one device; 2 or more = the workers' gradients split over that many "
               f"CPU devices (`config.devices`; main.py --cpu_devices=N exposes N CPU devices); "
               f"this machine has {_CORES} cores, so the rows split over one device per core and "
               "over one device more. Each device count runs in its own process that exposes "
               "exactly that many devices (idle extra CPU devices slow a one-device step by "
               "about 5-8%, see docs/performance.md). Split rows use the one-device GFLOP "
               "count (XLA counts one device's share) and XLA's per-device memory. "
               if on_cpu else "devices: the step runs on one device. ")
            + "Plain SGD: one model's SGD step on the same W*b examples with the same layers, "
            "timed alternately with each row (in the split rows' own process)."]
  lines += ["", "## Worker count", "",
            "mu2sgd, ctma(cwtm), sf (every worker computes), float32, f = (W - 1) // 2, "
            "`loop=auto`, the default `workers.chunk` (on CPU the workers' gradients are "
            "taken 16 at a time above 64 workers). A timed chunk is `rounds` rounds; every W "
            f"is compiled first, then the W's chunks alternate, {FLAGS.reps} timed chunks "
            "each after an untimed one (medians). Cost per worker: "
            "seconds per round divided by W, relative to the first row. Compile: building "
            "and compiling the chunk. Memory: XLA's memory analysis (temporaries and "
            "arguments).", "",
            "| W | f | loop | rounds | steps/s | cost per worker vs W=%d | compile s | "
            "memory MiB |" % scale_rows[0]["workers"],
            "|---|---|---|---|---|---|---|---|"]
  base = 1 / (scale_rows[0]["steps_per_sec"] * scale_rows[0]["workers"])
  for r in scale_rows:
    per_worker = 1 / (r["steps_per_sec"] * r["workers"])
    lines.append(f"| {r['workers']} | {r['byzantine']} | {r['loop']} | {r['rounds']} | "
                 f"{r['steps_per_sec']:.3f} | {per_worker / base:.2f} | "
                 f"{r['compile_s']:.1f} | {r['memory_mib']:.0f} |")
  lines.append("")
  if cifar_rows:
    lines += ["CIFAR-10-shaped data (32x32x3), mu2sgd, ctma(cwtm), sf, float32, W=17, b=16:", "",
              "| model | loop | steps/s | GFLOP/step | GFLOP/s | roofline | memory MiB |",
              "|---|---|---|---|---|---|---|"]
    for r in cifar_rows:
      lines.append(f"| {r['model']} | {r['loop']} | {r['steps_per_sec']:.3f} | "
                   f"{r['gflop_per_step']:.1f} | "
                   f"{r['gflops']:.0f} | {r['gflops'] / roof:.0%} | {r['memory_mib']:.0f} |")
    lines.append("")
  if on_cpu:
    lines += ["GPU: no accelerator was available for this run; GPU figures are still to be "
              "measured.", ""]
  else:
    lines += [f"Device: {jax.devices()[0].device_kind} ({jax.default_backend()}, "
              f"{len(jax.devices())} device(s)).", ""]
  with open(out_path, "w") as fh:
    fh.write("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
