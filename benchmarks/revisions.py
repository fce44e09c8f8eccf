r"""Speed of two revisions of ftjax side by side: training steps and aggregators.

Checks a base revision out into a temporary git worktree and times the same
rows in both trees, each measurement in a fresh child process, with the two
revisions' processes interleaved (A, B, A, B, ...) so that a slow phase of a
shared machine hits both alike. Reports the median of the repetitions and the
ratio new / base.

Rows (float32, MNIST-shaped synthetic data):

* training steps per second of simple_mnist at each ``--step_workers`` W
  (f = (W - 1) // 2, b=16) with
  ctma(cwtm): mu2sgd under sign flipping (every worker computes), mu2sgd
  under ALIE (only the honest ones do), momentum under sign flipping;
* milliseconds per call of every aggregator of ``benchmarks/aggregators.py``
  at d=1e6 coordinates for each ``--workers`` (f = W // 4; an entry ``WxD``
  sets its own d), with the time of one read of the same [W, d] array (the
  faster of XLA's ones-vector product and NumPy's ``x.sum(0)``) timed in the
  same process.

  python benchmarks/revisions.py --base=HEAD~5            # writes docs/benchmarks/revisions.md
  python benchmarks/revisions.py --base=v0.1 --reps=2 --noaggregators
  python benchmarks/revisions.py --base=af7d99b --noaggregators --step_workers=257 \
      --step_rows="mu2sgd sf"                    # one row at a large W
  python benchmarks/revisions.py --base=main --nosteps --rules=cwtm,cwmed \
      --workers=17,65,257,257x10000 --reps=5       # order statistics at large W

Both revisions must expose ``train.build``, ``init_state``,
``make_device_data``, ``make_chunk_fn`` and ``aggregators.make_aggregator``.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("base", None, "The revision to compare against (any git revision).")
flags.DEFINE_integer("reps", 3, "Interleaved repetitions per revision (medians are reported).")
flags.DEFINE_bool("steps", True, "Time the training-step rows.")
flags.DEFINE_bool("aggregators", True, "Time the aggregator rows.")
flags.DEFINE_list("workers", ["17", "65"], "Worker counts of the aggregator rows; "
                  "WxD also sets the coordinates of that row (default --dim).")
flags.DEFINE_list("step_workers", ["17"], "Worker counts of the training-step rows (f = W // 2 "
                  "rounded down below W / 2: 8 at W=17).")
flags.DEFINE_list("step_rows", ["mu2sgd sf", "mu2sgd alie", "momentum sf"],
                  "Training-step rows to time ('estimator attack').")
flags.DEFINE_integer("dim", 1_000_000, "Coordinates of the aggregator rows.")
flags.DEFINE_list("rules", [], "Aggregator specs to time (default: every rule of "
                  "benchmarks/aggregators.py).")
flags.DEFINE_string("out", "docs/benchmarks/revisions.md", "Markdown output.")
flags.mark_flag_as_required("base")
FLAGS = flags.FLAGS


# The child runs inside one revision's tree; it only uses API both revisions have.
_STEP_CHILD = textwrap.dedent("""
    import json, os, statistics, sys, time
    sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "benchmarks")]
    import jax, jax.numpy as jnp
    from configs import default
    from ftjax import train
    from synthetic import synthetic_dataset
    out = {}
    w = int(sys.argv[2])
    for estimator, attack in json.loads(sys.argv[1]):
      c = default.get_config()
      c.progress = False
      c.workers.num, c.workers.byzantine, c.workers.batch_size = w, (w - 1) // 2, 16
      c.model.name = "simple_mnist"
      c.optim.estimator, c.attack.name = estimator, attack
      c.aggregator.name, c.aggregator.meta = "cwtm", "ctma"
      c.devices = 1
      dataset = synthetic_dataset((28, 28, 1), num_train=max(4096, 16 * w))
      setup = train.build(c, dataset)
      state = train.init_state(setup, c.seed)
      data = train.make_device_data(setup)
      run = train.make_chunk_fn(setup, "auto")(state, data, 10).run
      state, m = run(state, data); jax.block_until_ready(m)
      times = []
      for _ in range(5):
        tic = time.perf_counter()
        state, m = run(state, data); jax.block_until_ready(m)
        times.append(time.perf_counter() - tic)
      out[f"{estimator} {attack}"] = 10 / statistics.median(times)
    print("RESULT " + json.dumps(out))
    """)

_AGG_CHILD = textwrap.dedent("""
    import importlib.util, json, os, statistics, sys, time
    sys.path[:0] = [os.getcwd()]
    import jax, jax.numpy as jnp
    import numpy as np
    from ftjax import aggregators
    spec = importlib.util.spec_from_file_location(
        "aggregator_bench", os.path.join("benchmarks", "aggregators.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    w, d = int(sys.argv[1]), int(sys.argv[2])
    specs = json.loads(sys.argv[3]) or bench.RULES
    x = jax.random.normal(jax.random.key(0), (w, d), jnp.float32)
    key = jax.random.key(1)
    xn = np.asarray(x)
    ones = jnp.ones((w,), jnp.float32)
    matvec = jax.jit(lambda v, o: o @ v)
    jax.block_until_ready(matvec(x, ones))
    reads = []
    for _ in range(5):
      tic = time.perf_counter()
      jax.block_until_ready(matvec(x, ones))
      t_xla = time.perf_counter() - tic
      tic = time.perf_counter()
      xn.sum(0)
      reads.append(min(t_xla, time.perf_counter() - tic))
    out = {"one read": 1e3 * statistics.median(reads)}
    for spec in specs:
      fn = jax.jit(aggregators.make_aggregator(spec, w // 4))
      jax.block_until_ready(fn(x, key))
      times = []
      for _ in range(5):
        tic = time.perf_counter()
        jax.block_until_ready(fn(x, key))
        times.append(time.perf_counter() - tic)
      out[spec] = 1e3 * statistics.median(times)
    print("RESULT " + json.dumps(out))
    """)


def _child(tree: str, script: str, *args: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)  # one CPU device in both trees
  proc = subprocess.run([sys.executable, "-c", script, *args], cwd=tree, env=env,
                        capture_output=True, text=True, timeout=3600)
  if proc.returncode != 0:
    raise RuntimeError(f"child in {tree} failed:\n{proc.stderr[-3000:]}")
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def _matmul_rate() -> float:
  """The machine's float32 matmul rate in GFLOP/s (XLA, 2048^3, best of 5), in a child."""
  script = textwrap.dedent("""
      import time, jax, jax.numpy as jnp
      a = jnp.ones((2048, 2048), jnp.float32); f = jax.jit(jnp.matmul)
      f(a, a).block_until_ready(); best = float("inf")
      for _ in range(5):
        tic = time.perf_counter(); f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - tic)
      print("RESULT", 2 * 2048 ** 3 / best / 1e9)
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       check=True).stdout
  return float(out.split("RESULT")[-1])


def _rev(tree: str, rev: str = "HEAD") -> str:
  return subprocess.run(["git", "rev-parse", "--short", rev], cwd=tree, capture_output=True,
                        text=True, check=True).stdout.strip()


def _table(title, unit, better, base_runs, new_runs, per=None):
  """Medians per row; with ``per``, also each tree's median in units of that row."""
  extra = f" base / {per} | new / {per} |" if per else ""
  lines = [f"## {title}", "", f"| row | base {unit} | new {unit} | new / base |" + extra
           + " every process (base; new) |",
           "|---|---:|---:|---:|" + ("---:|---:|" if per else "") + "---|"]
  med = {k: {n: statistics.median(r[n] for r in runs) for n in runs[0]}
         for k, runs in (("base", base_runs), ("new", new_runs))}
  for name in [k for k in base_runs[0] if k in new_runs[0]]:
    b, n = med["base"][name], med["new"][name]
    ratio = n / b if better == "higher" else b / n
    row = f"| {name} | {b:.2f} | {n:.2f} | {ratio:.3f} |"
    if per:
      row += f" {b / med['base'][per]:.1f} | {n / med['new'][per]:.1f} |"
    every = "; ".join(", ".join(f"{r[name]:.2f}" for r in runs)
                      for runs in (base_runs, new_runs))
    lines.append(row + f" {every} |")
  lines += ["", f"Ratio > 1: the new tree is faster ({unit}, {better} is better; "
            f"medians of {len(base_runs)} interleaved runs).", ""]
  return lines


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    base_tree = os.path.join(tmp, "base")
    subprocess.run(["git", "worktree", "add", "--detach", base_tree, FLAGS.base], cwd=ROOT,
                   check=True, capture_output=True)
    try:
      trees = {"base": base_tree, "new": ROOT}
      lines = ["# Two revisions side by side", "",
               f"Produced by `python {' '.join(sys.argv)}` "
               f"(base tree at {_rev(base_tree)}; new: the working tree). One CPU device, "
               f"float32; every measurement in its own process, the two trees' processes "
               f"interleaved; {os.cpu_count()} CPU cores, jax as installed, float32 "
               f"matmul {_matmul_rate():.0f} GFLOP/s (2048^3, XLA). Load average "
               f"(1, 5, 15 min) at the start: "
               f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}.", ""]
      for w in FLAGS.step_workers if FLAGS.steps else ():
        runs = {"base": [], "new": []}
        for rep in range(FLAGS.reps):
          for name in ("base", "new") if rep % 2 == 0 else ("new", "base"):
            rows = [row.split() for row in FLAGS.step_rows]
            runs[name].append(_child(trees[name], _STEP_CHILD, json.dumps(rows), w))
            print(f"steps W={w} rep {rep} {name}: {runs[name][-1]}", flush=True)
        lines += _table(f"Training steps, simple_mnist, W={w}, f={(int(w) - 1) // 2}, b=16, "
                        f"ctma(cwtm)", "steps/s", "higher", runs["base"], runs["new"])
      if FLAGS.aggregators:
        for cell in FLAGS.workers:
          w, _, d = cell.partition("x")
          d = int(float(d)) if d else FLAGS.dim
          runs = {"base": [], "new": []}
          for rep in range(FLAGS.reps):
            for name in ("base", "new") if rep % 2 == 0 else ("new", "base"):
              runs[name].append(_child(trees[name], _AGG_CHILD, w, str(d),
                                       json.dumps(FLAGS.rules)))
              print(f"aggregators W={w} d={d} rep {rep} {name}: {runs[name][-1]}", flush=True)
          lines += _table(f"Aggregators, W={w}, d={d:,}, f={int(w) // 4}", "ms",
                          "lower", runs["base"], runs["new"], per="one read")
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=ROOT,
                     capture_output=True)
  lines += ["Load average (1, 5, 15 min) at the end: " +
            ", ".join(f"{v:.1f}" for v in os.getloadavg()) + ".", ""]
  with open(os.path.join(ROOT, FLAGS.out), "w") as fh:
    fh.write("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
