"""The Colab quickstart stays in step with the library."""

import ast
import json
import os

import pytest

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "notebooks", "quickstart.ipynb")


def _code_cells():
  with open(NOTEBOOK) as fh:
    nb = json.load(fh)
  cells = []
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      # Shell (!) and magic (%) lines are IPython syntax, not Python.
      lines = [l for l in "".join(cell["source"]).splitlines()
               if not l.lstrip().startswith(("!", "%"))]
      cells.append("\n".join(lines))
  return cells


def test_every_code_cell_is_valid_python():
  cells = _code_cells()
  assert len(cells) >= 4
  for source in cells:
    ast.parse(source)


def test_aggregator_cell_runs_and_defends(capsys):
  cell = next(c for c in _code_cells() if "make_aggregator" in c)
  exec(compile(cell, "quickstart-cell", "exec"), {})  # pylint: disable=exec-used
  lines = dict(line.split(" distance to the honest mean: ")
               for line in capsys.readouterr().out.strip().splitlines())
  distances = {k.strip(): float(v) for k, v in lines.items()}
  assert distances["avg"] > 40          # 8 of 17 rows at 100 drag the mean away
  assert distances["ctma(cwtm)"] < 1.5  # the defence stays near the honest mean
