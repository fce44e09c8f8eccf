r"""Aggregation in the parameter-sharded layout against the replicated one, on 8 CPU devices.

  python benchmarks/sharded.py --out=docs/benchmarks/sharded.md

For each rule, worker count W and row length d: XLA's memory analysis of the
compiled program per device (arguments + outputs + temporaries) with the rows
replicated (every device aggregates all W x d values) and with the rows split
by coordinates (``sharding.shard_aggregator``, the rows given in that layout);
for the smaller sizes also the largest difference between the two aggregates
and the median time of each, measured interleaved. This machine has 2 CPU
cores for 8 XLA devices, so the times say nothing about a real mesh: they are
for information only.

Then the whole compiled round (``train.make_round``, one jitted round
with its state donated, as the host loop runs it) in both layouts of
``mesh.aggregation``: an ``mlp`` whose hidden width gives d parameters, W
workers that all compute (sign flipping), mu2sgd; compiled only, from
abstract inputs, so that no W x d array is ever allocated here.
"""
import argparse
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from configs import default  # noqa: E402
from ftjax import aggregators, models, sharding, train  # noqa: E402

SIMPLE_MNIST_D = 29034  # parameters of models.make_model("simple_mnist", num_classes=10)


def per_device_bytes(compiled, donated=False):
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  return total - m.alias_size_in_bytes if donated else total


