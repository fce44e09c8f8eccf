"""Aggregation on coordinate slices (sharding.shard_aggregator) gives the one-device results.

JAX fixes the number of CPU devices when it starts, so the checks run in
subprocesses started with XLA_FLAGS=--xla_force_host_platform_device_count=8.
Every rule and meta-aggregator of the registry runs once on one device
(``make_aggregator(spec, f)(rows, key)``, itself tested against NumPy in
test_aggregators.py) and once split over 8 devices by coordinates; the
aggregates and the diagnostics must agree.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ftjax import aggregators

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8


def _run(script: str, *args: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={DEVICES} "
      "--xla_cpu_collective_call_warn_stuck_timeout_seconds=10 "
      "--xla_cpu_collective_call_terminate_timeout_seconds=60"))
  proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def _specs() -> list[tuple[str, dict]]:
  """Every base rule, every meta-aggregator over a coordinate-wise and a
  distance-based rule, option variants that take other code paths, and a nest."""
  specs = [(name, {}) for name in aggregators.AGGREGATORS]
  for meta in aggregators.META_AGGREGATORS:
    specs += [(f"{meta}(cwtm)", {}), (f"{meta}(gm)", {})]
  specs += [
      ("gm", {"gm": {"tol": 1e-4, "max_iters": 50}}),             # while loop on a psum
      ("ctma(cwtm)", {"ctma": {"keep_ties": True}}),
      ("centered_clipping", {"centered_clipping": {"tau": 1.0, "iters": 3, "init": "mean"}}),
      ("cwmed", {"cwmed": {"lower": True}}),
      ("bucketing(nnm+ctma(krum))", {}),
  ]
  return specs


def _base_and(inner: str) -> list[tuple[str, dict]]:
  return ([(name, {}) for name in aggregators.AGGREGATORS]
          + [(f"{meta}({inner})", {}) for meta in aggregators.META_AGGREGATORS])


# case -> (W, f, dtype, faulty rows, kernel set, specs). The whole registry runs
# at W=17, f=8 (17 rows over 8 devices); the other cases take a subset each
# to keep the compile time of the file down.
_CASES = {
    "w17_f64": (17, 8, "float64", False, "plain", _specs()),
    "w9_f64": (9, 4, "float64", False, "plain", _base_and("gm")),
    "w17_f32": (17, 8, "float32", False, "plain", _base_and("gm")),
    "w17_faulty": (17, 8, "float64", True, "plain",
                   [s for s in _base_and("cwtm") if s[0] != "avg"]),  # the mean is not robust
    "w17_cpu_kernels": (17, 8, "float64", False, "auto",
                        [(n, {}) for n in ("cwtm", "meamed", "krum", "ctma(cwtm)", "nnm(cwtm)")]),
}


_EQUALITY = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from ftjax import aggregators, sharding

    specs = json.loads(sys.argv[1])
    mesh = sharding.coordinate_mesh()
    key = jax.random.key(3)
    # Leaves of 39 and 7 coordinates: neither a multiple of 8 (padding is exercised).
    shapes = {"conv": (13, 3), "bias": (7,)}

    def make_rows(w, f, dtype, faulty):
      rng = np.random.default_rng(w)
      tree = {}
      for name, shape in shapes.items():
        x = rng.normal(1.0, 1.0, size=(w,) + shape)
        x[w - f:] += 4.0 + rng.normal(size=(f,) + shape)  # the Byzantine rows sit apart
        tree[name] = x
      if faulty:  # one bad coordinate, seen by a single device of the split
        tree["conv"][w - 1, 12, 2] = np.nan
        tree["bias"][w - 2, 5] = np.inf
      return {k: jnp.asarray(v, dtype) for k, v in tree.items()}

    out = {}
    for case, (w, f, dtype, faulty, kernels, specs) in json.loads(sys.argv[1]).items():
      x = make_rows(w, f, jnp.dtype(dtype), faulty)
      scale = max(float(jnp.nanmax(jnp.abs(jnp.where(jnp.isfinite(l), l, 0)))) for l in
                  jax.tree.leaves(x))
      for spec, options in specs:
        agg = aggregators.make_aggregator(spec, f, options=options, kernels=kernels)
        ref, ref_diag = jax.jit(agg)(x, key)
        got, got_diag = jax.jit(sharding.shard_aggregator(agg, mesh))(x, key)
        diffs = []
        for name in shapes:
          a, b = np.asarray(ref[name]), np.asarray(got[name])
          assert a.shape == b.shape and a.dtype == b.dtype, (spec, a.shape, b.shape)
          same_nan = bool(np.array_equal(np.isnan(a), np.isnan(b)))
          diffs.append(float(np.nanmax(np.abs(a - b))) if same_nan else float("inf"))
        diag_equal = (sorted(ref_diag) == sorted(got_diag) and all(
            np.array_equal(np.asarray(ref_diag[k]), np.asarray(got_diag[k])) for k in ref_diag))
        out[f"{case}|{spec}|{json.dumps(options)}"] = {
            "rel_diff": max(diffs) / scale, "diag_equal": diag_equal,
            "diag_keys": sorted(ref_diag), "finite": bool(all(
                np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(got)))}
    # One flat [W, d] array, d = 8 * 11 + 5.
    rng = np.random.default_rng(0)
    flat = jnp.asarray(rng.normal(size=(17, 93)))
    for spec in ("ctma(cwtm)", "krum", "nnm(meamed)"):
      agg = aggregators.make_aggregator(spec, 8)
      a = np.asarray(jax.jit(agg)(flat, key)[0])
      b = np.asarray(jax.jit(sharding.shard_aggregator(agg, mesh))(flat, key)[0])
      out[f"flat|{spec}"] = {"rel_diff": float(np.abs(a - b).max() / np.abs(flat).max()),
                             "shape": list(b.shape)}
    print("RESULT " + json.dumps(out))
    """)


