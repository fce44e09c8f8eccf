r"""Where the time of one training step goes: a per-op profile on CPU.

Runs the compiled host-loop round of simple_mnist (W=17, f=8, b=16, ctma(cwtm),
MNIST-shaped synthetic data) under ``jax.profiler``, reads the trace back with
``jax.profiler.ProfileData`` and sums the time of every XLA thunk per step,
grouped by what it computes (taken from the op metadata of the optimized HLO,
which this script dumps for the step's module). XLA:CPU runs independent thunks
on its intra-op threads, so the per-thread busy time is reported next to the
step's wall time: their ratio is how much of the step ran in parallel.

Writes docs/benchmarks/step_profile.md.

  python benchmarks/step_profile.py                     # mu2sgd, sf, one device
  python benchmarks/step_profile.py --estimator=momentum --attack=alie
  python benchmarks/step_profile.py --devices=3 --out=/tmp/split.md  # workers split
"""

import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from configs import default
from ftjax import sharding
from ftjax import train
from synthetic import synthetic_dataset  # pylint: disable=g-bad-import-order

_DUMP = tempfile.mkdtemp(prefix="ftjax_hlo_")
# Before JAX's first device use: a text dump of the optimized HLO of the round's
# module only, and exactly --devices CPU devices (idle extra devices slow a
# one-device step by 5-8% here).
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={_DUMP}", "--xla_dump_hlo_as_text",
    "--xla_dump_hlo_module_re=one_round|scan_chunk"]).strip()