def round_cell(spec, w, f, hidden, layout):
  """Per-device bytes and largest array of the compiled round (nothing allocated)."""
  c = default.get_config()
  c.workers.num, c.workers.byzantine, c.workers.batch_size = w, f, 4
  c.aggregator.name, c.aggregator.meta = spec, "none"
  c.model.name, c.attack.name, c.optim.estimator = "mlp", "sf", "mu2sgd"
  c.mesh.aggregation, c.devices = layout, 0
  setup = train.build(c, model=models.MLP(hidden=hidden, num_classes=10))
  mesh = setup.mesh
  whole, split = NamedSharding(mesh, P()), sharding.worker_split(mesh)
  rows = train.worker_state_rows(setup)
  abstract = jax.eval_shape(lambda: train.init_state(setup, c.seed))

  def struct(x, sharding_, n=None):
    return jax.ShapeDtypeStruct(x.shape if n is None else (n,) + x.shape[1:], x.dtype,
                                sharding=sharding_)

  state = jax.tree.map(lambda x: struct(x, whole), abstract._replace(worker_state=()))
  worker_state = jax.tree.map(
      lambda x: struct(x, split, rows) if layout == "sharded" else struct(x, whole),
      abstract.worker_state)
  state = state._replace(worker_state=worker_state)
  data = train.place(setup, train.make_device_data(setup))
  idx = jax.ShapeDtypeStruct((w, c.workers.batch_size), jnp.int32, sharding=whole)
  compiled = jax.jit(train.make_round(setup), donate_argnums=0).lower(
      state, data, idx).compile()
  text = compiled.as_text()
  largest = max((int(np.prod([int(v) for v in dims.split(",") if v]))
                 for dims in re.findall(r"\bf32\[([0-9,]*)\]", text)), default=0)
  d = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  return {"spec": spec, "w": w, "f": f, "d": d, "layout": layout,
          "bytes": per_device_bytes(compiled, donated=True), "largest": largest * 4}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rules", default="ctma(cwtm),krum")
  p.add_argument("--workers", default="17,65,257")
  p.add_argument("--dims", default=f"1000000,{SIMPLE_MNIST_D}")
  p.add_argument("--timed", default="17,65", help="worker counts also run (equality, time)")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--round_rules", default="ctma(cwtm),krum",
                 help="rules of the whole-round table ('' for none)")
  p.add_argument("--round_workers", default="17,65,257")
  p.add_argument("--round_hidden", default="13333,387",
                 help="mlp hidden widths: d = 75 h + 10 on 8x8 digits (1e6, simple_mnist's)")
  p.add_argument("--out", default="")
  args = p.parse_args()
  mesh = sharding.coordinate_mesh()
  key = jax.random.key(0)
  rows = []
  for spec in filter(None, args.rules.split(",")):
    for w in map(int, args.workers.split(",")):
      f = (w - 1) // 2 if "krum" not in spec else (w - 3) // 2
      agg = aggregators.make_aggregator(spec, f)
      for d in map(int, args.dims.split(",")):
        d_pad = -(-d // 8) * 8
        split = NamedSharding(mesh, P(None, "model"))
        whole = NamedSharding(mesh, P())
        sharded_fn = jax.jit(sharding.shard_aggregator(agg, mesh))
        replicated_fn = jax.jit(agg)
        cs = sharded_fn.lower(jax.ShapeDtypeStruct((w, d_pad), jnp.float32, sharding=split),
                              key).compile()
        cr = replicated_fn.lower(jax.ShapeDtypeStruct((w, d_pad), jnp.float32, sharding=whole),
                                 key).compile()
        row = {"spec": spec, "w": w, "f": f, "d": d_pad, "sharded": per_device_bytes(cs),
               "replicated": per_device_bytes(cr), "rows": w * d_pad * 4}
        if w in map(int, args.timed.split(",")):
          x = np.random.default_rng(0).normal(size=(w, d_pad)).astype(np.float32)
          xs, xr = jax.device_put(x, split), jax.device_put(x, whole)
          a = np.asarray(cs(xs, key)[0])
          b = np.asarray(cr(xr, key)[0])
          row["max_abs_diff"] = float(np.abs(a - b).max())
          times = {"sharded": [], "replicated": []}
          for _ in range(args.reps):  # interleaved
            for name, fn, arg in (("sharded", cs, xs), ("replicated", cr, xr)):
              tic = time.perf_counter()
              jax.block_until_ready(fn(arg, key))
              times[name].append(time.perf_counter() - tic)
          row["t_sharded"] = float(np.median(times["sharded"]))
          row["t_replicated"] = float(np.median(times["replicated"]))
        print(row, flush=True)
        rows.append(row)
  rounds = []
  for spec in filter(None, args.round_rules.split(",")):
    for w in map(int, args.round_workers.split(",")):
      f = (w - 1) // 2 if "krum" not in spec else (w - 3) // 2
      for hidden in map(int, args.round_hidden.split(",")):
        cells = {layout: round_cell(spec, w, f, hidden, layout)
                 for layout in ("replicated", "sharded")}
        print(cells, flush=True)
        rounds.append(cells)
  if args.out:
    mb = lambda b: f"{b / 2**20:.1f}"
    with open(args.out, "w") as fh:
      fh.write("# Sharded aggregation (8 CPU devices)\n\n")
      fh.write("Written by `python benchmarks/sharded.py " + " ".join(sys.argv[1:]) + "` on a "
               "machine with 2 CPU cores exposing 8 XLA:CPU devices, jax " + jax.__version__
               + ", float32 rows, f = (W-1)/2 (krum: (W-3)/2), the default kernels.\n\n"
               "Bytes per device: XLA's memory analysis of the compiled program (arguments + "
               "outputs + temporaries) for one device. *replicated*: the rows replicated, "
               "every device aggregating all of them (what `mesh.aggregation=\"replicated\"` "
               "does after the all-gather); *sharded*: `sharding.shard_aggregator` with the "
               "rows given split by coordinates (what the all-to-all or the slice produces); "
               "both include the replicated d-value aggregate. d is padded to a multiple of 8. "
               "Max abs diff: between the two aggregates on N(0, 1) rows. Times: medians of "
               f"{args.reps} interleaved calls; 8 devices on 2 cores, so for information only "
               "(they do not predict a real mesh).\n\n")
      fh.write("| rule | W | d | W x d rows (MiB) | replicated (MiB/device) | sharded (MiB/device) "
               "| ratio | max abs diff | time replicated (s) | time sharded (s) |\n"
               "|---|---|---|---|---|---|---|---|---|---|\n")
      for r in rows:
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "not run"
        tr = f"{r['t_replicated']:.3f}" if "t_replicated" in r else "-"
        ts = f"{r['t_sharded']:.3f}" if "t_sharded" in r else "-"
        fh.write(f"| {r['spec']} | {r['w']} | {r['d']} | {mb(r['rows'])} | {mb(r['replicated'])} "
                 f"| {mb(r['sharded'])} | {r['replicated'] / r['sharded']:.1f} | {diff} | {tr} "
                 f"| {ts} |\n")
      if rounds:
        fh.write(
            "\n## The whole round\n\n"
            "`train.make_round` compiled with its state donated (as the host loop "
            "runs it), from abstract inputs: an `mlp` of d parameters on the 8x8 digits, "
            "W workers that all compute (`sf`) on 4 examples each, mu2sgd (so two gradients per worker and a "
            "per-worker momentum in the state), float32, f as above. Bytes per device: "
            "arguments + outputs + temporaries, less the aliased bytes (the donated state "
            "counts once). Largest "
            "array: the largest float32 array of the partitioned program on one device. "
            "*replicated*: `mesh.aggregation=\"replicated\"` (the workers' gradients split "
            "over the devices, then all-gathered; estimator, attack and aggregator on every "
            "device); *sharded*: `mesh.aggregation=\"sharded\"` (gradients, clipping, "
            "estimator and its state on the workers' devices, one all-to-all, attack and "
            "aggregator on coordinate slices, the aggregate all-gathered).\n\n"
            "| rule | W | d | W x d rows (MiB) | replicated (MiB/device) | sharded "
            "(MiB/device) | ratio | largest array replicated (MiB) | largest array sharded "
            "(MiB) |\n|---|---|---|---|---|---|---|---|---|\n")
        for cells in rounds:
          r, s_ = cells["replicated"], cells["sharded"]
          fh.write(f"| {r['spec']} | {r['w']} | {r['d']} | {mb(r['w'] * r['d'] * 4)} "
                   f"| {mb(r['bytes'])} | {mb(s_['bytes'])} | {r['bytes'] / s_['bytes']:.1f} "
                   f"| {mb(r['largest'])} | {mb(s_['largest'])} |\n")


if __name__ == "__main__":
  main()
