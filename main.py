r"""ftjax command line: train and evaluate one run from a config file.

  python main.py --config configs/default.py --workdir /tmp/ftjax/default \
    --config.workers.num=17 --config.aggregator.name=cwtm \
    --config.aggregator.meta=ctma --config.attack.name=alie

Running the same command again with the same --workdir resumes from the latest
checkpoint.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ftjax import cli
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
flags.DEFINE_enum(
    "distributed", "off", ["off", "on"],
    "on: join a multi-process run through jax.distributed before touching a device; "
    "--coordinator_address, --num_processes and --process_id, or what JAX detects (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI, a TPU "
    "pod slice), say where and who (docs/scaling.md). Implied by --coordinator_address.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes of the run (jax.distributed).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value; "
             f"python main.py --helpfull lists them).")
  if FLAGS.cpu_devices < 0:
    cli.fail("--cpu_devices must be >= 0 (0 = one per core).")
  # Before anything touches a device: the count is fixed when JAX starts its CPU client.
  sharding.expose_cpu_devices(FLAGS.cpu_devices)
  if FLAGS.distributed == "on" or FLAGS.coordinator_address:
    try:
      sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                      FLAGS.process_id)
    except ValueError as e:
      cli.fail(str(e))
  if not FLAGS["verbosity"].present:
    # Libraries (Orbax) log every checkpoint at INFO; the console table is enough.
    logging.set_verbosity(logging.WARNING)
  try:
    train.train_and_evaluate(cli.load_config(), FLAGS.workdir)
  except train.RUN_ERRORS as e:
    # Bad input, divergence and a full disk are the user's to fix: one clear line.
    cli.fail(str(e), code=1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
