r"""How the training round scales with the number of workers W on one device.

simple_mnist on MNIST-shaped synthetic data (benchmarks/synthetic.py), b=16,
float32, mu2sgd with ctma(cwtm), sign flipping (every worker computes its
gradients), f = W // 4. Each configuration runs in its own child process,
which compiles the chunk of rounds ahead of time (the compile seconds), reads
XLA's memory analysis of the compiled programs, runs one untimed chunk (small W
only) and then times chunks of a few rounds. The configurations run
interleaved, ``--reps`` times over, and the medians are reported, so that a
change in the machine's load hits every configuration alike.

Three tables:

* W = 17, 65, 257, 1024 with the default loop and kernels (``loop=auto``,
  ``kernels=auto``), unchunked and in chunks of 64 and 16 workers (``workers.chunk``):
  steps/s, seconds per worker-round relative to W = 17, compile seconds and
  memory;
* the loop and kernel choices at W = 65 and 257: the chunked round in the host
  loop, and the plain kernels unchunked (the scan with unchunked or plain
  convolutions is left out: XLA:CPU's slow path in a loop body, docs/performance.md);
* memory of simple_cifar10 (32x32x3 inputs, larger activations), compiled only.

Writes docs/benchmarks/scaling.md.

  python benchmarks/scaling.py                   # everything (about half an hour per
                                                 # repetition on 2 loaded cores)
  python benchmarks/scaling.py --quick           # W = 17 and 65 only, one repetition
  python benchmarks/scaling.py --from_log=LOG     # the tables from a run's printed output
"""

import ast
import json
import os
import re
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_bool("quick", False, "W = 17 and 65 only, one repetition (checks the script).")
flags.DEFINE_integer("reps", 3, "Interleaved repetitions of every configuration.")
flags.DEFINE_string("child", "", "Internal: run this JSON configuration and print its result.")
flags.DEFINE_string("only", "", "Comma-separated table names to run (w, loops, memory).")
flags.DEFINE_string("out", "docs/benchmarks/scaling.md", "Markdown output.")
flags.DEFINE_list("workers", [], "Only these worker counts (default: all of the tables').")
flags.DEFINE_list("chunks", [], "Above 64 workers, only these chunk settings (0, 64, unset).")
flags.DEFINE_string("from_log", "", "Render the tables from the printed output of an earlier "
                    "(possibly unfinished) run instead of measuring.")
FLAGS = flags.FLAGS

_MIB = 2.0**20


def _rounds(workers):
  """Timed rounds per chunk: a few, so that a loaded machine finishes the table."""
  return 6 if workers <= 17 else 3 if workers <= 65 else 2 if workers <= 257 else 1


