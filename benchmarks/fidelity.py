r"""Why ftjax's MNIST accuracy lags the original program's: one cause at a time.

The setting of benchmarks/accuracy.py (W=17, f=8, b=16, mu2sgd, lr 0.1, clip
2.0, ctma(cwtm), under alie and sf), run with the three ways in which ftjax's
defaults differ from the original PyTorch program switched one by one:

* dtype: float32 (ftjax's default) or float64 (the original's);
* BatchNorm running statistics (`model.batch_stats`): `honest_mean` (ftjax's
  default: one EMA step per round with the honest workers' mean batch
  statistics) or `sequential` (the original's: every forward pass updates them
  in turn, mu2sgd's second pass included);
* mu2sgd schedules: `clean` (beta_t = 1/t, gamma_t = 2/(t+1)), `floor` (both
  floored at 0.01, `optim.beta_min = optim.gamma_min = 0.01`) or `round` (the
  original's max(round(., 3), 0.01), `optim.reference_rounding=True`).

A variant is written dtype/batch_stats/schedule, e.g. float32/honest_mean/clean.
Results go to docs/benchmarks/fidelity.md, and the raw numbers to fidelity.json
beside it after every run (rerunning skips the runs already there, so an
interrupted measurement resumes). The flags --data, --seeds, --attacks, --steps,
--eval_every and --out are those of benchmarks/accuracy.py with this script's
defaults; its --dtype and --schedules are ignored (the variants set both).

  python benchmarks/fidelity.py --data mnist.npz --seeds 1,2,3 --steps 250
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accuracy  # pylint: disable=g-import-not-at-top
from ftjax import data as data_lib
from ftjax import train

BASELINE = "float32/honest_mean/clean"
ORIGINAL_LIKE = "float64/sequential/round"
# Priority order: an interrupted run still has the baseline and the full emulation.
DEFAULT_VARIANTS = [BASELINE, ORIGINAL_LIKE, "float32/sequential/clean",
                    "float32/honest_mean/floor", "float32/honest_mean/round",
                    "float32/sequential/round"]
# One table per cause: the variants that isolate it (each against the first row).
TABLES = [
    ("(a) float32 vs float64 (with the original's statistics and schedules)",
     ["float32/sequential/round", ORIGINAL_LIKE]),
    ("(a) float32 vs float64 (ftjax's statistics and schedules)",
     [BASELINE, "float64/honest_mean/clean"]),
    ("(b) BatchNorm running statistics, clean schedules", [BASELINE, "float32/sequential/clean"]),
    ("(b) BatchNorm running statistics, rounded schedules",
     ["float32/honest_mean/round", "float32/sequential/round"]),
    ("(c) mu2sgd schedules", [BASELINE, "float32/honest_mean/floor",
                              "float32/honest_mean/round"]),
    ("(c) the rounding on top of the floor", ["float32/honest_mean/floor",
                                              "float32/honest_mean/round"]),
    ("Combinations", [BASELINE, "float32/sequential/floor", "float32/sequential/round",
                      ORIGINAL_LIKE]),
]
SCHEDULES = ("clean", "floor", "round")

flags.DEFINE_list("variants", DEFAULT_VARIANTS,
                  "dtype/batch_stats/schedule triples to run (float32|float64, "
                  "honest_mean|sequential, clean|floor|round).")
flags.DEFINE_string("conclusion", "",
                    "Markdown file whose text is appended as the conclusion (written after "
                    "reading the numbers).")
FLAGS = flags.FLAGS
FLAGS.set_default("out", "docs/benchmarks/fidelity.md")
FLAGS.set_default("attacks", ["alie", "sf"])
FLAGS.set_default("steps", 250)
FLAGS.set_default("eval_every", 250)


def parse_variant(variant):
  parts = variant.split("/")
  if (len(parts) != 3 or parts[0] not in ("float32", "float64")
      or parts[1] not in ("honest_mean", "sequential") or parts[2] not in SCHEDULES):
    raise app.UsageError(f"Variant {variant!r} is not dtype/batch_stats/schedule, e.g. "
                         f"{BASELINE}.")
  return parts


def variant_config(attack, seed, variant):
  """accuracy.run_config's ctma(cwtm) run with the variant's three switches."""
  dtype, batch_stats, schedule = parse_variant(variant)
  c = accuracy.run_config(attack, "ctma(cwtm)", seed,
                          "reference" if schedule == "round" else "clean")
  c.dtype = dtype
  c.model.batch_stats = batch_stats
  floor = 0.01 if schedule == "floor" else 0.0
  c.optim.beta_min = c.optim.gamma_min = floor
  return c


def cell(values):
  """Median (min-max) of a list, or the value alone; '' when empty."""
  if not values:
    return ""
  if len(values) == 1:
    return f"{values[0]:.1f}"
  return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def signed_cell(values):
  """Median (min to max) of differences, in hundredths: one test image is 0.01."""
  if not values:
    return ""
  if len(values) == 1:
    return f"{values[0]:+.2f}"
  return f"{statistics.median(values):+.2f} ({min(values):+.2f} to {max(values):+.2f})"


def write_markdown(results, path, conclusion):
  steps = sorted({int(s) for r in results.values() for s in r["test_acc"]})
  seeds = sorted({r["seed"] for r in results.values()})
  commands = sorted({r["command"] for r in results.values()},
                    key=lambda c: min(r["steps"] for r in results.values() if r["command"] == c))

  def accs(attack, variant, step):
    return {r["seed"]: 100 * r["test_acc"][str(step)] for r in results.values()
            if r["attack"] == attack and r["variant"] == variant and str(step) in r["test_acc"]}

  lines = [
      "# Fidelity to the original program: which difference costs accuracy (real MNIST)", "",
      "Commands, in this order (a longer run replaces a shorter one of the same variant "
      "and seed, and repeats its earlier evaluations exactly):", "",
      *[f"    {c}" for c in commands], "",
      "W=17 workers, f=8 Byzantine, b=16 per worker, mu2sgd, lr 0.1, clipping 2.0, "
      "ctma(cwtm). Test accuracy (%) on the 10,000 test images: the median over seeds "
      f"{','.join(map(str, seeds))} with min-max, and the change against the first row of "
      "the table (median, min and max over seeds of the per-seed difference; a seed fixes "
      "the initialisation and the data order, so paired differences are less noisy than "
      "the medians). The last column is the original PyTorch program (float64, seed 1).", "",
      "A variant is dtype / BatchNorm running statistics (`model.batch_stats`) / mu2sgd "
      "schedules: *clean* is beta_t = 1/t and gamma_t = 2/(t+1); *floor* floors both at 0.01 "
      "(`optim.beta_min=0.01`, `optim.gamma_min=0.01`); *round* is the original's "
      "max(round(., 3), 0.01) (`optim.reference_rounding=True`). `honest_mean` sets the "
      "running statistics once per round from the honest workers' mean; `sequential` folds "
      "every computed worker's forward passes into them in worker order, as the original's "
      f"one shared model does. `{ORIGINAL_LIKE}` has all three of the original's "
      "properties.", ""]
  for title, variants in TABLES:
    variants = [v for v in variants if any(r["variant"] == v for r in results.values())]
    if len(variants) < 2:
      continue
    lines += [f"## {title}", "",
              "| attack | variant | seeds | " + " | ".join(f"acc@{s}" for s in steps) + " | "
              + " | ".join(f"change@{s}" for s in steps) + " | original "
              + "/".join(str(s) for s in steps) + " |",
              "|---|---|---|" + "---|" * (2 * len(steps) + 1)]
    for attack in FLAGS.attacks:
      ref = accuracy.REFERENCE.get(attack, {})
      for variant in variants:
        row = [attack, f"`{variant}`",
               ",".join(str(k) for k in sorted(accs(attack, variant, steps[0])))]
        row += [cell(list(accs(attack, variant, s).values())) for s in steps]
        for s in steps:
          base, this = accs(attack, variants[0], s), accs(attack, variant, s)
          paired = [this[k] - base[k] for k in this if k in base]
          row.append("" if variant == variants[0] else signed_cell(paired))
        row.append("/".join(f"{ref[s]:.1f}" for s in steps if s in ref))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
  if conclusion:
    lines += ["## Conclusion", "", conclusion.strip(), ""]
  lines += ["Wall time per run (s), on 2 CPU cores shared with other jobs (not a speed "
            "measurement): " + ", ".join(
      f"{r['attack']}/{r['variant']}/{r['seed']}: {r['wall_time']:.0f}"
      for r in results.values()), ""]
  with open(path, "w") as fh:
    fh.write("\n".join(lines))


def command_args(argv):
  """The command line as the doc shows it: the data file by its name only (its folder
  differs between machines), without --conclusion (the doc's own text)."""
  out, skip = [], False
  for prev, arg in zip([""] + argv, argv):
    if skip:
      skip = False
    elif arg == "--conclusion":
      skip = True
    elif arg.startswith("--conclusion="):
      pass
    elif prev == "--data":
      out.append(os.path.basename(arg))
    elif arg.startswith("--data="):
      out.append("--data=" + os.path.basename(arg[len("--data="):]))
    else:
      out.append(arg)
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if not os.path.exists(FLAGS.data):
    raise app.UsageError(f"MNIST file {FLAGS.data} not found; pass --data.")
  for variant in FLAGS.variants:
    parse_variant(variant)
  conclusion = ""
  if FLAGS.conclusion:
    with open(FLAGS.conclusion) as fh:
      conclusion = fh.read()
  dataset = data_lib.load_dataset("npz", path=FLAGS.data)
  json_path = os.path.splitext(FLAGS.out)[0] + ".json"
  os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
  results = {}
  if os.path.exists(json_path):
    with open(json_path) as fh:
      results = json.load(fh)
  command = "python benchmarks/fidelity.py " + " ".join(command_args(sys.argv[1:]))
  # Seed-major, so that an interrupted run still has every variant on the first seeds.
  plan = [(attack, int(seed), variant) for seed in FLAGS.seeds for variant in FLAGS.variants
          for attack in FLAGS.attacks]
  for i, (attack, seed, variant) in enumerate(plan):
    key = f"{attack}|{seed}|{variant}"
    if key in results and results[key]["steps"] >= FLAGS.steps:
      continue
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
      train.train_and_evaluate(variant_config(attack, seed, variant), workdir, dataset=dataset)
      with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    results[key] = {"attack": attack, "seed": seed, "variant": variant, "steps": FLAGS.steps,
                    "test_acc": {str(r["step"]): r["test_acc"] for r in rows},
                    "wall_time": time.perf_counter() - tic, "command": command}
    print(f"[{i + 1}/{len(plan)}] {attack:5s} {variant:26s} seed {seed}: "
          + " ".join(f"{k}:{100 * v:.1f}" for k, v in results[key]["test_acc"].items())
          + f" ({results[key]['wall_time']:.0f} s)", flush=True)
    with open(json_path, "w") as fh:
      json.dump(results, fh, indent=1)
    write_markdown(results, FLAGS.out, conclusion)
  write_markdown(results, FLAGS.out, conclusion)


if __name__ == "__main__":
  app.run(main)
