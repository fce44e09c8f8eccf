r"""Minimal reproducer: many multi-device CPU calls in flight and XLA:CPU's collectives.

The host loop of ftjax.train keeps at most sharding.MAX_ROUNDS_IN_FLIGHT rounds
queued when the workers are split over CPU devices. This script checks whether
the hang behind that limit needs ftjax at all: it jits a bare ``shard_map``
collective (an all-gather, or a psum) over N CPU devices, dispatches ``calls``
calls keeping at most ``depth`` of them in flight, and reports whether the
child process finished or was aborted by XLA's collective timeout.

  python benchmarks/allgather_deadlock.py --devices=2 --depths=4,16,64,256 \
    --out=docs/benchmarks/allgather_deadlock.md

Each (collective, depth) runs in a fresh child process with
``--xla_cpu_collective_call_terminate_timeout_seconds`` set, so a deadlock ends
as an abort within that time instead of hanging.
"""
import argparse
import os
import subprocess
import sys
import time

_CHILD = r"""
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
op, depth, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mesh = Mesh(np.array(jax.devices()), ("i",))
def body(x):
  return jax.lax.all_gather(x, "i", tiled=True) if op == "all_gather" else jax.lax.psum(x, "i")
fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("i"), out_specs=P() if op == "psum" else P(),
                           check_vma=False))
x = jax.device_put(jnp.arange(1024.0 * len(jax.devices())), jax.sharding.NamedSharding(mesh, P("i")))
queue = []
for i in range(calls):
  queue.append(fn(x))
  if len(queue) > depth:
    queue.pop(0).block_until_ready()
for q in queue:
  q.block_until_ready()
print("DONE", calls)
"""


def run_child(op, devices, depth, calls, timeout):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={devices} "
      f"--xla_cpu_collective_call_warn_stuck_timeout_seconds={max(1, timeout // 2)} "
      f"--xla_cpu_collective_call_terminate_timeout_seconds={timeout}"))
  tic = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, "-c", _CHILD, op, str(depth), str(calls)],
                          capture_output=True, text=True, env=env, timeout=timeout * 4 + 120)
    code, err = proc.returncode, proc.stderr
  except subprocess.TimeoutExpired:
    code, err = "hung", ""
  wall = time.perf_counter() - tic
  lines = [l.split("] ", 1)[-1] for l in err.splitlines() if "Termination timeout" in l]
  return code, wall, (lines[0][:220] if lines else "")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=2)
  p.add_argument("--depths", default="4,16,64,256")
  p.add_argument("--calls", type=int, default=2000)
  p.add_argument("--ops", default="all_gather,psum")
  p.add_argument("--timeout", type=int, default=20, help="XLA's collective terminate timeout (s)")
  p.add_argument("--out", default="")
  args = p.parse_args()
  rows = []
  for op in args.ops.split(","):
    for depth in map(int, args.depths.split(",")):
      code, wall, line = run_child(op, args.devices, depth, args.calls, args.timeout)
      status = "finished" if code == 0 else f"aborted (exit {code})"
      rows.append((op, depth, status, wall, line))
      print(f"{op:10s} depth={depth:4d} {status:22s} {wall:6.1f} s  {line}", flush=True)
  if args.out:
    with open(args.out, "w") as fh:
      fh.write("# Multi-device CPU collectives with many calls in flight\n\n")
      fh.write("Written by `python benchmarks/allgather_deadlock.py "
               + " ".join(sys.argv[1:]) + "` (2 CPU cores, jax "
               + __import__("jax").__version__ + "). A bare `shard_map` collective over "
               f"{args.devices} CPU devices, {args.calls} calls, at most `depth` in flight; "
               f"XLA aborts a collective stuck for {args.timeout} s.\n\n")
      fh.write("| collective | depth | result | wall (s) | last collective message |\n|---|---|---|---|---|\n")
      for op, depth, status, wall, line in rows:
        fh.write(f"| {op} | {depth} | {status} | {wall:.1f} | {line.replace('|', '/')} |\n")


if __name__ == "__main__":
  main()
