r"""Test accuracy under attack on real MNIST: CTMA(cwtm) against no defence.

The paper's setting (W=17 workers, f=8 Byzantine, b=16, lr 0.1, mu2sgd,
clipping 2.0, 1000 iterations) under lf, sf, ipm (eps 0.5) and alie, with
ctma(cwtm) for every seed and the plain average (no defence) to show that the
attacks bite. Results go to docs/benchmarks/accuracy.md (and the raw numbers to
accuracy.json beside it, written after every run so nothing is lost when the
script is interrupted; rerunning skips the runs already there).

  python benchmarks/accuracy.py --data /path/to/mnist.npz --seeds 1,2,3

The .npz layout, and how to build one from TFDS, is in docs/data.md.
"""

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import mnist  # pylint: disable=g-import-not-at-top
from ftjax import data as data_lib
from ftjax import train

flags.DEFINE_string("data", "mnist.npz",
                    "MNIST .npz: train_images uint8 [60000, 28, 28, 1], train_labels, "
                    "test_images, test_labels (docs/data.md).")
flags.DEFINE_list("seeds", ["1", "2", "3"], "Seeds for the defended runs.")
flags.DEFINE_integer("undefended_seeds", 1, "How many of the seeds also run without defence.")
flags.DEFINE_list("attacks", ["lf", "sf", "ipm", "alie"], "Attacks to run.")
flags.DEFINE_integer("steps", 1000, "Training rounds per run.")
flags.DEFINE_integer("eval_every", 250, "Evaluate every this many rounds.")
flags.DEFINE_string("dtype", "float32", "float32 or float64.")
flags.DEFINE_list("schedules", ["clean", "reference"],
                  "mu2sgd schedules: clean (beta_t = 1/t, gamma_t = 2/(t+1)) and/or reference "
                  "(the original's rounding to 3 decimals with a 0.01 floor).")
flags.DEFINE_list("all_seed_attacks", ["alie", "sf"],
                  "Attacks run with every seed; the others run with the first seed only.")
flags.DEFINE_string("out", "docs/benchmarks/accuracy.md", "Markdown output.")
FLAGS = flags.FLAGS

# The original program (float64, seed 1) on these machines, from the issue.
REFERENCE = {"alie": {250: 95.1, 500: 96.0, 1000: 96.4},
             "sf": {250: 95.9, 500: 96.8, 1000: 97.6}}
DEFENCES = {"ctma(cwtm)": ("cwtm", "ctma"), "avg (no defence)": ("avg", "none")}


def run_config(attack, defence, seed, schedule):
  name, meta = DEFENCES[defence]
  c = mnist.get_config(FLAGS.data)
  c.seed = seed
  c.dtype = FLAGS.dtype
  c.num_steps = FLAGS.steps
  c.eval_every = FLAGS.eval_every
  c.progress = False
  c.checkpoint.enabled = False
  c.workers.num, c.workers.byzantine, c.workers.batch_size = 17, 8, 16
  c.optim.estimator, c.optim.lr, c.optim.clip = "mu2sgd", 0.1, 2.0
  c.aggregator.name, c.aggregator.meta = name, meta
  c.attack.name = attack
  c.attack.options.ipm.eps = 0.5
  c.optim.reference_rounding = schedule == "reference"
  return c


