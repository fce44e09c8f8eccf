r"""Throughput and aggregator speed on one accelerator (GPU or TPU; runs on CPU too).

A prepared measurement for a machine with one accelerator, meant to finish in
under 8 minutes on one H200. On whatever backend JAX runs on, it times:

* the training round (steps/s of the compiled chunk after an untimed chunk,
  median of ``--reps`` timed chunks; compile seconds; XLA's memory analysis)
  for simple_mnist on MNIST shapes (28x28x1) and resnet18 on CIFAR-10 shapes
  (32x32x3), synthetic data, b = 16, float32, mu2sgd, ctma(cwtm), sign
  flipping (every worker computes gradients), f = W // 4, at W = 17, 65, 257
  (resnet18 above 64 workers in chunks of ``--resnet_chunk``, which bounds its
  activation memory);
* every aggregation rule of ``ftjax.aggregators`` at its defaults (the base
  rules, and every meta-aggregator over cwtm) plus ctma over cwmed and gm, on
  one [W, d] float32 array with d = 11,173,962 (ResNet-18's size), W = 17 and
  65: milliseconds per jitted call (median of ``--reps`` after a warm-up).

The rows run in order of cost, each guarded: a row that fails (e.g. out of
memory) is recorded with its error and the rest go on, and rows that would
start after ``--budget_s`` seconds are listed as skipped. The Markdown is
rewritten after every row, so an interrupted run keeps what it measured.

  python benchmarks/gpu.py                 # on the accelerator: docs/benchmarks/gpu.md
  python benchmarks/gpu.py --quick         # tiny shapes, to check the script on CPU
                                           # (writes /tmp/ftjax_gpu_quick.md)
"""

import os
import statistics
import sys
import time
import traceback

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from configs import default
from ftjax import aggregators as agg_lib
from ftjax import train
from synthetic import synthetic_dataset  # pylint: disable=g-bad-import-order

flags.DEFINE_bool("quick", False, "Tiny shapes and counts (checks the script, e.g. on CPU).")
flags.DEFINE_integer("reps", 3, "Timed chunks (or aggregator calls) per row; the median.")
flags.DEFINE_integer("resnet_chunk", 64, "workers.chunk of the resnet18 rows above 64 workers.")
flags.DEFINE_float("budget_s", 360.0, "Start no row after this many seconds.")
flags.DEFINE_string("out", "", "Markdown output (default docs/benchmarks/gpu.md, or "
                    "/tmp/ftjax_gpu_quick.md with --quick).")
FLAGS = flags.FLAGS

RESNET18_D = 11_173_962


def _plan(quick):
  """(kind, settings) rows in the order they run: cheapest first."""
  if quick:
    steps = [("simple_mnist", w, 2, 0) for w in (3, 5)] + [("resnet18", 3, 1, 0),
                                                           ("resnet18", 5, 1, 2)]
    return ([("step", dict(model=m, workers=w, rounds=r, chunk=c, batch=4))
             for m, w, r, c in steps]
            + [("aggregators", dict(workers=w, d=100_000)) for w in (9, 17)])
  mnist = [("step", dict(model="simple_mnist", workers=w, rounds=10, chunk=0, batch=16))
           for w in (17, 65, 257)]
  resnet = [("step", dict(model="resnet18", workers=w, rounds=3, batch=16,
                          chunk=FLAGS.resnet_chunk if w > 64 else 0)) for w in (17, 65, 257)]
  aggs = [("aggregators", dict(workers=w, d=RESNET18_D)) for w in (17, 65)]
  return mnist + [resnet[0], aggs[0], resnet[1], aggs[1], resnet[2]]


def rules():
  """Every rule at its defaults: the base rules, each meta-rule over cwtm, ctma over cwmed, gm."""
  base = list(agg_lib.AGGREGATORS)
  metas = [f"{m}(cwtm)" for m in agg_lib.META_AGGREGATORS]
  return base + metas + ["ctma(cwmed)", "ctma(gm)"]


def _memory(programs):
  """XLA's memory analysis of the largest compiled program, MiB (temporaries, arguments)."""
  analyses = [p.memory_analysis() for p in programs]
  analyses = [m for m in analyses if m is not None]
  if not analyses:
    return None, None
  peak = max(analyses, key=lambda m: m.temp_size_in_bytes)
  return peak.temp_size_in_bytes / 2**20, peak.argument_size_in_bytes / 2**20


def _device_peak_mib():
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def time_step(model, workers, rounds, chunk, batch):
  """One training-round row: steps/s, compile seconds, memory."""
  shape = (28, 28, 1) if model == "simple_mnist" else (32, 32, 3)
  c = default.get_config()
  c.progress = False
  c.workers.num, c.workers.byzantine, c.workers.batch_size = workers, workers // 4, batch
  c.workers.chunk = chunk
  c.model.name = model
  c.attack.name = "sf"
  dataset = synthetic_dataset(shape, num_train=max(1024, batch * workers))
  setup = train.build(c, dataset)
  state = train.init_state(setup, c.seed)
  data = train.DeviceData(jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels))
  tic = time.perf_counter()
  compiled = train.make_chunk_fn(setup, "auto")(state, data, rounds)
  compile_s = time.perf_counter() - tic
  state, metrics = compiled.run(state, data)  # untimed
  jax.block_until_ready(metrics)
  times = []
  for _ in range(FLAGS.reps):
    tic = time.perf_counter()
    state, metrics = compiled.run(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - tic)
  temp, args = _memory(compiled.executables)
  steps_per_sec = rounds / statistics.median(times)
  return dict(steps_per_sec=steps_per_sec, compile_s=compile_s, loop=compiled.loop,
              gflops=compiled.flops_per_step * steps_per_sec / 1e9, temp_mib=temp,
              args_mib=args, device_peak_mib=_device_peak_mib(),
              finite=bool(metrics["finite"]))


