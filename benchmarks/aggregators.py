r"""Aggregator speed against a memory pass and a straightforward NumPy version.

For every base rule, ctma over every base rule, and every meta-/pre-aggregator
over cwtm, at W workers and d float32 coordinates (f = W // 4, one [W, d]
leaf), it reports milliseconds per jitted call (median of ``--reps`` timed
calls after a warm-up call), side by side in the same run with:

* the memory pass: the fastest single read of the same [W, d] array (the
  lowest of NumPy's ``x.sum(0)``, XLA's ``x.sum(0)`` and XLA's row-by-row sum),
  the hardware bound for any rule that must read every row;
* a straightforward NumPy implementation of the same rule (np.partition /
  np.sort / one Gram matrix) as the peer baseline.

Writes a Markdown table (``--out``).

  python benchmarks/aggregators.py --quick          # W=17, d=1e4 and 1e6
  python benchmarks/aggregators.py --workers=17,65 --dims=1000000 --noresnet --weighted \
      "--rules=avg,cwmed,cwtm,gm,ctma(cwtm)" --np_reps=0 --out=docs/benchmarks/aggregators_weighted.md
  python benchmarks/aggregators.py                  # full grid (slow: tens of minutes)
  python benchmarks/aggregators.py --workers=17 --dims=1000000 --noresnet \
      "--rules=cwtm,ctma(cwtm)" --np_reps=0 --out=/tmp/agg.md   # one cell, no NumPy

``--select_variants`` times the rules once per setting of a constant of
``ftjax.kernels.select`` (the digit width's ``MAX_PACKED_SUMS``, the
network's crossover ``NETWORK_MAX_ROWS``), the settings' calls interleaved,
in a table of its own per cell:

  python benchmarks/aggregators.py --workers=257 --dims=250000 --noresnet \
      --rules=cwtm,cwmed --np_reps=0 \
      --select_variants=MAX_PACKED_SUMS:1,MAX_PACKED_SUMS:2,MAX_PACKED_SUMS:5
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
import numpy as np

from ftjax import aggregators as agg_lib
from ftjax.aggregators import weighted
from ftjax.kernels import rows as rows_lib
from ftjax.kernels import select as select_lib

BASE = ["avg", "cwmed", "cwtm", "gm", "krum", "multikrum", "centered_clipping", "meamed"]
RULES = BASE + [f"ctma({b})" for b in BASE if b != "cwtm"] + [
    "ctma(cwtm)", "nnm(cwtm)", "nnm+ctma(cwtm)", "bucketing(cwtm)", "clip(cwtm)", "arc(cwtm)"]

flags.DEFINE_bool("quick", False, "Only W=17 at d=1e4 and 1e6.")
flags.DEFINE_list("workers", ["17", "65", "257"], "Worker counts W.")
flags.DEFINE_list("dims", ["10000", "1000000"], "Coordinates d.")
flags.DEFINE_bool("resnet", True, "Also W=17 at d=1.1e7 (ResNet-18 size).")
flags.DEFINE_list("rules", RULES, "Specs to time.")
flags.DEFINE_integer("reps", 5, "Timed calls per cell (the median is reported).")
flags.DEFINE_integer("np_reps", 5, "Timed calls of the NumPy baselines (cap to save time; "
                     "0 skips them).")
flags.DEFINE_float("max_gb", 6.0, "Skip (W, d) whose float32 working set would exceed this.")
flags.DEFINE_float("slow_s", 20.0, "A call slower than this is timed once, marked '*'.")
flags.DEFINE_bool("weighted", False, "Also time each rule with unequal per-worker weights "
                  "(weights 1..W; rules with a weighted version only).")
flags.DEFINE_string("out", "docs/benchmarks/aggregators.md", "Markdown output.")
flags.DEFINE_list("select_variants", [], "NAME:VALUE settings of ftjax.kernels.select "
                  "constants, each timed on every rule (interleaved).")
FLAGS = flags.FLAGS


# --------------------------------------------------------------------------
# NumPy peer baselines: what one would write by hand.
# --------------------------------------------------------------------------


def np_cwmed(x, f):
  return np.median(x, axis=0)


def np_cwtm(x, f):
  w = x.shape[0]
  if f == 0:
    return x.mean(0)
  p = np.partition(x, [f - 1, w - f], axis=0)
  return p[f:w - f].mean(0)


def np_meamed(x, f):
  med = np.median(x, axis=0)
  idx = np.argpartition(np.abs(x - med), x.shape[0] - f - 1, axis=0)[:x.shape[0] - f]
  return np.take_along_axis(x, idx, axis=0).mean(0)


def np_gm(x, f, iters=3, nu=0.1):
  z = np.median(x, axis=0)
  for _ in range(iters):
    beta = 1.0 / np.maximum(np.linalg.norm(x - z, axis=1), nu)
    z = beta @ x / beta.sum()
  return z


def np_dist(x):
  c = np.median(x, axis=0)
  y = x - c
  g = y @ y.T
  sq = np.diag(g)
  return np.maximum(sq[:, None] + sq[None] - 2 * g, 0)


def np_multikrum(x, f, m=None):
  w = x.shape[0]
  d = np_dist(x)
  np.fill_diagonal(d, np.inf)
  scores = np.sort(d, axis=1)[:, :w - f - 1].sum(1)
  return x[np.argsort(scores, kind="stable")[:m or w - f]].mean(0)


def np_krum(x, f):
  return np_multikrum(x, f, 1)


def np_cclip(x, f, iters=1):
  # ftjax's defaults: start at the coordinate-wise median, radius = the median distance.
  w = x.shape[0]
  v = np.median(x, axis=0)
  for _ in range(iters):
    diff = x - v
    dist = np.linalg.norm(diff, axis=1)
    tau = np.sort(dist)[(w - 1) // 2]
    scale = np.minimum(1.0, tau / np.maximum(dist, 1e-12))
    v = v + (scale[:, None] * diff).mean(0)
  return v


def np_ctma(base):
  def fn(x, f):
    x0 = base(x, f)
    r = np.linalg.norm(x - x0, axis=1)
    return x[np.argpartition(r, x.shape[0] - f - 1)[:x.shape[0] - f]].mean(0)
  return fn


def np_nnm_rows(x, f):
  d = np_dist(x)
  idx = np.argsort(d, axis=1)[:, :x.shape[0] - f]
  return np.stack([x[i].mean(0) for i in idx])


def np_bucketing(x, f, rng=np.random.default_rng(0)):
  w = x.shape[0]
  s = max(1, w // (2 * f)) if f else 1
  xp = x[rng.permutation(w)]
  means = np.stack([xp[i:i + s].mean(0) for i in range(0, w, s)])
  return np_cwtm(means, f)


def np_clip_rows(x, tau):
  n = np.linalg.norm(x, axis=1)
  return x * np.minimum(1.0, tau / np.maximum(n, 1e-12))[:, None]


def np_arc(x, f):
  w = x.shape[0]
  k = 2 * f * (w - f) // w
  tau = np.sort(np.linalg.norm(x, axis=1))[::-1][k]
  return np_cwtm(np_clip_rows(x, tau), f)


NUMPY = {
    "avg": lambda x, f: x.mean(0), "cwmed": np_cwmed, "cwtm": np_cwtm, "gm": np_gm,
    "krum": np_krum, "multikrum": np_multikrum, "centered_clipping": np_cclip,
    "meamed": np_meamed,
    "nnm(cwtm)": lambda x, f: np_cwtm(np_nnm_rows(x, f), f),
    "nnm+ctma(cwtm)": np_ctma(lambda x, f: np_cwtm(np_nnm_rows(x, f), f)),
    "bucketing(cwtm)": np_bucketing,
    "clip(cwtm)": lambda x, f: np_cwtm(np_clip_rows(x, 1.0), f),
    "arc(cwtm)": np_arc,
}
for _b in BASE:
  NUMPY[f"ctma({_b})"] = np_ctma(NUMPY[_b])


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def _time(fn, reps):
  """Median milliseconds of ``reps`` calls after one warm-up; '*' if slow."""
  tic = time.perf_counter()
  fn()
  first = time.perf_counter() - tic
  if first > FLAGS.slow_s:
    return first * 1e3, True
  times = []
  for _ in range(reps):
    tic = time.perf_counter()
    fn()
    times.append(time.perf_counter() - tic)
  return statistics.median(times) * 1e3, False


def memory_pass(x, xn, reps):
  """Fastest single read of x, and which way achieved it."""
  w = x.shape[0]
  rowsum = jax.jit(lambda a: rows_lib.sum_rows([a[i] for i in range(w)]))
  xla_sum = jax.jit(lambda a: a.sum(0))
  cands = {
      "numpy x.sum(0)": _time(lambda: xn.sum(0), reps)[0],
      "XLA x.sum(0)": _time(lambda: xla_sum(x).block_until_ready(), reps)[0],
      "XLA row sum": _time(lambda: rowsum(x).block_until_ready(), reps)[0],
  }
  best = min(cands, key=cands.get)
  return cands[best], best, cands


def bench_cell(w, d, rules, reps):
  f = w // 4
  x = jax.random.normal(jax.random.key(0), (w, d), jnp.float32)
  xn = np.asarray(x)
  mem, how, cands = memory_pass(x, xn, reps)
  rows = []
  key = jax.random.key(1)
  for spec in rules:
    agg = agg_lib.make_aggregator(spec, f, num_workers=w)
    fn = jax.jit(agg.__call__)
    tic = time.perf_counter()
    fn.lower(x, key).compile()
    compile_s = time.perf_counter() - tic
    ms, slow = _time(lambda: jax.block_until_ready(fn(x, key)), reps)
    np_fn = NUMPY.get(spec)
    np_ms, np_slow = (_time(lambda: np_fn(xn, f), min(reps, FLAGS.np_reps))
                      if np_fn and FLAGS.np_reps > 0
                      else (float("nan"), False))
    weighted_ms = time_weighted(agg, x, key, reps) if FLAGS.weighted else float("nan")
    rows.append(dict(spec=spec, ms=ms, slow=slow, np_ms=np_ms, np_slow=np_slow,
                     compile_s=compile_s, weighted_ms=weighted_ms))
    print(f"W={w} d={d} f={f} {spec:22s} {ms:10.2f} ms{'*' if slow else ' '} "
          f"numpy {np_ms:10.2f} ms  mem {mem:8.2f} ms  compile {compile_s:5.1f} s", flush=True)
  variants = time_variants(x, f, rules, reps) if FLAGS.select_variants else {}
  return dict(w=w, d=d, f=f, mem=mem, how=how, cands=cands, rows=rows, variants=variants)


def time_weighted(agg, x, key, reps):
  """Median ms of ``agg`` with unequal weights 1..W (NaN for a rule without a weighted
  version): the weighted formulas, not the equal-weights shortcut."""
  try:
    weighted.check(agg)
  except ValueError:
    return float("nan")
  weights = jnp.arange(1, x.shape[0] + 1, dtype=jnp.float32)
  fn = jax.jit(lambda x_, k, w_: agg(x_, k, weights=w_))
  return _time(lambda: jax.block_until_ready(fn(x, key, weights)), reps)[0]


def time_variants(x, f, rules, reps):
  """{(spec, variant): median ms}: each rule jitted under each constant setting.

  Every variant is compiled with its setting in place; the timed calls then
  rotate over the variants, so that a slow phase of the machine hits all.
  """
  key = jax.random.key(1)
  fns = {}
  for spec in rules:
    for variant in FLAGS.select_variants:
      name, value = variant.split(":")
      old = getattr(select_lib, name)
      setattr(select_lib, name, int(value))
      try:
        fn = jax.jit(agg_lib.make_aggregator(spec, f, num_workers=x.shape[0]).__call__)
        jax.block_until_ready(fn(x, key))  # traced and compiled under the setting
      finally:
        setattr(select_lib, name, old)
      fns[(spec, variant)] = fn
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      tic = time.perf_counter()
      jax.block_until_ready(fn(x, key))
      times[k].append(time.perf_counter() - tic)
  for k, ts in times.items():
    print(f"W={x.shape[0]} d={x.shape[1]} {k[0]} {k[1]}: {statistics.median(ts) * 1e3:.2f} ms",
          flush=True)
  return {k: statistics.median(ts) * 1e3 for k, ts in times.items()}


def markdown(cells, skipped, command):
  lines = [
      "# Aggregator speed (CPU, float32)", "",
      "Produced by `" + command + "` on the shared 2-core CPU machine",
      f"(jax {jax.__version__}, other jobs running at the same time: medians of "
      f"{FLAGS.reps} calls after a warm-up, NumPy baselines {min(FLAGS.reps, FLAGS.np_reps)}; "
      f"'*' = slower than {FLAGS.slow_s:g} s, timed once).",
      "f = W // 4; one [W, d] float32 leaf. `mem` is the fastest single read of the array",
      "(the hardware bound); `x mem` and `x numpy` are ratios of the rule's time to those.",
      "NumPy baselines are straightforward implementations (np.partition / np.sort / one Gram",
      "matrix); `-` = no NumPy baseline written.",
      "Load average (1, 5, 15 min) when written: " +
      ", ".join(f"{v:.1f}" for v in os.getloadavg()) + ".", ""]
  for c in cells:
    cands = ", ".join(f"{k} {v:.2f} ms" for k, v in c["cands"].items())
    lines += [f"## W={c['w']}, d={c['d']:,}, f={c['f']}", "",
              f"Memory pass: {c['mem']:.2f} ms ({c['how']}; candidates: {cands}).", "",
              "| rule | ms | x mem | numpy ms | x numpy | compile s |"
              + (" weighted ms | x unweighted |" if FLAGS.weighted else ""),
              "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if FLAGS.weighted else "")]
    for r in c["rows"]:
      np_ms = "-" if np.isnan(r["np_ms"]) else f"{r['np_ms']:.2f}{'*' if r['np_slow'] else ''}"
      ratio = "-" if np.isnan(r["np_ms"]) else f"{r['ms'] / r['np_ms']:.2f}"
      line = (f"| {r['spec']} | {r['ms']:.2f}{'*' if r['slow'] else ''} | "
              f"{r['ms'] / c['mem']:.1f} | {np_ms} | {ratio} | {r['compile_s']:.1f} |")
      if FLAGS.weighted:
        wm = r["weighted_ms"]
        line += (" - | - |" if np.isnan(wm) else f" {wm:.2f} | {wm / r['ms']:.2f} |")
      lines.append(line)
    lines.append("")
    if c["variants"]:
      lines += ["Constants of `ftjax.kernels.select`, one setting at a time (interleaved calls):",
                "", "| rule | setting | ms | x mem |", "|---|---|---:|---:|"]
      for (spec, variant), ms in c["variants"].items():
        lines.append(f"| {spec} | {variant} | {ms:.2f} | {ms / c['mem']:.1f} |")
      lines.append("")
  if skipped:
    lines += ["Skipped (float32 working set above --max_gb): " +
              ", ".join(f"W={w} d={d:,}" for w, d in skipped) + ".", ""]
  return "\n".join(lines)


def main(argv):
  del argv
  workers = [int(w) for w in FLAGS.workers]
  dims = [int(float(d)) for d in FLAGS.dims]
  grid = [(w, d) for w in workers for d in dims]
  if FLAGS.quick:
    grid = [(17, 10_000), (17, 1_000_000)]
  elif FLAGS.resnet:
    grid.append((17, 11_000_000))
  cells, skipped = [], []
  for w, d in sorted(grid, key=lambda wd: wd[0] * wd[1]):  # small cells first
    # Input, NumPy copy, one [W, d] temporary (Gram centring, sort) and slack.
    if 4 * w * d * 4 / 2**30 > FLAGS.max_gb:
      skipped.append((w, d))
      continue
    cells.append(bench_cell(w, d, FLAGS.rules, FLAGS.reps))
    write(cells, skipped)  # after every cell, so a stopped run leaves its tables
  print(write(cells, skipped))


def write(cells, skipped):
  command = "python benchmarks/aggregators.py " + " ".join(sys.argv[1:])
  text = markdown(cells, skipped, command.strip())
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as fh:
    fh.write(text)
  return text


if __name__ == "__main__":
  app.run(main)
