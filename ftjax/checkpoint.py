"""Orbax checkpoints of the latest and the best training state.

Two managers live under ``<workdir>/checkpoints``: ``latest`` (rewritten at every
evaluation, used to resume) and ``best`` (rewritten when an evaluation becomes the
run's best: :func:`ftjax.results.best_row`, on the validation accuracy when the run holds
a validation split out, else on the test accuracy). Each checkpoint holds the whole
:class:`ftjax.train.TrainState` (model, server and per-worker estimator states, step,
PRNG key data) plus a small JSON of bookkeeping (the best evaluation's test accuracy and
step, wall time spent).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

PyTree = Any


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, permissions, ...); one line."""


class CheckpointRestoreError(ValueError):
  """The workdir's checkpoint does not fit the run's state (one line, for the user)."""


class _DropOrbaxErrors(logging.Filter):
  """Drops the error records (with tracebacks) that Orbax's writer threads log.

  The same failure reaches the caller as one :class:`CheckpointWriteError`;
  without the filter a full disk prints dozens of tracebacks before it.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if f"{os.sep}orbax{os.sep}" in record.pathname:
      return False
    # asyncio reports the same failure again for Orbax's unawaited futures and tasks.
    tb = record.exc_info[2] if record.exc_info else None
    return not (record.name == "asyncio" and ("orbax" in record.getMessage() or _from_orbax(tb)))


_FILTER = _DropOrbaxErrors()


def _from_orbax(tb) -> bool:
  while tb is not None:
    name = tb.tb_frame.f_code.co_filename
    if f"{os.sep}orbax{os.sep}" in name or f"{os.sep}etils{os.sep}" in name:
      return True
    tb = tb.tb_next
  return False


def _quiet_orbax_threads() -> None:
  """Drops the tracebacks of Orbax's writer threads and coroutines.

  A failed save also raises in Orbax's background threads, and pending
  coroutines complain at exit; the failure itself reaches the caller once, as a
  :class:`CheckpointWriteError`. Exceptions from anywhere else pass through.
  """
  if getattr(threading.excepthook, "_ftjax", False):
    return
  thread_hook, unraisable_hook, except_hook = (threading.excepthook, sys.unraisablehook,
                                               sys.excepthook)

  def closed_loop(error) -> bool:
    # Orbax's tensorstore callbacks post to an event loop that is already closed.
    return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)

  def on_thread_error(args):
    if not (_from_orbax(args.exc_traceback) or closed_loop(args.exc_value)):
      thread_hook(args)

  def on_uncaught(kind, error, tb):
    if not closed_loop(error):
      except_hook(kind, error, tb)

  def on_unraisable(unraisable):
    text = repr(unraisable.object)
    if not (_from_orbax(unraisable.exc_traceback) or "orbax" in text or
            "serialize" in text or closed_loop(unraisable.exc_value)):
      unraisable_hook(unraisable)

  on_thread_error._ftjax = True  # pylint: disable=protected-access
  threading.excepthook, sys.unraisablehook = on_thread_error, on_unraisable
  sys.excepthook = on_uncaught


def _reason(error: Exception) -> str:
  text = " ".join(str(error).split())
  if "No space left" in text or "os_error_code='28'" in text:
    return "no space left on the device"
  if "Permission denied" in text or "os_error_code='13'" in text:
    return "permission denied"
  return f"{type(error).__name__}: {text[:200]}"

logging.getLogger("asyncio").addFilter(_FILTER)


class Checkpointer:
  """Saves and restores the latest and the best state of one run.

  Args:
    workdir: the run's directory; checkpoints go to ``workdir/checkpoints``.
    enabled: when False every method is a no-op (``restore_latest`` gives None).
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:  # the hooks go in when checkpoints are written, not on import
      _quiet_orbax_threads()
    self.workdir = workdir
    self._managers = {}
    if not enabled:
      return
    logging.getLogger("absl").addFilter(_FILTER)
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    for name in ("latest", "best"):
      self._managers[name] = ocp.CheckpointManager(
          os.path.join(root, name),
          # A crash or a full disk can leave an unfinished save behind; it is never
          # restored, and removing it at start keeps Orbax from warning about it later.
          options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                               cleanup_tmp_directories=True))

  def restore_latest(self, abstract_state: PyTree) -> Optional[tuple[PyTree, dict]]:
    """Restores the latest checkpoint into the structure of ``abstract_state``.

    An array saved with more rows than its target but otherwise the same shape
    is restored as its first rows: the sharded layout pads the per-worker
    estimator states to a multiple of the device count
    (``ftjax.train.worker_state_rows``), and those padding rows come last.

    Args:
      abstract_state: a state (or ``jax.eval_shape`` of one) giving the tree
        structure, shapes and dtypes to restore into.

    Returns:
      ``(state, meta)`` or None when there is nothing to resume from.
    """
    if not self.enabled:
      return None
    manager = self._managers["latest"]
    step = manager.latest_step()
    if step is None:
      return None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target, strict=not self._padded_rows(step, target)),
          meta=ocp.args.JsonRestore()))
    except ValueError as e:  # Orbax: the saved tree's structure or shapes differ
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointRestoreError(
          f"The checkpoint of step {step} in {self.workdir} does not fit this run's state "
          f"(Orbax: {first.rstrip(':')}); it was written by another ftjax version or "
          f"layout. Resume it with the ftjax that wrote it, or start in a new workdir."
      ) from None
    return restored.state, dict(restored.meta)

  def _padded_rows(self, step: int, target: PyTree) -> bool:
    """Whether the checkpoint differs from ``target`` only by extra leading rows.

    Every saved array is looked up by its path in the checkpoint's metadata;
    any other difference, or a path not found, answers False (a strict
    restore then reports it).
    """
    try:  # the managers name each step's directory by the plain step number
      directory = self._managers["latest"].directory / str(step) / "state"
      stored = ocp.StandardCheckpointHandler().metadata(directory).tree
    except Exception:  # pylint: disable=broad-except
      return False
    padded = False
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
      node = stored
      for entry in path:
        name = getattr(entry, "name", getattr(entry, "key", getattr(entry, "idx", None)))
        if isinstance(node, dict):
          node = node.get(name, node.get(str(name)))
        elif isinstance(node, (list, tuple)) and isinstance(name, int) and name < len(node):
          node = node[name]
        else:
          node = None
        if node is None:
          return False
      shape = tuple(getattr(node, "shape", ()) or ())
      want = tuple(leaf.shape)
      if shape == want:
        continue
      if len(shape) != len(want) or not want or shape[1:] != want[1:] or shape[0] < want[0]:
        return False
      padded = True
    return padded

  def save(self, which: str, step: int, state: PyTree, meta: dict) -> None:
    """Writes ``state`` as the ``which`` ('latest' or 'best') checkpoint at ``step``."""
    if not self.enabled:
      return
    manager = self._managers[which]
    # Saving waits for the previous save of this manager, whose failure surfaces here.
    with self._reporting(which):
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  @contextlib.contextmanager
  def _reporting(self, which: str):
    """Turns a failed write of manager ``which`` into one :class:`CheckpointWriteError`."""
    try:
      yield
    except Exception as error:  # pylint: disable=broad-except
      try:  # let an earlier save still in flight finish, so that it counts as kept
        self._managers[which].wait_until_finished()
      except Exception:  # pylint: disable=broad-except
        pass  # it failed too; what is on disk below is what is kept
      # Read from disk: after a failed save the manager's own step list is not reliable.
      directory = os.path.join(os.path.abspath(self.workdir), "checkpoints", which)
      done = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(
          directory) else []
      kept = max(done) if done else None
      kept = (f"the complete checkpoint of step {kept} is kept" if kept is not None
              else "no complete checkpoint is on disk yet")
      raise CheckpointWriteError(
          f"Could not write the {which!r} checkpoint in {self.workdir} "
          f"({_reason(error)}); {kept}. Free space (or fix the workdir) and rerun the same "
          f"command to resume.") from None

  def wait(self) -> None:
    """Blocks until asynchronous writes are on disk.

    Raises:
      CheckpointWriteError: a save in flight failed.
    """
    for which, manager in self._managers.items():
      with self._reporting(which):
        manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending writes and releases the managers.

    Raises:
      CheckpointWriteError: a save in flight failed (the managers are released anyway).
    """
    try:
      self.wait()
    finally:
      for manager in self._managers.values():
        try:
          manager.close()
        except Exception:  # pylint: disable=broad-except
          pass  # Its failure was reported by wait(); closing must not mask it.
