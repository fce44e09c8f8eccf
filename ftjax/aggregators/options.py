"""The shipped rules' option checks (one sentence per bad value)."""

from __future__ import annotations

from typing import Any

from ftjax import registry

_INITS = ("zero", "mean", "cwmed")
_CENTRES = _INITS + ("previous",)  # centred clipping: also the previous round's aggregate


def check(info: Any, rule_name: str, name: str, value: Any) -> None:
  """Refuses a bad value of option ``name`` of rule ``rule_name`` in one sentence.

  A registered rule (``info.registered``) is checked by its own ``check``, or
  against the type of its default; the shipped rules' options here.

  Raises:
    ValueError: naming the option, the value and what is valid.
  """
  if info is not None and info.registered:
    if info.check is not None:
      info.check(**{**info.options, name: value})
    else:
      registry.check_like_default(f"{rule_name}.{name}", value, info.options.get(name))
    return

  def bad(what):
    raise ValueError(f"Option {rule_name}.{name}={value!r} is invalid: {what}.")

  is_int = isinstance(value, int) and not isinstance(value, bool)
  is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
  if name in ("lower", "keep_ties") and not isinstance(value, bool):
    bad("use True or False")
  if name in ("iters", "max_iters") and not (is_int and value >= 1):
    bad("use an integer >= 1")
  if name == "tau" and rule_name == "centered_clipping" and value is None:
    return  # the adaptive radius
  if name in ("nu", "tau") and not (is_num and value > 0):
    bad("use a positive number")
  if name == "tol" and value is not None and not (is_num and value > 0):
    bad("use a positive number, or None for a fixed number of iterations")
  if name in ("bucket_size", "num_selected", "num_neighbours") and value is not None and not (
      is_int and value >= 1):
    bad("use an integer >= 1, or None for the default")
  if name == "init" and rule_name == "centered_clipping" and value not in _CENTRES:
    bad(f"valid first centres are {list(_CENTRES)}")
  if name == "init" and rule_name != "centered_clipping" and value not in _INITS:
    bad(f"valid starting points are {list(_INITS)}")
