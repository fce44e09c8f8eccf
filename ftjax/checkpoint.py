"""Orbax checkpoints of the latest and the best training state.

Two managers live under ``<workdir>/checkpoints``: ``latest`` (rewritten at every
evaluation, used to resume) and ``best`` (rewritten when the test accuracy
improves). Each checkpoint holds the whole :class:`ftjax.train.TrainState`
(model, server and per-worker estimator states, step, PRNG key data) plus a
small JSON of bookkeeping (best accuracy so far, wall time spent).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
  """Saves and restores the latest and the best state of one run.

  Args:
    workdir: the run's directory; checkpoints go to ``workdir/checkpoints``.
    enabled: when False every method is a no-op (``restore_latest`` gives None).
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._managers = {}
    if not enabled:
      return
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    for name in ("latest", "best"):
      self._managers[name] = ocp.CheckpointManager(
          os.path.join(root, name),
          options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

  def restore_latest(self, abstract_state: PyTree) -> Optional[tuple[PyTree, dict]]:
    """Restores the latest checkpoint into the structure of ``abstract_state``.

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
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta)

  def save(self, which: str, step: int, state: PyTree, meta: dict) -> None:
    """Writes ``state`` as the ``which`` ('latest' or 'best') checkpoint at ``step``."""
    if not self.enabled:
      return
    manager = self._managers[which]
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    """Blocks until asynchronous writes are on disk."""
    for manager in self._managers.values():
      manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending writes and releases the managers."""
    for manager in self._managers.values():
      manager.wait_until_finished()
      manager.close()
