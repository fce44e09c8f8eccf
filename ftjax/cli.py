"""Command-line helpers shared by the ftjax commands (ftjax.commands, main.py).

Bad input ends the program with one line on stderr (``ftjax: error: ...``)
instead of a traceback: exit 2 for bad flags, 1 for a config or run the user
must fix.
"""

from __future__ import annotations

import re
import sys

from absl import flags


def fail(message: str, code: int = 2) -> None:
  """One line on stderr and exit: 2 for bad flags, 1 for a config or run the user must fix."""
  print(f"ftjax: error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(code)


def parse_flags(argv, *, command: str = "python main.py", config_flag: str = "config",
                fields_doc: str = "configs/default.py"):
  """absl's flag parsing, with one line instead of a traceback for a bad override or file.

  Args:
    argv: the command line.
    command: how the program is started, for the ``--helpfull`` hint.
    config_flag: the ``config_flags.DEFINE_config_file`` flag whose overrides
      are checked.
    fields_doc: the file that lists the config's fields, named in the message.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "Traceback (most recent call last)" in text:
      # A config file that raised while loading: its own error is the last line.
      head = text.split("Traceback")[0].strip().rstrip(":")
      last = [l.strip() for l in text.splitlines() if l.strip()][-1]
      text = f"{head}: {last}"
    fail(f"{text} ({command} --helpfull lists the flags).")
  except (KeyError, AttributeError) as e:
    if isinstance(e, AttributeError) and "get_config" in str(e):
      fail(f"the --{config_flag} file defines no get_config() (see {fields_doc}).")
    # ml_collections names the missing field and often a close match.
    text = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\'", "'")
    field = re.search(r"'([^']+)'", text)
    hint = re.search(r"Did you mean .*\?", text)
    fail(f"a --{config_flag}.* override names a field the config does not have"
         f"{f' ({field.group(1)!r})' if field else ''}. {hint.group(0) + ' ' if hint else ''}"
         f"{fields_doc} lists every field.")


def load_config(config_flag: str = "config"):
  """The value of a config-file flag, or one line when the file failed to load."""
  try:
    config = getattr(flags.FLAGS, config_flag)
    config.get("dtype")  # a file that failed to load raises on first use
    return config
  except (OSError, ImportError, SyntaxError, AttributeError) as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    fail(f"cannot load the --{config_flag} file: {lines[-1] if lines else type(e).__name__}")
