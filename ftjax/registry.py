"""What registering a rule or an attack shares: options read from a function's signature,
and the checks of option and config values.

A registered function's keyword-only parameters (with defaults) are its
options; each option then takes values of its default's type unless the
registration gives its own check. A check is ``check(what, value) ->
normalised value`` raising ``ValueError`` with one sentence naming ``what``:
:func:`finite`, :func:`nonnegative`, :func:`positive`, :func:`int_at_least`,
:func:`optional`, :func:`choice`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional

import numpy as np


def options_from_signature(fn: Callable, positional: int, shape: str,
                           keyword: Optional[str] = None) -> dict[str, Any]:
  """``fn``'s keyword-only parameters but ``keyword``, with their defaults.

  Args:
    fn: the registered function.
    positional: how many positional parameters it must take.
    shape: its expected signature in words, for the error message.
    keyword: a keyword-only parameter it must take that is not an option (``f``).

  Raises:
    ValueError: another number of positional parameters, a missing
      ``keyword``, or an option without a default.
  """
  params = inspect.signature(fn).parameters
  given = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  if len(given) != positional or (keyword is not None and keyword not in params):
    raise ValueError(f"{fn.__name__} must be a function {shape}; it takes "
                     f"{inspect.signature(fn)}.")
  options = {}
  for name, p in params.items():
    if p.kind != p.KEYWORD_ONLY or name == keyword:
      continue
    if p.default is p.empty:
      raise ValueError(f"Option {name!r} of {fn.__name__} needs a default value.")
    options[name] = p.default
  return options


def check_like_default(what: str, value: Any, default: Any) -> Any:
  """``value`` if it has the type of ``default`` (anything when either is None).

  An int default takes ints, a float default ints or floats, a bool only bools.

  Raises:
    ValueError: naming ``what`` and the type wanted.
  """
  if default is None or value is None:
    return value
  if isinstance(default, bool) or isinstance(value, bool):
    ok = isinstance(default, bool) and isinstance(value, bool)
  elif isinstance(default, float):
    ok = isinstance(value, (int, float))
  else:
    ok = isinstance(value, type(default))
  if not ok:
    raise ValueError(f"Option {what}={value!r} is invalid: use a value of type "
                     f"{type(default).__name__}, like its default {default!r}.")
  return value


def finite(what: str, v: Any) -> float:
  """``v`` as a float, if it is a finite real number (not a bool)."""
  if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
      or not math.isfinite(v):
    raise ValueError(f"{what} must be a finite number, got {v!r}.")
  return float(v)


def nonnegative(what: str, v: Any) -> float:
  v = finite(what, v)
  if v < 0:
    raise ValueError(f"{what} must be >= 0, got {v}.")
  return v


def positive(what: str, v: Any) -> float:
  v = finite(what, v)
  if v <= 0:
    raise ValueError(f"{what} must be > 0, got {v}.")
  return v


def int_at_least(lowest: int, hint: str = "") -> Callable[[str, Any], int]:
  """The check of an integer (not a bool) >= ``lowest``; ``hint`` follows the bound."""
  def check(what, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lowest:
      raise ValueError(f"{what} must be an integer >= {lowest}{f' ({hint})' if hint else ''}, "
                       f"got {v!r}.")
    return int(v)
  return check


def optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
  """``check``, letting None through."""
  def wrapped(what, v):
    return None if v is None else check(what, v)
  return wrapped


def choice(*valid) -> Callable[[str, Any], Any]:
  """The check of a value among ``valid``."""
  def check(what, v):
    if v not in valid:
      raise ValueError(f"{what} must be one of {', '.join(map(repr, valid))}; got {v!r}.")
    return v
  return check