sharding.expose_cpu_devices(
    next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--devices=")), 1))

flags.DEFINE_string("estimator", "mu2sgd", "optim.estimator.")
flags.DEFINE_string("attack", "sf", "attack.name.")
flags.DEFINE_enum("dtype", "float32", ["float32", "float64"], "Computation dtype.")
flags.DEFINE_integer("devices", 1, "CPU devices to expose and split the workers over "
                     "(give it as --devices=N).")
flags.DEFINE_enum("loop", "auto", ["auto", "scan", "host"], "config.loop of the profiled chunk.")
flags.DEFINE_integer("rounds", 10, "Rounds per chunk (the profiled chunk is one).")
flags.DEFINE_integer("reps", 5, "Timed chunks before profiling (median reported).")
flags.DEFINE_integer("top", 25, "Rows of the per-op table.")
flags.DEFINE_string("out", "docs/benchmarks/step_profile.md", "Markdown output.")
FLAGS = flags.FLAGS

# (category, regex on the op_name metadata); first match wins. Thunks without
# metadata are the per-worker weight-gradient convolutions the custom batching
# rule unrolls (and the transposes feeding them).
_CATEGORIES = [
    ("conv layer 2: forward", r"jvp\(SimpleCNN\)\)?/Conv_1/conv_general_dilated"),
    ("conv layer 2: input gradient",
     r"transpose\(jvp\(\)\)/conv_general_dilated|transpose\(vmap\(jvp\(SimpleCNN\)\)\)\)/Conv_1/"
     r"conv_general_dilated"),
    ("conv layer 1: forward (sum of shifted inputs)", r"/Conv_0/"),
    ("BatchNorm+ReLU+pool layer 1 (fwd and bwd)", r"/BatchNorm_0/"),
    ("BatchNorm+ReLU+pool layer 2 (fwd and bwd)", r"/BatchNorm_1/"),
    ("conv layer 2: bias, transposes feeding the gradients, other", r"/Conv_1/"),
    ("dense layer and loss", r"/Dense_0/|softmax|log_softmax|exp|logsumexp"),
]
_NO_METADATA = "per-worker weight gradients (unrolled convolutions and their transposes)"
_OTHER = "other (data, attack, aggregator, estimator, update)"


def _metadata(hlo_text):
  """Instruction name -> (shape, op_name) for the entry computation's instructions."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*%?([\w.\-]+) = (\S+) .*?op_name=\"([^\"]+)\"", line)
    if m:
      out[m.group(1)] = (m.group(2), m.group(3))
    else:
      m = re.match(r"\s*%?([\w.\-]+) = (\S+) ", line)
      if m and m.group(1) not in out:
        out[m.group(1)] = (m.group(2), "")
  return out


def _category(shape, op_name):
  # simple_mnist's weight gradients come out as [C, 5, 5, O] convolutions.
  if not op_name or re.match(r"f(32|64)\[\d+,5,5,\d+\]", shape):
    return _NO_METADATA
  for name, pattern in _CATEGORIES:
    if re.search(pattern, op_name):
      return name
  return _OTHER


def main(argv):
  del argv
  c = default.get_config()
  c.progress = False
  c.devices = FLAGS.devices
  c.workers.num, c.workers.byzantine, c.workers.batch_size = 17, 8, 16
  c.model.name = "simple_mnist"
  c.optim.estimator = FLAGS.estimator
  c.aggregator.name, c.aggregator.meta = "cwtm", "ctma"
  c.attack.name = FLAGS.attack
  c.dtype = FLAGS.dtype
  if FLAGS.dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  dataset = synthetic_dataset((28, 28, 1))
  setup = train.build(c, dataset)
  state = train.place(setup, train.init_state(setup, c.seed))
  data = train.place(setup, train.DeviceData(jnp.asarray(dataset.train_images),
                                             jnp.asarray(dataset.train_labels)))
  length = FLAGS.rounds
  chunk = train.make_chunk_fn(setup, FLAGS.loop)(state, data, length)
  loop = chunk.loop
  state, metrics = chunk.run(state, data)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(FLAGS.reps):
    tic = time.perf_counter()
    state, metrics = chunk.run(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - tic)
  step_ms = statistics.median(times) / length * 1e3
  print(f"{1e3 / step_ms:.1f} steps/s ({step_ms:.1f} ms per step)", flush=True)

  trace_dir = tempfile.mkdtemp(prefix="ftjax_trace_")
  jax.profiler.start_trace(trace_dir)
  state, metrics = chunk.run(state, data)
  jax.block_until_ready(metrics)
  jax.profiler.stop_trace()
  trace = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
  module = "one_round" if loop == "host" else "scan_chunk"
  hlo = sorted(glob.glob(os.path.join(_DUMP, f"*{module}*cpu_after_optimizations.txt")))
  if not hlo:
    raise SystemExit(f"no optimized HLO of the round was dumped to {_DUMP}")
  meta = _metadata(open(hlo[-1]).read())

  per_op = collections.defaultdict(float)
  busy = collections.defaultdict(float)
  for plane in jax.profiler.ProfileData.from_file(trace).planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name:  # XLA:CPU's intra-op threads
        continue
      executor, thunks = [], []
      for ev in line.events:
        (executor if ev.name.startswith("ThunkExecutor") else thunks).append(ev)
      # A while loop's body runs in a nested executor: count busy time once, as
      # the union of the executors' intervals, and leave out the while thunks,
      # which contain their body's thunks.
      end = 0
      for ev in sorted(executor, key=lambda e: e.start_ns):
        start = max(ev.start_ns, end)
        if ev.end_ns > start:
          busy[line.name] += (ev.end_ns - start) / 1e6 / length
        end = max(end, ev.end_ns)
      for ev in thunks:
        if not re.fullmatch(r"while(\.\d+)?", ev.name):
          per_op[ev.name] += ev.duration_ns / 1e6 / length
  by_category = collections.defaultdict(float)
  for name, ms in per_op.items():
    by_category[_category(*meta.get(name, ("", "")))] += ms
  total = sum(per_op.values())

  cmd = "python benchmarks/step_profile.py"
  if FLAGS.estimator != "mu2sgd" or FLAGS.attack != "sf":
    cmd += f" --estimator={FLAGS.estimator} --attack={FLAGS.attack}"
  if FLAGS.devices != 1:
    cmd += f" --devices={FLAGS.devices}"
  if FLAGS.dtype != "float32":
    cmd += f" --dtype={FLAGS.dtype}"
  lines = [
      "# Where the training step's time goes (CPU)", "",
      f"Command: `{cmd}`", "",
      f"Machine: {os.cpu_count()} CPU cores, JAX {jax.__version__}, "
      f"{FLAGS.devices} device(s). simple_mnist, "
      f"W=17, f=8, b=16, ctma(cwtm), {FLAGS.estimator}, {FLAGS.attack}, {FLAGS.dtype}; {loop} loop, "
      f"one profiled chunk of {length} rounds.", "",
      f"Step: **{step_ms:.1f} ms** wall (median of {FLAGS.reps} unprofiled chunks, "
      f"{1e3 / step_ms:.1f} steps/s). XLA's intra-op threads were busy "
      + ", ".join(f"{v:.1f}" for v in sorted(busy.values(), reverse=True))
      + f" ms per step; the thunks inside sum to {total:.1f} thread-ms per step. "
      "A thunk's time includes waiting for the other thread to run its share "
      "when XLA split a loop over both threads.", "",
      "| what | thread-ms per step | share |", "|---|---:|---:|"]
  for name, ms in sorted(by_category.items(), key=lambda kv: -kv[1]):
    lines.append(f"| {name} | {ms:.1f} | {ms / total:.0%} |")
  lines += ["", f"The {FLAGS.top} costliest thunks:", "",
            "| thunk | shape | op | thread-ms per step |", "|---|---|---|---:|"]
  for name, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:FLAGS.top]:
    shape, op = meta.get(name, ("?", ""))
    op = re.sub(r"^jit\((one_round|scan_chunk)\)/(while/body/closed_call/)?", "", op) or "—"
    lines.append(f"| {name} | `{shape.split('{')[0]}` | {op} | {ms:.2f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as fh:
    fh.write(text)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
