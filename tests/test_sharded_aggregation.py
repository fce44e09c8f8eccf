"""The parameter-sharded layout gives the one-device results.

JAX fixes the number of CPU devices when it starts, so the checks run in
subprocesses started with XLA_FLAGS=--xla_force_host_platform_device_count=8.
Every rule and meta-aggregator of the registry runs once on one device
(``make_aggregator(spec, f)(rows, key)``, itself tested against NumPy in
test_aggregators.py) and once split over 8 devices by coordinates
(``sharding.shard_aggregator``); the aggregates and the diagnostics must
agree, and so must every attack run on coordinate slices. The whole round in
the sharded layout (``mesh.aggregation = "sharded"``) must give the
one-device round's parameters and metrics, and its compiled program must
hold no device's worth of every worker's rows.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ftjax import aggregators

pytestmark = pytest.mark.slow  # minutes of compiling; CI runs it, -m "not slow" skips it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8


def _run(script: str, *args: str) -> dict:
  # LLVM's optimisation level 0: the programs here are compiled once and run
  # for milliseconds, and the HLO (layout, collectives, buffers) is the same.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={DEVICES} "
      "--xla_backend_optimization_level=0 "
      "--xla_cpu_collective_call_warn_stuck_timeout_seconds=10 "
      "--xla_cpu_collective_call_terminate_timeout_seconds=60"))
  proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def _built_in() -> list[str]:
  """The package's own base rules (the registered peers' rules have their own sharded
  test, tests/test_rules_extra_sharded.py)."""
  return [name for name, info in aggregators.AGGREGATORS.items() if not info.registered]


def _specs() -> list[tuple[str, dict]]:
  """Every base rule, every meta-aggregator over a coordinate-wise and a
  distance-based rule, option variants that take other code paths, and a nest."""
  specs = [(name, {}) for name in _built_in()]
  for meta in aggregators.META_AGGREGATORS:
    specs += [(f"{meta}(cwtm)", {}), (f"{meta}(gm)", {})]
  specs += [
      ("gm", {"gm": {"tol": 1e-4, "max_iters": 50}}),             # while loop on a psum
      ("ctma(cwtm)", {"ctma": {"keep_ties": True}}),
      ("centered_clipping", {"centered_clipping": {"tau": 1.0, "iters": 3, "init": "mean"}}),
      ("cwmed", {"cwmed": {"lower": True}}),
      ("bucketing(nnm+ctma(krum))", {}),
      # ctma takes the distances to its centre from krum's pairwise distances.
      ("ctma(krum)", {}),
      ("ctma(multikrum)", {"ctma": {"keep_ties": True}}),
  ]
  return specs


def _base_and(inner: str) -> list[tuple[str, dict]]:
  return ([(name, {}) for name in _built_in()]
          + [(f"{meta}({inner})", {}) for meta in aggregators.META_AGGREGATORS])


# case -> (W, f, dtype, faulty rows, kernel set, specs). The whole registry runs
# at W=17, f=8 (17 rows over 8 devices); the other cases take a subset each
# to keep the compile time of the file down.
_CASES = {
    "w17_f64": (17, 8, "float64", False, "plain", _specs()),
    "w9_f64": (9, 4, "float64", False, "plain", _base_and("gm")),
    "w17_f32": (17, 8, "float32", False, "plain", _base_and("gm")),
    "w17_faulty": (17, 8, "float64", True, "plain",
                   [s for s in _base_and("cwtm") if s[0] != "avg"]  # the mean is not robust
                   + [("ctma(multikrum)", {})]),
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

    def together(fns):  # one program for a list of functions of the same arguments
      return jax.jit(lambda *args: [fn(*args) for fn in fns])

    out = {}
    for case, (w, f, dtype, faulty, kernels, specs) in json.loads(sys.argv[1]).items():
      x = make_rows(w, f, jnp.dtype(dtype), faulty)
      scale = max(float(jnp.nanmax(jnp.abs(jnp.where(jnp.isfinite(l), l, 0)))) for l in
                  jax.tree.leaves(x))
      aggs = [aggregators.make_aggregator(spec, f, options=options, kernels=kernels)
              for spec, options in specs]
      refs = together(aggs)(x, key)
      gots = together([sharding.shard_aggregator(agg, mesh) for agg in aggs])(x, key)
      for (spec, options), (ref, ref_diag), (got, got_diag) in zip(specs, refs, gots):
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
    names = ("ctma(cwtm)", "krum", "nnm(meamed)")
    aggs = [aggregators.make_aggregator(spec, 8) for spec in names]
    refs = together(aggs)(flat, key)
    gots = together([sharding.shard_aggregator(agg, mesh) for agg in aggs])(flat, key)
    for spec, (a, _), (b, _) in zip(names, refs, gots):
      out[f"flat|{spec}"] = {"rel_diff": float(np.abs(np.asarray(a) - np.asarray(b)).max()
                                               / np.abs(flat).max()), "shape": list(b.shape)}

    # Every attack on coordinate slices (the sharded round's layout) against
    # the whole rows: honest and own rows laid out like the aggregator's, the
    # random draws made for the whole rows, the result gathered back here.
    from jax.sharding import PartitionSpec as P
    from ftjax import attacks, kernels as kernels_lib
    w, f = 17, 7  # fang_krum is defined for W >= 2f + 2
    x = make_rows(w, f, jnp.float64, False)
    honest = jax.tree.map(lambda l: l[:w - f], x)
    own = jax.tree.map(lambda l: l[w - f:], x)
    ctx = attacks.AttackContext(num_byzantine=f, num_classes=10,
                                aggregator=aggregators.make_aggregator("ctma(cwtm)", f))
    cases = [(n, {}) for n in sorted({a.name for a in attacks.shipped().values()})]
    cases += [("min_max", {"perturbation": "std", "solver": "exact"}),
              ("min_sum", {"perturbation": "sign"}), ("gaussian", {"center": "zero"}),
              ("fang_krum", {"epsilon": 0.05}), ("signguard_adaptive", {"magnitude": "median_norm"})]
    built = [attacks.make_attack(n, **o) for n, o in cases]

    def sharded(attack):
      def fn(honest, own, key):
        draws = attack.draw(honest, key, ctx)
        laid = [sharding.shard_rows(t, mesh) for t in (honest, own, draws or {})]
        treedef = jax.tree.structure(honest)

        def local(h, o, d):
          with kernels_lib.shard_coordinates("model"):
            rows = attack(jax.tree.unflatten(treedef, h), jax.tree.unflatten(treedef, o), key,
                          ctx, draws=jax.tree.unflatten(treedef, d) if d else None)
          return jax.tree.leaves(rows)

        rows = jax.shard_map(local, mesh=mesh, in_specs=P(None, "model"),
                             out_specs=P(None, "model"), check_vma=False)(*laid)
        return jax.tree.unflatten(treedef, [r[:, :l[0].size].reshape((f,) + l.shape[1:])
                                            for r, l in zip(rows, jax.tree.leaves(honest))])
      return fn

    refs = together([lambda h, o, k, a=a: a(h, o, k, ctx) for a in built])(honest, own, key)
    gots = together([sharded(a) for a in built])(honest, own, key)
    for (name, options), ref, got in zip(cases, refs, gots):
      diffs = []
      for leaf in shapes:
        a, b = np.asarray(ref[leaf]), np.asarray(got[leaf])
        same = a.shape == b.shape and np.array_equal(np.isfinite(a), np.isfinite(b)) and (
            np.array_equal(a[~np.isfinite(a)], b[~np.isfinite(b)], equal_nan=True))
        fin = np.isfinite(a)
        diffs.append(float(np.abs(a[fin] - b[fin]).max(initial=0.0)) if same else float("inf"))
      out[f"attack|{name}|{json.dumps(options)}"] = {"rel_diff": max(diffs) / scale}
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
    if case not in _CASES:  # "flat" and "attack": their own tests
      continue
    assert r["rel_diff"] <= _TOLERANCE[_CASES[case][2]], (name, r)
    assert r["diag_equal"], (name, r)


def test_every_meta_aggregator_and_rule_was_covered(equality):
  ran = {name.split("|")[1] for name in equality if not name.startswith("attack|")}
  for rule in _built_in():
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


def test_every_attack_on_coordinate_slices_gives_the_whole_rows_result(equality):
  from ftjax import attacks
  ran = {name.split("|")[1] for name in equality if name.startswith("attack|")}
  assert {a.name for a in attacks.shipped().values()} <= ran
  for name, r in equality.items():
    if name.startswith("attack|"):
      assert r["rel_diff"] <= 1e-12, (name, r)


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
  # ctma: the predicate of its fusion barrier (rows.isolate) and the distances
  # to x0; krum: the barrier around the median of its centring and the Gram
  # matrix (the non-finite rows are read off the Gram matrix's diagonal).
  assert ctma["all-reduce"] == 2 and krum["all-reduce"] == 2


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


# The whole round in the sharded layout against the one-device round: name ->
# (W, f, attack, estimator, aggregator, loop). Both estimators with a state,
# attacks of each kind (own updates: sf, lf; coordinate-wise: alie; norms and
# the aggregator itself: optimal_ipm; random: gaussian; the others at the
# attack level, _ATTACKS) and rules of each kind (coordinate-wise, distances,
# Gram matrices, a while loop on psums), W = 9 (9, 6 or 5 computed workers:
# none divides over 8 devices) and W = 17. One case per path: "none" would
# repeat sf's (every worker computed, mu2sgd) and "ipm" alie's.
_ROUNDS = {
    "sf": (9, 4, "sf", "mu2sgd", "ctma(cwtm)", "host"),
    "alie": (9, 4, "alie", "momentum", "nnm+ctma(cwtm)", "scan"),
    "lf": (17, 8, "lf", "momentum", "arc(ctma(gm))", "scan"),
    "optimal_ipm": (9, 4, "optimal_ipm", "mu2sgd", "ctma(cwtm)", "scan"),
    "gaussian": (9, 3, "gaussian", "mu2sgd", "krum", "scan"),
}

_ROUND = textwrap.dedent("""
    import json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    from ftjax import models, train
    from tests.test_train import tiny_config

    def config(w, f, attack, estimator, spec, loop, devices, dtype="float64",
               layout="sharded"):
      return tiny_config(**{"workers.num": w, "workers.byzantine": f, "attack.name": attack,
                            "optim.estimator": estimator, "aggregator.name": spec,
                            "aggregator.meta": "none", "model.name": "mlp", "dtype": dtype,
                            "loop": loop, "mesh.aggregation": layout, "devices": devices})

    out = {}
    with jax.enable_x64(True):
      for name, case in json.loads(sys.argv[1]).items():
        loop = case[-1]
        runs = {}
        for devices in (1, 0):  # one device, then the sharded layout on all 8
          c = config(*case, devices=devices)
          setup = train.build(c)
          state = train.init_state(setup, c.seed)
          data = train.make_device_data(setup)
          run = train.make_chunk_fn(setup, loop)(state, data, 2).run
          state, m = run(state, data)
          if loop == "host":  # a second chunk takes back the state the first returned
            state, m = run(state, data)
          runs[devices] = (state, {k: float(v) for k, v in m.items()})
        (one, m1), (split, m8) = runs[1], runs[0]
        leaf = jax.tree.leaves(split.worker_state)[-1]
        out[name] = {
            "param_rel": max(float(np.abs(np.asarray(a) - np.asarray(b)).max()
                                   / np.abs(np.asarray(a)).max())
                             for a, b in zip(jax.tree.leaves(one.params),
                                             jax.tree.leaves(split.params))),
            "metrics": [m1, m8], "computed": setup.num_computed,
            "worker_rows": [int(jax.tree.leaves(one.worker_state)[-1].shape[0]),
                            int(leaf.shape[0])],
            "worker_spec": str(leaf.sharding.spec), "steps": int(split.step)}

    # The compiled round itself (float32 mlp with d = 76810, W = 33; sf: all
    # workers computed; gaussian: 16 rows of noise): XLA's memory analysis per
    # device, the largest array of the partitioned program and its collectives.
    def shapes(text):  # (elements, bytes) of every array shape in an HLO text
      size = {"f32": 4, "f64": 8, "s32": 4, "u32": 4, "s64": 8, "u8": 1, "pred": 1}
      for dtype, dims in re.findall(r"\\b(f32|f64|s32|u32|s64|u8|pred)\\[([0-9,]*)\\]", text):
        n = int(np.prod([int(x) for x in dims.split(",") if x]))
        yield n, n * size[dtype]

    def collective(text, op):
      return [sum(n for n, _ in shapes(line.split(" " + op)[0]))
              for line in text.splitlines() if re.search(r"= .* " + op + r"(-start)?\\(", line)]

    w, f = 33, 16
    for layout, attack in (("replicated", "sf"), ("sharded", "sf"), ("sharded", "gaussian")):
      c = config(w, f, attack, "momentum", "ctma(cwtm)", "host", 0, "float32", layout)
      setup = train.build(c, model=models.MLP(hidden=1024, num_classes=10))
      state = train.place(setup, train.init_state(setup, c.seed))
      data = train.place(setup, train.make_device_data(setup))
      idx = jax.ShapeDtypeStruct((w, c.workers.batch_size), jnp.int32)
      compiled = jax.jit(train.make_round(setup), donate_argnums=0).lower(
          state, data, idx).compile()
      mem = compiled.memory_analysis()
      text = compiled.as_text()
      out[f"memory|{layout}|{attack}"] = {
          "bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                       + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
          "largest": max(n for n, _ in shapes(text)),
          "all-to-all": collective(text, "all-to-all"),
          "all-gather": collective(text, "all-gather"),
          "all-reduce": collective(text, "all-reduce"),
          "d": int(sum(p.size for p in jax.tree.leaves(state.params))),
          "leaves": len(jax.tree.leaves(state.params)),
          "rows": train.worker_state_rows(setup), "w": w, "devices": int(setup.mesh.devices.size),
          "logits": c.workers.batch_size * setup.dataset.num_classes}
    try:
      train.build(tiny_config(**{"mesh.aggregation": "split"}))
    except train.ConfigError as e:
      out["bad_layout"] = str(e)
    print("RESULT " + json.dumps(out))
    """)


@pytest.fixture(scope="module")
def rounds():
  return _run(_ROUND, json.dumps(_ROUNDS))


def test_sharded_round_gives_the_one_device_round(rounds):
  # Two float64 rounds (four for the host loop, whose compiled round takes
  # back the state it returns): parameters and every metric to 1e-12.
  for name in _ROUNDS:
    r = rounds[name]
    assert r["param_rel"] <= 1e-12, (name, r)
    one, split = r["metrics"]
    assert set(one) == set(split), name
    for k in one:
      assert abs(one[k] - split[k]) <= 1e-12 * max(1.0, abs(one[k])), (name, k, one[k], split[k])
  assert rounds["sf"]["steps"] == 4 and rounds["alie"]["steps"] == 2


def test_the_estimator_state_stays_split_over_the_workers(rounds):
  for name in _ROUNDS:
    r = rounds[name]
    n = r["computed"]
    assert r["worker_rows"] == [n, -(-n // DEVICES) * DEVICES], (name, r)
    assert r["worker_spec"] in ("PartitionSpec('workers',)", "P('workers',)"), (name, r)
  # 9 computed workers for sf, 6 for gaussian (f = 3: its rows are noise): both padded.
  assert rounds["sf"]["computed"] == 9 and rounds["gaussian"]["computed"] == 6


def test_no_device_holds_every_workers_row_in_the_sharded_round(rounds):
  rep = rounds["memory|replicated|sf"]
  w, d = rep["w"], rep["d"]
  whole = w * d * 4  # the float32 rows of all W workers
  assert rep["bytes"] > whole and rep["largest"] >= w * d  # the gathered rows
  assert not rep["all-to-all"]
  for attack in ("sf", "gaussian"):
    r = rounds[f"memory|sharded|{attack}"]
    rows, num, leaves = r["rows"], r["devices"], r["leaves"]
    # All of a device's buffers together (arguments, outputs and temporaries,
    # the donated state counted once) hold less than the rows of every worker.
    assert r["bytes"] < whole, (attack, r)
    # The largest array: this device's workers' rows, or every worker's values
    # for its slice of the coordinates (gaussian's 16 rows of noise included).
    share = max(rows // num * (d + num * leaves), w * (d // num + leaves))
    assert r["largest"] <= share < w * d // 4, (attack, r, share)
    # One all-to-all moves the rows into the coordinate layout; the all-gathers
    # carry the aggregate (d values, padded) and the workers' losses and
    # logits, never rows; the psums carry distances, not coordinates.
    assert len(r["all-to-all"]) == 1 and r["all-to-all"][0] <= share, (attack, r)
    assert sum(r["all-gather"]) <= d + num * leaves + rows * (1 + r["logits"]), (attack, r)
    assert sum(r["all-reduce"]) <= w * w + 4 * w, (attack, r)


def test_an_unknown_layout_is_refused(rounds):
  assert "mesh.aggregation" in rounds["bad_layout"] and "sharded" in rounds["bad_layout"]
