"""The worker axis split over several devices gives the one-device results.

JAX fixes the number of CPU devices when it starts, so each check runs in a
subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=3
(three devices on any machine: the results must not depend on the cores).
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from ftjax import train
from tests.test_train import tiny_config

pytestmark = pytest.mark.slow  # minutes of compiling; CI runs it, -m "not slow" skips it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from ftjax import train
    from tests.test_train import tiny_config

    out = {"devices": len(jax.devices())}
    for attack, estimator in (("sf", "mu2sgd"), ("alie", "momentum")):
      params, metrics = {}, {}
      for devices in (1, 0):  # one device, then all three
        c = tiny_config(**{"attack.name": attack, "optim.estimator": estimator,
                           "devices": devices})
        setup = train.build(c)
        state = train.init_state(setup, c.seed)
        data = train.make_device_data(setup)
        run = train.make_chunk_fn(setup, "host")(state, data, 3).run
        state, m = run(state, data)
        state, m = run(state, data)
        params[devices] = [np.asarray(p) for p in jax.tree.leaves(state.params)]
        metrics[devices] = {k: float(v) for k, v in m.items()}
        sharding = jax.tree.leaves(state.params)[0].sharding
        out[f"{attack}_mesh_{devices}"] = (None if setup.mesh is None
                                           else int(setup.mesh.devices.size))
        out[f"{attack}_spec_{devices}"] = str(getattr(sharding, "spec", None))
      out[f"{attack}_computed"] = setup.num_computed
      out[f"{attack}_param_diff"] = max(float(np.abs(a - b).max())
                                        for a, b in zip(params[1], params[0]))
      out[f"{attack}_loss"] = [metrics[1]["train_loss"], metrics[0]["train_loss"]]
    # The lax.scan chunk splits the same way.
    c = tiny_config(**{"devices": 0})
    setup = train.build(c)
    state = train.init_state(setup, c.seed)
    data = train.make_device_data(setup)
    fresh = lambda: jax.tree.map(jnp.copy, state)  # run() donates its state
    scanned, _ = train.make_chunk_fn(setup, "scan")(fresh(), data, 3).run(fresh(), data)
    hosted, _ = train.make_chunk_fn(setup, "host")(fresh(), data, 3).run(fresh(), data)
    out["scan_host_diff"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                                zip(jax.tree.leaves(scanned.params), jax.tree.leaves(hosted.params)))
    # A whole run on all devices in the sharded layout (its checkpoint holds
    # the estimator states padded to 6 rows, split over the workers), resumed
    # on one device (devices and mesh are resumable).
    workdir = sys.argv[1]
    split = train.train_and_evaluate(
        tiny_config(**{"devices": 0, "num_steps": 3, "mesh.aggregation": "sharded"}), workdir)
    out["split_rows"] = int(jax.tree.leaves(split.state.worker_state)[-1].shape[0])
    row = train.train_and_evaluate(tiny_config(**{"devices": 1}), workdir)
    out["resumed_step"] = row.metrics["step"]
    out["resumed_rows"] = int(jax.tree.leaves(row.state.worker_state)[-1].shape[0])
    # A long host-loop chunk: dozens of multi-device rounds queued at once
    # deadlock XLA:CPU's all-gather, so the loop bounds the rounds in flight.
    c = tiny_config(**{"devices": 0})
    setup = train.build(c)
    state = train.init_state(setup, c.seed)
    state, m = train.make_chunk_fn(setup, "host")(state, data, 300).run(state, data)
    out["long_chunk_loss"] = float(m["train_loss"])
    try:
      train.build(tiny_config(**{"devices": 4}))
    except train.ConfigError as e:
      out["too_many"] = str(e)
    print("RESULT " + json.dumps(out))
    """)


@pytest.fixture(scope="module")
def three_devices(tmp_path_factory):
  # Short collective timeouts: a deadlocked all-gather aborts in seconds.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_force_host_platform_device_count=3 --xla_backend_optimization_level=0 "
      "--xla_cpu_collective_call_warn_stuck_timeout_seconds=10 "
      "--xla_cpu_collective_call_terminate_timeout_seconds=40"))
  workdir = str(tmp_path_factory.mktemp("sharded_run"))
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, workdir], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def test_split_worker_axis_matches_one_device(three_devices):
  r = three_devices
  assert r["devices"] == 3
  for attack in ("sf", "alie"):
    assert r[f"{attack}_mesh_1"] is None and r[f"{attack}_mesh_0"] == 3
    assert r[f"{attack}_spec_0"] in ("P()", "PartitionSpec()")  # state stays replicated
    assert r[f"{attack}_param_diff"] < 1e-5, r
    a, b = r[f"{attack}_loss"]
    assert abs(a - b) < 1e-5 * max(1.0, abs(a)), r
  # 5 and 4 computed workers: neither divides over 3 devices (padding is exercised).
  assert r["sf_computed"] == 5 and r["alie_computed"] == 4


def test_scan_chunk_splits_like_the_host_loop(three_devices):
  assert three_devices["scan_host_diff"] < 1e-5


def test_sharded_run_resumes_on_one_device(three_devices):
  assert three_devices["resumed_step"] == 6
  # 5 computed workers: padded to 6 rows over 3 devices, restored as 5.
  assert three_devices["split_rows"] == 6 and three_devices["resumed_rows"] == 5


def test_long_host_chunk_on_split_workers_does_not_deadlock(three_devices):
  # 300 rounds in one chunk run to the end; a deadlocked all-gather would
  # abort the subprocess within the short collective timeouts set above.
  assert math.isfinite(three_devices["long_chunk_loss"])


def test_more_devices_than_exist_is_refused(three_devices):
  assert "devices=4" in three_devices["too_many"]
  assert "xla_force_host_platform_device_count" in three_devices["too_many"]


@pytest.mark.parametrize("devices", [-1, 10_000])
def test_bad_device_counts_are_refused(devices):
  with pytest.raises(train.ConfigError, match="devices"):
    train.build(tiny_config(devices=devices))
