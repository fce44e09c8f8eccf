r"""Reliability campaign: hostile updates, bad inputs and faults.

Writes docs/benchmarks/reliability.md with three parts:

* hostile updates: every robust rule and meta-aggregator at its defaults
  against f hostile rows (:mod:`ftjax.stress`), float32 and float64;
* bad inputs: every bad config, data file and workdir state tried, each run as
  ``python main.py`` with the one line it prints and its exit code;
* faults: kill -9 at random moments of a run (and of a sweep), a disk filled up
  during checkpoint and metrics writes, Weights & Biases unreachable, a run
  resumed with a raised ``num_steps``, and two processes of one config; every
  interrupted run is resumed and its metrics compared with an uninterrupted one.

  python benchmarks/reliability.py                      # everything (about 30 min)
  python benchmarks/reliability.py --parts=hostile,inputs --kill_trials=0

The disk-full trials mount a small tmpfs and need root; without it they are
reported as skipped.
"""

import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # pylint: disable=g-import-not-at-top

PARTS = ("hostile", "inputs", "faults", "kills", "sweep")
flags.DEFINE_list("parts", list(PARTS), "Which parts to run; the others keep their last "
                  "results (kept in the .json beside --out).")
flags.DEFINE_integer("kill_trials", 20, "kill -9 trials on a run.")
flags.DEFINE_integer("sweep_kill_trials", 6, "kill -9 trials on a sweep.")
flags.DEFINE_integer("seed", 0, "Seed of the random kill moments.")
flags.DEFINE_string("out", "docs/benchmarks/reliability.md", "Markdown output.")
FLAGS = flags.FLAGS

PYTHON = sys.executable
# A small run that still checkpoints often, so that kills land in saves too.
SMALL = ["--config", "configs/default.py", "--config.num_steps=150", "--config.eval_every=10",
         "--config.workers.num=7", "--config.workers.byzantine=3",
         "--config.model.name=tiny_cnn", "--config.progress=False"]
