"""Two processes joined by jax.distributed reproduce the one-process run.

Two local CPU processes (2 devices each, a localhost coordinator on a free
port, gloo collectives) train the same tiny config as one process with 4
devices, in both aggregation layouts; metrics and parameters must agree.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from tests.subprocess_env import with_devices

pytestmark = pytest.mark.slow  # minutes of compiling; CI runs it, -m "not slow" skips it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    from ftjax import sharding, train
    from tests.test_train import tiny_config

    if len(sys.argv) > 1:
      sharding.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
    out = {"processes": jax.process_count(), "devices": jax.device_count(),
           "local_devices": jax.local_device_count()}
    for layout in ("replicated", "sharded"):
      c = tiny_config(**{"workers.num": 9, "workers.byzantine": 4, "model.name": "mlp",
                         "dtype": "float64", "mesh.aggregation": layout, "devices": 0})
      setup = train.build(c)  # every process loads the dataset itself
      state = train.init_state(setup, c.seed)
      data = train.make_device_data(setup)
      state, m = train.make_chunk_fn(setup, "host")(state, data, 5).run(state, data)
      # Replicated global arrays: this process's copy.
      local = lambda a: np.asarray(a.addressable_data(0))
      out[layout] = {"metrics": {k: float(local(v)) for k, v in m.items()},
                     "params": [local(p).ravel().tolist() for p in jax.tree.leaves(state.params)]}
    print("RESULT " + json.dumps(out))
    """)


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=with_devices(devices))


def _result(stdout):
  line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  address = f"localhost:{port}"
  logs = tmp_path_factory.mktemp("distributed")
  # Files, not pipes: a process blocked on a full pipe would stall the other
  # one at the shutdown barrier.
  files = [(open(logs / f"out{i}", "w+"), open(logs / f"err{i}", "w+")) for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, address, str(i)], cwd=ROOT,
                            env=_env(2), stdout=out, stderr=err, text=True)
           for i, (out, err) in enumerate(files)]
  try:
    for p in procs:
      p.wait(timeout=600)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outs = []
  for p, (out, err) in zip(procs, files):
    out.seek(0), err.seek(0)
    stdout, stderr = out.read(), err.read()
    assert p.returncode == 0, stderr[-3000:]
    outs.append(_result(stdout))
  single = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=_env(4),
                          capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  return outs, _result(single.stdout)


def test_two_processes_form_one_mesh(runs):
  outs, single = runs
  for r in outs:
    assert (r["processes"], r["devices"], r["local_devices"]) == (2, 4, 2)
  assert (single["processes"], single["devices"]) == (1, 4)


@pytest.mark.parametrize("layout", ["replicated", "sharded"])
def test_two_processes_reproduce_the_single_process_run(runs, layout):
  outs, single = runs
  for r in outs:
    assert r[layout]["metrics"] == single[layout]["metrics"]
    for a, b in zip(r[layout]["params"], single[layout]["params"]):
      assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-12
