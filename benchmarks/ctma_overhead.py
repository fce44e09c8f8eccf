r"""What CTMA adds to the rule it wraps, in read passes over the rows.

ctma(X) computes X's output x0, one distance pass of every row to x0, and the
mean of the W - f nearest rows, so its cost beyond X is at least about
1 + (W - f) / W reads of the [W, d] rows. This script times X and ctma(X) for
every base rule at W workers and d float32 coordinates (f = W // 4), with a
memory pass (the fastest single read of the rows: XLA's row-by-row sum or its
matrix-vector mean) in the same interleaved loop, and reports

    passes = (median time of ctma(X) - median time of X) / median memory pass

Every repetition calls each jitted function once in turn, so the load of a
shared machine falls on all of them alike; medians over ``--reps``. The
"paired" column is the median over repetitions of (ctma(X) - X) / memory
pass within each repetition: the same quantity, less sensitive to load that
changes between repetitions when X itself takes many passes.

  python benchmarks/ctma_overhead.py --out=docs/benchmarks/ctma_overhead.md
"""

import os
import statistics
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from ftjax import aggregators as agg_lib
from ftjax.kernels import rows as rows_lib

BASE = ["avg", "cwmed", "cwtm", "gm", "krum", "multikrum", "centered_clipping", "meamed"]

FLAGS = flags.FLAGS
flags.DEFINE_integer("workers", 17, "W.")
flags.DEFINE_integer("dims", 1_000_000, "d.")
flags.DEFINE_list("rules", BASE, "Base rules X (each timed alone and under ctma).")
flags.DEFINE_integer("reps", 21, "Interleaved repetitions (medians are reported).")
flags.DEFINE_string("out", "docs/benchmarks/ctma_overhead.md", "Markdown output.")


def main(argv):
  del argv
  w, d = FLAGS.workers, FLAGS.dims
  f = w // 4
  x = jax.random.normal(jax.random.key(0), (w, d), jnp.float32)
  key = jax.random.key(1)
  fns = {
      "row sum": jax.jit(lambda a: rows_lib.sum_rows([a[i] for i in range(w)])),
      "matvec": jax.jit(lambda a: jnp.dot(jnp.ones((w,), a.dtype), a)),
  }
  for spec in FLAGS.rules:
    for s in (spec, f"ctma({spec})"):
      fns[s] = jax.jit(agg_lib.make_aggregator(s, f, num_workers=w).__call__)
  calls = {name: (lambda fn=fn, name=name: fn(x) if name in ("row sum", "matvec")
                  else fn(x, key)) for name, fn in fns.items()}
  for call in calls.values():  # compile and warm up
    jax.block_until_ready(call())
  times = {name: [] for name in calls}
  for rep in range(FLAGS.reps):
    for name, call in calls.items():
      tic = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - tic)
    print(f"repetition {rep + 1}/{FLAGS.reps}", file=sys.stderr, flush=True)
  med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
  mem_name = min(("row sum", "matvec"), key=med.get)
  mem = med[mem_name]
  ideal = 1 + (w - f) / w
  lines = [
      "# CTMA's cost beyond the rule it wraps", "",
      "Produced by `" + " ".join(["python benchmarks/ctma_overhead.py"] + sys.argv[1:]) + "`",
      f"on a shared 2-core CPU machine, jax {jax.__version__}, backend {jax.default_backend()}: "
      f"W = {w}, d = {d:,}, f = {f}, one [W, d] float32 leaf of N(0, 1) values. Every "
      f"function is jitted and warmed up, then called once per repetition in turn; medians "
      f"over {FLAGS.reps} interleaved repetitions.", "",
      f"Memory pass: {mem:.2f} ms (the faster of XLA's row-by-row sum, "
      f"{med['row sum']:.2f} ms, and its matrix-vector sum, {med['matvec']:.2f} ms). "
      f"passes = (ctma(X) - X) / memory pass; the distance pass and the mean of the "
      f"W - f kept rows read about {ideal:.2f} passes.", "",
      "| X | X ms | ctma(X) ms | ctma(X) - X ms | passes | paired |",
      "|---|---:|---:|---:|---:|---:|"]
  for spec in FLAGS.rules:
    a, b = med[spec], med[f"ctma({spec})"]
    paired = statistics.median(
        (tb - ta) / tm for ta, tb, tm in zip(times[spec], times[f"ctma({spec})"], times[mem_name]))
    lines.append(f"| {spec} | {a:.2f} | {b:.2f} | {b - a:.2f} | {(b - a) / mem:.2f} "
                 f"| {paired:.2f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as fh:
    fh.write(text)


if __name__ == "__main__":
  app.run(main)
