r"""Per-worker gradient formulations of simple_mnist, side by side.

Times the vmapped per-worker ``value_and_grad`` that the training step uses
(``jax.vmap(jax.value_and_grad(loss), in_axes=(None, None, 0, 0))`` at W=17
workers of b=16 MNIST-shaped examples) for every convolution formulation in
``ftjax.conv.CONV_IMPLS`` (plus a variant with XLA's reduce-window max pool), in
float32 and float64, with and without XLA:CPU flags. Next to it: the vmapped
forward pass alone, one gradient over the 272 examples as a single batch, and
the two gradient evaluations of a mu2sgd step (at x_t and x_{t-1}), written as
two vmaps or as one vmap over the stacked pair of parameter points.

Each configuration runs in its own subprocess (XLA flags are read once per
process); every number is the median of ``--reps`` timed calls after one
compiling call. Writes docs/benchmarks/grad_formulations.md.

  python benchmarks/grad_formulations.py              # full table (~5 min on 2 cores)
  python benchmarks/grad_formulations.py --quick      # float32, no flags
  python benchmarks/grad_formulations.py --compare=unrolled,shifted,xla

``--compare`` times the listed formulations in one process with their calls
interleaved (round r calls every formulation once), so background load hits
them alike; it reports medians and ratios to the first one, plus a per-layer
breakdown of one gradient evaluation (convolution forward, input gradient and
per-worker weight gradient, and the BatchNorm+ReLU+max-pool forward+backward),
and rewrites only the comparison section of the Markdown file.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_bool("quick", False, "float32 only, no XLA-flag rows.")
flags.DEFINE_integer("reps", 7, "Timed calls per number (the median is reported).")
flags.DEFINE_integer("workers", 17, "Workers W.")
flags.DEFINE_integer("batch", 16, "Examples per worker b.")
flags.DEFINE_string("out", "docs/benchmarks/grad_formulations.md", "Markdown output.")
flags.DEFINE_string("compare", "", "Comma-separated formulations to time interleaved in "
                    "one process (float32); the first is the ratio baseline.")
flags.DEFINE_string("child", "", "Internal: JSON spec of one configuration to time.")
FLAGS = flags.FLAGS

XLA_FLAG_SETS = {  # label -> XLA_FLAGS value
    "": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
}
RW_POOL = "unrolled+rw_pool"  # benchmark-only variant, built in the child


def _median_ms(fn, *args, reps):
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3, compile_s


def run_child(spec):
  """Times one (impl, dtype) configuration in this process; returns a dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import optax
  from ftjax import conv as conv_lib
  from ftjax import models

  if spec["dtype"] == "float64":
    jax.config.update("jax_enable_x64", True)
  dtype = jnp.float64 if spec["dtype"] == "float64" else jnp.float32
  impl = spec["impl"]
  if impl == RW_POOL:
    base = conv_lib.CONV_IMPLS["unrolled"]
    conv_lib.CONV_IMPLS[RW_POOL] = conv_lib.ConvImpl(
        base.conv, conv_lib.CONV_IMPLS["xla"].max_pool, "unrolled with reduce-window max pool")
  w, b, reps = spec["workers"], spec["batch"], spec["reps"]
  model = models.make_model("simple_mnist", dtype=dtype, conv_impl=impl)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1), dtype), train=False)
  params, stats = variables["params"], variables["batch_stats"]
  prev = jax.tree.map(lambda p: p * 0.99, params)
  x = jax.random.normal(jax.random.key(1), (w, b, 28, 28, 1), dtype)
  y = jax.random.randint(jax.random.key(2), (w, b), 0, 10)

  def loss_fn(params, batch_stats, x, y):
    logits, mut = model.apply({"params": params, "batch_stats": batch_stats}, x,
                              train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, mut["batch_stats"])

  per_worker = jax.vmap(jax.value_and_grad(loss_fn, has_aux=True), in_axes=(None, None, 0, 0))
  out = {}
  out["grad_ms"], out["compile_s"] = _median_ms(jax.jit(per_worker), params, stats, x, y,
                                                reps=reps)
  if spec.get("extras"):
    fwd = jax.jit(jax.vmap(loss_fn, in_axes=(None, None, 0, 0)))
    out["fwd_ms"], _ = _median_ms(fwd, params, stats, x, y, reps=reps)
    big = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    out["big_ms"], _ = _median_ms(big, params, stats, x.reshape((w * b,) + x.shape[2:]),
                                  y.reshape(-1), reps=reps)
    two = jax.jit(lambda p, q: (per_worker(p, stats, x, y), per_worker(q, stats, x, y)))
    out["pair_ms"], _ = _median_ms(two, params, prev, reps=reps)
    if spec["dtype"] == "float32":  # seconds per call in float64: float32 shows the trend
      stacked = jax.tree.map(lambda p, q: jnp.stack([p, q]), params, prev)
      joint = jax.jit(jax.vmap(lambda p: per_worker(p, stats, x, y)))
      out["pair_joint_ms"], _ = _median_ms(joint, stacked, reps=reps)
  return out


