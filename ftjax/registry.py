"""What registering a rule or an attack shares: options read from a function's signature.

A registered function's keyword-only parameters (with defaults) are its
options; each option then takes values of its default's type unless the
registration gives its own check.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional


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
