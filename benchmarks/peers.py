r"""ftjax's distance rules and order statistics against ByzFL and byzpy, interleaved.

For each cell (rule, W workers, d float32 coordinates, f) the rows are drawn
once and written to a temporary .npy file; then, for ``--rounds`` rounds, each
library runs in its own fresh process (``benchmarks/peers_runner.py``): ftjax
under this Python, ByzFL and byzpy under ``--peers_python`` (a separate
virtual environment with torch, byzfl and byzpy; torch limited to 2 threads).
The order of the libraries rotates from round to round, so that no library
always runs first or last. Each process times up to ``--reps`` calls after a
warm-up call (jit compilation is not timed); a cell reports the median of all
timed calls of a library over its rounds.

Every output is checked against ftjax's: krum's selected row (the index of
the row each library returned), multikrum's selected set (the peer's output
against the mean of the rows ftjax selected), and otherwise the largest
absolute difference relative to the largest absolute value.

The physical limit of a cell is the product's floating-point operations
(2 W^2 d for the Gram matrix of krum and multikrum, twice that for nnm, which
also multiplies its selection matrix by the rows; none for cwtm and cwmed) at
the machine's float32 matmul rate (the best of XLA's and NumPy's 2048^3
product), plus one read of the [W, d] input (the fastest of XLA's
matrix-vector product with a ones vector and NumPy's ``x.sum(0)``).

Writes ``--out`` (Markdown), with the rates and the load averages seen.

``--only=agreement`` instead checks, without timing, every other rule that
ftjax shares with ByzFL or byzpy (``peers_runner.AGREEMENT``: avg, meamed, gm,
centred clipping, MDA, SMEA, MoNNA, CGE, CAF, ARC, static clipping) on small
rows with f far rows, each peer built with the parameters of ftjax's
definition; selection rules report whether the same rows were averaged, the
others the largest difference relative to the largest value. It writes
``docs/benchmarks/peers_agreement.md``.

  python benchmarks/peers.py                          # everything (long on 2 cores)
  python benchmarks/peers.py --only=agreement
  python benchmarks/peers.py --only=headline --rules=cwtm --out=/tmp/cwtm.md
  python benchmarks/peers.py --peers_python=/path/to/venv/bin/python --deadline_s=1800
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LIBS = ("ftjax", "byzfl", "byzpy")
RULES = ("krum", "multikrum", "nnm", "cwtm", "cwmed")
# (rule, W, d, f, m) of the figures that motivated this comparison.
HEADLINE = [("krum", 64, 65536, 8, None), ("multikrum", 80, 65536, 20, 60),
            ("nnm", 196, 4096, 32, None), ("cwtm", 257, 1_000_000, 128, None),
            ("cwmed", 257, 1_000_000, 0, None)]
# ByzFL's nnm gathers every row's W - f neighbours into one [W, W - f, d]
# tensor; cells where that exceeds this many bytes are skipped for it.
BYZFL_NNM_MAX_BYTES = 2 << 30


def grid(workers, dims):
  cells = []
  for w in workers:
    for d in dims:
      f = w // 4
      for rule in RULES:
        cells.append((rule, w, d, f, w - f if rule == "multikrum" else None))
  # Cheapest first, so that a deadline cuts the heaviest cells.
  return sorted(cells, key=lambda c: (c[1] * c[1] * c[2], RULES.index(c[0])))


def gemm_flops(rule, w, d):
  return {"krum": 2, "multikrum": 2, "nnm": 4}.get(rule, 0) * w * w * d


def skipped(lib, rule, w, d, f):
  if lib == "byzfl" and rule == "nnm" and w * (w - f) * d * 4 > BYZFL_NNM_MAX_BYTES:
    return "skipped: gathers [W, W-f, d]"
  return None


def machine_rates(x_shapes):
  """(matmul GFLOP/s of XLA and NumPy, {shape: one read in seconds})."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp

  def best(fn, *args, reps=5):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      ts.append(time.perf_counter() - t0)
    return min(ts)

  a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
  flops = 2 * 2048 ** 3
  xla = flops / best(jax.jit(lambda m: m @ m), jnp.asarray(a)) / 1e9
  npy = flops / best(lambda m: m @ m, a) / 1e9
  reads = {}
  for w, d in x_shapes:
    x = np.ones((w, d), np.float32)
    ones = jnp.ones((w,), jnp.float32)
    t_xla = best(jax.jit(lambda v, o: o @ v), jnp.asarray(x), ones)
    t_np = best(lambda v: v.sum(0), x, reps=3)
    reads[(w, d)] = min(t_xla, t_np)
  return xla, npy, reads


