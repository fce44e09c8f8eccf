"""The ``ftjax`` command: ``ftjax train | sweep | plot | list``.

Installed as a console script with the package (``ftjax``), also run as
``python -m ftjax``; ``python main.py`` in a checkout is :func:`train`.
Bad input ends with one line, ``ftjax: error: ...``, and exit status 2 (1 for
a run the user must fix), never a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import textwrap
from typing import Optional

from ftjax import cli
from ftjax import run as run_lib
from ftjax import configfiles

USAGE = """\
usage: ftjax <command> [flags]

commands:
  train   train and evaluate one run from a config (what python main.py does)
  sweep   a grid of runs (attacks x rules x seeds x any field) in one workdir
  plot    figures of a sweep or of one run, as PNG and PDF
  list    the names the configs accept: ftjax list [rules|metas|attacks|splits|models|
          estimators|datasets|configs]

ftjax <command> --help describes a command, its flags and where the config fields
are documented.
"""

CONFIG_FIELDS = """\
The config fields, each documented on its line in configs/default.py
({default}):
seed, dtype, num_steps, eval_every, eval_steps, eval_at_start, report_last_k, loop,
devices, kernels, mesh.*, workers.* (num, byzantine, batch_size),
data.* (name, path, partition, alpha, validation, ...),
model.*, optim.* (estimator, lr, clip, ...), aggregator.* (name, meta, f, options.*),
attack.* (name, options.*), checkpoint.*, wandb.*. The names they accept: ftjax list.
"""

TRAIN_HELP = """\
usage: {command} --config=NAME_OR_FILE[:arg] --workdir=DIR [--config.FIELD=VALUE ...]

Trains and evaluates one run. --config names a shipped config or a config file,
optionally with an argument after a colon (mnist:mnist.npz, configs/cifar10.py:resnet18).
Shipped configs: {configs}.
--config.FIELD=VALUE overrides any field, e.g. --config.aggregator.name=cwtm
--config.aggregator.meta=ctma --config.attack.name=alie. Rerunning the same command
with the same --workdir resumes from the latest checkpoint.

{fields}
The workdir receives config.json, metrics.csv, metrics.jsonl and checkpoints/
(README.md, "Run"); ftjax plot --workdir=DIR draws its curves.

flags:
{flags}"""

SWEEP_HELP = """\
usage: {command} --sweep=NAME_OR_FILE[:arg] --workdir=DIR [--retry_failed]

Runs a grid of experiments in one process and one workdir, then writes results.csv and
results.md. --sweep names a shipped sweep or a sweep config file, optionally NAME:arg.
Shipped sweeps: {sweeps}.
A sweep config's fields (name, base, overrides, grid, cells, seeds, max_batch, devices,
share_programs) are documented in docs/sweeps.md and, commented, in
configs/sweeps/demo.py ({demo}); its overrides and axes name run config fields, each
documented in configs/default.py. Rerunning the command resumes the sweep.

