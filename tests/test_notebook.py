"""The Colab quickstart stays in step with the library and the packaging."""

import ast
import csv
import json
import os
import re

import pytest

pytestmark = pytest.mark.slow  # minutes of compiling; CI runs it, -m "not slow" skips it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _raw_code_cells():
  with open(NOTEBOOK) as fh:
    nb = json.load(fh)
  return ["".join(cell["source"]) for cell in nb["cells"] if cell["cell_type"] == "code"]


def _code_cells():
  """The code cells as plain Python.

  Shell (!) and magic (%) lines are IPython syntax, not Python; each becomes a
  ``pass`` at its own indentation, so that a block holding only such lines
  still parses.
  """
  cells = []
  for source in _raw_code_cells():
    lines = []
    for line in source.splitlines():
      stripped = line.lstrip()
      if stripped.startswith(("!", "%")):
        line = line[:len(line) - len(stripped)] + "pass"
      lines.append(line)
    cells.append("\n".join(lines))
  return cells


def test_every_code_cell_is_valid_python():
  cells = _code_cells()
  assert len(cells) >= 4
  for source in cells:
    ast.parse(source)


def test_setup_installs_ftjax_with_pip():
  cells = _raw_code_cells()
  assert not any("sys.path" in c for c in cells), "install ftjax with pip, not sys.path"
  setup = cells[0]
  pip_lines = [l.strip() for l in setup.splitlines() if l.strip().startswith("%pip install")]
  # Inside a checkout: the checkout itself, editable; elsewhere: the GitHub package.
  assert any(" -e " in l and ".." in l for l in pip_lines), pip_lines
  assert any("git+https://" in l for l in pip_lines), pip_lines
  assert "../pyproject.toml" in setup
  # The extras the notebook asks for exist in pyproject.toml.
  with open(os.path.join(ROOT, "pyproject.toml")) as fh:
    pyproject = fh.read()
  for extra in set(re.findall(r"\[(\w+)\]", " ".join(pip_lines))):
    assert re.search(rf"^{extra}\s*=", pyproject, re.M), f"no extra {extra!r} in pyproject.toml"


def test_aggregator_cell_runs_and_defends(capsys):
  cell = next(c for c in _code_cells() if "aggregator" in c and "train_and_evaluate" not in c)
  exec(compile(cell, "quickstart-cell", "exec"), {})  # pylint: disable=exec-used
  lines = dict(line.split(" distance to the honest mean: ")
               for line in capsys.readouterr().out.strip().splitlines())
  distances = {k.strip(): float(v) for k, v in lines.items()}
  assert distances["avg"] > 40          # 8 of 17 rows at 100 drag the mean away
  assert distances["ctma(cwtm)"] < 1.5  # the defence stays near the honest mean


def test_the_whole_notebook_runs_on_a_tiny_config(tmp_path, monkeypatch):
  """Every cell, in order, in a kernel: FTJAX_NOTEBOOK_QUICK=1 shrinks the runs to a few rounds."""
  nbclient = pytest.importorskip("nbclient")
  nbformat = pytest.importorskip("nbformat")
  runs = str(tmp_path / "runs")
  monkeypatch.setenv("FTJAX_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("FTJAX_NOTEBOOK_RUNS", runs)  # the kernel inherits the environment
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Opened from notebooks/ as in a checkout: ftjax is importable, so nothing is installed.
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

  cells = [c for c in nb.cells if c.cell_type == "code"]
  assert not any(o.output_type == "error" for c in cells for o in c.outputs)
  # The training runs went to RUNS, with the quick sizes.
  # Defended and undefended, under sign flipping and under ALIE.
  for name in ("notebook_ctma", "notebook_avg", "notebook_ctma_alie", "notebook_avg_alie"):
    with open(os.path.join(runs, name, "metrics.jsonl")) as fh:
      assert json.loads(fh.readlines()[-1])["step"] == 20  # the quick size
  # The sweep finished all 4 cells x 2 seeds and its table is shown.
  with open(os.path.join(runs, "notebook_sweep", "results.csv")) as fh:
    table = list(csv.DictReader(fh))
  assert len(table) == 4 and all(row["status"] == "ok" for row in table)
  shown = [o for c in cells for o in c.outputs if "text/markdown" in o.get("data", {})]
  assert any("Worst case per rule" in o.data["text/markdown"] for o in shown)
  # The comparison shows one figure, a panel per attack.
  compare = next(c for c in cells if "train_pair(" in c.source)
  assert len([o for o in compare.outputs if "image/png" in o.get("data", {})]) == 1
  # The plot cell shows its three figures inline.
  plot_cell = next(c for c in cells if "plot.curves(SWEEP)" in c.source)
  images = [o for o in plot_cell.outputs if "image/png" in o.get("data", {})]
  assert len(images) == 3
