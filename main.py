r"""ftjax command line: train and evaluate one run from a config file.

  python main.py --config configs/default.py --workdir /tmp/ftjax/default \
    --config.workers.num=17 --config.aggregator.name=cwtm \
    --config.aggregator.meta=ctma --config.attack.name=alie

Running the same command again with the same --workdir resumes from the latest
checkpoint.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ftjax import sharding
from ftjax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py), optionally file.py:arg.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, config and checkpoints.")
flags.DEFINE_integer(
    "cpu_devices", 1,
    "CPU devices to expose (XLA_FLAGS=--xla_force_host_platform_device_count): 1 (default) "
    "= one device; N > 1 lets config.devices=0 split the workers' gradients over N devices "
    "(XLA:CPU runs each convolution on one core; which count is fastest depends on the "
    "step, see README); 0 = one per core. Ignored when XLA_FLAGS already sets the count.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.cpu_devices < 0:
    raise app.UsageError("--cpu_devices must be >= 0 (0 = one per core).")
  # Before anything touches a device: the count is fixed when JAX starts its CPU client.
  sharding.expose_cpu_devices(FLAGS.cpu_devices)
  if not FLAGS["verbosity"].present:
    # Libraries (Orbax) log every checkpoint at INFO; the console table is enough.
    logging.set_verbosity(logging.WARNING)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train.ConfigError, train.TrainingDiverged) as e:
    # Bad input and divergence are the user's to fix: one clear line, no traceback.
    print(f"ftjax: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
