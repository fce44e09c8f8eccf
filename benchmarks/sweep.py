r"""Sweep engine speed: one sweep process against separate runs; seeds batched against in turn.

  python benchmarks/sweep.py --num_steps=100 --reps=1 --batch_reps=5

(a) The 24 runs of configs/sweeps/default_24.py (4 attacks x 3 rules x 2 seeds of
    the default config) as one `python -m ftjax.sweep` process against the same 24
    runs as separate `python main.py` processes, one after the other; wall time of
    each side, ratio sweep / separate. A third side is the sweep with
    share_programs=False (every cell compiles its own round). With --reps > 1 the
    sides rotate which goes first.
(b) In one process, R seeds of one config as one program (train.make_chunk_fn(runs=True),
    with the runs vmapped, looped inside the program and unrolled) against the same
    R seeds' chunks run one after the other through the unbatched program: compiled
    first, then interleaved timed repetitions; medians; speed-up = time in turn / time
    in the program of R runs. For the default config (digits) and simple_mnist on
    MNIST-shaped synthetic data.

The script uses whatever backend JAX picks; off CPU it writes
docs/benchmarks/sweep_<backend>.md unless --out is given.
"""

import os
import resource
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
from ftjax import policy  # pylint: disable=g-import-not-at-top
from ftjax import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
from ftjax import train  # pylint: disable=g-import-not-at-top
from synthetic import synthetic_dataset  # pylint: disable=g-import-not-at-top,g-bad-import-order

LAYOUTS = policy.RUNS_LAYOUTS  # make_chunk_fn(runs=True, runs_layout=...)

flags.DEFINE_integer("num_steps", 100, "Rounds per run in (a), both sides (the default "
                     "config has 600).")
flags.DEFINE_integer("reps", 1, "Repetitions of (a), alternating which side goes first.")
flags.DEFINE_integer("batch_reps", 5, "Timed repetitions of each side in (b).")
flags.DEFINE_string("out", "docs/benchmarks/sweep.md", "Markdown output.")
flags.DEFINE_bool("skip_processes", False, "Only part (b).")
flags.DEFINE_bool("skip_batching", False, "Only part (a).")
FLAGS = flags.FLAGS


def _children_cpu() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def _time(cmd) -> tuple[float, float]:
  """Wall seconds and CPU seconds (user + system) of one child process."""
  tic, cpu = time.perf_counter(), _children_cpu()
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if out.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
  return time.perf_counter() - tic, _children_cpu() - cpu


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
      wall = cpu = 0.0
      for i, run in enumerate(runs):
        w, c = _time([sys.executable, "main.py", "--config=configs/default.py",
                      f"--workdir={tmp}/run{i}", f"--config.num_steps={num_steps}",
                      f"--config.seed={run.seed}", "--config.progress=False",
                      f"--config.attack.name={run.config.attack.name}",
                      f"--config.aggregator.name={run.config.aggregator.name}"])
        wall, cpu = wall + w, cpu + c
      return wall, cpu

    sides = [("sweep", lambda: _time(sweep_cmd)), ("separate", separate),
             ("unshared", lambda: _time([a.replace(f"{tmp}/sweep", f"{tmp}/unshared")
                                         for a in sweep_cmd] + ["--sweep.share_programs=False"]))]
    sides = sides[rep % 3:] + sides[:rep % 3]
    times = {}
    for name, fn in sides:
      times[name], times[name + "_cpu"] = fn()
      print(f"rep {rep}: {name} {times[name]:.1f} s wall, {times[name + '_cpu']:.1f} s CPU",
            flush=True)
    out.append(times)
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def _batched_program(setup, loop, stacked, data, length, layout: str):
  """The runs=True chunk with the runs in ``layout`` (make_chunk_fn's runs_layout)."""
  return train.make_chunk_fn(setup, loop, runs=True, runs_layout=layout)(
      stacked, data, length).run


