r"""Where the time of the distance rules goes on XLA:CPU: their pieces timed apart.

For each cell (rule, W, d, f; float32, ``kernels=cpu``) one process times, as
separately jitted programs on the same rows, median of ``--reps`` calls after
a warm-up call:

* ``rule``: the whole rule (krum, multikrum: the aggregator; nnm: the mixing
  step ``nearest_neighbour_mix``);
* ``centre``: the coordinate-wise median of the first 2f + 1 rows;
* ``gram``: ``pairwise_sqdist`` given that centre (blocked centred products,
  the distances from them);
* ``select``: krum, multikrum: the Krum scores and the selected indices from
  the distances; nnm: the neighbourhood mask and the weights;
* ``final``: krum, multikrum: the mean of the selected rows; nnm: ``mix``
  and the non-finite rows put back;
* ``read``: one read of the rows (a ones-vector product);
* ``new [W, d]``: ``x * 1.0001``, one read and one write to a freshly
  allocated output of the rows' size (what nnm's output costs by itself);
* ``gemm``: the rule's product flops (2 W^2 d; nnm 4 W^2 d) at the machine's
  2048^3 matmul rate, measured in the same process.

With ``--block_bytes``, ``gram`` is also timed with
``distances.GRAM_BLOCK_BYTES`` set to each value (a second table: whether
another block size would serve a shape better).

Then the whole rule runs 3 times under ``jax.profiler`` (a Perfetto trace) and
the ``--top`` XLA operations with the largest summed durations are listed
(per call). The machine is shared: the load average is recorded per cell.

  python benchmarks/distance_profile.py                 # docs/benchmarks/distance_profile.md
  python benchmarks/distance_profile.py --cells=nnm:17:1000000:4 --out=/tmp/p.md
"""
import argparse
import collections
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402

from ftjax import aggregators as agg_lib  # noqa: E402
from ftjax import kernels  # noqa: E402
from ftjax.aggregators import maths, meta  # noqa: E402
from ftjax.kernels import distances, rows  # noqa: E402

CELLS = ["krum:64:65536:8", "multikrum:80:65536:20", "nnm:196:4096:32", "nnm:17:1000000:4",
         "krum:257:10000:64"]
# Trace events that wrap the operations rather than being one.
WRAPPERS = ("ThunkExecutor", "PjitFunction", "$", "Execute", "while", "cond", "call")


def timed(fn, *args, reps):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(ts)


def matmul_rate(reps):
  a = jnp.asarray(np.random.default_rng(0).standard_normal((2048, 2048)), jnp.float32)
  return 2 * 2048 ** 3 / (timed(jax.jit(lambda m: m @ m), a, reps=reps) / 1e3) / 1e9


def pieces(rule, w, f, m):
  """{piece: (jitted function, argument builder from (x, centre, dist, idx))}."""
  k = min(w, 2 * f + 1)
  if rule == "nnm":
    whole = jax.jit(lambda x: meta.nearest_neighbour_mix(x, f))
  else:
    agg = agg_lib.krum(f) if rule == "krum" else agg_lib.multikrum(f, m)
    whole = jax.jit(lambda x: agg(x)[0])

  def select(dist):
    if rule == "nnm":
      d = jnp.where(jnp.eye(w, dtype=bool), -1.0, dist)
      return jnp.where(rows.smallest_mask(d, w - f), 1.0 / (w - f), 0.0).astype(dist.dtype)
    return maths.smallest_indices(maths.krum_scores(dist, f), 1 if rule == "krum" else m)

  def final(x, sel):
    if rule == "nnm":
      finite = jnp.ones((w,), bool)
      return jnp.where(finite[:, None], rows.mix(x, sel, finite), x)
    return maths.mean_of(x, sel)

  return {
      "rule": (whole, lambda a: (a["x"],)),
      "centre": (jax.jit(lambda x: maths.median(x[:k])), lambda a: (a["x"],)),
      "gram": (jax.jit(lambda x, c: rows.pairwise_sqdist(x, c)[0]), lambda a: (a["x"], a["c"])),
      "select": (jax.jit(select), lambda a: (a["dist"],)),
      "final": (jax.jit(final), lambda a: (a["x"], a["sel"])),
      "read": (jax.jit(lambda x: jnp.ones((w,), x.dtype) @ x), lambda a: (a["x"],)),
      "new [W, d]": (jax.jit(lambda x: x * 1.0001), lambda a: (a["x"],)),
  }