flags:
{flags}"""

TRAIN_FLAGS = ("config", "workdir", "cpu_devices", "distributed", "coordinator_address",
               "num_processes", "process_id")


def _flag_help(names) -> str:
  from absl import flags  # pylint: disable=import-outside-toplevel
  lines = []
  for name in names:
    flag = flags.FLAGS[name]
    default = "" if flag.default is None else f" (default: {flag.default})"
    lines.append(textwrap.fill(f"--{name}: {flag.help}{default}", width=88,
                               initial_indent="  ", subsequent_indent="      "))
  return "\n".join(lines)


def _wants_help(argv) -> bool:
  return any(a in ("-h", "--help") for a in argv[1:])


def _resolve(argv: list[str], flag: str, kind: str) -> list[str]:
  """argv with the value of --flag (``--flag=V`` or ``--flag V``) as a file (configfiles)."""
  out = list(argv)
  for i, arg in enumerate(out):
    try:
      if arg.startswith(f"--{flag}="):
        out[i] = f"--{flag}=" + configfiles.resolve(arg.split("=", 1)[1], kind)
      elif arg == f"--{flag}" and i + 1 < len(out):
        out[i + 1] = configfiles.resolve(out[i + 1], kind)
    except configfiles.ConfigNotFound as e:
      cli.fail(f"--{flag}: {e}")
  return out


# --------------------------------------------------------------------------
# ftjax train
# --------------------------------------------------------------------------


def _define_train_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file(
      "config", None, "A shipped config's name (default, mnist, ...) or a config file, "
      "optionally NAME:arg.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for metrics, config and checkpoints.")
  flags.DEFINE_integer(
      "cpu_devices", 1,
      "CPU devices to expose (XLA_FLAGS=--xla_force_host_platform_device_count): 1 = one "
      "device; N > 1 lets config.devices=0 split the workers' gradients over N devices "
      "(XLA:CPU runs each convolution on one core; which count is fastest depends on the "
      "step, see docs/performance.md); 0 = one per core. Ignored when XLA_FLAGS already "
      "sets the count.")
  flags.DEFINE_enum(
      "distributed", "off", ["off", "on"],
      "on: join a multi-process run through jax.distributed before touching a device; "
      "--coordinator_address, --num_processes and --process_id, or what JAX detects "
      "(JAX_COORDINATOR_ADDRESS, SLURM, Open MPI, a TPU pod slice), say where and who "
      "(docs/scaling.md). Implied by --coordinator_address.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (jax.distributed).")
  flags.DEFINE_integer("num_processes", None, "Number of processes of the run (jax.distributed).")
  flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
  flags.mark_flags_as_required(["config", "workdir"])


def _train_main(argv, command: str) -> None:
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  from ftjax import sharding, train as train_lib  # pylint: disable=import-outside-toplevel
  values = flags.FLAGS
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value; "
             f"{command} --help lists them).")
  if values.cpu_devices < 0:
    cli.fail("--cpu_devices must be >= 0 (0 = one per core).")
  # Before anything touches a device: the count is fixed when JAX starts its CPU client.
  sharding.expose_cpu_devices(values.cpu_devices)
  if values.distributed == "on" or values.coordinator_address:
    try:
      sharding.initialize_distributed(values.coordinator_address, values.num_processes,
                                      values.process_id)
    except ValueError as e:
      cli.fail(str(e))
  if not values["verbosity"].present:
    # Libraries (Orbax) log every checkpoint at INFO; the console table is enough.
    logging.set_verbosity(logging.WARNING)
  try:
    train_lib.train_and_evaluate(cli.load_config(), values.workdir)
  except train_lib.RUN_ERRORS as e:
    # Bad input (exit 2), divergence and a full disk (exit 1): one clear line.
    cli.fail(str(e), code=run_lib.exit_code(e))


def train(argv: list[str], command: str = "ftjax train") -> None:
  """Trains one run: ``argv`` is ``[program, --config=..., --workdir=..., ...]``."""
  from absl import app  # pylint: disable=import-outside-toplevel
  _define_train_flags()
  if _wants_help(argv):
    print(TRAIN_HELP.format(
        command=command, configs=", ".join(configfiles.shipped("config")),
        fields=CONFIG_FIELDS.format(default=os.path.join(configfiles.configs_dir(),
                                                         "default.py")),
        flags=_flag_help(TRAIN_FLAGS)))
    return
  app.run(functools.partial(_train_main, command=command), argv=_resolve(argv, "config", "config"),
          flags_parser=functools.partial(cli.parse_flags, command=command))


# --------------------------------------------------------------------------
# ftjax sweep, plot, list
# --------------------------------------------------------------------------


def sweep(argv: list[str], command: str = "ftjax sweep") -> None:
  """Runs a sweep: ``argv`` is ``[program, --sweep=..., --workdir=...]``."""
  from ftjax import sweep as sweep_lib  # pylint: disable=import-outside-toplevel
  sweep_lib.define_flags()
  if _wants_help(argv):
    print(SWEEP_HELP.format(
        command=command, sweeps=", ".join(configfiles.shipped("sweep")),
        demo=os.path.join(configfiles.configs_dir(), "sweeps", "demo.py"),
        flags=_flag_help(("sweep", "workdir", "retry_failed"))))
    return
  sweep_lib.run(_resolve(argv, "sweep", "sweep"), command=command)


def plot(argv: list[str], command: str = "ftjax plot") -> None:
  """Draws the figures of a sweep's or a run's workdir."""
  from ftjax import plot as plot_lib  # pylint: disable=import-outside-toplevel
  plot_lib.main(argv, command=command)


def list_names(argv: list[str], command: str = "ftjax list") -> None:
  """Prints the names the configs accept: every table, or the one named."""
  from ftjax import listing  # pylint: disable=import-outside-toplevel
  sections = ", ".join(listing.SECTIONS)
  if _wants_help(argv):
    print(f"usage: {command} [{'|'.join(listing.SECTIONS)}]\n\nPrints the names a config "
          f"accepts, with their options and defaults: every table, or the one named.")
    return
  if len(argv) > 2 or (len(argv) == 2 and argv[1] not in listing.SECTIONS):
    cli.fail(f"{command} takes at most one of {sections}; got {' '.join(argv[1:])!r}.")
  print(listing.text(argv[1] if len(argv) == 2 else None), end="")


COMMANDS = {"train": train, "sweep": sweep, "plot": plot, "list": list_names}


def main(argv: Optional[list[str]] = None) -> None:
  """``ftjax <command> [flags]``."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE, end="")
    return
  name = argv[1]
  if name not in COMMANDS:
    cli.fail(f"unknown command {name!r}; the commands are {', '.join(COMMANDS)} "
             f"(ftjax --help).")
  try:
    COMMANDS[name]([f"ftjax {name}", *argv[2:]])
  except BrokenPipeError:
    # The reader of stdout went away (ftjax list | head): stop quietly, as Unix tools do.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(141)