@pytest.fixture(scope="module")
def equality():
  return _run(_EQUALITY, json.dumps(_CASES))


# float64: the sums over coordinates are split into 8 partial sums added by the
# psum, so results agree to rounding; float32 to its own rounding.
_TOLERANCE = {"float64": 1e-12, "float32": 2e-6}


def test_every_rule_gives_the_one_device_result(equality):
  expected = {f"{case}|{spec}|{json.dumps(options)}"
              for case, (*_, specs) in _CASES.items() for spec, options in specs}
  assert expected <= set(equality)  # every case ran every spec it lists
  for name, r in equality.items():
    case = name.split("|")[0]
    if case == "flat":
      continue
    assert r["rel_diff"] <= _TOLERANCE[_CASES[case][2]], (name, r)
    assert r["diag_equal"], (name, r)


def test_every_meta_aggregator_and_rule_was_covered(equality):
  ran = {name.split("|")[1] for name in equality}
  for rule in aggregators.AGGREGATORS:
    assert rule in ran
  for meta in aggregators.META_AGGREGATORS:
    assert f"{meta}(cwtm)" in ran and f"{meta}(gm)" in ran


def test_diagnostics_come_back_replicated_and_complete(equality):
  r = equality["w17_f64|bucketing(nnm+ctma(krum))|{}"]
  assert set(r["diag_keys"]) == {"ctma_kept", "krum_selected"}
  assert equality['w17_f64|gm|{"gm": {"tol": 0.0001, "max_iters": 50}}']["diag_keys"] == [
      "gm_iters"]


def test_a_bad_coordinate_on_one_device_marks_the_whole_row(equality):
  # The NaN and the inf each sit in one device's slice; the psum'd distances
  # must still make those rows infinitely far, so robust rules stay finite.
  for name, r in equality.items():
    if name.startswith("w17_faulty|"):
      assert r["finite"], (name, r)


def test_one_flat_array_of_rows(equality):
  for spec in ("ctma(cwtm)", "krum", "nnm(meamed)"):
    r = equality[f"flat|{spec}"]
    assert r["shape"] == [93] and r["rel_diff"] <= 1e-12, (spec, r)


_LAYOUT = textwrap.dedent("""
    import json, re
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ftjax import aggregators, sharding

    mesh = sharding.coordinate_mesh()
    key = jax.random.key(0)
    out = {}

    def collectives(text):
      return {op: len(re.findall(op + r"(-start)?\\(", text))
              for op in ("all-to-all", "all-gather", "all-reduce", "collective-permute")}

    # Rows split over the workers (16 of them, 2 per device) -> coordinates.
    rows = jax.ShapeDtypeStruct((16, 8 * 512 + 3), jnp.float32,
                                sharding=NamedSharding(mesh, P("model", None)))
    for spec in ("ctma(cwtm)", "krum"):
      fn = sharding.shard_aggregator(aggregators.make_aggregator(spec, 4), mesh, gather=False)
      out[f"from_workers|{spec}"] = collectives(jax.jit(fn).lower(rows, key).compile().as_text())
    # Replicated rows: each device takes its slice, no communication for them.
    rows = jax.ShapeDtypeStruct((16, 8 * 512 + 3), jnp.float32)
    fn = sharding.shard_aggregator(aggregators.make_aggregator("ctma(cwtm)", 4), mesh)
    out["from_replicated|ctma(cwtm)"] = collectives(
        jax.jit(fn).lower(rows, key).compile().as_text())

    # Bytes per device (XLA's memory analysis of the partitioned program).
    w, d = 17, 8 * 4096
    split = jax.ShapeDtypeStruct((w, d), jnp.float32, sharding=NamedSharding(mesh, P(None, "model")))
    whole = jax.ShapeDtypeStruct((w, d), jnp.float32)
    for spec in ("cwtm", "meamed", "ctma(cwtm)", "krum", "gm", "nnm(cwtm)", "bucketing(cwmed)",
                 "arc(ctma(cwtm))", "centered_clipping", "nnm+ctma(gm)"):
      agg = aggregators.make_aggregator(spec, 4)
      sums = []
      for fn, arg in ((sharding.shard_aggregator(agg, mesh), split), (agg, whole)):
        m = jax.jit(fn).lower(arg, key).compile().memory_analysis()
        sums.append(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
      out[f"memory|{spec}"] = {"sharded": sums[0], "replicated": sums[1]}
    print("RESULT " + json.dumps(out))
    """)


