"""``ftjax list``: the names a config accepts, read from the library's own tables.

Each table is read through one small function (:func:`rules`, :func:`metas`,
...), so where a table lives can change in one place. :func:`sections`
returns the text of every listing; the command prints one or all of them.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from typing import Any, Callable, Mapping

from ftjax import configfiles


# --------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------


def rules() -> Mapping[str, Any]:
  """Base aggregation rules: name -> RuleInfo (options, requirement, build)."""
  from ftjax import aggregators  # pylint: disable=import-outside-toplevel
  return aggregators.AGGREGATORS


def metas() -> Mapping[str, Any]:
  """Meta- and pre-aggregators: name -> RuleInfo."""
  from ftjax import aggregators  # pylint: disable=import-outside-toplevel
  return aggregators.META_AGGREGATORS


def rule_aliases() -> Mapping[str, str]:
  """Other names of rules: alias -> name."""
  from ftjax import aggregators  # pylint: disable=import-outside-toplevel
  return aggregators.ALIASES


def attacks() -> Mapping[str, Any]:
  """Attacks: accepted name -> spec (``name``: the canonical name, ``defaults``: options)."""
  from ftjax import attacks as attacks_lib  # pylint: disable=import-outside-toplevel
  return attacks_lib.ATTACKS


def partitions() -> Mapping[str, Callable]:
  """Data partitions over the workers: name -> function."""
  from ftjax import sampling  # pylint: disable=import-outside-toplevel
  return sampling.PARTITIONS


def models() -> Mapping[str, Callable]:
  """Models: name -> builder."""
  from ftjax import models as models_lib  # pylint: disable=import-outside-toplevel
  return models_lib.MODELS


def estimators() -> Mapping[str, Callable]:
  """Worker estimators: name -> builder."""
  from ftjax import estimators as estimators_lib  # pylint: disable=import-outside-toplevel
  return estimators_lib.ESTIMATORS


def datasets() -> Mapping[str, Any]:
  """Dataset names: name -> spec (``source``: "digits", "npz" or "tfds")."""
  from ftjax import data  # pylint: disable=import-outside-toplevel
  return data.DATASETS


# --------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------


def plain(text: str) -> str:
  """Docstring text for a terminal: Sphinx roles and double backquotes dropped."""
  text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
  return text.replace("``", "")


def _options(options: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in options.items()) or "-"


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
  return [line(header), *(line(r) for r in rows)]


def _summary(function: Callable) -> str:
  lines = (function.__doc__ or "").strip().splitlines()
  return plain(lines[0]) if lines else ""


def _rule_lines(table: Mapping[str, Any], extra: list[tuple[str, ...]]) -> list[str]:
  rows = extra + [(name, info.requirement, _options(info.options), _summary(info.build))
                  for name, info in table.items()]
  return _table(rows, ("name", "robust when", "options (defaults)", "what"))


def list_rules() -> list[str]:
  aliases = ", ".join(f"{a} = {n}" for a, n in rule_aliases().items())
  return ["Base rules: --config.aggregator.name=NAME; options under "
          "--config.aggregator.options.NAME.OPTION (docs/aggregators.md). W workers, f "
          f"Byzantine. Aliases: {aliases or 'none'}.", "",
          *_rule_lines(rules(), [])]


def list_metas() -> list[str]:
  return ["Meta-aggregators: --config.aggregator.meta=NAME wraps the base rule, e.g. "
          "ctma(cwtm); a full spec such as arc(ctma(cwtm)) goes in aggregator.name with "
          "meta=none (docs/aggregators.md).", "",
          *_rule_lines(metas(), [("none", "-", "-", "the base rule alone")])]


def list_attacks() -> list[str]:
  names: dict[str, list[str]] = {}
  specs = {}
  for name, spec in attacks().items():
    names.setdefault(spec.name, [])
    specs[spec.name] = spec
    if name != spec.name:
      names[spec.name].append(name)
  rows = [(name, ", ".join(aliases) or "-", _options(specs[name].defaults))
          for name, aliases in names.items()]
  return ["Attacks: --config.attack.name=NAME; options under "
          "--config.attack.options.NAME.OPTION (docs/attacks.md). An option shown as None "
          "is computed (e.g. alie's z).", "", *_table(rows, ("name", "aliases", "options"))]


def _default_config():
  path = configfiles.resolve("default").partition(":")[0]
  spec = importlib.util.spec_from_file_location("ftjax_listing_default", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def list_splits() -> list[str]:
  data_fields = _default_config().data
  rows = []
  for name, function in partitions().items():
    fields = [p for p in inspect.signature(function).parameters
              if p in data_fields and p not in ("partition", "name")]
    rows.append((name, ", ".join(f"data.{p}={data_fields[p]!r}" for p in fields) or "-"))
  return ["Data partitions over the workers: --config.data.partition=NAME (docs/data.md).", "",
          *_table(rows, ("name", "config fields it reads (defaults)"))]


def list_models() -> list[str]:
  return ["Models: --config.model.name=NAME (docs/architecture.md says how to add one).", "",
          *models()]


def list_estimators() -> list[str]:
  return ["Worker estimators: --config.optim.estimator=NAME; their fields are optim.* in "
          "configs/default.py (docs/estimators.md).", "", *estimators()]


def list_datasets() -> list[str]:
  where = {"digits": "built in (scikit-learn's 8x8 digits, offline)",
           "npz": "a local .npz file: --config.data.path=FILE (docs/data.md)",
           "tfds": "TFDS (the tfds extra), prepared once (docs/data.md)"}
  rows = [(name, where.get(spec.source, spec.source)) for name, spec in datasets().items()]
  return ["Datasets: --config.data.name=NAME.", "", *_table(rows, ("name", "source"))]


def list_configs() -> list[str]:
  return ["Shipped configs: ftjax train --config=NAME[:arg] (or a path to your own file).",
          "  " + ", ".join(configfiles.shipped("config")),
          "Shipped sweeps: ftjax sweep --sweep=NAME[:arg] (docs/sweeps.md).",
          "  " + ", ".join(configfiles.shipped("sweep")),
          f"They are the files of {configfiles.configs_dir()}."]


SECTIONS: dict[str, Callable[[], list[str]]] = {
    "rules": list_rules, "metas": list_metas, "attacks": list_attacks, "splits": list_splits,
    "models": list_models, "estimators": list_estimators, "datasets": list_datasets,
    "configs": list_configs,
}


def text(section: str | None = None) -> str:
  """The listing of one section (a key of SECTIONS), or of every section."""
  names = [section] if section else list(SECTIONS)
  return "\n\n".join("\n".join(SECTIONS[name]()) for name in names) + "\n"