def run_lib(lib, args, rule, f, m, path, out_path):
  python = sys.executable if lib == "ftjax" else args.peers_python
  cmd = [python, os.path.join(HERE, "peers_runner.py"), f"--lib={lib}", f"--rule={rule}",
         f"--f={f}", f"--input={path}", f"--output={out_path}", f"--reps={args.reps}",
         f"--budget_s={args.budget_s}"]
  if m is not None:
    cmd.append(f"--m={m}")
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
  if proc.returncode:
    return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(rule, x, ref, other, m):
  """How a peer's output compares with ftjax's."""
  out = other["out"]
  if rule == "krum":
    got = int(np.argmin(np.max(np.abs(x - out[None]), axis=1)))
    want = int(ref["selected"][0])
    return "same row" if got == want else f"row {got} vs {want}"
  if rule == "multikrum":
    mean = x[ref["selected"]].astype(np.float64).mean(0)
    rel = np.max(np.abs(out - mean)) / max(np.max(np.abs(mean)), 1e-30)
    return "same set" if rel < 1e-5 else f"other set (rel {rel:.1e})"
  a, b = out.astype(np.float64), ref["out"].astype(np.float64)
  rel = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
  return f"rel {rel:.1e}"


def run_cell(cell, args, tmp):
  rule, w, d, f, m = cell
  x = np.random.default_rng(w * 7919 + d).standard_normal((w, d)).astype(np.float32)
  path = os.path.join(tmp, "x.npy")
  np.save(path, x)
  times = {lib: [] for lib in LIBS}
  notes, outputs = {}, {}
  for r in range(args.rounds):
    order = LIBS[r % 3:] + LIBS[:r % 3]
    for lib in order:
      why = skipped(lib, rule, w, d, f)
      if why or lib in notes:
        notes.setdefault(lib, why)
        continue
      out_path = os.path.join(tmp, f"{lib}.npz")
      res = run_lib(lib, args, rule, f, m, path, out_path)
      if "error" in res:
        notes[lib] = "failed: " + res["error"][:60]
        continue
      times[lib] += res["times"]
      args.loads.append(res["load"])
      if lib not in outputs:
        outputs[lib] = dict(np.load(out_path))
  row = {"cell": cell, "ms": {}, "agree": {}, "notes": notes}
  for lib in LIBS:
    if times[lib]:
      row["ms"][lib] = 1e3 * statistics.median(times[lib])
      row["n"] = row.get("n", {}) | {lib: len(times[lib])}
  if "ftjax" in outputs:
    for lib in ("byzfl", "byzpy"):
      if lib in outputs:
        row["agree"][lib] = agreement(rule, x, outputs["ftjax"], outputs[lib], m)
  os.remove(path)
  return row


