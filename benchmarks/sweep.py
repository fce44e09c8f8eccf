r"""Sweep engine speed: one sweep process against separate runs; seeds batched against in turn.

  python benchmarks/sweep.py --num_steps=100 --reps=1 --batch_reps=5

(a) The 24 runs of configs/sweeps/default_24.py (4 attacks x 3 rules x 2 seeds of
    the default config) as one `python -m ftjax.sweep` process against the same 24
    runs as separate `python main.py` processes, one after the other; wall time of
    each side, ratio sweep / separate. With --reps > 1 the two sides alternate
    which goes first.
(b) In one process, R seeds of one config as one vmapped program
    (train.make_chunk_fn(runs=True)) against the same R seeds' chunks run one after
    the other through the unbatched program: compiled first, then interleaved timed
    repetitions; medians; speed-up = time in turn / time batched. For the default
    config (digits) and simple_mnist on MNIST-shaped synthetic data.

The script uses whatever backend JAX picks; off CPU it writes
docs/benchmarks/sweep_<backend>.md unless --out is given.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top

from configs import default  # pylint: disable=g-import-not-at-top
from configs.sweeps import default_24  # pylint: disable=g-import-not-at-top
from ftjax import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
from ftjax import train  # pylint: disable=g-import-not-at-top
from synthetic import synthetic_dataset  # pylint: disable=g-import-not-at-top,g-bad-import-order

flags.DEFINE_integer("num_steps", 100, "Rounds per run in (a), both sides (the default "
                     "config has 600).")
flags.DEFINE_integer("reps", 1, "Repetitions of (a), alternating which side goes first.")
flags.DEFINE_integer("batch_reps", 5, "Timed repetitions of each side in (b).")
flags.DEFINE_string("out", "docs/benchmarks/sweep.md", "Markdown output.")
flags.DEFINE_bool("skip_processes", False, "Only part (b).")
FLAGS = flags.FLAGS


def _time(cmd) -> float:
  tic = time.perf_counter()
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if out.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
  return time.perf_counter() - tic


def sweep_vs_processes(num_steps: int, reps: int) -> list[dict]:
  """Part (a): wall seconds of the sweep process and of the 24 main.py processes."""
  spec = default_24.get_config()
  runs = [r for c in sweep_lib.expand(spec).cells for r in c.runs]
  out = []
  for rep in range(reps):
    tmp = tempfile.mkdtemp(prefix="ftjax_sweep_bench_")
    sweep_cmd = [sys.executable, "-m", "ftjax.sweep", "--sweep=configs/sweeps/default_24.py",
                 f"--workdir={tmp}/sweep", f"--sweep.overrides.num_steps={num_steps}"]

    def separate():
      total = 0.0
      for i, run in enumerate(runs):
        total += _time([sys.executable, "main.py", "--config=configs/default.py",
                        f"--workdir={tmp}/run{i}", f"--config.num_steps={num_steps}",
                        f"--config.seed={run.seed}", "--config.progress=False",
                        f"--config.attack.name={run.config.attack.name}",
                        f"--config.aggregator.name={run.config.aggregator.name}"])
      return total

    sides = [("sweep", lambda: _time(sweep_cmd)), ("separate", separate)]
    if rep % 2:
      sides.reverse()
    times = {}
    for name, fn in sides:
      times[name] = fn()
      print(f"rep {rep}: {name} {times[name]:.1f} s", flush=True)
    out.append(times)
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def batched_vs_in_turn(config, dataset, num_runs: int, length: int, reps: int) -> dict:
  """Part (b): seconds per chunk of ``length`` rounds for R seeds, batched and in turn."""
  setup = train.build(config, dataset)
  data = train.make_device_data(setup)
  single = train.make_chunk_fn(setup, config.loop)
  batched = train.make_chunk_fn(setup, config.loop, runs=True)
  alone = [train.init_state(setup, s) for s in range(1, num_runs + 1)]
  stacked = train.init_states(setup, list(range(1, num_runs + 1)))
  run_single = single(alone[0], data, length).run
  run_batched = batched(stacked, data, length).run
  for i in range(num_runs):  # warm up
    alone[i], m = run_single(alone[i], data)
    jax.block_until_ready(m)
  stacked, m = run_batched(stacked, data)
  jax.block_until_ready(m)
  in_turn, together = [], []
  for _ in range(reps):
    tic = time.perf_counter()
    for i in range(num_runs):
      alone[i], m = run_single(alone[i], data)
      jax.block_until_ready(m)
    in_turn.append(time.perf_counter() - tic)
    tic = time.perf_counter()
    stacked, m = run_batched(stacked, data)
    jax.block_until_ready(m)
    together.append(time.perf_counter() - tic)
  a, b = statistics.median(in_turn), statistics.median(together)
  return {"in_turn_s": a, "batched_s": b, "speedup": a / b,
          "steps_per_sec_in_turn": num_runs * length / a,
          "steps_per_sec_batched": num_runs * length / b}


def main(argv):
  del argv
  backend = jax.default_backend()
  out_path = FLAGS.out
  if backend != "cpu" and not FLAGS["out"].present:
    out_path = f"docs/benchmarks/sweep_{backend}.md"
  device = jax.devices()[0].device_kind
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  lines = ["# Sweep engine speed", "",
           f"Measured with `python benchmarks/sweep.py --num_steps={FLAGS.num_steps} "
           f"--reps={FLAGS.reps} --batch_reps={FLAGS.batch_reps}` on {os.cpu_count()} CPU "
           f"cores, JAX {jax.__version__}, backend {backend} ({device}). The machine was shared "
           f"with other jobs (load average {load:.1f} at the start), so the absolute times are "
           f"inflated and noisy; the two sides of each comparison ran under the same load.", ""]

  if not FLAGS.skip_processes:
    times = sweep_vs_processes(FLAGS.num_steps, FLAGS.reps)
    sweep_s = statistics.median(t["sweep"] for t in times)
    separate_s = statistics.median(t["separate"] for t in times)
    lines += ["## (a) One sweep process against 24 separate runs", "",
              f"The 24 runs of `configs/sweeps/default_24.py` (attacks alie, sf, ipm, lf x "
              f"rules ctma(cwtm), ctma(cwmed), ctma(gm) x seeds 1, 2; the default config with "
              f"num_steps={FLAGS.num_steps} instead of 600 on both sides) as "
              f"`python -m ftjax.sweep ... --sweep.overrides.num_steps={FLAGS.num_steps}` "
              f"against 24 `python main.py --config=configs/default.py "
              f"--config.num_steps={FLAGS.num_steps} ...` processes run one after the other. "
              f"Wall time of each side (median of {FLAGS.reps}), including start-up and "
              f"compilation.", "",
              "| side | wall s |", "|---|---|",
              f"| one sweep process (2 seeds batched per cell) | {sweep_s:.1f} |",
              f"| 24 main.py processes | {separate_s:.1f} |",
              f"| ratio sweep / separate | {sweep_s / separate_s:.2f} |", ""]
    print("\n".join(lines[-8:]), flush=True)

  c = default.get_config()
  c.progress = False
  mnist_config = default.get_config()
  mnist_config.progress = False
  mnist = synthetic_dataset((28, 28, 1))
  cases = [("default (digits 8x8, simple_mnist, W=17, f=8)", c, None, 50),
           ("simple_mnist on MNIST-shaped synthetic data (28x28, W=17, f=8)", mnist_config,
            mnist, 10)]
  rows = []
  for name, config, dataset, length in cases:
    for num_runs in (2, 4):
      r = batched_vs_in_turn(config, dataset, num_runs, length, FLAGS.batch_reps)
      print(name, num_runs, r, flush=True)
      rows.append(f"| {name} | {num_runs} | {length} | {r['in_turn_s']:.2f} | "
                  f"{r['batched_s']:.2f} | {r['steps_per_sec_in_turn']:.1f} | "
                  f"{r['steps_per_sec_batched']:.1f} | {r['speedup']:.2f} |")
  lines += ["## (b) R seeds in one program against the same seeds in turn", "",
            "One process; the unbatched chunk program and the batched one (the round vmapped "
            "over a leading runs axis, `train.make_chunk_fn(setup, runs=True)`) are compiled "
            "and warmed up first. Each repetition runs one chunk of each of the R seeds in "
            "turn through the unbatched program, then one chunk of all R seeds batched; "
            f"medians over {FLAGS.batch_reps} interleaved repetitions. speed-up = time in "
            "turn / time batched (above 1: batching is faster).", "",
            "| config | R | rounds per chunk | in turn s | batched s | rounds/s in turn | "
            "rounds/s batched | speed-up |", "|---|---|---|---|---|---|---|---|", *rows, ""]
  with open(os.path.join(ROOT, out_path), "w") as fh:
    fh.write("\n".join(lines))
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
