r"""What CTMA adds to the rule it wraps, in read passes over the rows.

ctma(X) computes X's output x0, one distance pass of every row to x0, and the
mean of the W - f nearest rows, so its cost beyond X is at least about
1 + (W - f) / W reads of the [W, d] rows. This script times X and ctma(X) for
every base rule at W workers and d float32 coordinates (f = W // 4), with a
memory pass (the fastest single read of the rows: XLA's row-by-row sum or its
matrix-vector mean) in the same interleaved loop, and reports

    passes = (median time of ctma(X) - median time of X) / median memory pass

Every repetition calls each jitted function once, in an order shuffled anew
in every repetition (a call's time depends on the call before it), so the
load of a shared machine falls on all of them alike; medians over ``--reps``. The
"paired" figure is the median over repetitions of (ctma(X) - X) / memory
pass within each repetition: the same quantity, less sensitive to load that
changes between repetitions when X itself takes many passes. CTMA's two
passes are also timed alone, as the floor of what it adds: the distance pass
(``rows.sqdist`` of the rows to a fixed point) and the mean of W - f given rows
(``rows.mean_of``).

With ``--runs=N`` the measurement runs in N processes one after the other
(the memory pass itself moves between processes on a shared machine), and the
table gives each run's passes and their median.

  python benchmarks/ctma_overhead.py --runs=3 --out=docs/benchmarks/ctma_overhead.md
"""

import json
import os
import random
import statistics
import subprocess
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
flags.DEFINE_integer("runs", 1, "Measurements, each in its own process, one after the other.")
flags.DEFINE_string("out", "docs/benchmarks/ctma_overhead.md", "Markdown output.")
flags.DEFINE_string("child", None, "Internal: measure once and write the medians to this JSON file.")


COMPONENTS = ("distance pass", "kept mean")


def measure(w: int, d: int, rules, reps: int) -> dict:
  """Times of every function per repetition (ms), interleaved."""
  f = w // 4
  x = jax.random.normal(jax.random.key(0), (w, d), jnp.float32)
  point = jax.random.normal(jax.random.key(2), (d,), jnp.float32)
  kept = jnp.arange(w - f)
  key = jax.random.key(1)
  plain = {
      "row sum": jax.jit(lambda a: rows_lib.sum_rows([a[i] for i in range(w)])),
      "matvec": jax.jit(lambda a: jnp.dot(jnp.ones((w,), a.dtype), a)),
      "distance pass": jax.jit(lambda a: rows_lib.sqdist(a, point)),
      "kept mean": jax.jit(lambda a: rows_lib.mean_of(a, kept)),
  }
  calls = {name: (lambda fn=fn: fn(x)) for name, fn in plain.items()}
  for spec in rules:
    for s in (spec, f"ctma({spec})"):
      fn = jax.jit(agg_lib.make_aggregator(s, f, num_workers=w).__call__)
      calls[s] = lambda fn=fn: fn(x, key)
  for call in calls.values():  # compile and warm up
    jax.block_until_ready(call())
  times = {name: [] for name in calls}
  order = list(calls)
  for rep in range(reps):
    # A call's time depends on the call before it (krum runs faster right after
    # ctma(gm) than after other calls), so the order is shuffled in every
    # repetition and each function follows many others.
    random.Random(rep).shuffle(order)
    for name in order:
      call = calls[name]
      tic = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append((time.perf_counter() - tic) * 1e3)
    print(f"repetition {rep + 1}/{reps}", file=sys.stderr, flush=True)
  return times


def summarize(times: dict, rules) -> dict:
  """Medians (ms), the memory pass, and passes / paired passes per rule and component."""
  med = {name: statistics.median(t) for name, t in times.items()}
  mem_name = min(("row sum", "matvec"), key=med.get)
  mem = med[mem_name]
  out = {"med": med, "mem": mem, "passes": {}, "paired": {}}
  for name in COMPONENTS:
    out["passes"][name] = med[name] / mem
    out["paired"][name] = statistics.median(a / m for a, m in zip(times[name], times[mem_name]))
  for spec in rules:
    a, b = times[spec], times[f"ctma({spec})"]
    out["passes"][spec] = (med[f"ctma({spec})"] - med[spec]) / mem
    out["paired"][spec] = statistics.median(
        (tb - ta) / tm for ta, tb, tm in zip(a, b, times[mem_name]))
  return out


def main(argv):
  del argv
  w, d, rules = FLAGS.workers, FLAGS.dims, FLAGS.rules
  if FLAGS.child:
    with open(FLAGS.child, "w") as fh:
      json.dump(measure(w, d, rules, FLAGS.reps), fh)
    return
  runs = []
  for run in range(FLAGS.runs):
    path = f"{FLAGS.out}.run{run}.json"
    print(f"run {run + 1}/{FLAGS.runs}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={path}",
                    f"--workers={w}", f"--dims={d}", f"--rules={','.join(rules)}",
                    f"--reps={FLAGS.reps}"], check=True)
    with open(path) as fh:
      runs.append(summarize(json.load(fh), rules))
    os.remove(path)
  f = w // 4
  ideal = 1 + (w - f) / w
  mems = ", ".join(f"{r['mem']:.2f}" for r in runs)
  lines = [
      "# CTMA's cost beyond the rule it wraps", "",
      "Produced by `" + " ".join(["python benchmarks/ctma_overhead.py"] + sys.argv[1:]) + "`",
      f"on a shared 2-core CPU machine, jax {jax.__version__}, backend {jax.default_backend()}: "
      f"W = {w}, d = {d:,}, f = {f}, one [W, d] float32 leaf of N(0, 1) values. Every "
      f"function is jitted and warmed up, then called once per repetition in an order shuffled in "
      f"every repetition; medians "
      f"over {FLAGS.reps} interleaved repetitions, in {len(runs)} process(es) one after the "
      f"other.", "",
      f"Memory pass per run: {mems} ms (the faster of XLA's row-by-row sum and its "
      f"matrix-vector sum). passes = (ctma(X) - X) / memory pass; CTMA's distance pass and "
      f"the mean of the W - f kept rows read about {ideal:.2f} passes.", "",
      "| X | X ms | ctma(X) - X ms | passes per run | passes, median | paired, median |",
      "|---|---:|---:|---|---:|---:|"]

  def row(name, x_ms, extra_ms):
    per_run = ", ".join(f"{r['passes'][name]:.2f}" for r in runs)
    lines.append(
        f"| {name} | {x_ms} | {extra_ms} | {per_run} "
        f"| {statistics.median(r['passes'][name] for r in runs):.2f} "
        f"| {statistics.median(r['paired'][name] for r in runs):.2f} |")

  for spec in rules:
    x_ms = statistics.median(r["med"][spec] for r in runs)
    extra = statistics.median(r["med"][f"ctma({spec})"] - r["med"][spec] for r in runs)
    row(spec, f"{x_ms:.2f}", f"{extra:.2f}")
  for name in COMPONENTS:
    row(name, "-", f"{statistics.median(r['med'][name] for r in runs):.2f}")
  lines += ["", "The last two rows time CTMA's two passes alone (their own time, not a "
            "difference): the distance pass to a point and the mean of W - f given rows."]
  text = "\n".join(lines) + "\n"
  print(text)
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as fh:
    fh.write(text)


if __name__ == "__main__":
  app.run(main)
