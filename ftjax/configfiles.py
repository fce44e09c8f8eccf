"""Where config files are found: a path, or the name of a config shipped with ftjax.

The run configs (``configs/*.py``) and the sweep configs
(``configs/sweeps/*.py``) of the repository are installed with the package as
``ftjax.configs`` and ``ftjax.configs.sweeps``, so ``ftjax train
--config=default`` works without a checkout. A config is named by

* a path to a file, kept as given when it exists (``configs/mnist.py``,
  ``/abs/my_config.py``);
* a bare name, the shipped file of that name (``default``, ``mnist.py``);
* a checkout-relative ``configs/...`` path that is not there, the shipped copy
  of that file (what the shipped sweeps' ``base`` fields name);

each optionally followed by ``:arg`` (``mnist:mnist.npz``). Nothing here
imports JAX.
"""

from __future__ import annotations

import importlib.util
import os

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {"config": "", "sweep": "sweeps"}  # kind -> folder under the configs directory


class ConfigNotFound(ValueError):
  """A bare config name that no shipped config has; the message lists the shipped ones."""


def configs_dir() -> str:
  """The shipped configs: the installed ``ftjax.configs``, else the checkout's ``configs/``."""
  try:
    spec = importlib.util.find_spec("ftjax.configs")
  except ImportError:
    spec = None
  if spec is not None and spec.submodule_search_locations:
    return list(spec.submodule_search_locations)[0]
  return os.path.join(CHECKOUT, "configs")


def shipped(kind: str = "config") -> list[str]:
  """The names of the shipped configs of ``kind`` ("config" or "sweep"), sorted."""
  folder = os.path.join(configs_dir(), KINDS[kind])
  if not os.path.isdir(folder):
    return []
  return sorted(name[:-3] for name in os.listdir(folder)
                if name.endswith(".py") and not name.startswith("_") and
                name != "paper_common.py")


def resolve(spec: str, kind: str = "config") -> str:
  """``spec`` (``name``, ``path`` or either with ``:arg``) as ``file.py[:arg]``.

  Raises:
    ConfigNotFound: a bare name that is neither a file nor a shipped config.
  """
  path, colon, arg = spec.partition(":")
  if not path or os.path.isfile(path):
    return spec
  shipped_dir = configs_dir()
  if os.sep not in path and "/" not in path:
    name = path[:-3] if path.endswith(".py") else path
    candidate = os.path.join(shipped_dir, KINDS[kind], name + ".py")
    if os.path.isfile(candidate):
      return candidate + colon + arg
    raise ConfigNotFound(
        f"no {kind} file or shipped {kind} named {path!r}; the shipped {kind}s are "
        f"{', '.join(shipped(kind))}, or give a path to a .py file.")
  relative = os.path.normpath(path).split(os.sep)
  if relative[0] == "configs":
    candidate = os.path.join(shipped_dir, *relative[1:])
    if os.path.isfile(candidate):
      return candidate + colon + arg
  return spec
