r"""ftjax command line: train and evaluate one run from a config file.

  python main.py --config configs/default.py --workdir /tmp/ftjax/default \
    --config.workers.num=17 --config.aggregator.name=cwtm \
    --config.aggregator.meta=ctma --config.attack.name=alie

Running the same command again with the same --workdir resumes from the latest
checkpoint.
"""

import re
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


def _fail(message: str, code: int = 2) -> None:
  """One line on stderr and exit: 2 for bad flags, 1 for a config or run the user must fix."""
  print(f"ftjax: error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(code)


def _parse_flags(argv):
  """absl's flag parsing, with one line instead of a traceback for a bad override or file."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e} (python main.py --helpfull lists the flags).")
  except (KeyError, AttributeError) as e:
    # ml_collections names the missing field and often a close match.
    text = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\'", "'")
    field = re.search(r"'([^']+)'", text)
    hint = re.search(r"Did you mean .*\?", text)
    _fail(f"a --config.* override names a field the config does not have"
          f"{f' ({field.group(1)!r})' if field else ''}. {hint.group(0) + ' ' if hint else ''}"
          f"configs/default.py lists every field.")


def _load_config():
  """FLAGS.config, or one line when the config file failed to load."""
  try:
    config = FLAGS.config
    config.get("dtype")  # a file that failed to load raises on first use
    return config
  except (OSError, ImportError, SyntaxError, AttributeError) as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(f"cannot load the --config file: {lines[-1] if lines else type(e).__name__}")


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
    train.train_and_evaluate(_load_config(), FLAGS.workdir)
  except (train.ConfigError, train.TrainingDiverged) as e:
    # Bad input and divergence are the user's to fix: one clear line, no traceback.
    _fail(str(e), code=1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
