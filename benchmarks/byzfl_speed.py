r"""Training speed of ftjax against ByzFL on ByzFL's own README example, interleaved.

ByzFL's README trains `cnn_mnist` with 3 honest clients and 1 Byzantine (IPM),
batch 25, client momentum, clipping, NNM and the trimmed mean at the server
(configs/sweeps/byzfl_readme.py has the same run in ftjax). For ``--rounds``
rounds, each library trains in its own fresh process
(``benchmarks/byzfl_speed_runner.py``): ftjax under this Python, ByzFL under
``--peers_python`` (torch limited to 2 threads), the order alternating from
round to round. Each reports its steady training rate in rounds per second
(ByzFL: ``--steps`` rounds after ``--warmup``; ftjax: its own timer over a
compiled chunk of ``--steps`` rounds) and, separately, its start-up: the
imports, data and model (``setup``) and the rest of the wall time (ByzFL: the
warm-up rounds; ftjax: compilation and one evaluation). Neither rate includes
a test evaluation.

Writes (or replaces) the section "Training speed on ByzFL's README example" of
``--out``, with the machine's float32 matmul rate and the load averages seen.

  python benchmarks/byzfl_speed.py --mnist=mnist.npz
  python benchmarks/byzfl_speed.py --mnist=mnist.npz --rounds=3 --steps=200
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HEADING = "## Training speed on ByzFL's README example"


def run(lib, args):
  python = sys.executable if lib == "ftjax" else args.peers_python
  env = dict(os.environ, PYTHONPATH=ROOT) if lib == "ftjax" else None
  cmd = [python, os.path.join(HERE, "byzfl_speed_runner.py"), f"--lib={lib}",
         f"--mnist={args.mnist}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
  t0 = time.perf_counter()
  out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=ROOT)
  row = json.loads(out.stdout.strip().splitlines()[-1])
  row["process_s"] = time.perf_counter() - t0
  return row


def matmul_gflops():
  sys.path.insert(0, HERE)
  import peers  # pylint: disable=g-import-not-at-top
  xla, npy, _ = peers.machine_rates([])
  return xla, npy


def section(args, rows, rates):
  by = {lib: [r for r in rows if r["lib"] == lib] for lib in ("ftjax", "byzfl")}
  med = lambda lib, key: statistics.median(r[key] for r in by[lib])
  loads = [r["load1"] for r in rows]
  lines = [
      HEADING, "",
      "Written by `python benchmarks/byzfl_speed.py --mnist=mnist.npz "
      f"--rounds={args.rounds} --steps={args.steps} --warmup={args.warmup}`.", "",
      "ByzFL's README example (cnn_mnist, 3 honest clients and 1 Byzantine sending IPM, "
      "batch 25, client momentum 0.9, clipping to 2, NNM, trimmed mean, server SGD with "
      "weight decay) trained by ByzFL's own classes (`Client`, `Server`, `ByzantineClient`, "
      "`DataDistributor`; torch CPU, 2 threads) and by ftjax's "
      "`configs/sweeps/byzfl_readme.py` (seed 1, float32, XLA:CPU), each in its own fresh "
      f"process, {args.rounds} rounds, the order alternating. Rounds per second of training, "
      "median over the processes (ByzFL: "
      f"{args.steps} rounds timed after {args.warmup}; ftjax: its own timer over one compiled "
      f"chunk of {args.steps} rounds); no test evaluation inside either. Start-up is separate: "
      "`setup` (imports, data, model), then `other` (ByzFL: its warm-up rounds; ftjax: "
      "compilation and one evaluation of the 10,000 test images).", "",
      f"Machine: 2 cores; float32 matmul {rates[0]:.0f} GFLOP/s (XLA) and {rates[1]:.0f} "
      "GFLOP/s (NumPy), 2048^3. Load average (1 min) at the end of each process: "
      f"{min(loads):.1f}-{max(loads):.1f}, median {statistics.median(loads):.1f} (the machine "
      "is shared; the figures carry that noise).", "",
      "| program | rounds/s (median) | per process | setup s | other s | ftjax / ByzFL |",
      "|---|---:|---|---:|---:|---:|"]
  ratio = med("ftjax", "steps_per_sec") / med("byzfl", "steps_per_sec")
  for lib, name, rel in (("ftjax", "ftjax", f"{ratio:.1f}"), ("byzfl", "ByzFL", "1")):
    each = ", ".join(f"{r['steps_per_sec']:.2f}" for r in by[lib])
    lines.append(f"| {name} | {med(lib, 'steps_per_sec'):.2f} | {each} | "
                 f"{med(lib, 'setup_s'):.1f} | {med(lib, 'overhead_s'):.1f} | {rel} |")
  return "\n".join(lines) + "\n"


def write(path, text):
  old = open(path).read() if os.path.exists(path) else ""
  if HEADING in old:  # replace this script's section, keep everything else
    start = old.index(HEADING)
    end = old.find("\n## ", start + len(HEADING))
    old = old[:start] + (old[end + 1:] if end >= 0 else "")
  with open(path, "w") as fh:
    fh.write(old.rstrip("\n") + "\n\n" + text)


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--mnist", required=True, help="the MNIST .npz (docs/data.md)")
  p.add_argument("--peers_python", default="/work/peers-venv/bin/python")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "peers.md"))
  args = p.parse_args()
  rows = []
  for r in range(args.rounds):
    for lib in (("ftjax", "byzfl") if r % 2 == 0 else ("byzfl", "ftjax")):
      rows.append(run(lib, args))
      print(json.dumps(rows[-1]), flush=True)
  rates = matmul_gflops()
  write(args.out, section(args, rows, rates))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