def fmt_ms(v):
  if v is None:
    return "-"
  return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def write(args, rows, rates, reads, not_run, started):
  xla, npy = rates
  rate = max(xla, npy)
  lines = [
      "# ftjax against ByzFL and byzpy",
      "",
      "Written by `python benchmarks/peers.py " + " ".join(args.argv) + "`.",
      "",
      "Milliseconds per call, float32, median of every timed call over "
      f"{args.rounds} interleaved rounds (each library in its own fresh process per "
      "round, the order rotating; `n` timed calls in all). ftjax runs its jitted "
      "function under XLA:CPU (`kernels=auto`); ByzFL and byzpy run torch "
      f"{args.torch_version} with 2 threads. ByzFL takes one [W, d] tensor; byzpy takes "
      "a list of W per-worker tensors and stacks them inside its call (its API).",
      "",
      f"Machine: {os.cpu_count()} cores; float32 matmul {xla:.0f} GFLOP/s (XLA) and "
      f"{npy:.0f} GFLOP/s (NumPy), 2048^3; the limit uses {rate:.0f}. Load average "
      f"(1 min) seen by the runs: {min(args.loads):.1f}-{max(args.loads):.1f}, median "
      f"{statistics.median(args.loads):.1f} (the machine is shared; figures carry that noise).",
      "",
      "Limit: GEMM flops at that rate (krum, multikrum: 2 W^2 d; nnm: 4 W^2 d) plus one "
      "read of the input (the faster of XLA's ones-vector product and NumPy's `x.sum(0)`, "
      "measured per shape). Agreement: krum, the row each peer returned against ftjax's; "
      "multikrum, the peer's output against the mean of ftjax's selected rows (`same "
      "set` below 1e-5 relative); otherwise the largest difference relative to the "
      "largest value.",
      "",
      "| rule | W | d | f | ftjax | ByzFL | byzpy | limit | ftjax / limit | ftjax / best peer "
      "| agreement ByzFL | agreement byzpy | n |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
  ]
  for row in rows:
    rule, w, d, f, m = row["cell"]
    ms = row["ms"]
    limit = 1e3 * (gemm_flops(rule, w, d) / (rate * 1e9) + reads[(w, d)])
    peers = [ms[l] for l in ("byzfl", "byzpy") if l in ms]
    fj = ms.get("ftjax")
    cols = [rule + (f" (m={m})" if m is not None else ""), str(w), f"{d:,}", str(f)]
    for lib in LIBS:
      cols.append(fmt_ms(ms.get(lib)) if lib in ms else (row["notes"].get(lib) or "-"))
    cols.append(fmt_ms(limit))
    cols.append(f"{fj / limit:.1f}" if fj else "-")
    cols.append(f"{fj / min(peers):.2f}" if fj and peers else "-")
    cols += [row["agree"].get("byzfl", "-"), row["agree"].get("byzpy", "-")]
    cols.append("/".join(str(row.get("n", {}).get(l, 0)) for l in LIBS))
    lines.append("| " + " | ".join(cols) + " |")
  if not_run:
    lines += ["", "Not run (the `--deadline_s` of "
              f"{args.deadline_s:.0f} s was reached after {time.time() - started:.0f} s): "
              + ", ".join(f"{r} W={w} d={d:,}" for r, w, d, _, _ in not_run) + "."]
  with open(args.out, "w") as fh:
    fh.write("\n".join(lines) + "\n")


# Agreement cases whose output is the mean of the rows they select.
SELECTIONS = ("mda", "smea", "monna", "cge")
AGREEMENT_SHAPE = (11, 1000, 2)  # W, d, f: C(11, 2) = 55 subsets for MDA and SMEA


def agreement_rows(w, d, f):
  """Standard normal rows, the last f of them shifted and scaled far from the others."""
  x = np.random.default_rng(w * 7919 + d).standard_normal((w, d))
  x[w - f:] = 4.0 * x[w - f:] + 3.0
  return x.astype(np.float32)


