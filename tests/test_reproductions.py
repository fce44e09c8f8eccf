"""The committed reproductions of other people's experiments say what their programs do."""

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import sweep_spec
from ftjax import train


def _byzfl_server(rows, c, f):
  """ByzFL's README server rule in NumPy: Clipping(c), then NNM(f), then TrMean(f)."""
  norms = np.linalg.norm(rows, axis=1, keepdims=True)
  rows = np.where(norms > c, rows * c / norms, rows)
  dist = ((rows[:, None] - rows[None]) ** 2).sum(-1)
  n = len(rows)
  mixed = np.stack([rows[np.argsort(dist[i], kind="stable")[:n - f]].mean(0) for i in range(n)])
  ordered = np.sort(mixed, axis=0)
  return ordered[f:n - f].mean(0)


def test_byzfl_readme_sweep_is_byzfls_program():
  spec = sweep_spec.load_config_file("configs/sweeps/byzfl_readme.py:mnist.npz")
  sweep = sweep_spec.expand(spec)
  assert [r.seed for r in sweep.cells[0].runs] == [1, 2, 3, 4, 5]
  c = sweep.cells[0].runs[0].config
  assert (c.workers.num, c.workers.byzantine, c.workers.batch_size, c.num_steps) == (4, 1, 25, 1000)
  assert (c.data.partition, c.data.alpha, c.data.honest_only) == ("dirichlet", 0.5, True)
  assert (c.model.name, c.attack.name, c.attack.options.ipm.eps) == ("cnn_mnist", "ipm", 3.0)
  assert not c.optim.clip  # ByzFL clips the sent rows, not the gradients
  # The server's rule on rows whose norms straddle the clipping radius.
  c.data.name, c.data.path, c.model.name = "digits", "", "mlp"
  setup = train.build(c)
  rows = np.random.default_rng(0).standard_normal((4, 50)) * np.array([[0.1], [0.5], [1.0], [3.0]])
  got, _ = setup.aggregator(jnp.asarray(rows, jnp.float32), jax.random.key(0))
  np.testing.assert_allclose(got, _byzfl_server(rows, 2.0, 1), rtol=1e-5, atol=1e-6)
