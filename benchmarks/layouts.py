r"""Every device layout against the one-device round, for every attack, in float64.

The round is written once (``ftjax.round``) and ``ftjax.sharding.lay_out_round``
places it on the devices: one device, the workers split over the devices with
the aggregation replicated, or the aggregation on coordinate slices
(``mesh.aggregation = "sharded"``). This trains the same float64 run for
``--rounds`` rounds in each layout, for every attack (and one attack family
sharing a compiled round), and reports the largest relative difference of the
parameters from the one-device run.

  python benchmarks/layouts.py            # writes docs/benchmarks/layouts.md

It sets XLA_FLAGS to expose ``--devices`` CPU devices before importing JAX.
"""

import os
import sys

from absl import app
from absl import flags

flags.DEFINE_integer("rounds", 20, "Training rounds of every run.")
flags.DEFINE_integer("devices", 8, "CPU devices of the multi-device layouts.")
flags.DEFINE_string("out", "docs/benchmarks/layouts.md", "Markdown output.")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY = ("alie", "ipm", "gaussian", "min_max")


def _byzantine(attack):
  """4, or the most Byzantine workers of 9 the attack is defined for (fang_krum: 3)."""
  from ftjax import attacks  # pylint: disable=import-outside-toplevel
  built = attacks.make_attack(attack)
  for f in range(4, 0, -1):
    try:
      built.check_counts(9, f)
      return f
    except ValueError:
      continue
  return 0


def _config(attack, devices, layout):
  from configs import default  # pylint: disable=import-outside-toplevel
  c = default.get_config()
  c.progress, c.dtype, c.model.name, c.loop = False, "float64", "mlp", "scan"
  c.workers.num, c.workers.byzantine, c.workers.batch_size = 9, _byzantine(attack), 4
  c.attack.name, c.devices, c.mesh.aggregation = attack, devices, layout
  c.num_steps = c.eval_every = FLAGS.rounds
  return c


def _params(attack, devices, layout, family=()):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from ftjax import train  # pylint: disable=import-outside-toplevel
  c = _config(attack, devices, layout)
  setup = train.build(c, attacks=family)
  state = train.init_state(setup, c.seed)
  data = train.make_device_data(setup)
  state, _ = train.make_chunk_fn(setup)(state, data, FLAGS.rounds).run(state, data)
  return [np.asarray(p) for p in jax.tree.leaves(state.params)]


def _difference(a, b):
  import numpy as np  # pylint: disable=import-outside-toplevel
  return max(float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-300)) for x, y in zip(a, b))


def main(argv):
  del argv
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={FLAGS.devices}")
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=import-outside-toplevel
  from ftjax import attacks  # pylint: disable=import-outside-toplevel
  names = sorted({spec.name for spec in attacks.ATTACKS.values()})
  cases = [(name, ()) for name in names] + [(f"{FAMILY[0]} in the family {'/'.join(FAMILY)}",
                                             FAMILY)]
  rows, worst = [], 0.0
  with jax.enable_x64(True):
    for label, family in cases:
      attack = label.split(" ")[0]
      one = _params(attack, 1, "replicated", family)
      diffs = [_difference(one, _params(attack, FLAGS.devices, layout, family))
               for layout in ("replicated", "sharded")]
      worst = max([worst] + diffs)
      f = _byzantine(attack)
      label += "" if f == 4 else f" (f = {f})"
      rows.append(f"| {label} | {diffs[0]:.1e} | {diffs[1]:.1e} |")
      print(rows[-1], flush=True)
  lines = ["# Device layouts against one device", "",
           f"Produced by `python benchmarks/layouts.py --rounds={FLAGS.rounds} "
           f"--devices={FLAGS.devices}`: an mlp on the built-in digits, W = 9 of which 4 "
           f"Byzantine (fewer where an attack's definition needs it), ctma(cwtm), mu2sgd, float64, {FLAGS.rounds} rounds in one scanned "
           f"chunk, on {FLAGS.devices} CPU devices. Each cell is the largest difference of a "
           f"parameter from the one-device run, relative to the largest parameter of its "
           f"leaf.", "",
           "| attack | workers split, aggregation replicated | aggregation sharded |",
           "|---|---:|---:|", *rows, "",
           f"Largest difference: {worst:.1e}.", ""]
  with open(os.path.join(ROOT, FLAGS.out), "w") as fh:
    fh.write("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
