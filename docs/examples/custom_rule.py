"""Your own aggregation rule and attack, registered from outside the package.

Importing this module registers the rule ``median_of_means`` and the attack
``scaled_mean``; from then on specs (``"ctma(median_of_means)"``), configs
(``docs/examples/custom_config.py``), sweeps and the notebook can name them.
"""

import jax
import jax.numpy as jnp

from ftjax import aggregators, attacks


@aggregators.register(requirement="W > 2f", robust_rows=lambda f, o: 2 * f + 1)
def median_of_means(updates, key, *, f, groups=3):
  """The coordinate-wise median of the means of ``groups`` consecutive groups of rows."""
  del key, f
  num_rows = jax.tree.leaves(updates)[0].shape[0]
  bounds = [round(i * num_rows / groups) for i in range(groups + 1)]

  def leaf(u):
    means = jnp.stack([u[a:b].mean(0) for a, b in zip(bounds, bounds[1:]) if b > a])
    return jnp.median(means, axis=0)

  return jax.tree.map(leaf, updates), {}


@attacks.register()
def scaled_mean(honest, own, key, ctx, *, scale=-3.0):
  """Every Byzantine worker sends ``scale`` times the honest mean."""
  del own, key
  row = jax.tree.map(lambda h: scale * h.mean(0), honest)
  return jax.tree.map(lambda r: jnp.repeat(r[None], ctx.num_byzantine, 0), row)
