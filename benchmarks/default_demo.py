r"""The default demonstration: does the attack bite, and does the defence hold?

Runs configs/default.py (built-in digits, W=17 workers of which 8 Byzantine,
mu2sgd, 600 rounds) once per (attack, aggregator) pair, changing only the
attack and the aggregator, and writes the final test accuracy of each run to
docs/benchmarks/default_demo.md. The raw numbers go to default_demo.json
beside it after every run, so an interrupted script loses nothing; rerunning
skips the runs already there. One run at a time.

  python benchmarks/default_demo.py

An attack is a name from ftjax/attacks.py, optionally with options after a
colon: ``--attacks=none,alie,ipm:eps=1.5``. Aggregators are ``name`` or
``meta(name)`` specs as in the config (``avg`` = no defence).
"""

import ast
import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # pylint: disable=g-import-not-at-top
from ftjax import attacks
from ftjax import train

flags.DEFINE_list("attacks", ["none", "DEFAULT", "alie", "lf", "ipm:eps=10.0", "optimal_ipm",
                                "min_max"],
                  "Attacks, each `name` or `name:option=value[:option=value]`; DEFAULT is "
                  "the default config's attack.")
flags.DEFINE_list("aggregators", ["avg", "ctma(cwtm)"],
                  "Aggregators: `name` (meta none) or `meta(name)`.")
flags.DEFINE_integer("seed", 1, "The run's seed (the default config's is 1).")
flags.DEFINE_string("out", "docs/benchmarks/default_demo.md", "Markdown output.")
FLAGS = flags.FLAGS


def parse_attack(spec):
  """``"ipm:eps=1.5"`` -> ("ipm", {"eps": 1.5}); DEFAULT -> the default config's attack."""
  if spec == "DEFAULT":
    c = default.get_config()
    name = c.attack.name
    given = c.attack.options.get(attacks.canonical_name(name), None)
    defaults = dict(attacks.ATTACKS[attacks.canonical_name(name)].defaults)
    changed = {k: v for k, v in (given or {}).items() if defaults.get(k, v) != v}
    return name, changed
  name, *pairs = spec.split(":")
  options = {}
  for pair in pairs:
    key, _, value = pair.partition("=")
    if not key or not value:
      raise app.UsageError(f"Attack option {pair!r} in {spec!r} must read option=value.")
    options[key] = ast.literal_eval(value)
  return name, options


def label(name, options):
  return name + "".join(f" {k}={v}" for k, v in sorted(options.items()))


def flags_for(name, options, aggregator):
  """The main.py flags that reproduce one run from configs/default.py."""
  inner, meta = aggregator, "none"
  if "(" in aggregator:
    meta, inner = aggregator.rstrip(")").split("(", 1)
  out = [f"--config.aggregator.name={inner}", f"--config.aggregator.meta={meta}",
         f"--config.attack.name={name}"]
  out += [f"--config.attack.options.{attacks.canonical_name(name)}.{k}={v}"
          for k, v in sorted(options.items())]
  return out


def run_config(name, options, aggregator):
  c = default.get_config()
  c.seed = FLAGS.seed
  c.progress = False
  c.checkpoint.enabled = False
  inner, meta = aggregator, "none"
  if "(" in aggregator:
    meta, inner = aggregator.rstrip(")").split("(", 1)
  c.aggregator.name, c.aggregator.meta = inner, meta
  c.attack.name = name
  section = attacks.canonical_name(name)
  for key, value in options.items():
    c.attack.options[section][key] = value
  return c


def write_markdown(results, path, command, plan):
  d = default.get_config()
  lines = [
      "# The default demonstration: attack against no defence and the default defence", "",
      f"Command: `{command}`", "",
      f"configs/default.py (the built-in digits data: 1,438 train and 359 test images; "
      f"W={d.workers.num} workers of which {d.workers.byzantine} Byzantine, b="
      f"{d.workers.batch_size}, mu2sgd, lr {d.optim.lr}, clipping {d.optim.clip}, "
      f"{d.num_steps} rounds, seed {FLAGS.seed}), changing only the attack and the "
      "aggregator. Final test accuracy (%) on the 359 test images; 'diverged' means the run "
      "stopped on a non-finite loss or model. One process at a time on a shared 2-core CPU.",
      "", "Each cell is reproduced by `python main.py --config configs/default.py --workdir "
      "/tmp/ftjax/demo` with the flags of its row and column (below the table).", ""]
  default_attack = label(*parse_attack("DEFAULT"))
  lines += [f"The default config's attack is `{default_attack}` (marked); `none` is the clean "
            "run.", ""]
  aggregators = list(dict.fromkeys(a for _, _, a in plan))
  lines.append("| attack | " + " | ".join(aggregators) + " |")
  lines.append("|---|" + "---|" * len(aggregators))
  for attack_label in dict.fromkeys(label(n, o) for n, o, _ in plan):
    cells = []
    for aggregator in aggregators:
      r = results.get(f"{attack_label}|{aggregator}|{FLAGS.seed}")
      if r is None:
        cells.append("")
      elif r["diverged"]:
        cells.append(f"diverged at round {r['last_step']}")
      else:
        cells.append(f"{100 * r['test_acc']:.1f}")
    shown = attack_label + (" (default)" if attack_label == default_attack else "")
    lines.append(f"| {shown} | " + " | ".join(cells) + " |")
  lines += ["", "Flags of each run:", ""]
  for name, options, aggregator in plan:
    r = results.get(f"{label(name, options)}|{aggregator}|{FLAGS.seed}")
    if r is not None:
      lines.append(f"* {label(name, options)}, {aggregator}: `" + " ".join(
          flags_for(name, options, aggregator)) + f"` ({r['wall_time']:.0f} s)")
  lines.append("")
  with open(path, "w") as fh:
    fh.write("\n".join(lines))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  json_path = os.path.splitext(FLAGS.out)[0] + ".json"
  results = {}
  if os.path.exists(json_path):
    with open(json_path) as fh:
      results = json.load(fh)
  command = " ".join(["python benchmarks/default_demo.py"] + sys.argv[1:])
  plan = [parse_attack(a) + (g,) for a in FLAGS.attacks for g in FLAGS.aggregators]
  for i, (name, options, aggregator) in enumerate(plan):
    key = f"{label(name, options)}|{aggregator}|{FLAGS.seed}"
    if key in results:
      continue
    tic = time.perf_counter()
    diverged = False
    with tempfile.TemporaryDirectory() as workdir:
      try:
        train.train_and_evaluate(run_config(name, options, aggregator), workdir)
      except train.TrainingDiverged:
        diverged = True
      with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    results[key] = {"attack": label(name, options), "aggregator": aggregator,
                    "seed": FLAGS.seed, "diverged": diverged,
                    "last_step": rows[-1]["step"] if rows else 0,
                    "test_acc": rows[-1]["test_acc"] if rows else float("nan"),
                    "test_acc_by_step": {str(r["step"]): r["test_acc"] for r in rows},
                    "wall_time": time.perf_counter() - tic}
    r = results[key]
    print(f"[{i + 1}/{len(plan)}] {r['attack']:20s} {aggregator:12s}: "
          + ("diverged" if diverged else f"{100 * r['test_acc']:.1f}%")
          + f" ({r['wall_time']:.0f} s)", flush=True)
    with open(json_path, "w") as fh:
      json.dump(results, fh, indent=1)
    write_markdown(results, FLAGS.out, command, plan)
  write_markdown(results, FLAGS.out, command, plan)


if __name__ == "__main__":
  app.run(main)