@pytest.fixture(scope="module")
def layout():
  return _run(_LAYOUT)


def test_worker_split_rows_reach_the_coordinate_layout_in_one_all_to_all(layout):
  ctma, krum = layout["from_workers|ctma(cwtm)"], layout["from_workers|krum"]
  assert ctma["all-to-all"] == 1 and ctma["all-gather"] == 0
  assert krum["all-to-all"] == 1 and krum["all-gather"] == 0
  # ctma: one psum (distances to x0); krum: the finiteness check and the Gram matrix.
  assert ctma["all-reduce"] == 1 and krum["all-reduce"] == 2


def test_replicated_rows_are_sliced_without_communication(layout):
  r = layout["from_replicated|ctma(cwtm)"]
  assert r["all-to-all"] == 0 and r["collective-permute"] == 0
  assert r["all-gather"] == 1  # the d-value aggregate, gathered back


def test_no_device_holds_the_rows_of_every_worker(layout):
  # W x d float32 rows, 17 x 32768: a device of the split holds its W x d/8
  # slice (the argument), temporaries of at most a few such slices, and the
  # gathered aggregate (d values); never a W x d buffer.
  w, d, itemsize = 17, 8 * 4096, 4
  whole = w * d * itemsize
  bound = 4 * whole // DEVICES + 2 * d * itemsize + 64 * w * w * itemsize
  assert bound < whole  # the bound excludes any buffer of all the rows
  for name, r in layout.items():
    if name.startswith("memory|"):
      assert r["sharded"] < bound, (name, r, bound)
      assert r["replicated"] >= whole, (name, r)  # the one-device program holds them all


_ROUND = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from ftjax import train
    from tests.test_train import tiny_config

    out = {}
    for w, f, spec, loop in ((9, 4, "ctma(cwtm)", "host"), (17, 8, "arc(ctma(gm))", "scan")):
      params, metrics = {}, {}
      for layout in ("replicated", "sharded"):
        c = tiny_config(**{"workers.num": w, "workers.byzantine": f, "aggregator.name": spec,
                           "aggregator.meta": "none", "model.name": "mlp", "dtype": "float64",
                           "mesh.aggregation": layout, "devices": 0})
        setup = train.build(c)
        state = train.init_state(setup, c.seed)
        data = train.make_device_data(setup)
        state, m = train.make_chunk_fn(setup, loop)(state, data, 20).run(state, data)
        params[layout] = [np.asarray(p) for p in jax.tree.leaves(state.params)]
        metrics[layout] = {k: float(v) for k, v in m.items()}
        out[f"w{w}_devices"] = int(setup.mesh.devices.size)
      out[f"w{w}_param_diff"] = max(float(np.abs(a - b).max()) for a, b in
                                    zip(params["replicated"], params["sharded"]))
      out[f"w{w}_metrics"] = metrics
    try:
      train.build(tiny_config(**{"mesh.aggregation": "split"}))
    except train.ConfigError as e:
      out["bad_layout"] = str(e)
    print("RESULT " + json.dumps(out))
    """)


def test_sharded_round_gives_the_replicated_metrics():
  # 20 float64 rounds of the mlp on 8 devices, W=9 and W=17 (neither a multiple
  # of 8), a coordinate-wise and a distance-based rule, the host loop (its
  # compiled round takes back the state it returns) and the scan.
  r = _run(_ROUND)
  for w in (9, 17):
    assert r[f"w{w}_devices"] == DEVICES
    assert r[f"w{w}_param_diff"] < 1e-10, r
    rep, shard = r[f"w{w}_metrics"]["replicated"], r[f"w{w}_metrics"]["sharded"]
    assert set(rep) == set(shard)
    for k in rep:
      assert abs(rep[k] - shard[k]) <= 1e-10 * max(1.0, abs(rep[k])), (w, k, rep[k], shard[k])
  assert "mesh.aggregation" in r["bad_layout"] and "sharded" in r["bad_layout"]
