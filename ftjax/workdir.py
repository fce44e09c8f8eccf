"""A run's workdir: checks before a run, config.json, and the files a run writes.

:class:`RunFiles` holds one run's checkpointer and reporter, resumes from the
latest checkpoint, records evaluation rows and checkpoints in the order that
makes an interruption harmless, and closes them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Sequence


from ftjax import checkpoint as checkpoint_lib
from ftjax import configfiles
from ftjax import reporting
from ftjax import results
from ftjax.build import ConfigError, Setup

# Config fields that may change between an interrupted run and its resume.
RESUMABLE_FIELDS = ("num_steps", "eval_every", "wandb", "checkpoint", "progress", "loop",
                    "devices", "mesh", "eval_steps", "eval_at_start", "report_last_k")


def config_fields(config, drop: Sequence[str] = ()) -> dict:
  """The config as a JSON-able dict, without the dotted fields in ``drop``."""
  fields = json.loads(config.to_json())
  for name in drop:
    *parents, leaf = name.split(".")
    node = fields
    for p in parents:
      node = node.get(p, {})
    node.pop(leaf, None)
  return fields


def check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as fh:
      fh.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"Cannot write to workdir {workdir!r} ({e.strerror}); pass a "
                      f"writable --workdir.") from None


def _comparable(fields: dict) -> dict:
  return {k: v for k, v in fields.items() if k not in RESUMABLE_FIELDS + ("resolved",)}


def _fill_added_fields(saved: dict, defaults: dict) -> dict:
  """``saved`` with the fields it lacks set to their defaults.

  A run recorded before a config field existed trained with that field's
  default behaviour (every new field defaults to the behaviour before it), so
  it resumes under a config that leaves the field at its default.
  """
  out = dict(saved)
  for k, v in defaults.items():
    if k not in out:
      out[k] = v
    elif isinstance(v, dict) and isinstance(out[k], dict):
      out[k] = _fill_added_fields(out[k], v)
  return out


def _default_fields() -> dict:
  """The default config's fields: the checkout's configs/default.py, else the shipped one."""
  path = os.path.join(configfiles.CHECKOUT, "configs", "default.py")
  if not os.path.isfile(path):
    path = os.path.join(configfiles.configs_dir(), "default.py")
  spec = importlib.util.spec_from_file_location("ftjax_default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return _comparable(json.loads(module.get_config().to_json()))


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _differences(va, vb, f"{prefix}{k}.")
    elif va != vb:
      out.append(f"{prefix}{k} was {va!r}, now {vb!r}")
  return out


def check_resume_config(workdir: str, fields: dict) -> None:
  """Refuses a workdir that holds another config's run, or checkpoints of an unknown one.

  ``fields``: the config's fields as JSON (:func:`config_fields`, ``Setup.fields``).
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
      raise ConfigError(
          f"The workdir {workdir!r} holds checkpoints but no config.json, so the run they "
          f"belong to is unknown; restore its config.json or use another --workdir.")
    return
  try:
    with open(path) as fh:
      saved = _fill_added_fields(_comparable(json.load(fh)), _default_fields())
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} cannot be read as JSON ({e}); the workdir is damaged: restore "
                      f"the file or use another --workdir.") from None
  now = _comparable(fields)
  if saved != now:
    raise ConfigError(
        f"The workdir {workdir!r} holds a run with a different config "
        f"({'; '.join(_differences(saved, now))}); resume it with the same config "
        f"or use another --workdir.")


def write_config(workdir: str, setup: Setup) -> None:
  """config.json: the config, plus what it resolved to (the rule, f, attack, loop)."""
  with open(os.path.join(workdir, "config.json"), "w") as fh:
    json.dump({**setup.fields, "resolved": setup.resolved}, fh, indent=2)


class RunFiles:
  """One run's workdir: its checkpointer, reporter, last row and bookkeeping."""

  def __init__(self, workdir: str, setup: Setup, console: bool, start_state):
    self.workdir = workdir
    fields = setup.fields
    self.checkpointer = checkpoint_lib.Checkpointer(workdir,
                                                    enabled=fields["checkpoint"]["enabled"])
    self.last_k = setup.report_last_k
    self.meta = {"best_test_acc": -1.0, "best_step": 0, "wall_time": 0.0}
    restored = self.checkpointer.restore_latest(start_state)
    self.restored = restored is not None
    self.state = restored[0] if self.restored else None
    if self.restored:
      self.meta.update(restored[1])
    self.step = int(self.state.step) if self.restored else 0
    self.reporter = reporting.Reporter(
        workdir, total_steps=setup.num_steps, start_step=self.step, wandb_config=fields["wandb"],
        run_config=fields, show_progress=console and fields["progress"],
        print_rows=console, resumed=self.restored)
    self.row = self.reporter.rows[-1] if self.reporter.rows else {}
    self.wall_start = time.perf_counter() - self.meta["wall_time"]

  def record(self, row: dict, state) -> None:
    """Writes an evaluation row, then the latest (and, when best, the best) checkpoint.

    The row goes first: a crash between the two leaves a row past the
    checkpoint, which a resume drops. The best row is :func:`ftjax.results.best_row`'s
    (on validation when the run holds a validation split out, else on test)."""
    self.reporter.write(row)
    self.row, self.step = row, row["step"]
    best = results.best_row(self.reporter.rows) is self.reporter.rows[-1]
    if best:
      self.meta.update(best_test_acc=row["test_acc"], best_step=row["step"])
    self.meta["wall_time"] = row["wall_time"]
    self.checkpointer.save("latest", row["step"], state, self.meta)
    if best:
      self.checkpointer.save("best", row["step"], state, self.meta)

  def close(self, failing: bool) -> None:
    """Finishes the writes; a failed write must not mask the error already raised."""
    try:
      self.checkpointer.close()
    except checkpoint_lib.CheckpointWriteError:
      if not failing:
        raise
    finally:
      self.reporter.close()

  def summary(self) -> str:
    """The closing line: the last, best and last-k mean test accuracies (docs/sweeps.md)."""
    s = results.run_summary(self.reporter.rows, self.last_k)
    if s["final_step"] is None:
      return f"Finished {self.workdir} at step {self.step} with no evaluation row."
    return (f"Finished {self.workdir} at step {s['final_step']}: test accuracy "
            f"{s['final_test_acc']:.4f}, best {s['best_test_acc']:.4f} at step {s['best_step']} "
            f"(on {s['best_on']}), mean of the last {s['last_k']} evaluations "
            f"{s['last_k_test_acc']:.4f}; {self.meta['wall_time']:.0f} s. Metrics in "
            f"{self.reporter.csv_path}; plot with `ftjax plot --workdir={self.workdir}`.")