def time_aggregators(workers, d, note):
  """Milliseconds per call of every rule on one [W, d] array; errors per rule."""
  f = workers // 4
  x = jax.random.normal(jax.random.key(0), (workers, d), jnp.float32)
  key = jax.random.key(1)
  out = {}
  for spec in rules():
    try:
      fn = jax.jit(agg_lib.make_aggregator(spec, f, num_workers=workers).__call__)
      tic = time.perf_counter()
      compiled = fn.lower(x, key).compile()
      compile_s = time.perf_counter() - tic
      jax.block_until_ready(compiled(x, key))
      times = []
      for _ in range(FLAGS.reps):
        tic = time.perf_counter()
        jax.block_until_ready(compiled(x, key))
        times.append(time.perf_counter() - tic)
      out[spec] = dict(ms=statistics.median(times) * 1e3, compile_s=compile_s)
    except Exception as e:  # pylint: disable=broad-except
      out[spec] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    note(f"aggregators W={workers} d={d:,} {spec}: {out[spec]}")
  return out


def _fmt(value, spec):
  return "-" if value is None else format(value, spec)


def markdown(done, skipped, elapsed):
  device = jax.local_devices()[0]
  lines = ["# Throughput and aggregators on one accelerator", "",
           f"Command: `python benchmarks/gpu.py {' '.join(sys.argv[1:])}`", "",
           f"Device: {device.device_kind} (backend {jax.default_backend()}, "
           f"{len(jax.local_devices())} local device(s)), JAX {jax.__version__}, "
           f"{os.cpu_count()} host CPU cores. Total time {elapsed:.0f} s.", ""]
  steps = [(s, r) for kind, s, r in done if kind == "step"]
  if steps:
    lines += ["## Training round", "",
              "Synthetic data; simple_mnist on 28x28x1, resnet18 on 32x32x3; float32, mu2sgd, "
              "ctma(cwtm), sign flipping (every worker computes), f = W // 4, `loop=auto`, "
              f"`kernels=auto`. Median of {FLAGS.reps} timed chunks after an untimed one. "
              "Memory: XLA's memory analysis of the largest compiled program (temporaries, "
              "arguments); device peak: the allocator's peak so far in the process, where the "
              "backend reports one.", "",
              "| model | W | b | chunk | loop | rounds/chunk | steps/s | worker-steps/s | "
              "GFLOP/s | compile s | temp MiB | args MiB | device peak MiB |",
              "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s, r in steps:
      head = (f"| {s['model']} | {s['workers']} | {s['batch']} | {s['chunk']} | ")
      if "error" in r:
        lines.append(head + f"failed: {r['error']} | | | | | | | | |")
        continue
      lines.append(head + f"{r['loop']} | {s['rounds']} | {r['steps_per_sec']:.2f} | "
                   f"{r['steps_per_sec'] * s['workers']:.0f} | {r['gflops']:.0f} | "
                   f"{r['compile_s']:.1f} | {_fmt(r['temp_mib'], '.0f')} | "
                   f"{_fmt(r['args_mib'], '.0f')} | {_fmt(r['device_peak_mib'], '.0f')} |")
    lines.append("")
  for kind, s, r in done:
    if kind != "aggregators":
      continue
    lines += [f"## Aggregators, W = {s['workers']}, d = {s['d']:,}, f = {s['workers'] // 4}", "",
              f"One [W, d] float32 array of normal values; median of {FLAGS.reps} jitted calls "
              "after a warm-up; default options.", "",
              "| rule | ms | compile s |", "|---|---:|---:|"]
    if "error" in r:
      lines.append(f"| (all) | failed: {r['error']} | |")
    for spec, v in r.items() if "error" not in r else []:
      if "error" in v:
        lines.append(f"| {spec} | failed: {v['error']} | |")
      else:
        lines.append(f"| {spec} | {v['ms']:.2f} | {v['compile_s']:.1f} |")
    lines.append("")
  if skipped:
    lines += [f"Skipped (the {FLAGS.budget_s:.0f} s budget was spent): "
              + ", ".join(f"{k} {s}" for k, s in skipped), ""]
  return "\n".join(lines)


def main(argv):
  del argv
  out = FLAGS.out or ("/tmp/ftjax_gpu_quick.md" if FLAGS.quick else "docs/benchmarks/gpu.md")
  if FLAGS.quick and not FLAGS["reps"].present:
    FLAGS.reps = 1
  start = time.perf_counter()
  note = lambda m: print(f"[{time.perf_counter() - start:6.1f} s] {m}", flush=True)
  note(f"device: {jax.local_devices()[0].device_kind} ({jax.default_backend()})")
  done, skipped = [], []
  plan = _plan(FLAGS.quick)
  for i, (kind, settings) in enumerate(plan):
    if time.perf_counter() - start > FLAGS.budget_s:
      skipped = [(k, s) for k, s in plan[i:]]
      break
    try:
      if kind == "step":
        result = time_step(**settings)
      else:
        result = time_aggregators(settings["workers"], settings["d"], note)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    done.append((kind, settings, result))
    note(f"{kind} {settings}: {result if kind == 'step' else 'done'}")
    with open(out, "w") as fh:  # after every row: an interrupted run keeps what it measured
      fh.write(markdown(done, skipped, time.perf_counter() - start))
  text = markdown(done, skipped, time.perf_counter() - start)
  with open(out, "w") as fh:
    fh.write(text)
  print(text)
  print(f"Wrote {out}.")


if __name__ == "__main__":
  app.run(main)
