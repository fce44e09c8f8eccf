"""Sweep configs: a grid x explicit cells x seeds expanded into runs (docs/sweeps.md).

:func:`expand` turns a sweep config into a :class:`Sweep` of cells, each a
base config with some fields overridden and one run per seed; every field
name and value is checked here, in one sentence naming it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import itertools
import json
import os
import re
from typing import Any

import ml_collections

from ftjax import build as build_lib
from ftjax import configfiles
from ftjax.build import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP_FIELDS = ("name", "base", "overrides", "grid", "cells", "seeds", "max_batch", "devices",
                "share_programs")


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: a cell's config with one seed."""
  cell: str
  seed: int
  workdir: str                        # relative to the sweep's workdir
  config: ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Cell:
  """One setting of the axes and its runs, one per seed."""
  name: str
  values: dict      # axis -> value
  aggregator: str   # the resolved rule spec, e.g. "ctma(cwtm)"
  runs: tuple


@dataclasses.dataclass(frozen=True)
class Sweep:
  """An expanded sweep config."""
  name: str
  axes: tuple
  seeds: tuple
  cells: tuple
  max_batch: int
  devices: int = 1  # local devices a batch's runs are spread over (0 = all)
  share_programs: bool = True  # cells that differ only in their attack share a program

  def to_json(self) -> dict:
    """The ``sweep.json`` record (docs/sweeps.md)."""
    return {"name": self.name, "axes": list(self.axes), "seeds": list(self.seeds),
            "cells": [{"cell": c.name, "values": c.values, "aggregator": c.aggregator,
                       "runs": [{"seed": r.seed, "workdir": r.workdir} for r in c.runs]}
                      for c in self.cells]}


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path.py`` or ``path.py:arg``.

  The path is relative to the current directory or the checkout; a bare name or a
  ``configs/...`` path that is not there is a shipped config (:mod:`ftjax.configfiles`).
  """
  path, _, arg = spec.partition(":")
  found = next((p for p in (path, os.path.join(ROOT, path)) if os.path.isfile(p)), None)
  if found is None:
    try:
      found = configfiles.resolve(path, "config")
    except configfiles.ConfigNotFound as e:
      raise ConfigError(f"The sweep's base config: {e}") from None
    found = found if os.path.isfile(found) else None
  if found is None:
    raise ConfigError(f"The sweep's base config {path!r} does not exist; set base to a "
                            f"config file such as 'configs/default.py'.")
  module_spec = importlib.util.spec_from_file_location("ftjax_sweep_base", found)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"The sweep's base config {spec!r} cannot be loaded "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})."
                            ) from None


def _plain(value: Any) -> Any:
  """ConfigDicts, tuples and lists of the sweep config as plain Python values."""
  if isinstance(value, ml_collections.ConfigDict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return value


def get_field(config: ml_collections.ConfigDict, field: str) -> Any:
  """The value of a dotted field (``attack.name``)."""
  value = config
  for part in field.split("."):
    value = value[part]
  return _plain(value)


def set_field(config: ml_collections.ConfigDict, field: str, value: Any, where: str) -> None:
  """Sets a dotted field, refusing unknown fields and ill-typed values in one sentence."""
  section = config
  parts = field.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(section, ml_collections.ConfigDict) or part not in section:
      keys = list(section.keys()) if isinstance(section, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, keys, n=1)
      prefix = ".".join(parts[:depth])
      hint = f" (did you mean {'.'.join([prefix, close[0]]).lstrip('.')!r}?)" if close else ""
      raise ConfigError(f"{where}: the config has no field {field!r}{hint}; "
                              f"configs/default.py lists every field.")
    if depth < len(parts) - 1:
      section = section[part]
  try:
    section[parts[-1]] = value
  except (TypeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"{where}: {field}={value!r} is not a valid value ({first}).") from None


def _pairs(value, where: str) -> list[tuple[str, Any]]:
  """A mapping or a sequence of (dotted field, value) pairs, as ordered pairs.

  A ConfigDict iterates in sorted order; a sequence of pairs keeps its order.
  """
  if value is None:
    return []
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    pairs = list(value.items())
  else:
    pairs = list(value)
  for pair in pairs:
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
      raise ConfigError(f"{where} holds (dotted field, value) pairs or a dict, got "
                              f"{pair!r}.")
  return [(field, _plain(v)) for field, v in pairs]


def _grid(spec) -> list[tuple[str, list]]:
  """The grid as ordered (field, values) pairs."""
  out = []
  for field, values in _pairs(spec.get("grid", None), "sweep.grid"):
    if not isinstance(values, list) or not values:
      raise ConfigError(f"sweep.grid[{field!r}] must be a non-empty list of values, got "
                              f"{values!r}.")
    out.append((field, values))
  return out


def slug(value: Any) -> str:
  """A value as a file-name-safe string (cell names, table columns)."""
  text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
  return re.sub(r"[^A-Za-z0-9_.+()-]", "_", text)


def expand(spec: ml_collections.ConfigDict) -> Sweep:
  """Expands a sweep config into its cells and runs (grid x cells x seeds).

  Raises:
    train.ConfigError: one sentence naming the field, for an unknown sweep or
      config field, an ill-typed value, no seeds or two equal cells.
  """
  for key in spec.keys():
    if key not in SWEEP_FIELDS:
      close = difflib.get_close_matches(key, SWEEP_FIELDS, n=1)
      raise ConfigError(f"The sweep config has no field {key!r}"
                        f"{f' (did you mean {close[0]!r}?)' if close else ''}; its "
                        f"fields are {', '.join(SWEEP_FIELDS)}.")
  seeds, max_batch, devices, share = _settings(spec)
  base = load_config_file(spec.get("base", None) or "configs/default.py")
  for field, value in _pairs(spec.get("overrides", None), "sweep.overrides"):
    set_field(base, field, value, "sweep.overrides")
  grid = _grid(spec)
  explicit = _plain(spec.get("cells", None) or [])
  axes = _axes(grid, explicit)
  cells, names = [], set()
  points = itertools.product(*[values for _, values in grid]) if grid else [()]
  for point, extra in itertools.product(list(points), explicit or [{}]):
    overrides = {**dict(zip([f for f, _ in grid], point)), **extra}
    cell = _cell(base, overrides, axes, seeds, devices)
    if cell.name in names:
      where = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
      raise ConfigError(f"sweep cell {where} is the same setting as the cell {cell.name!r}; "
                        f"every cell must differ.")
    names.add(cell.name)
    cells.append(cell)
  return Sweep(spec.get("name", None) or "sweep", tuple(axes), tuple(seeds), tuple(cells),
               max_batch, devices, share)


def _settings(spec) -> tuple[list, int, int, bool]:
  """The sweep's own fields: seeds, max_batch, devices and share_programs, checked."""
  seeds = list(_plain(spec.get("seeds", None) or []))
  if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
    raise ConfigError(f"sweep.seeds must be a non-empty list of integers, got {seeds!r}.")
  if len(set(seeds)) != len(seeds):
    raise ConfigError(f"sweep.seeds lists a seed twice: {seeds}.")
  max_batch = spec.get("max_batch", None) or len(seeds)
  if not isinstance(max_batch, int) or max_batch < 1:
    raise ConfigError(f"sweep.max_batch must be a positive integer, got {max_batch!r}.")
  devices = spec.get("devices", None)
  devices = 1 if devices is None else devices
  if not isinstance(devices, int) or isinstance(devices, bool) or devices < 0:
    raise ConfigError(f"sweep.devices must be an integer >= 0 (0 = all local devices, "
                      f"1 = one device), got {devices!r}.")
  share = spec.get("share_programs", None)
  share = True if share is None else share
  if not isinstance(share, bool):
    raise ConfigError(f"sweep.share_programs must be True or False, got {share!r}.")
  return seeds, max_batch, devices, share


