"""Calling a rule a user wrote as a plain function (:func:`ftjax.aggregators.rule`)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import jax

PyTree = Any
Diagnostics = dict[str, jax.Array]


def _takes_key(fn: Callable) -> bool:
  """Whether ``fn`` takes two positional arguments (updates, key)."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def call(fn: Callable, name: str, x: PyTree, key) -> tuple[PyTree, Diagnostics]:
  """A user's rule on the rows: ``fn(x)`` for a function of the updates alone, else
  ``fn(x, key)``, whose result must be ``(aggregate, diagnostics)``."""
  if not _takes_key(fn):
    return fn(x), {}
  out = fn(x, key)
  if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
    raise ValueError(f"Rule {name!r} takes (updates, key), so it must return (aggregate, "
                     f"diagnostics dict); a function of updates alone may return the aggregate.")
  return out[0], dict(out[1])
