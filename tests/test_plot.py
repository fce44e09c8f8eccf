"""The plot command on a sweep workdir written by hand (docs/sweeps.md's layout)."""

import itertools
import json
import os
import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
from matplotlib import image as mpimage  # pylint: disable=g-import-not-at-top

from ftjax import plot, plot_run, results  # pylint: disable=g-import-not-at-top
from ftjax import plot_style as style  # pylint: disable=g-import-not-at-top

ATTACKS = ("alie", "sf")
FS = (2, 4)
PARTITIONS = ("iid", "dirichlet")
RULES = (("avg", "none", "avg"), ("cwtm", "ctma", "ctma(cwtm)"))
SEEDS = (1, 2)
STEPS = (10, 20, 30)
AXES = ["attack.name", "workers.byzantine", "data.partition", "aggregator.name",
        "aggregator.meta"]
FAILED = ("sf", 4, "iid", "avg")          # both seeds diverge: the cell failed
PARTIAL = ("alie", 2, "dirichlet", "avg")  # seed 2 diverges: only seed 1 counts


def _acc(i, seed, step):
  """A distinct test accuracy for every cell index, seed and step."""
  return 0.3 + 0.02 * i + 0.05 * seed + 0.1 * step / 10


def _write_sweep(w, axes=AXES, settings=None):
  """sweep.json, status.jsonl and metrics.jsonl of every run; results.csv via ftjax.results.

  Returns {(attack, f, partition, rule): [final accuracy of each finished seed]}.
  """
  settings = settings or list(itertools.product(ATTACKS, FS, PARTITIONS, RULES))
  cells, status, finals = [], [], {}
  for i, (attack, f, partition, (name, meta, spec)) in enumerate(settings):
    values = dict(zip(AXES, (attack, f, partition, name, meta)))
    values = {a: values[a] for a in axes}
    cell = ",".join(f"{a}={v}" for a, v in values.items())
    cells.append({"cell": cell, "values": values, "aggregator": spec,
                  "runs": [{"seed": s, "workdir": f"runs/{cell}/seed={s}"} for s in SEEDS]})
    key = (attack, f, partition, spec)
    finals[key] = []
    for s in SEEDS:
      run = os.path.join(w, "runs", cell, f"seed={s}")
      os.makedirs(run)
      rows = [{"step": t, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0,
               "test_acc": _acc(i, s, t), "aggregate_norm": 1.0, "wall_time": 2.0 * s * t,
               "steps_per_sec": 5.0 * s} for t in STEPS]
      with open(os.path.join(run, "metrics.jsonl"), "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
      failed = key[:3] + (name,) == FAILED or (key[:3] + (name,) == PARTIAL and s == 2)
      status.append({"cell": cell, "seed": s, "status": "failed" if failed else "ok",
                     "reason": "Training diverged" if failed else ""})
      if not failed:
        finals[key].append(rows[-1]["test_acc"])
  with open(os.path.join(w, "sweep.json"), "w") as fh:
    json.dump({"name": "fake", "axes": axes, "seeds": list(SEEDS), "cells": cells}, fh)
  with open(os.path.join(w, "status.jsonl"), "w") as fh:
    fh.write("".join(json.dumps(e) + "\n" for e in status))
  results.write_results(w)
  return finals


def _check_png(path):
  assert os.path.getsize(path) > 10_000, path
  with open(path, "rb") as fh:
    assert fh.read(8) == b"\x89PNG\r\n\x1a\n", path
  pixels = mpimage.imread(path)
  assert pixels.shape[0] > 300 and pixels.shape[1] > 400, (path, pixels.shape)
  assert pixels[..., :3].std() > 0.05, path  # not a blank canvas


@pytest.mark.slow
def test_plot_command_writes_every_figure(tmp_path, capsys):
  w = str(tmp_path / "sweep")
  os.makedirs(w)
  _write_sweep(w)
  plot.main(["ftjax plot", f"--workdir={w}"])
  names = ["curves", "rule_attack", "f_heterogeneity", "wall_time"]
  assert sorted(os.listdir(os.path.join(w, "plots"))) == sorted(
      f"{n}.{ext}" for n in names for ext in ("png", "pdf"))
  for name in names:
    _check_png(os.path.join(w, "plots", f"{name}.png"))
    with open(os.path.join(w, "plots", f"{name}.pdf"), "rb") as fh:
      assert fh.read(5) == b"%PDF-"
  path = os.path.join(w, "plots", "curves")
  assert f"Wrote {path}.png and {path}.pdf" in capsys.readouterr().out


def test_rule_attack_heatmap_numbers(tmp_path):
  w = str(tmp_path)
  finals = _write_sweep(w)
  panels = plot.heatmap_data(w)
  names = {"iid": "i.i.d.", "dirichlet": "Dirichlet"}
  assert [p["title"] for p in panels] == [f"f = {f}, partition: {names[p]}"
                                          for f in FS for p in PARTITIONS]
  for panel, (f, partition) in zip(panels, itertools.product(FS, PARTITIONS)):
    assert panel["rows"] == ["avg", "ctma(cwtm)"] and panel["columns"] == list(ATTACKS)
    for (i, rule), (j, attack) in itertools.product(enumerate(panel["rows"]),
                                                   enumerate(ATTACKS)):
      seeds = finals[(attack, f, partition, rule)]
      if (attack, f, partition) == FAILED[:3] and rule == "avg":
        assert panel["failed"][i, j] and np.isnan(panel["values"][i, j])
        assert not seeds
      else:
        assert not panel["failed"][i, j]
        assert panel["values"][i, j] == pytest.approx(sum(seeds) / len(seeds))
  # The partial cell counts seed 1 only: cell index 2 (alie, f=2, dirichlet, avg) -> 0.3 +
  # 0.04 + 0.05 + 0.3.
  assert panels[1]["values"][0, 0] == pytest.approx(0.69)
  # The worst case of avg at f=4, iid is the failed sf cell; else the smaller attack.
  assert plot._worst(panels[2]["values"][0], panels[2]["failed"][0]) == 1
  assert plot._worst(np.array([0.7, 0.6]), np.array([False, False])) == 1


def test_heatmap_draws_its_numbers_and_boxes_the_worst_attack(tmp_path):
  w = str(tmp_path)
  _write_sweep(w)
  fig = plot.heatmap(w)
  panel_axes = [a for a in fig.axes if a.get_title().startswith("f = ")]
  first = panel_axes[0]  # f=2, iid: every attack a little lower than sf (larger cell index)
  texts = [t.get_text() for t in first.texts]
  data = plot.heatmap_data(w)[0]
  assert texts == [f"{100 * v:.1f}" for v in data["values"].ravel()]
  assert [t.get_text() for t in first.get_xticklabels()] == ["ALIE", "sign flipping"]
  boxes = [(p.get_x() + p.get_width() / 2, p.get_y() + p.get_height() / 2)
           for p in first.patches]
  # Cell indices grow with the attack (alie before sf), so alie (column 0) is each row's worst.
  assert boxes == [(0, 0), (0, 1)]
  failed_panel = panel_axes[2]  # f=4, iid: avg failed under sf
  assert "failed" in [t.get_text() for t in failed_panel.texts]
  assert (1, 0) in [(p.get_x() + p.get_width() / 2, p.get_y() + p.get_height() / 2)
                    for p in failed_panel.patches]


def test_heterogeneity_heatmap_averages_over_the_attacks(tmp_path):
  w = str(tmp_path)
  finals = _write_sweep(w)
  panels = plot.heterogeneity_data(w)
  assert [p["title"] for p in panels] == ["avg", "ctma(cwtm)"]
  for panel in panels:
    assert panel["rows"] == list(FS) and panel["columns"] == list(PARTITIONS)
    assert panel["averaged"] == ["attack.name"]
    for (i, f), (j, partition) in itertools.product(enumerate(FS), enumerate(PARTITIONS)):
      if (f, partition, panel["title"]) == (FAILED[1], FAILED[2], FAILED[3]):
        assert panel["failed"][i, j] and np.isnan(panel["values"][i, j])
        continue
      means = [np.mean(finals[(a, f, partition, panel["title"])]) for a in ATTACKS]
      assert panel["values"][i, j] == pytest.approx(np.mean(means))


def test_curves_are_means_over_the_seeds(tmp_path):
  w = str(tmp_path)
  _write_sweep(w)
  fig = plot.curves(w)
  alie = next(a for a in fig.axes if a.get_title() == "attack: ALIE")
  label = "ctma(cwtm), f = 2, partition: i.i.d."
  line = next(l for l in alie.lines if l.get_label() == label)
  # Cell index 1 (alie, f=2, iid, ctma(cwtm)), seeds 1 and 2.
  expected = [100 * (_acc(1, 1, t) + _acc(1, 2, t)) / 2 for t in STEPS]
  np.testing.assert_allclose(line.get_ydata(), expected)
  np.testing.assert_allclose(line.get_xdata(), STEPS)
  # The partial cell's curve is its one finished seed.
  partial = next(l for l in alie.lines if l.get_label() == "avg, f = 2, partition: Dirichlet")
  np.testing.assert_allclose(partial.get_ydata(), [100 * _acc(2, 1, t) for t in STEPS])
  # The panels share their y-axis.
  sf = next(a for a in fig.axes if a.get_title() == "attack: sign flipping")
  assert sf.get_ylim() == alie.get_ylim() and alie.get_shared_y_axes().joined(alie, sf)
  # Training time: seed s runs 5 * s rounds per second, so t rounds take t / (5 s) seconds;
  # the mean over seeds 1 and 2 is 0.15 t (wall_time, with compilation, is not used).
  fig = plot.wall_time(w)
  alie = next(a for a in fig.axes if a.get_title() == "attack: ALIE")
  line = next(l for l in alie.lines if l.get_label() == label)
  np.testing.assert_allclose(line.get_xdata(), [0.15 * t for t in STEPS])


def test_training_time_sums_the_chunks_without_compilation():
  rows = [{"step": 10, "steps_per_sec": 2.0, "wall_time": 50.0},
          {"step": 30, "steps_per_sec": 4.0, "wall_time": 60.0}]
  assert plot.training_time(rows) == [5.0, 10.0]


def test_each_rule_has_one_colour_in_every_figure(tmp_path):
  w = str(tmp_path)
  _write_sweep(w)
  colours = {}
  for fig in (plot.curves(w), plot.wall_time(w)):
    for axis in fig.axes:
      for line in axis.lines:
        colours.setdefault(line.get_label().split(",")[0], set()).add(line.get_color())
  assert colours == {"avg": {style.PALETTE[0]}, "ctma(cwtm)": {style.PALETTE[1]}}
  # A spec without a fixed slot gets the same colour every time, from the palette.
  assert style.rule_color("krum") == style.rule_color("krum") in style.PALETTE
  assert style.HEATMAP_CMAP == "viridis"
  assert plot.heatmap(w).axes[0].images[0].get_cmap().name == "viridis"


def test_one_run_gets_its_curves_ctma_rows_and_norm(tmp_path):
  w = str(tmp_path)
  rows = [{"step": t, "train_loss": 2.0 / t, "train_acc": 0.5 + t / 100, "test_loss": 1.0 / t,
           "test_acc": 0.4 + t / 100, "aggregate_norm": 3.0 - t / 10,
           "ctma_kept_honest": 8.0 + t / 10, "ctma_kept_byzantine": 1.0 - t / 10,
           "wall_time": 1.0 * t, "steps_per_sec": 5.0} for t in (5, 10)]
  with open(os.path.join(w, "metrics.jsonl"), "w") as fh:
    fh.write("".join(json.dumps(r) + "\n" for r in rows))
  with open(os.path.join(w, "config.json"), "w") as fh:
    json.dump({"aggregator": {"name": "cwtm", "meta": "ctma"}, "attack": {"name": "alie"},
               "workers": {"num": 17, "byzantine": 8}}, fh)
  plot.main(["ftjax plot", f"--workdir={w}"])
  assert sorted(os.listdir(os.path.join(w, "plots"))) == ["run.pdf", "run.png"]
  _check_png(os.path.join(w, "plots", "run.png"))
  fig = plot_run.run(w)
  assert fig.texts[0].get_text() == "ctma(cwtm), attack: ALIE, W = 17, f = 8"
  by_label = {a.get_ylabel(): a for a in fig.axes if a.get_visible()}
  assert list(by_label) == ["accuracy (%)", "loss", "rows CTMA kept per round",
                            "norm of the aggregate"]
  test_acc = by_label["accuracy (%)"].lines[0]
  np.testing.assert_allclose(test_acc.get_ydata(), [45.0, 50.0])
  assert test_acc.get_color() == style.rule_color("ctma(cwtm)")
  kept = {l.get_label(): list(l.get_ydata()) for l in by_label["rows CTMA kept per round"].lines}
  assert kept == {"ctma kept, Byzantine": [0.5, 0.0], "ctma kept, honest": [8.5, 9.0]}
  np.testing.assert_allclose(by_label["norm of the aggregate"].lines[0].get_ydata(), [2.5, 2.0])
  # Without the optional columns: accuracy and loss only.
  with open(os.path.join(w, "metrics.jsonl"), "w") as fh:
    fh.write("".join(json.dumps({k: r[k] for k in ("step", "train_loss", "train_acc",
                                                   "test_loss", "test_acc")}) + "\n"
                     for r in rows))
  assert [a.get_ylabel() for a in plot_run.run(w).axes if a.get_visible()] == [
      "accuracy (%)", "loss"]
  # A backdoor's attack success rate joins the accuracy panel.
  with open(os.path.join(w, "metrics.jsonl"), "w") as fh:
    fh.write("".join(json.dumps({**r, "test_asr": t / 20}) + "\n" for r in rows
                     for t in [r["step"]]))
  accuracy = plot_run.run(w).axes[0]
  curves = {l.get_label(): list(l.get_ydata()) for l in accuracy.lines}
  assert curves["attack success (backdoor)"] == [25.0, 50.0]


def test_a_sweep_without_attack_or_heterogeneity_axes_skips_those_heatmaps(tmp_path, capsys):
  w = str(tmp_path)
  settings = [("sf", 2, "iid", rule) for rule in RULES]
  _write_sweep(w, axes=["aggregator.name", "aggregator.meta"], settings=settings)
  out = str(tmp_path / "elsewhere")
  plot.main(["ftjax.plot", f"--workdir={w}", f"--out={out}"])
  assert sorted(os.listdir(out)) == ["curves.pdf", "curves.png", "wall_time.pdf",
                                     "wall_time.png"]
  printed = capsys.readouterr().out
  assert "No rule x attack heatmap" in printed and "No f x heterogeneity heatmap" in printed
  for name in ("curves.png", "wall_time.png"):
    _check_png(os.path.join(out, name))


def test_bad_workdir_and_missing_matplotlib_give_one_line(tmp_path, capsys, monkeypatch):
  with pytest.raises(SystemExit) as e:
    plot.main(["ftjax.plot", f"--workdir={tmp_path}"])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "has no sweep.json" in err
  _write_sweep(str(tmp_path))
  os.rename(tmp_path / "results.csv", tmp_path / "results.csv.away")
  with pytest.raises(SystemExit):
    plot.main(["ftjax.plot", f"--workdir={tmp_path}"])
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "has no results.csv" in err
  assert not os.path.exists(tmp_path / "plots")
  os.rename(tmp_path / "results.csv.away", tmp_path / "results.csv")
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
  monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
  with pytest.raises(SystemExit):
    plot.main(["ftjax.plot", f"--workdir={tmp_path}"])
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'pip install "ftjax[plots]"' in err
  with pytest.raises(plot.PlotError, match=r'pip install "ftjax\[plots\]"'):
    plot.curves(str(tmp_path))
