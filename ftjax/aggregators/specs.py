"""The string spelling of rules: ``"arc(ctma(cwtm))"`` parsed, its options resolved, built.

Spec grammar: ``rule`` or ``meta(spec)``, nested freely; names resolve through the
tables of :mod:`.core` (built-in and registered rules alike) and their aliases.
"""

from __future__ import annotations

from typing import Any, Mapping

from ftjax import kernels as kernels_lib
from ftjax.aggregators.core import AGGREGATORS, ALIASES, META_AGGREGATORS, Aggregator
from ftjax.aggregators.core import _TABLE, _canonical, _check_f, _check_option


def _parse(spec: str) -> list[str]:
  """'arc(ctma(cwtm))' -> ['arc', 'ctma', 'cwtm'] (outermost first)."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"Aggregator spec must be a non-empty string such as 'ctma(cwtm)', "
                     f"got {spec!r}.")
  names, rest = [], spec.replace(" ", "").lower()
  while "(" in rest:
    head, _, rest = rest.partition("(")
    if not rest.endswith(")"):
      raise ValueError(f"Unbalanced parentheses in aggregator spec {spec!r}; write e.g. "
                       f"'ctma(cwtm)'.")
    rest = rest[:-1]
    names.append(_canonical(head))
  names.append(_canonical(rest))
  if ")" in rest:
    raise ValueError(f"Unbalanced parentheses in aggregator spec {spec!r}.")
  for n in names[:-1]:
    if n not in META_AGGREGATORS:
      hint = " (it is a base rule; only the innermost name may be one)" if n in AGGREGATORS else ""
      raise ValueError(f"Unknown meta-aggregator {n!r} in spec {spec!r}{hint}; valid "
                       f"meta-aggregators: {sorted(META_AGGREGATORS)}.")
  if names[-1] not in AGGREGATORS:
    raise ValueError(f"Unknown aggregator {names[-1]!r} in spec {spec!r}; valid base rules: "
                     f"{sorted(AGGREGATORS)} (aliases {ALIASES}); meta-aggregators "
                     f"{sorted(META_AGGREGATORS)} wrap one, e.g. 'ctma(cwtm)'.")
  return names


def spec_layers(spec: str) -> list[str]:
  """The canonical names of a spec's layers, outermost first: 'arc(ctma(cwtm))' -> [arc, ctma, cwtm].

  Raises:
    ValueError: an unparsable spec or an unknown name.
  """
  return _parse(spec)


def _resolve_options(options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict]:
  resolved = {name: dict(info.options) for name, info in _TABLE.items()}
  for raw_name, given in (options or {}).items():
    name = _canonical(raw_name)
    if name not in _TABLE:
      raise ValueError(f"Options given for unknown rule {raw_name!r}; valid names: "
                       f"{sorted(_TABLE)}.")
    if given is None:
      continue
    if not isinstance(given, Mapping):
      raise ValueError(f"Options for {raw_name!r} must be a mapping of option names to "
                       f"values, e.g. {{'{name}': {dict(_TABLE[name].options)}}}.")
    for key, value in given.items():
      if key not in _TABLE[name].options:
        raise ValueError(f"Unknown option {key!r} for {name!r}; valid options: "
                         f"{sorted(_TABLE[name].options) or 'none'}.")
      _check_option(name, key, value)
      resolved[name][key] = value
  return resolved


def make_aggregator(spec: str, f: int, *, num_workers: int | None = None,
                    options: Mapping[str, Mapping[str, Any]] | None = None,
                    kernels: str = "auto") -> Aggregator:
  """Builds an aggregator from its string spelling.

  ``make_aggregator("ctma(cwtm)", 4)`` equals ``ctma(cwtm(f=4))``: every layer
  gets ``f`` and its options.

  Args:
    spec: e.g. ``"cwtm"``, ``"ctma(cwtm)"``, ``"bucketing(cwmed)"``,
      ``"nnm+ctma(cwtm)"``, ``"arc(ctma(cwtm))"``; see :data:`AGGREGATORS`,
      :data:`META_AGGREGATORS` and :data:`ALIASES`.
    f: number of Byzantine workers to tolerate (integer >= 0).
    num_workers: if given, :meth:`Aggregator.check` runs for it.
    options: rule name -> keyword options, e.g.
      ``{"gm": {"iters": 3, "nu": 0.1, "init": "zero"}, "ctma": {"keep_ties": True}}``.
      Options of rules absent from ``spec`` are validated and ignored; missing
      ones take :data:`DEFAULT_OPTIONS`.
    kernels: kernel set of the primitives: ``"auto"``, ``"plain"`` or ``"cpu"``.

  Returns:
    The :class:`Aggregator`.

  Raises:
    ValueError: unknown names or options, bad option values, a bad f or kernel
      set, or (with ``num_workers``) a worker count the rule cannot handle.
  """
  _check_f(f)
  kernels_lib.check(kernels)
  names = _parse(spec)
  opts = _resolve_options(options)
  agg = AGGREGATORS[names[-1]].build(f=f, **opts[names[-1]])
  for name in reversed(names[:-1]):
    agg = META_AGGREGATORS[name].build(agg, f=f, **opts[name])
  agg = agg.with_kernels(kernels)
  if num_workers is not None:
    agg.check(num_workers)
  return agg