TIMING_FIELDS = ("wall_time", "steps_per_sec")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def main_py(args, workdir, env=None, timeout=600):
  """Runs main.py; returns (exit code, stderr)."""
  proc = subprocess.run([PYTHON, "main.py", *args, f"--workdir={workdir}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})
  return proc.returncode, proc.stderr


def error_lines(stderr):
  """The lines a user sees as errors, and whether any traceback was printed."""
  lines = [l for l in stderr.splitlines() if l.startswith("ftjax: error:")]
  return lines, "Traceback" in stderr


def metrics(workdir):
  """The evaluation rows without the timing fields."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as fh:
    for line in fh:
      try:
        rows.append(json.loads(line))
      except ValueError:  # blank, or a line the run is writing at this moment
        pass
  return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def md_table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
  return lines


# --------------------------------------------------------------------------
# Hostile updates
# --------------------------------------------------------------------------


def hostile_part():
  from ftjax import stress  # pylint: disable=g-import-not-at-top
  tic = time.perf_counter()
  cells = stress.table()
  kinds = list(stress.HOSTILE_ROWS)
  lines = [
      "## Hostile updates", "",
      "Every base rule, and every meta-aggregator over cwtm, at its default options "
      "(`ftjax.stress.table()`). The last f of W rows hold the hostile values, the others "
      "are honest rows 2 + 0.5 N(0, 1) in d = 50 coordinates. A cell shows the output's "
      "distance to the honest mean over the honest radius (max_i |h_i - m|): **box** when "
      "the output is inside the honest rows' coordinate-wise box, a ratio <= 1.00 when it is "
      "inside the honest ball, **FAIL r** when it is neither (r is the ratio), **non-finite** "
      "when it is not finite; *refused* when the rule's robustness condition rejects this W "
      "and f before running (the rule's one line is given below the table). `clip(cwtm)` is "
      "compared with the clipped honest rows. avg is the non-robust baseline.", ""]
  by_setting = collections.defaultdict(list)
  for c in cells:
    by_setting[(c.num_workers, c.f, c.dtype)].append(c)
  refusals = {}
  summary = collections.Counter()
  for (w, f, dtype), group in by_setting.items():
    lines += [f"### W={w}, f={f}, {dtype}", ""]
    rows = []
    for spec in dict.fromkeys(c.spec for c in group):
      row = [spec]
      for kind in kinds:
        (c,) = [c for c in group if c.spec == spec and c.kind == kind]
        if c.refused:
          row.append("*refused*")
          refusals[(spec, w, f)] = c.refused
          summary["refused"] += 1
          continue
        s = c.spread
        if not s.finite:
          row.append("**non-finite**")
        elif s.in_box:
          row.append("box")
        elif s.ball_ratio <= 1:
          row.append(f"{s.ball_ratio:.2f}")
        else:
          row.append(f"**FAIL {s.ball_ratio:.3g}**")
        if spec != "avg":
          summary["within" if s.within else "outside"] += 1
      rows.append(row)
    lines += md_table(["rule"] + kinds, rows) + [""]
  if refusals:
    lines += ["Refusals:", ""]
    lines += [f"- {spec} at W={w}, f={f}: {msg}" for (spec, w, f), msg in refusals.items()]
    lines.append("")
  lines += [f"Robust cells (avg excluded) within the honest spread: {summary['within']}; "
            f"outside: {summary['outside']}; refused: {summary['refused']}. "
            f"({time.perf_counter() - tic:.0f} s)", ""]
  return lines, summary


# --------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------


def _npz(path, **arrays):
  rng = np.random.default_rng(0)
  base = dict(train_images=rng.integers(0, 256, (400, 8, 8, 1), dtype=np.uint8),
              train_labels=np.arange(400) % 10,
              test_images=rng.integers(0, 256, (100, 8, 8, 1), dtype=np.uint8),
              test_labels=np.arange(100) % 10)
  base.update({k: v for k, v in arrays.items() if v is not None})
  for k in [k for k, v in arrays.items() if v is None]:
    del base[k]
  np.savez(path, **base)
  return path


def _truncated(path):
  _npz(path)
  with open(path, "rb") as fh:
    data = fh.read()
  with open(path, "wb") as fh:
    fh.write(data[:len(data) // 2])
  return path


def _garbage(path):
  with open(path, "wb") as fh:
    fh.write(os.urandom(2000))
  return path


def bad_inputs(tmp):
  """(what, main.py args, setup of the workdir or None)."""
  npz = lambda name, **a: _npz(os.path.join(tmp, name + ".npz"), **a)
  data = lambda path: ["--config.data.name=npz", f"--config.data.path={path}"]
  rng = np.random.default_rng(1)
  cases = [
      ("field name typo", ["--config.aggregator.nmae=cwtm"]),
      ("integer field given text", ["--config.workers.num=abc"]),
      ("float field given text", ["--config.optim.lr=fast"]),
      ("unknown flag", ["--epochs=3"]),
      ("stray positional argument", ["extra"]),
      ("config file missing", ["--config=configs/nope.py"]),
      ("--cpu_devices negative", ["--cpu_devices=-1"]),
      ("no workers", ["--config.workers.num=0"]),
      ("f >= W/2 for cwtm", ["--config.workers.byzantine=9"]),
      ("negative f", ["--config.workers.byzantine=-1"]),
      ("batch size 0", ["--config.workers.batch_size=0"]),
      ("batch larger than the data", ["--config.workers.batch_size=100000"]),
      ("num_steps negative", ["--config.num_steps=-5"]),
      ("eval_every 0", ["--config.eval_every=0"]),
      ("dtype float16", ["--config.dtype=float16"]),
      ("unknown model", ["--config.model.name=resnet50"]),
      ("unknown aggregator", ["--config.aggregator.name=median"]),
      ("unknown meta-aggregator", ["--config.aggregator.meta=ctm"]),
      ("bad aggregator spec", ["--config.aggregator.name=ctma(cwtm", "--config.aggregator.meta=none"]),
      ("bucketing with f > W/4", ["--config.aggregator.meta=bucketing"]),
      ("unknown attack", ["--config.attack.name=alie2"]),
      ("unknown estimator", ["--config.optim.estimator=adam"]),
      ("negative learning rate", ["--config.optim.lr=-0.1"]),
      ("NaN learning rate", ["--config.optim.lr=nan"]),
      ("momentum above 1", ["--config.optim.estimator=momentum", "--config.optim.momentum=1.5"]),
      ("negative clipping", ["--config.optim.clip=-1"]),
      ("unknown schedule", ["--config.optim.beta_schedule=cosine"]),
      ("gm with 0 iterations", ["--config.aggregator.name=gm",
                                "--config.aggregator.options.gm.iters=0"]),
      ("unknown gm start", ["--config.aggregator.name=gm",
                            "--config.aggregator.options.gm.init=random"]),
      ("ALIE z negative", ["--config.attack.name=alie", "--config.attack.options.alie.z=-1"]),
      ("unknown partition", ["--config.data.partition=noniid"]),
      ("Dirichlet alpha <= 0", ["--config.data.partition=dirichlet", "--config.data.alpha=0"]),
      ("unknown kernel set", ["--config.kernels=gpu"]),
      ("unknown loop", ["--config.loop=fast"]),
      ("unknown dataset", ["--config.data.name=mnist_typo"]),
      ("npz without a path", ["--config.data.name=npz"]),
      ("npz path missing", data(os.path.join(tmp, "missing.npz"))),
      ("npz truncated", data(_truncated(os.path.join(tmp, "truncated.npz")))),
      ("npz not a zip", data(_garbage(os.path.join(tmp, "garbage.npz")))),
      ("npz without train_labels", data(npz("nolabels", train_labels=None))),
      ("npz empty test split", data(npz("emptytest", test_images=np.zeros((0, 8, 8, 1), np.uint8),
                                        test_labels=np.zeros((0,), np.int64)))),
      ("npz stray label 10", data(npz("stray", train_labels=np.r_[np.arange(399) % 10, 10]))),
      ("npz negative label", data(npz("negative", train_labels=np.r_[np.arange(399) % 10, -1]))),
      ("npz float labels", data(npz("floatlabels", train_labels=(np.arange(400) % 10) + 0.5))),
      ("npz labels and images differ in length", data(npz("short", train_labels=np.arange(300) % 10))),
      ("npz images with 5 axes", data(npz("fiveaxes", train_images=rng.integers(
          0, 256, (400, 8, 8, 1, 1), dtype=np.uint8)))),
      ("npz float images with NaN", data(npz("nanimages", train_images=np.full(
          (400, 8, 8, 1), np.nan, np.float32)))),
      ("npz train and test shapes differ", data(npz("shapes", test_images=rng.integers(
          0, 256, (100, 9, 9, 1), dtype=np.uint8)))),
      ("images too small for the model", data(npz("tiny", train_images=rng.integers(
          0, 256, (400, 2, 2, 1), dtype=np.uint8), test_images=rng.integers(
              0, 256, (100, 2, 2, 1), dtype=np.uint8)))),
      ("diverges in the first chunk", ["--config.aggregator.name=avg",
                                      "--config.aggregator.meta=none", "--config.attack.name=inf"]),
  ]
  return [(what, args, None) for what, args in cases] + [
      ("workdir is a file", [], "file"),
      ("corrupt config.json in the workdir", [], "corrupt_config"),
      ("checkpoints but no config.json", [], "no_config"),
      ("workdir holds a different config", ["--config.optim.lr=0.05"], "other_config"),
  ]


def _prepare_workdir(kind, workdir):
  if kind == "file":
    with open(workdir, "w") as fh:
      fh.write("not a directory")
  elif kind in ("corrupt_config", "no_config", "other_config"):
    code, err = main_py(SMALL[:2] + ["--config.num_steps=10", "--config.eval_every=10",
                                     "--config.progress=False"], workdir)
    assert code == 0, err
    if kind == "corrupt_config":
      with open(os.path.join(workdir, "config.json"), "w") as fh:
        fh.write("{\"seed\": 1, ")
    elif kind == "no_config":
      os.remove(os.path.join(workdir, "config.json"))


def inputs_part():
  rows, clean = [], 0
  with tempfile.TemporaryDirectory() as tmp:
    cases = bad_inputs(tmp)
    for i, (what, args, setup) in enumerate(cases):
      workdir = os.path.join(tmp, f"w{i}")
      if setup:
        _prepare_workdir(setup, workdir)
      base = SMALL[:2] + ["--config.num_steps=10", "--config.eval_every=10",
                          "--config.progress=False"]
      if args and args[0].startswith("--config="):
        base = base[2:]
      code, err = main_py(base + args, workdir)
      lines, traceback = error_lines(err)
      ok = code != 0 and len(lines) == 1 and not traceback
      clean += ok
      shown = lines[0][len("ftjax: error: "):] if len(lines) == 1 else (
          f"{len(lines)} error lines" + ("; TRACEBACK" if traceback else "")
          + (f": {err.strip().splitlines()[-1]}" if err.strip() else ""))
      rows.append((what, code, "yes" if ok else "**NO**", shown))
      print(f"[inputs {i + 1}/{len(cases)}] {what}: exit {code}, {'ok' if ok else 'NOT OK'}",
            flush=True)
  lines = ["## Bad inputs", "",
           "Each row ran `python main.py --config configs/default.py --workdir=<fresh dir> "
           "--config.num_steps=10 --config.eval_every=10 --config.progress=False` plus the "
           "arguments named (data files and workdir states made by the script). *One line* "
           "means: a nonzero exit code, exactly one `ftjax: error:` line and no traceback.", ""]
  lines += md_table(["input", "exit code", "one line", "what it prints"], rows)
  lines += ["", f"{clean} of {len(rows)} bad inputs gave one line and a nonzero exit code.", ""]
  return lines, (clean, len(rows))


# --------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------


def _saving(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  for dirpath, dirnames, _ in os.walk(ckpt):
    if any("tmp" in d for d in dirnames):
      return True
  return False


def _kill_at(workdir, proc, target_rows, in_save, rng):
  """Waits until the run has written ``target_rows`` rows (and, if ``in_save``, until a
  checkpoint save is in progress), plus a random fraction of a second, then kills it.

  The moment is drawn on the run's own timeline, so that a loaded machine does not push
  every kill into start-up.
  """
  while proc.poll() is None:
    if len(metrics(workdir)) >= target_rows and (not in_save or _saving(workdir)):
      break
    time.sleep(0.005 if in_save else 0.02)
  if not in_save:
    time.sleep(rng.uniform(0.0, 0.5))
  during_save = _saving(workdir)
  step = (metrics(workdir) or [{"step": 0}])[-1]["step"]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return step, during_save


def kill_trials(n, rng, tmp, reference):
  """kill -9 a run at random moments, resume it, compare with the uninterrupted run.

  Half of the trials aim at a checkpoint save in progress, half at a random moment
  after a random evaluation (or during start-up). Trials whose run had already
  finished are listed but not counted; trials go on until ``n`` runs were killed.
  """
  rows, identical, killed = [], 0, 0
  num_rows = len(reference)
  while killed < n and len(rows) < 2 * n:
    workdir = os.path.join(tmp, f"kill{len(rows)}")
    in_save = len(rows) % 2 == 1
    target = rng.randrange(1 if in_save else 0, num_rows)
    proc = subprocess.Popen([PYTHON, "main.py", *SMALL, f"--workdir={workdir}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step, during_save = _kill_at(workdir, proc, target, in_save, rng)
    was_killed = proc.returncode == -signal.SIGKILL
    code, _ = main_py(SMALL, workdir)
    same = code == 0 and metrics(workdir) == reference
    if was_killed:
      killed += 1
      identical += same
    moment = (f"after step {step}" if step else "during start-up or the first chunk") + (
        ", during a save" if during_save else "")
    if not was_killed:
      moment += " (had finished: not counted)"
    rows.append((len(rows) + 1, moment, code, "yes" if same else "**NO**"))
    print(f"[kill {len(rows)}] {moment}: resumed exit {code}, identical {same}", flush=True)
  return rows, identical, killed


def faults_part():
  rng = random.Random(FLAGS.seed)
  lines = ["## Faults", "",
           "The run: `python main.py " + " ".join(SMALL) + "` (digits, 7 workers, 3 of them "
           "Byzantine, checkpoints every 10 rounds). *Identical* means its metrics.jsonl, "
           "without the wall-time and steps/s fields, equals the uninterrupted run's row for "
           "row, every float bit for bit.", ""]
  summary = {}
  with tempfile.TemporaryDirectory() as tmp:
    ref_dir = os.path.join(tmp, "reference")
    code, err = main_py(SMALL, ref_dir)
    assert code == 0, err
    reference = metrics(ref_dir)

    # Same seed, same results: a second process.
    code, _ = main_py(SMALL, os.path.join(tmp, "again"))
    same = code == 0 and metrics(os.path.join(tmp, "again")) == reference
    summary["two processes"] = same
    lines += ["### Two processes, one config", "",
              f"A second process of the same config: metrics identical: **{same}**.", ""]

    # A raised num_steps: half the rounds, then the same workdir with all of them.
    raised = os.path.join(tmp, "raised")
    c1, _ = main_py([a for a in SMALL if "num_steps" not in a] + ["--config.num_steps=80"],
                    raised)
    c2, _ = main_py(SMALL, raised)
    same = c1 == 0 and c2 == 0 and metrics(raised) == reference
    summary["raised num_steps"] = same
    lines += ["### Resumed with a raised num_steps", "",
              "80 rounds, then the same command with `--config.num_steps=150` in the same "
              f"workdir: metrics identical to the uninterrupted 150 rounds: **{same}**.", ""]

    # Weights & Biases unreachable / not logged in.
    wandb_dir = os.path.join(tmp, "wandb")
    code, err = main_py(SMALL + ["--config.wandb.enabled=True", "--config.wandb.mode=online"],
                        wandb_dir, env={"WANDB_API_KEY": "", "WANDB_BASE_URL": "http://127.0.0.1:9",
                                        "WANDB_INIT_TIMEOUT": "20", "HOME": tmp})
    warnings = [l for l in err.splitlines() if "Weights & Biases" in l]
    same = code == 0 and metrics(wandb_dir) == reference
    summary["wandb"] = same and len(warnings) == 1
    lines += ["### Weights & Biases unreachable and not logged in", "",
              "`--config.wandb.enabled=True --config.wandb.mode=online` with no API key and "
              f"the server unreachable: exit code {code}, metrics identical: **{same}**, "
              f"warning lines: {len(warnings)}" + (f": `{warnings[0].strip()}`" if warnings else "")
              + ".", ""]

    lines += disk_full(tmp, reference, summary)
  return lines, summary


def kills_part():
  rng = random.Random(FLAGS.seed)
  summary = {}
  with tempfile.TemporaryDirectory() as tmp:
    ref_dir = os.path.join(tmp, "reference")
    code, err = main_py(SMALL, ref_dir)
    assert code == 0, err
    reference = metrics(ref_dir)
    rows, identical, killed = kill_trials(FLAGS.kill_trials, rng, tmp, reference)
  summary["kill"] = (identical, killed)
  lines = ["### kill -9 during a run", "",
            "Each trial starts the run in a fresh workdir and sends SIGKILL at a random "
            f"moment of the run's own timeline (seed {FLAGS.seed}): odd trials as soon as "
            "a checkpoint save is in progress after a random evaluation, even trials "
            "0-0.5 s after a random evaluation row (or during start-up); then it runs the "
            "same command "
            "again to the end. *during a save* means an unfinished Orbax checkpoint "
            "directory existed when the signal was sent. The run is the one of the faults "
            "above.", ""]
  lines += md_table(["trial", "killed at", "rerun exit code", "identical"], rows)
  saves = sum("during a save" in r[1] for r in rows)
  lines += ["", f"{identical} of {killed} killed runs ({saves} of them during a save) "
            f"resumed to identical metrics.", ""]
  return lines, summary


def sweep_part():
  rng = random.Random(FLAGS.seed + 2)
  summary = {}
  with tempfile.TemporaryDirectory() as tmp:
    lines = sweep_kills(tmp, rng, summary)
  return lines, summary


def disk_full(tmp, reference, summary):
  lines = ["### Disk full", ""]
  if os.geteuid() != 0 or shutil.which("mount") is None:
    summary["disk full"] = "skipped"
    return lines + ["Skipped: mounting a tmpfs needs root.", ""]
  lines += ["The run's workdir on a 20 MB tmpfs. After a random evaluation row a filler file takes "
            "all the free space, so the next checkpoint or metrics write fails; then the "
            "filler is deleted and the same command resumes the run.", ""]
  rows, identical = [], 0
  mount = os.path.join(tmp, "fs")
  os.makedirs(mount)
  rng = random.Random(FLAGS.seed + 1)
  try:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", mount], check=True)
    for i in range(4):
      workdir = os.path.join(mount, f"run{i}")
      proc = subprocess.Popen([PYTHON, "main.py", *SMALL, f"--workdir={workdir}"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      target = rng.randrange(1, len(reference))
      while proc.poll() is None and len(metrics(workdir)) < target:
        time.sleep(0.02)
      filler = os.path.join(mount, "filler")
      subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
      _, err = proc.communicate()
      first, traceback = error_lines(err)
      os.remove(filler)
      code, err2 = main_py(SMALL, workdir)
      resumed = re.search(r"Resumed from the checkpoint at step (\d+)", err2)
      same = code == 0 and metrics(workdir) == reference
      identical += same
      shown = first[0][len("ftjax: error: "):] if len(first) == 1 else (
          "finished before the disk filled" if proc.returncode == 0 else
          f"{len(first)} error lines" + ("; TRACEBACK" if traceback else ""))
      rows.append((i + 1, f"after row {target}", proc.returncode, shown,
                   resumed.group(1) if resumed else "start", "yes" if same else "**NO**"))
      print(f"[disk {i + 1}] exit {proc.returncode}: {shown[:80]}; identical {same}", flush=True)
      shutil.rmtree(workdir)
  finally:
    subprocess.run(["umount", mount], check=False)
  summary["disk full"] = (identical, len(rows))
  lines += md_table(["trial", "filled after", "exit code", "what it printed",
                     "rerun resumed from step", "resumed identical"], rows)
  return lines + [""]


def sweep_kills(tmp, rng, summary):
  """kill -9 a sweep at random moments; the rerun must give the uninterrupted results."""
  sweep_args = ["-m", "ftjax.sweep", "--sweep=configs/sweeps/tiny.py"]
  if not os.path.exists(os.path.join(ROOT, "configs", "sweeps", "demo.py")):
    summary["sweep kill"] = "skipped"
    return ["### kill -9 during a sweep", "", "Skipped: no sweep command.", ""]

  def finals(workdir):
    out = {}
    for dirpath, _, files in os.walk(os.path.join(workdir, "runs")):
      if "metrics.jsonl" in files:
        out[os.path.relpath(dirpath, workdir)] = metrics(dirpath)
    return out

  def start(workdir):
    return subprocess.Popen([PYTHON, *sweep_args, f"--workdir={workdir}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

  ref = os.path.join(tmp, "sweep_ref")
  proc = start(ref)
  _, err = proc.communicate()
  assert proc.returncode == 0, err
  reference = finals(ref)
  total = sum(len(r) for r in reference.values())
  rows, identical = [], 0
  for i in range(FLAGS.sweep_kill_trials):
    workdir = os.path.join(tmp, f"sweep{i}")
    # A random moment on the sweep's own timeline: after a random number of evaluation
    # rows over all its runs, plus up to half a second.
    target = rng.randrange(0, total)
    proc = start(workdir)
    while proc.poll() is None and sum(len(r) for r in finals(workdir).values()) < target:
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = start(workdir)
    _, err = proc.communicate()
    same = proc.returncode == 0 and finals(workdir) == reference
    identical += same
    rows.append((i + 1, f"after {target} of {total} rows", proc.returncode,
                 "yes" if same else "**NO**"))
    print(f"[sweep kill {i + 1}] after {target} rows: rerun exit {proc.returncode}, "
          f"identical {same}", flush=True)
  summary["sweep kill"] = (identical, len(rows))
  lines = ["### kill -9 during a sweep", "",
           f"`python -m ftjax.sweep --sweep=configs/sweeps/tiny.py` killed after a random "
           f"number of evaluation rows (over all its runs) plus up to 0.5 s, then rerun to "
           f"the end; "
           f"*identical* compares every run's metrics.jsonl with the uninterrupted sweep's.", ""]
  lines += md_table(["trial", "killed at", "rerun exit code", "identical"], rows)
  return lines + ["", f"{identical} of {len(rows)} killed sweeps resumed to identical metrics.",
                  ""]


def main(argv):
  del argv
  out = os.path.join(ROOT, FLAGS.out)
  cache_path = os.path.splitext(out)[0] + ".json"
  sections = {}
  if os.path.exists(cache_path):
    with open(cache_path) as fh:
      sections = json.load(fh)
  header = ["# Reliability", "",
            "Command: `python benchmarks/reliability.py` (each part can be rerun alone with "
            "`--parts=...`; the others keep their last results). Machine: 2 CPU cores, JAX "
            "on the CPU.", ""]
  parts = {"hostile": hostile_part, "inputs": inputs_part, "faults": faults_part,
           "kills": kills_part, "sweep": sweep_part}
  def write():
    body = header + [l for part in PARTS if part in sections for l in sections[part]]
    with open(out, "w") as fh:
      fh.write("\n".join(body) + "\n")

  for name in FLAGS.parts:
    sections[name], summary = parts[name]()
    print(name, summary, flush=True)
    with open(cache_path, "w") as fh:
      json.dump(sections, fh, indent=1)
    write()
  write()  # --parts= (empty) renders the cached parts only


if __name__ == "__main__":
  app.run(main)