def _axes(grid: list, explicit) -> list[str]:
  """The axes: the grid's fields, then every field the explicit cells set."""
  if not isinstance(explicit, list) or not all(isinstance(c, dict) for c in explicit):
    raise ConfigError("sweep.cells must be a list of dicts of overrides "
                      "({'aggregator.name': 'krum', ...}).")
  grid_fields = [field for field, _ in grid]
  axes = list(grid_fields)
  for cell in explicit:
    for field in cell:
      if field in grid_fields:
        raise ConfigError(f"sweep.cells sets {field!r}, which is also a grid axis; set "
                          f"it in one of them.")
      if field not in axes:
        axes.append(field)
  if "seed" in axes:
    raise ConfigError("The seed is not an axis: list the seeds in sweep.seeds.")
  return axes


def _cell(base, overrides: dict, axes: list, seeds: list, devices: int) -> Cell:
  """One cell: the base config with ``overrides``, and one run per seed."""
  config = ml_collections.ConfigDict(base.to_dict())
  where = "sweep cell " + ", ".join(f"{k}={v!r}" for k, v in overrides.items())
  for field, value in overrides.items():
    set_field(config, field, value, where)
  values = {axis: get_field(config, axis) for axis in axes}
  name = ",".join(f"{axis}={slug(values[axis])}" for axis in axes) or "base"
  runs = []
  for seed in seeds:
    run_config = ml_collections.ConfigDict(config.to_dict())
    run_config.seed = seed
    run_config.progress = False
    if devices != 1:  # the runs are spread over the devices: each run on one of them
      run_config.devices = 1
    runs.append(Run(name, seed, os.path.join("runs", name, f"seed={seed}"), run_config))
  return Cell(name, values, build_lib.aggregator_spec(config.aggregator.name,
                                                      config.aggregator.meta), tuple(runs))