def run_child(spec):
  """Builds, compiles and times one configuration; returns its figures."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from configs import default
  from ftjax import train
  from synthetic import synthetic_dataset  # pylint: disable=g-bad-import-order

  w = spec["workers"]
  shape = tuple(spec.get("shape", (28, 28, 1)))
  c = default.get_config()
  c.progress = False
  c.workers.num, c.workers.byzantine, c.workers.batch_size = w, w // 4, 16
  c.workers.chunk = spec.get("chunk", 0)  # None: unset, the backend's choice
  c.model.name = spec.get("model", "simple_mnist")
  c.kernels = spec.get("kernels", "auto")
  c.attack.name = "sf"
  dataset = synthetic_dataset(shape, num_train=max(4096, 16 * w))
  setup = train.build(c, dataset)
  state = train.init_state(setup, c.seed)
  data = train.DeviceData(jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels))
  length = spec.get("rounds", _rounds(w))
  tic = time.perf_counter()
  compiled = train.make_chunk_fn(setup, spec.get("loop", "auto"))(
      state, data, length)
  compile_s = time.perf_counter() - tic
  # The largest compiled program (the scanned chunk, or the host loop's round).
  analyses = [p.memory_analysis() for p in compiled.executables]
  peak = max(analyses, key=lambda m: m.temp_size_in_bytes)
  result = {"compile_s": compile_s, "loop": compiled.loop, "rounds": length,
            "temp_mib": peak.temp_size_in_bytes / _MIB,
            "args_mib": peak.argument_size_in_bytes / _MIB,
            "out_mib": peak.output_size_in_bytes / _MIB,
            "gflop_per_step": compiled.flops_per_step / 1e9,
            "d": sum(int(x.size) for x in jax.tree.leaves(state.params))}
  if spec.get("run", True):
    if w <= 65:  # an untimed chunk first; larger W take long enough per round without
      state, metrics = compiled.run(state, data)
      jax.block_until_ready(metrics)
    times = []
    for _ in range(spec.get("chunks", 1)):
      tic = time.perf_counter()
      state, metrics = compiled.run(state, data)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - tic)
    result["steps_per_sec"] = length / statistics.median(times)
  return result


def _child(spec):
  cmd = [sys.executable, os.path.abspath(__file__), "--child=" + json.dumps(spec)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise SystemExit(f"{json.dumps(spec)} failed:\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def _label(spec):
  keys = ("model", "workers", "chunk", "loop", "kernels")
  return ", ".join(f"{k}={spec[k]}" for k in keys if k in spec)


def _specs(quick, only):
  """The tables' configurations; ``once``: deterministic (compile only) or too long to repeat."""
  w_values = (17, 65) if quick else (17, 65, 257, 1024)
  tables = {"w": [], "loops": [], "memory": []}
  for w in w_values:
    if w == 1024:  # unchunked: compiled for its memory only; chunked: one repetition
      tables["w"] += [{"workers": w, "chunk": 0, "run": False, "once": True},
                      {"workers": w, "chunk": None, "once": True}]
      continue
    tables["w"].append({"workers": w, "chunk": 0})
    if w > 64:  # None: workers.chunk unset, which is 16 here (policy.worker_chunk)
      tables["w"] += [{"workers": w, "chunk": 64}, {"workers": w, "chunk": None}]
  for w in (65,) if quick else (65, 257):
    # The chunked round in the host loop: what loop=auto chose for it before the rule
    # followed the chunk (its vmapped axis); the plain kernels in the host loop.
    tables["loops"] += [{"workers": w, "chunk": 64, "loop": "host"},
                        {"workers": w, "chunk": 0, "kernels": "plain"}]
  for w in (17, 65):
    tables["memory"].append({"workers": w, "chunk": 0, "model": "simple_cifar10",
                             "shape": [32, 32, 3], "run": False, "once": True})
  if only:
    tables = {k: v for k, v in tables.items() if k in only.split(",")}
  if FLAGS.workers:
    keep = {int(w) for w in FLAGS.workers}
    tables = {k: [s for s in v if s["workers"] in keep] for k, v in tables.items()}
  if FLAGS.chunks:  # above 64 workers only: W = 17 is the reference
    tables = {k: [s for s in v if s["workers"] <= 64 or str(_chunk(s)).split()[0]
                  in FLAGS.chunks] for k, v in tables.items()}
  return tables


def _chunk(spec):
  return "unset (16)" if spec["chunk"] is None else spec["chunk"]


def _median(results, key):
  values = [r[key] for r in results if key in r]
  return statistics.median(values) if values else None


def _fmt(value, spec=".2f"):
  return "-" if value is None else format(value, spec)


def main(argv):
  del argv
  if FLAGS.child:
    print("RESULT " + json.dumps(run_child(json.loads(FLAGS.child))), flush=True)
    return
  reps = 1 if FLAGS.quick else FLAGS.reps
  tables = _specs(FLAGS.quick, FLAGS.only)
  specs = [s for table in tables.values() for s in table]
  # The same configuration may appear in two tables; it runs once per repetition.
  unique = list({json.dumps(s, sort_keys=True): s for s in specs}.values())
  results = {json.dumps(s, sort_keys=True): [] for s in unique}
  if FLAGS.from_log:
    by_label = {_label(s): json.dumps(s, sort_keys=True) for s in unique}
    with open(FLAGS.from_log) as fh:
      for line in fh:
        match = re.match(r"rep (\d+)/(\d+) (.*?): (\{.*\})$", line.strip())
        if match and match.group(3) in by_label:
          results[by_label[match.group(3)]].append(ast.literal_eval(match.group(4)))
          reps = max(reps if reps != FLAGS.reps else 0, int(match.group(2)))
    tables = {k: [s for s in v if results[json.dumps(s, sort_keys=True)]]
              for k, v in tables.items()}
    _write(tables, results, reps)
    return
  for rep in range(reps):
    for spec in unique:
      if rep and spec.get("once"):
        continue
      r = _child(spec)
      results[json.dumps(spec, sort_keys=True)].append(r)
      print(f"rep {rep + 1}/{reps} {_label(spec)}: {r}", flush=True)
    _write(tables, results, rep + 1)


