r"""Per-worker label histograms of every data split, drawn for docs/data.md.

The built-in digits data (1,438 training images, 10 classes) split over W=17
workers by each scheme of ftjax.data.PARTITIONS, with the default config's
seed and options (data.alpha, data.shards_per_worker, data.gamma): each panel
is one scheme, one stacked bar per worker, coloured by class. The "iid"
panel shows what each worker draws in one epoch of the shared sampler (it has
no shards of its own).

  python benchmarks/label_histograms.py            # -> docs/images/label_histograms.png
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from configs import default  # pylint: disable=g-import-not-at-top
from ftjax import sampling
from ftjax import data as data_lib
from ftjax import train

flags.DEFINE_integer("workers", 17, "W, the number of workers.")
flags.DEFINE_string("out", "docs/images/label_histograms.png", "PNG output.")
FLAGS = flags.FLAGS


def histograms(scheme, c):
  """int [W, C] label counts per worker for one scheme, as a run with config ``c`` sees it."""
  c = c.copy_and_resolve_references()
  c.data.partition = scheme
  setup = train.build(c)
  labels, classes = setup.dataset.train_labels, setup.dataset.num_classes
  if setup.partition is None:  # iid: one epoch of the shared per-round sampler
    n, w, b = labels.size, setup.num_workers, setup.batch_size
    idx = np.asarray(sampling.chunk_indices(jax.random.key(c.seed), 0, n // (w * b), n, w, b))
    shards = [idx[:, i].reshape(-1) for i in range(w)]
  else:
    p = setup.partition
    shards = [p.table[i, :p.sizes[i]] for i in range(p.table.shape[0])]
  return np.stack([np.bincount(labels[s], minlength=classes) for s in shards])


def title(scheme, c):
  extra = {"dirichlet": f" (alpha = {c.data.alpha})",
           "shards": f" ({c.data.shards_per_worker} per worker)",
           "gamma_similarity": f" (gamma = {c.data.gamma})",
           "iid": " (one epoch of the shared sampler)"}
  return scheme + extra.get(scheme, "")


def main(argv):
  del argv
  c = default.get_config()
  c.workers.num = FLAGS.workers
  schemes = list(sampling.PARTITIONS)
  cols = 2
  rows = -(-len(schemes) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(12, 3.2 * rows), squeeze=False)
  colours = plt.get_cmap("tab10").colors
  for ax, scheme in zip(axes.flat, schemes):
    counts = histograms(scheme, c)
    bottom = np.zeros(counts.shape[0])
    for k in range(counts.shape[1]):
      ax.bar(np.arange(counts.shape[0]), counts[:, k], bottom=bottom, width=0.8,
             color=colours[k % len(colours)], label=str(k))
      bottom += counts[:, k]
    ax.set_title(title(scheme, c), fontsize=11)
    ax.set_xticks(np.arange(counts.shape[0]))
    ax.set_xlabel("worker")
    ax.set_ylabel("examples")
    ax.margins(x=0.01)
    ax.set_ylim(0, 1.05 * counts.sum(1).max())
    print(f"{scheme}: classes per worker "
          f"{(counts > 0).sum(1).tolist()}, sizes {counts.sum(1).tolist()}", flush=True)
  for ax in list(axes.flat)[len(schemes):]:
    ax.axis("off")
  handles, names = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, names, title="class", loc="center right", fontsize=10)
  fig.suptitle(f"Per-worker label histograms, digits data, W = {c.workers.num} "
               f"(seed {c.seed})", fontsize=13)
  fig.tight_layout(rect=(0, 0, 0.93, 0.97))
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  fig.savefig(FLAGS.out, dpi=110)
  print(f"Wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
