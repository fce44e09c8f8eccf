r"""The plain and the fast kernels train alike: metrics of both over the same run.

Runs the default config (built-in digits, W=17, f=8 under ALIE, ctma(cwtm),
mu2sgd) for ``--steps`` rounds twice in float64, once with ``kernels="plain"``
(plain JAX everywhere) and once with ``kernels="cpu"`` (the XLA:CPU fast
primitives), and reports every evaluation row of both with the largest
relative difference per metric. Float64 makes the comparison sharp: where the
two kernel sets compute the same sums in a different order, the difference is
rounding, about 1e-13 relative, and any real disagreement shows at once.

  python benchmarks/kernel_parity.py            # writes docs/benchmarks/kernel_parity.md
"""

import json
import os
import sys
import tempfile

import jax
import numpy as np

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # pylint: disable=g-import-not-at-top
from ftjax import train

flags.DEFINE_integer("steps", 50, "Training rounds.")
flags.DEFINE_integer("eval_every", 10, "Rounds between evaluations.")
flags.DEFINE_string("dtype", "float64", "float64 (sharp) or float32.")
flags.DEFINE_string("out", "docs/benchmarks/kernel_parity.md", "Markdown output.")
FLAGS = flags.FLAGS

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "aggregate_norm",
           "ctma_kept_byzantine")


def _run(kernel_set: str) -> tuple[list[dict], list[np.ndarray]]:
  c = default.get_config()
  c.kernels = kernel_set
  c.dtype = FLAGS.dtype
  c.num_steps, c.eval_every = FLAGS.steps, FLAGS.eval_every
  c.progress = False
  c.attack.name = "alie"  # the attack the committed parity results were measured under
  c.checkpoint.enabled = False
  with tempfile.TemporaryDirectory() as workdir:
    result = train.train_and_evaluate(c, workdir)
    params = [np.asarray(p) for p in jax.tree.leaves(result.state.params)]
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
      return [json.loads(line) for line in fh], params


def main(argv):
  del argv
  (plain, params_plain), (cpu, params_cpu) = _run("plain"), _run("cpu")
  lines = ["# Plain against fast kernels", "",
           f"Produced by `python benchmarks/kernel_parity.py` ({FLAGS.dtype}, default config: "
           f"digits, W=17, f=8, ALIE, ctma(cwtm), mu2sgd; {FLAGS.steps} rounds, evaluated "
           f"every {FLAGS.eval_every}). Each cell: plain / cpu.", "",
           "| step | " + " | ".join(METRICS) + " |", "|---:|" + "---:|" * len(METRICS)]
  worst = {m: 0.0 for m in METRICS}
  for a, b in zip(plain, cpu):
    cells = []
    for m in METRICS:
      va, vb = a.get(m, float("nan")), b.get(m, float("nan"))
      cells.append(f"{va:.10g} / {vb:.10g}")
      worst[m] = max(worst[m], abs(va - vb) / max(abs(va), 1e-300))
    lines.append(f"| {a['step']} | " + " | ".join(cells) + " |")
  lines += ["", "Largest relative difference per metric:", "",
            "| metric | max relative difference |", "|---|---:|"]
  lines += [f"| {m} | {worst[m]:.2e} |" for m in METRICS]
  scale = max(float(np.abs(p).max()) for p in params_plain)
  diff = max(float(np.abs(a - b).max()) for a, b in zip(params_plain, params_cpu))
  lines += ["", "The logged metrics are float32 (a difference below about 6e-8 relative reads as 0), "
            f"so the final {FLAGS.dtype} parameters are compared too: largest absolute "
            f"difference {diff:.2e}, against a largest parameter magnitude of {scale:.3g} "
            f"({params_plain[0].dtype})."]
  with open(FLAGS.out, "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