def _write(tables, results, reps):
  """Writes the Markdown tables from the repetitions done so far."""

  def med(spec, key):
    return _median(results[json.dumps(spec, sort_keys=True)], key)

  def runs(spec):
    return len(results[json.dumps(spec, sort_keys=True)])

  import jax  # pylint: disable=g-import-not-at-top
  lines = ["# Scaling in the number of workers, one device", "",
           (f"Command: `python benchmarks/scaling.py --reps={reps}`, its printed output "
            "rendered with `--from_log` (rows with fewer runs than that: the run was stopped "
            "before repeating them)" if FLAGS.from_log else
            f"Command: `python benchmarks/scaling.py {' '.join(sys.argv[1:])}`"), "",
           f"Machine: {os.cpu_count()} CPU cores, shared with other jobs while it ran (so the "
           f"figures carry load noise), JAX {jax.__version__}, backend "
           f"{jax.default_backend()}. Every configuration ran in its own process, "
           f"up to {reps} time(s), interleaved with the others (the runs column; compile-only "
           "rows are deterministic and W = 1024 ran once); the tables give medians. "
           "simple_mnist (d = 29,034) on MNIST-shaped synthetic data, b = 16, float32, "
           "mu2sgd, ctma(cwtm), sign flipping (every worker computes gradients), "
           "f = W // 4. A timed chunk is a few rounds (6 at W = 17, 3 at 65, 2 at 257, 1 at "
           "1024) after an untimed one (W <= 65 only).", "",
           "Memory is XLA's memory analysis of the largest compiled program (the scanned "
           "chunk, or the host loop's round): temporaries, and arguments (the state, the "
           "data and the chunk's example indices). Outputs alias the donated state.", "",
           "Cost per worker: seconds per round divided by W, relative to W = 17 unchunked "
           "(1.00 = as cheap per worker as W = 17).", ""]
  if "w" in tables:
    base = next((s for s in tables["w"] if s["workers"] == 17), None)
    base_cost = (1 / (med(base, "steps_per_sec") * 17)
                 if base and med(base, "steps_per_sec") else None)
    lines += ["## Worker count", "",
              "`loop=auto`, `kernels=auto`; chunk 0 = all workers in one vmap, otherwise "
              "`workers.chunk`; `unset (16)` is the default (`workers.chunk = None`), which "
              "on CPU is chunks of 16 above 64 workers.", "",
              "| W | f | chunk | loop | runs | steps/s | cost per worker vs W=17 | compile s | "
              "temp MiB | args MiB |",
              "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for s in tables["w"]:
      sps = med(s, "steps_per_sec")
      cost = (1 / (sps * s["workers"])) / base_cost if sps and base_cost else None
      loop = results[json.dumps(s, sort_keys=True)][0]["loop"]
      lines.append(f"| {s['workers']} | {s['workers'] // 4} | {_chunk(s)} | {loop} | "
                   f"{runs(s)} | {_fmt(sps, '.3f')} | {_fmt(cost)} | "
                   f"{_fmt(med(s, 'compile_s'), '.1f')} | "
                   f"{_fmt(med(s, 'temp_mib'), '.0f')} | {_fmt(med(s, 'args_mib'), '.0f')} |")
    lines += ["", "A `-` under steps/s: compiled for its memory analysis only, not run.", ""]
  if "loops" in tables:
    lines += ["## Loop and kernel choices", "",
              "Forced `loop` or `kernels`; the ratio is the same W and chunk's `loop=auto`, "
              "`kernels=auto` row of the table above over this row (medians; above 1: auto is "
              "faster). The chunked host-loop rows are what `loop=auto` chose for a chunked "
              "round before the rule followed the chunk size.", "",
              "| W | chunk | loop | kernels | runs | steps/s | auto over this | compile s |",
              "|---:|---:|---|---|---:|---:|---:|---:|"]
    for s in tables["loops"]:
      ref = next((r for r in tables.get("w", []) if r["workers"] == s["workers"]
                  and r["chunk"] == s["chunk"]), None)
      sps = med(s, "steps_per_sec")
      ref_sps = med(ref, "steps_per_sec") if ref else None
      ratio = ref_sps / sps if ref_sps and sps else None
      loop = results[json.dumps(s, sort_keys=True)][0]["loop"]
      lines.append(f"| {s['workers']} | {s['chunk']} | {loop} | {s.get('kernels', 'auto')} | "
                   f"{runs(s)} | {_fmt(sps, '.3f')} | {_fmt(ratio)} | {_fmt(med(s, 'compile_s'), '.1f')} |")
    lines.append("")
  if "memory" in tables:
    lines += ["## Memory against the model size", "",
              "simple_cifar10 on 32x32x3 inputs, unchunked, compiled only (same b, estimator, "
              "aggregator and attack):", "",
              "| model | d | W | temp MiB | args MiB |", "|---|---:|---:|---:|---:|"]
    for s in tables["memory"]:
      r = results[json.dumps(s, sort_keys=True)][0]
      lines.append(f"| {s['model']} | {r['d']:,} | {s['workers']} | "
                   f"{_fmt(med(s, 'temp_mib'), '.0f')} | {_fmt(med(s, 'args_mib'), '.0f')} |")
    lines.append("")
  text = "\n".join(lines)
  if FLAGS.out:
    with open(FLAGS.out, "w") as fh:
      fh.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main)