def write_markdown(results, path, command):
  results = {k: r for k, r in results.items()
             if r["steps"] == FLAGS.steps and r["dtype"] == FLAGS.dtype}
  steps = sorted({int(s) for r in results.values() for s in r["test_acc"]})
  lines = [
      "# Test accuracy under attack (real MNIST)", "",
      f"Command: `{command}`", "",
      "W=17 workers, f=8 Byzantine, b=16 per worker, mu2sgd (beta_t = 1/t, AnyTime alpha_t = t), "
      f"lr 0.1, clipping 2.0, {FLAGS.dtype}. Test accuracy (%) on the 10,000 test images: the "
      "median over seeds, with min-max when there are several. The last column is the "
      "original PyTorch program (float64, seed 1) on the same machines, from the issue.", "",
      "Schedules: *clean* is the paper's beta_t = 1/t and gamma_t = 2/(t+1); *reference* is the "
      "original program's rounding of both to 3 decimals with a 0.01 floor "
      "(`optim.reference_rounding=True`).", "",
      "| attack | aggregator | schedules | seeds | " + " | ".join(f"acc@{s}" for s in steps)
      + " | original program " + "/".join(str(s) for s in sorted(REFERENCE["alie"])) + " |",
      "|---|---|---|---|" + "---|" * len(steps) + "---|"]
  for attack in FLAGS.attacks:
    for defence, schedule in [(d, s) for d in DEFENCES for s in ("clean", "reference")]:
      runs = [r for r in results.values() if r["attack"] == attack and r["defence"] == defence
              and r.get("schedule", "clean") == schedule]
      if not runs:
        continue
      cells = []
      for s in steps:
        accs = [100 * r["test_acc"][str(s)] for r in runs if str(s) in r["test_acc"]]
        if not accs:
          cells.append("")
        elif len(accs) == 1:
          cells.append(f"{accs[0]:.1f}")
        else:
          cells.append(f"{statistics.median(accs):.1f} ({min(accs):.1f}-{max(accs):.1f})")
      ref = REFERENCE.get(attack) if defence.startswith("ctma") else None
      ref_cell = "/".join(f"{ref[s]:.1f}" for s in steps if s in ref) if ref else ""
      seeds = ",".join(str(r["seed"]) for r in runs)
      lines.append(f"| {attack} | {defence} | {schedule} | {seeds} | " + " | ".join(cells)
                   + f" | {ref_cell} |")
  lines += ["", "Wall time per run (s): " + ", ".join(
      f"{r['attack']}/{r['defence'].split()[0]}/{r.get('schedule', 'clean')}/{r['seed']}: "
      f"{r['wall_time']:.0f}"
      for r in results.values()), ""]
  with open(path, "w") as fh:
    fh.write("\n".join(lines))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if not os.path.exists(FLAGS.data):
    raise app.UsageError(f"MNIST file {FLAGS.data} not found; pass --data.")
  dataset = data_lib.load_dataset("npz", path=FLAGS.data)
  json_path = os.path.splitext(FLAGS.out)[0] + ".json"
  results = {}
  if os.path.exists(json_path):
    with open(json_path) as fh:
      results = json.load(fh)
  command = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:])
  seeds = [int(s) for s in FLAGS.seeds]
  # Seed-major, so that an interrupted run still covers every attack once.
  plan = []
  for i, seed in enumerate(seeds):
    for attack in FLAGS.attacks:
      if i and attack not in FLAGS.all_seed_attacks:
        continue
      for schedule in FLAGS.schedules:
        plan.append((attack, "ctma(cwtm)", seed, schedule))
      if i < FLAGS.undefended_seeds:
        plan.append((attack, "avg (no defence)", seed, FLAGS.schedules[0]))
  for i, (attack, defence, seed, schedule) in enumerate(plan):
    key = f"{attack}|{defence}|{seed}|{FLAGS.steps}|{FLAGS.dtype}"
    if schedule != "clean":
      key += f"|{schedule}"
    if key in results:
      continue
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
      train.train_and_evaluate(run_config(attack, defence, seed, schedule), workdir,
                               dataset=dataset)
      with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    results[key] = {"attack": attack, "defence": defence, "seed": seed, "schedule": schedule,
                    "steps": FLAGS.steps, "dtype": FLAGS.dtype,
                    "test_acc": {str(r["step"]): r["test_acc"] for r in rows},
                    "wall_time": time.perf_counter() - tic}
    print(f"[{i + 1}/{len(plan)}] {attack:5s} {defence:18s} {schedule:9s} seed {seed}: "
          + " ".join(f"{k}:{100 * v:.1f}" for k, v in results[key]["test_acc"].items()),
          flush=True)
    with open(json_path, "w") as fh:
      json.dump(results, fh, indent=1)
    write_markdown(results, FLAGS.out, command)


if __name__ == "__main__":
  app.run(main)
