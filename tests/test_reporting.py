"""Metric files: CSV/JSONL rows, resume truncation, changing columns."""

import csv
import json

from ftjax import reporting


def _csv(path):
  with open(path) as fh:
    return list(csv.DictReader(fh))


def test_rows_go_to_csv_and_jsonl(tmp_path, capsys):
  r = reporting.Reporter(str(tmp_path), total_steps=20, show_progress=False)
  r.write({"step": 10, "train_loss": 1.5, "test_acc": 0.5})
  r.write({"step": 20, "train_loss": 1.0, "test_acc": 0.75})
  r.close()
  rows = _csv(tmp_path / "metrics.csv")
  assert [row["step"] for row in rows] == ["10", "20"]
  assert float(rows[1]["test_acc"]) == 0.75
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["train_loss"] for l in lines] == [1.5, 1.0]
  out = capsys.readouterr().out
  assert "test_acc" in out and "0.7500" in out  # the console table, on stdout


def test_resume_drops_rows_past_the_checkpoint(tmp_path):
  r = reporting.Reporter(str(tmp_path), total_steps=30, show_progress=False)
  for step in (10, 20, 30):
    r.write({"step": step, "x": float(step)})
  r.close()
  r = reporting.Reporter(str(tmp_path), total_steps=30, start_step=20, show_progress=False)
  r.write({"step": 30, "x": -1.0})
  r.close()
  rows = _csv(tmp_path / "metrics.csv")
  assert [(row["step"], row["x"]) for row in rows] == [("10", "10.0"), ("20", "20.0"),
                                                        ("30", "-1.0")]


def test_new_column_rewrites_the_csv_header(tmp_path):
  r = reporting.Reporter(str(tmp_path), total_steps=2, show_progress=False)
  r.write({"step": 1, "a": 1.0})
  r.write({"step": 2, "a": 2.0, "b": 3.0})
  r.close()
  rows = _csv(tmp_path / "metrics.csv")
  assert list(rows[0]) == ["step", "a", "b"]
  assert rows[0]["b"] == "" and rows[1]["b"] == "3.0"


def test_format_table():
  text = reporting.format_table([{"a": 1, "b": 0.123456}], ["a", "b"])
  assert text.splitlines()[2] == "| 1 | 0.1235 |"