def trace_top(fn, x, top):
  """[(op name, ms per call)] of the ``top`` longest XLA operations of 3 calls of fn(x)."""
  jax.block_until_ready(fn(x))
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    for _ in range(3):
      jax.block_until_ready(fn(x))
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(tmp, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as fh:
      events = json.load(fh)
  events = events["traceEvents"] if isinstance(events, dict) else events
  total = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(WRAPPERS):
      total[e["name"]] += e.get("dur", 0)
  return [(name, us / 3e3) for name, us in total.most_common(top)]


def profile(cell, args, rate):
  rule, w, d, f = cell.split(":")
  w, d, f = int(w), int(d), int(f)
  m = w - f if rule == "multikrum" else None
  x = jnp.asarray(np.random.default_rng(w * 7919 + d).standard_normal((w, d)), jnp.float32)
  load = os.getloadavg()[0]
  with kernels.use("cpu"):
    fns = pieces(rule, w, f, m)
    a = {"x": x}
    a["c"] = fns["centre"][0](x)
    a["dist"] = fns["gram"][0](x, a["c"])
    a["sel"] = fns["select"][0](a["dist"])
    ms = {name: timed(fn, *build(a), reps=args.reps) for name, (fn, build) in fns.items()}
    top = trace_top(fns["rule"][0], x, args.top)
    blocks = {}
    default = distances.GRAM_BLOCK_BYTES
    for size in [int(v) for v in args.block_bytes.split(",") if v]:
      distances.GRAM_BLOCK_BYTES = size
      try:  # a fresh jit: the block size is read while tracing
        blocks[size] = timed(jax.jit(lambda v, c: rows.pairwise_sqdist(v, c)[0]), x, a["c"],
                             reps=args.reps)
      finally:
        distances.GRAM_BLOCK_BYTES = default
  flops = (4 if rule == "nnm" else 2) * w * w * d
  ms["gemm"] = 1e3 * flops / (rate * 1e9)
  return {"cell": (rule, w, d, f), "ms": ms, "top": top, "blocks": blocks,
          "load": (load, os.getloadavg()[0])}


def write(args, results, rate):
  cols = ["rule", "centre", "gram", "select", "final", "read", "new [W, d]", "gemm"]
  lines = [
      "# Where the distance rules' time goes (XLA:CPU)", "",
      "Written by `python benchmarks/distance_profile.py " + " ".join(args.argv) + "`.", "",
      f"Milliseconds per call, float32, `kernels=cpu`, median of {args.reps} calls of each "
      "piece jitted on its own (see the script's docstring for what each column runs). "
      f"Machine: {os.cpu_count()} cores, float32 matmul {rate:.0f} GFLOP/s (XLA, 2048^3, "
      "measured in this process); `gemm` is the rule's product flops at that rate. "
      "The machine is shared: the load average (1 min) at the start and end of each "
      "cell is listed; the figures carry that noise.", "",
      "| cell | " + " | ".join(cols) + " | load |",
      "|---|" + "---:|" * len(cols) + "---|"]
  for r in results:
    rule, w, d, f = r["cell"]
    vals = [f"{r['ms'][c]:.2f}" for c in cols]
    lines.append(f"| {rule} W={w} d={d:,} f={f} | " + " | ".join(vals)
                 + f" | {r['load'][0]:.1f}-{r['load'][1]:.1f} |")
  sizes = sorted({b for r in results for b in r["blocks"]})
  if sizes:
    lines += ["", "`gram` with other block sizes (`GRAM_BLOCK_BYTES`; the default is "
              f"{distances.GRAM_BLOCK_BYTES:,} bytes; milliseconds, same process):", "",
              "| cell | " + " | ".join(f"{b:,} B" for b in sizes) + " |",
              "|---|" + "---:|" * len(sizes)]
    for r in results:
      rule, w, d, f = r["cell"]
      lines.append(f"| {rule} W={w} d={d:,} | " + " | ".join(
          f"{r['blocks'][b]:.2f}" if b in r["blocks"] else "-" for b in sizes) + " |")
  lines += ["", "Longest XLA operations of the whole rule (summed over a call, from a "
            "`jax.profiler` Perfetto trace; names as XLA gives them):", ""]
  for r in results:
    rule, w, d, f = r["cell"]
    lines.append(f"* {rule} W={w} d={d:,}: " + ", ".join(
        f"`{name}` {ms:.2f}" for name, ms in r["top"]))
  with open(args.out, "w") as fh:
    fh.write("\n".join(lines) + "\n")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cells", default=",".join(CELLS), help="rule:W:d:f,...")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--top", type=int, default=6)
  p.add_argument("--block_bytes", default="65536,131072,262144,1048576,2097152",
                 help="GRAM_BLOCK_BYTES values to time gram with ('' for none).")
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks",
                                               "distance_profile.md"))
  args = p.parse_args()
  args.argv = sys.argv[1:]
  rate = matmul_rate(args.reps)
  results = []
  for cell in args.cells.split(","):
    results.append(profile(cell, args, rate))
    print(json.dumps({"cell": results[-1]["cell"], "ms": results[-1]["ms"]}), flush=True)
    write(args, results, rate)


if __name__ == "__main__":
  main()
