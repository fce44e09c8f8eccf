"""python -m ftjax <command>: the ftjax command (ftjax/commands.py)."""

from ftjax import commands

commands.main()