def run_agreement(args, tmp):
  sys.path.insert(0, HERE)
  from peers_runner import AGREEMENT  # pylint: disable=g-import-not-at-top
  w, d, f = AGREEMENT_SHAPE
  x = agreement_rows(w, d, f)
  path = os.path.join(tmp, "x.npy")
  np.save(path, x)
  one = argparse.Namespace(**{**vars(args), "reps": 1, "budget_s": 0.0})
  rows = []
  for case, (spec, options, peers) in AGREEMENT.items():
    if case not in args.rules.split(",") and args.rules != ",".join(RULES):
      continue
    outs = {}
    for lib in ("ftjax",) + peers:
      out_path = os.path.join(tmp, f"{lib}.npz")
      res = run_lib(lib, one, case, f, None, path, out_path)
      outs[lib] = res.get("error") or np.load(out_path)["out"].astype(np.float64)
      if "load" in res:
        args.loads.append(res["load"])
    row = {"case": case, "spec": spec, "options": options}
    for lib in peers:
      a, b = outs[lib], outs["ftjax"]
      if isinstance(a, str) or isinstance(b, str):
        row[lib] = "failed: " + (a if isinstance(a, str) else b)[:60]
        continue
      rel = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
      if case in SELECTIONS:
        row[lib] = "same set" if rel < 1e-5 else f"other set (rel {rel:.1e})"
      else:
        row[lib] = f"rel {rel:.1e}"
    rows.append(row)
    print(json.dumps(row), flush=True)
  lines = [
      "# ftjax against ByzFL and byzpy: agreement of the other shared rules", "",
      "Written by `python benchmarks/peers.py " + " ".join(args.argv) + "`.", "",
      f"One call per library on the same float32 rows: W = {w}, d = {d:,}, f = {f}; "
      f"standard normal rows, the last {f} scaled by 4 and shifted by 3 (far rows). "
      "ftjax under XLA:CPU; ByzFL and byzpy under torch "
      f"{args.torch_version}, each peer built with the parameters that make its "
      "definition ftjax's (below). Selection rules (mean of the rows they select): "
      "`same set` when the outputs agree to 1e-5 relative; otherwise the largest "
      "difference relative to the largest value of ftjax's output. `-`: that library "
      "has no such rule. krum, multikrum, nnm, cwtm and cwmed are in "
      "[peers.md](peers.md). Why each difference is there: "
      "[aggregators.md](../aggregators.md#against-byzfl-and-byzpy).", "",
      "| case | ftjax spec and options | ByzFL | byzpy |", "|---|---|---|---|"]
  for row in rows:
    opts = f" `{json.dumps(row['options'])}`" if row["options"] else ""
    lines.append(f"| {row['case']} | `{row['spec']}`{opts} | {row.get('byzfl', '-')} | "
                 f"{row.get('byzpy', '-')} |")
  with open(args.out, "w") as fh:
    fh.write("\n".join(lines) + "\n")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--peers_python", default="/work/peers-venv/bin/python")
  p.add_argument("--only", choices=["all", "headline", "grid", "agreement"], default="all")
  p.add_argument("--rules", default=",".join(RULES), help="Only these rules.")
  p.add_argument("--workers", default="17,65,257")
  p.add_argument("--dims", default="10000,1000000")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--budget_s", type=float, default=3.0,
                 help="Per process: fewer timed calls when one call is slow.")
  p.add_argument("--deadline_s", type=float, default=3600.0,
                 help="Cells not started by then are listed as not run.")
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "peers.md"))
  args = p.parse_args()
  args.argv = sys.argv[1:]
  args.loads = []
  args.torch_version = subprocess.run(
      [args.peers_python, "-c", "import torch; print(torch.__version__)"],
      capture_output=True, text=True, check=True).stdout.strip()
  if args.only == "agreement":
    if args.out == p.get_default("out"):
      args.out = os.path.join(ROOT, "docs", "benchmarks", "peers_agreement.md")
    with tempfile.TemporaryDirectory() as tmp:
      run_agreement(args, tmp)
    return
  cells = []
  if args.only in ("all", "headline"):
    cells += HEADLINE
  if args.only in ("all", "grid"):
    cells += grid([int(v) for v in args.workers.split(",")],
                  [int(v) for v in args.dims.split(",")])
  cells = [c for c in cells if c[0] in args.rules.split(",")]
  started = time.time()
  xla, npy, reads = machine_rates(sorted({(c[1], c[2]) for c in cells}))
  rows, not_run = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for cell in cells:
      if time.time() - started > args.deadline_s:
        not_run.append(cell)
        continue
      row = run_cell(cell, args, tmp)
      rows.append(row)
      print(json.dumps({"cell": cell, "ms": row["ms"], "agree": row["agree"],
                        "notes": row["notes"]}), flush=True)
      write(args, rows, (xla, npy), reads, not_run, started)
  write(args, rows, (xla, npy), reads, not_run, started)


if __name__ == "__main__":
  main()
