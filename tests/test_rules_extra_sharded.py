"""The rules of ftjax.aggregators.subsets and ftjax.aggregators.filters on coordinate slices.

Each rule runs once on one device and once split over 4 CPU devices by
coordinates (``sharding.shard_aggregator``, in a subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=4); the aggregates and the
diagnostics must agree. The leaves' sizes are not multiples of 4, so padding
columns are exercised, and one row holds a NaN seen by a single device.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # a subprocess over several devices; -m "not slow" skips it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import functools, json
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from ftjax import aggregators, sharding
    from ftjax.aggregators import filters as rules_filters, subsets as rules_subsets

    rules = {**rules_subsets.RULES, **rules_filters.RULES}
    mesh = sharding.coordinate_mesh()
    rng = np.random.default_rng(0)
    w, f = 11, 2
    x = {"conv": rng.normal(1, 1, (w, 13, 3)), "bias": rng.normal(1, 1, (w, 7))}
    x["conv"][-f:] += 4.0
    x["bias"][-f:] -= 3.0
    x["conv"][-1, 12, 2] = np.nan
    x = jax.tree.map(jnp.asarray, x)
    aggs = []
    for name, info in rules.items():
      options = {**info["options"], **({"noise": 0.0} if name == "flame" else {})}
      fn = functools.partial(info["body"], f=f, **options)
      aggs.append(aggregators.rule(lambda v, key, fn=fn: fn(v, key), f=f, name=name))
    key = jax.random.key(0)
    refs = jax.jit(lambda v, k: [a(v, k) for a in aggs])(x, key)
    gots = jax.jit(lambda v, k: [sharding.shard_aggregator(a, mesh)(v, k) for a in aggs])(x, key)
    out = {}
    for name, (ref, ref_diag), (got, got_diag) in zip(rules, refs, gots):
      out[name] = {
          "diff": max(float(jnp.max(jnp.abs(r - g)))
                      for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got))),
          "diag": all(np.allclose(ref_diag[k], got_diag[k]) for k in ref_diag),
      }
    print("RESULT " + json.dumps(out))
""")


def test_sharded_equals_one_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"))
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  results = json.loads(line[len("RESULT "):])
  assert len(results) == 11
  for name, r in results.items():
    assert r["diff"] < 1e-12 and r["diag"], (name, r)