def batched_vs_in_turn(config, dataset, num_runs: int, length: int, reps: int) -> dict:
  """Part (b): seconds per chunk of ``length`` rounds for R seeds, in one program and in turn."""
  setup = train.build(config, dataset)
  data = train.make_device_data(setup)
  single = train.make_chunk_fn(setup, config.loop)
  alone = [train.init_state(setup, s) for s in range(1, num_runs + 1)]
  seeds = list(range(1, num_runs + 1))
  stacked = {mode: train.init_states(setup, seeds) for mode in LAYOUTS}
  programs = {mode: _batched_program(setup, config.loop, stacked[mode], data, length,
                                     mode) for mode in stacked}
  run_single = single(alone[0], data, length).run
  for i in range(num_runs):  # warm up
    alone[i], m = run_single(alone[i], data)
    jax.block_until_ready(m)
  for mode, run in programs.items():
    stacked[mode], m = run(stacked[mode], data)
    jax.block_until_ready(m)
  times = {"in_turn": [], **{mode: [] for mode in LAYOUTS}}
  for _ in range(reps):
    tic = time.perf_counter()
    for i in range(num_runs):
      alone[i], m = run_single(alone[i], data)
      jax.block_until_ready(m)
    times["in_turn"].append(time.perf_counter() - tic)
    for mode, run in programs.items():
      tic = time.perf_counter()
      stacked[mode], m = run(stacked[mode], data)
      jax.block_until_ready(m)
      times[mode].append(time.perf_counter() - tic)
  med = {k: statistics.median(v) for k, v in times.items()}
  return {"in_turn_s": med["in_turn"], **{f"{m}_s": med[m] for m in LAYOUTS},
          **{f"speedup_{m}": med["in_turn"] / med[m] for m in LAYOUTS},
          "steps_per_sec_in_turn": num_runs * length / med["in_turn"]}


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
    sweep_cpu = statistics.median(t["sweep_cpu"] for t in times)
    separate_cpu = statistics.median(t["separate_cpu"] for t in times)
    unshared_s = statistics.median(t["unshared"] for t in times)
    unshared_cpu = statistics.median(t["unshared_cpu"] for t in times)
    each = "; ".join(f"{t['sweep']:.0f} s / {t['unshared']:.0f} s / {t['separate']:.0f} s"
                     for t in times)
    lines += ["## (a) One sweep process against 24 separate runs", "",
              f"The 24 runs of `configs/sweeps/default_24.py` (attacks alie, sf, ipm, lf x "
              f"rules ctma(cwtm), ctma(cwmed), ctma(gm) x seeds 1, 2; the default config with "
              f"num_steps={FLAGS.num_steps} instead of 600 on both sides) as "
              f"`python -m ftjax.sweep ... --sweep.overrides.num_steps={FLAGS.num_steps}` "
              f"against 24 `python main.py --config=configs/default.py "
              f"--config.num_steps={FLAGS.num_steps} ...` processes run one after the other. "
              f"The sweep runs as it does by default: each cell's 2 seeds in one program, "
              f"and cells that differ only in their attack sharing one compiled round "
              f"(6 chunk programs for the 12 cells); the same sweep with "
              f"`--sweep.share_programs=False` compiles one per cell. "
              f"Wall time and CPU time (user + system of the child processes) of each side, "
              f"medians of {FLAGS.reps} repetitions that rotate which side goes first "
              f"(wall sweep / unshared sweep / separate per repetition: {each}), including "
              f"start-up and compilation. On a shared machine the CPU time is the steadier "
              f"of the two.", "",
              "| side | wall s | CPU s | wall / separate | CPU / separate |",
              "|---|---|---|---|---|",
              f"| one sweep process | {sweep_s:.1f} | {sweep_cpu:.1f} | "
              f"{sweep_s / separate_s:.2f} | {sweep_cpu / separate_cpu:.2f} |",
              f"| one sweep process, share_programs=False | {unshared_s:.1f} | "
              f"{unshared_cpu:.1f} | {unshared_s / separate_s:.2f} | "
              f"{unshared_cpu / separate_cpu:.2f} |",
              f"| 24 main.py processes | {separate_s:.1f} | {separate_cpu:.1f} | 1 | 1 |", ""]
    print("\n".join(lines[-8:]), flush=True)

  if FLAGS.skip_batching:
    with open(os.path.join(ROOT, out_path), "w") as fh:
      fh.write("\n".join(lines))
    print(f"wrote {out_path}")
    return
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
                  + " | ".join(f"{r[m + '_s']:.2f}" for m in LAYOUTS) + " | "
                  + " | ".join(f"{r['speedup_' + m]:.2f}" for m in LAYOUTS) + " |")
  chosen = ", ".join(f"`{policy.runs_layout(r)}` for R={r}" for r in (2, 4))
  lines += ["## (b) R seeds in one program against the same seeds in turn", "",
            "One process; the unbatched chunk program and the program of R runs "
            "(`train.make_chunk_fn(setup, runs=True)`, the state stacked on a leading runs "
            "axis) are compiled and warmed up first, the latter in each of its layouts "
            "(`runs_layout`): the round vmapped over the runs (`vmap`), the runs looped one "
            "after another inside the program (`map`, a `lax.map`), and one copy of the round "
            "per run (`unroll`). Each repetition runs one chunk of each of the R "
            "seeds in turn through the unbatched program, then one chunk of all R seeds "
            f"through each program of R runs; medians over {FLAGS.batch_reps} interleaved "
            "repetitions. speed-up = time in turn / time in the program of R runs (above 1: "
            f"faster). On this backend `ftjax.policy.runs_layout` picks "
            f"{chosen}.",
            "",
            "| config | R | rounds per chunk | in turn s | "
            + " | ".join(f"{m} s" for m in LAYOUTS) + " | "
            + " | ".join(f"speed-up {m}" for m in LAYOUTS) + " |",
            "|---|---|---|---|" + "---|" * (2 * len(LAYOUTS)), *rows, ""]
  with open(os.path.join(ROOT, out_path), "w") as fh:
    fh.write("\n".join(lines))
  print(f"wrote {out_path}")


if __name__ == "__main__":
  app.run(main)