def _run_in_subprocess(spec, xla_flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip())
  cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
  res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
  if res.returncode or not lines:
    tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
    return {"error": " / ".join(tail)[:200]}
  return json.loads(lines[-1][len("RESULT "):])


COMPARE_BEGIN = "<!-- compare: begin -->"
COMPARE_END = "<!-- compare: end -->"


def _interleaved_ms(fns, reps):
  """{name: (fn, args)} -> {name: median ms}, calling every fn once per round."""
  import jax  # pylint: disable=g-import-not-at-top
  for fn, args in fns.values():  # compile, then one warm call
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, (fn, args) in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def run_compare(impls, reps, w, b):
  """Interleaved timings of whole gradient evaluations and of per-layer parts."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  import optax
  from ftjax import conv as conv_lib
  from ftjax import models

  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  x = normal(w, b, 28, 28, 1)
  y = jnp.asarray(rng.integers(0, 10, (w, b)), jnp.int32)
  grads = {}
  for impl in impls:
    model = models.make_model("simple_mnist", conv_impl=impl)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)

    def loss_fn(params, batch_stats, x, y, model=model):
      logits, mut = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, (logits, mut["batch_stats"])

    f = jax.jit(jax.vmap(jax.value_and_grad(loss_fn, has_aux=True), in_axes=(None, None, 0, 0)))
    grads[impl] = (f, (variables["params"], variables["batch_stats"], x, y))
  grad_ms = _interleaved_ms(grads, reps)

  # Per-layer parts at the shapes of one evaluation: layer 1 is 28x28, 1 -> 16
  # channels; layer 2 is 14x14, 16 -> 32. Arguments are passed, not closed over
  # (XLA would constant-fold a convolution of constants).
  parts = {}
  for layer, (hw, c, o) in enumerate([(28, 1, 16), (14, 16, 32)], start=1):
    xs, ks, dys = normal(w, b, hw, hw, c), normal(5, 5, c, o), normal(w, b, hw, hw, o)
    for impl in impls:
      conv = conv_lib.CONV_IMPLS[impl].conv

      def wgrad(k, x, dy, conv=conv):  # per-worker kernel gradient
        return jax.vmap(lambda x, dy: jax.vjp(lambda k: conv(x, k, 1, 2), k)[1](dy)[0])(x, dy)

      def xgrad(k, x, dy, conv=conv):  # input gradient (kernel shared)
        return jax.vmap(lambda x, dy: jax.vjp(lambda x: conv(x, k, 1, 2), x)[1](dy)[0])(x, dy)

      fwd = lambda k, x, dy, conv=conv: jax.vmap(lambda x: conv(x, k, 1, 2))(x)
      parts[(layer, "conv forward", impl)] = (jax.jit(fwd), (ks, xs, dys))
      if layer > 1:  # the first layer's input is the data: no input gradient
        parts[(layer, "conv input grad", impl)] = (jax.jit(xgrad), (ks, xs, dys))
      parts[(layer, "conv weight grad", impl)] = (jax.jit(wgrad), (ks, xs, dys))
    scale, bias = jnp.ones(o), jnp.zeros(o)
    pool = conv_lib.CONV_IMPLS[impls[0]].max_pool

    def block(a, scale, bias, pool=pool):  # BN + ReLU + pool, forward and backward
      f = lambda a: pool(jax.nn.relu(conv_lib.batch_norm_train(a, scale, bias, 1e-5)[0]))
      out, vjp = jax.vjp(f, a)
      return vjp(out)[0]

    parts[(layer, f"BN+ReLU+pool fwd+bwd ({impls[0]} pool)", impls[0])] = (
        jax.jit(jax.vmap(block, in_axes=(0, None, None))), (dys, scale, bias))
  part_ms = _interleaved_ms(parts, reps)
  return grad_ms, part_ms


def compare_main(impls):
  import jax  # pylint: disable=g-import-not-at-top
  from ftjax import conv as conv_lib  # pylint: disable=g-import-not-at-top
  w, b, reps = FLAGS.workers, FLAGS.batch, FLAGS.reps
  grad_ms, part_ms = run_compare(impls, reps, w, b)
  base = impls[0]
  load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
  cmd = f"python benchmarks/grad_formulations.py --compare={','.join(impls)} --reps={reps}"
  lines = [
      COMPARE_BEGIN,
      "## Interleaved comparison",
      "",
      f"Generated by `{cmd}`: float32, W={w} x b={b}, all formulations in one process, "
      f"calls interleaved, median of {reps} rounds after compiling; load average at the end "
      f"{load}. Ratios are to `{base}` and are the numbers to compare.",
      "",
      "| conv_impl | grad ms | ratio to " + base + " |",
      "|---|---|---|",
  ]
  for impl in impls:
    lines.append(f"| {impl} | {grad_ms[impl]:.1f} | {grad_ms[impl] / grad_ms[base]:.2f} |")
  lines += ["", "Per-layer parts of one evaluation (vmapped over the workers; ms):", "",
            "| layer | part | " + " | ".join(impls) + " |",
            "|---|---|" + "---|" * len(impls)]
  keys = sorted(dict.fromkeys((l, p) for l, p, _ in part_ms), key=lambda k: k[0])
  for layer, part in keys:
    cells = [f"{part_ms[(layer, part, i)]:.1f}" if (layer, part, i) in part_ms else "—"
             for i in impls]
    lines.append(f"| {layer} | {part} | " + " | ".join(cells) + " |")
  lines.append(COMPARE_END)
  section = "\n".join(lines)
  print(section)
  text = open(FLAGS.out).read() if os.path.exists(FLAGS.out) else ""
  if COMPARE_BEGIN in text and COMPARE_END in text:
    head, rest = text.split(COMPARE_BEGIN, 1)
    text = head + section + rest.split(COMPARE_END, 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  with open(FLAGS.out, "w") as f:
    f.write(text)
  print(f"wrote {FLAGS.out} (jax {jax.__version__}, auto={conv_lib.resolve_conv_impl('auto')})")


def _fmt(v):
  return "—" if v is None else f"{v:.1f}"


def main(argv):
  del argv
  if FLAGS.child:
    print("RESULT " + json.dumps(run_child(json.loads(FLAGS.child))), flush=True)
    return
  if FLAGS.compare:
    compare_main([i.strip() for i in FLAGS.compare.split(",") if i.strip()])
    return
  from ftjax import conv as conv_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  impls = list(conv_lib.CONV_IMPLS) + [RW_POOL]
  dtypes = ["float32"] if FLAGS.quick else ["float32", "float64"]
  flag_sets = [""] if FLAGS.quick else list(XLA_FLAG_SETS)
  rows = []
  for dtype in dtypes:
    for label in flag_sets:
      for impl in impls:
        if label and impl not in ("xla", conv_lib.resolve_conv_impl("auto")):
          continue  # flags only for the baseline and the chosen default
        spec = dict(impl=impl, dtype=dtype, workers=FLAGS.workers, batch=FLAGS.batch,
                    reps=FLAGS.reps, extras=not label)
        r = _run_in_subprocess(spec, XLA_FLAG_SETS[label])
        r.update(impl=impl, dtype=dtype, flags=label)
        print(json.dumps(r), flush=True)
        rows.append(r)

  auto = conv_lib.resolve_conv_impl("auto")
  w, b = FLAGS.workers, FLAGS.batch
  cmd = "python benchmarks/grad_formulations.py" + (" --quick" if FLAGS.quick else "")
  lines = [
      "# Per-worker gradient formulations (simple_mnist)",
      "",
      f"Generated by `{cmd}` (reps={FLAGS.reps}, median ms after one compiling call; "
      f"W={w} workers x b={b} examples of 28x28x1, one subprocess per row).",
      f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
      f"jax {jax.__version__}, backend cpu; load average at the end "
      f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} (the cores are shared, so "
      "absolute numbers are noisy; compare within a run).",
      "",
      f'`conv_impl="auto"` resolves to **{auto}** on CPU (and to `xla` on GPU/TPU).',
      "",
      "Columns: *grad* = `vmap(value_and_grad(loss))` over the workers (what the step runs, "
      "once per gradient evaluation); *fwd* = the vmapped forward loss only; *big-batch* = "
      f"one `value_and_grad` over all {w * b} examples as one batch (not per worker); "
      "*mu2sgd pair* = the two per-worker gradient evaluations of a mu2sgd step (x_t and "
      "x_{t-1}) in one jit, as two vmaps / as one vmap over the stacked parameter points.",
      "",
      "| conv_impl | dtype | XLA flags | grad ms | fwd ms | big-batch grad ms | "
      "mu2sgd pair ms (2 vmaps) | mu2sgd pair ms (joint vmap) | compile s |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    name = f"**{r['impl']}**" if r["impl"] == auto else r["impl"]
    if "error" in r:
      lines.append(f"| {name} | {r['dtype']} | {r['flags'] or '—'} | failed: {r['error']} "
                   "| | | | | |")
      continue
    lines.append(
        f"| {name} | {r['dtype']} | {r['flags'] or '—'} | {_fmt(r['grad_ms'])} | "
        f"{_fmt(r.get('fwd_ms'))} | {_fmt(r.get('big_ms'))} | {_fmt(r.get('pair_ms'))} | "
        f"{_fmt(r.get('pair_joint_ms'))} | {r['compile_s']:.1f} |")
  lines += ["", "Formulations:", ""]
  for name, impl in conv_lib.CONV_IMPLS.items():
    lines.append(f"- `{name}`: {impl.doc}.")
  lines.append(f"- `{RW_POOL}` (benchmark only): `unrolled` convolutions with XLA's "
               "reduce-window max pool (select-and-scatter backward).")
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
