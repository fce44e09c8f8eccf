"""Server-side optax transforms: weight decay, SGD and AnyTime averaging.

The server keeps the query point x_t (the model that is evaluated, and the
``params`` optax sees) and, for mu2sgd, the anchor iterate w_t inside the state
of :func:`anytime_averaging`. One server step is

  w_{t+1} = w_t - lr * (a_t + lambda * x_t)
  x_{t+1} = (1 - gamma_t) * x_t + gamma_t * w_{t+1}

which is the chain ``add_decayed_weights(lambda) -> sgd(lr) -> anytime_averaging``
applied with ``params = x_t``: the first two turn the aggregate a_t into the
w-increment, the last one moves w and returns the increment of x. Server
momentum (``optim.server_momentum`` = mu > 0) puts ``optax.trace(mu)`` before
the SGD step: v_t = mu v_{t-1} + (a_t + lambda x_t), v_0 = 0, and v_t replaces
the aggregate in the step (PyTorch's SGD momentum without dampening).
Without AnyTime averaging (momentum and sgd estimators) x = w and the chain is
plain SGD.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ftjax import estimators

PyTree = Any


class AnytimeState(NamedTuple):
  """State of :func:`anytime_averaging`."""
  count: jax.Array   # int32 []: server steps done
  anchor: PyTree     # like params: the iterate w_t
  alpha_sum: jax.Array  # float32 []: sum_{s<=t} alpha_s


def anytime_gamma(t: jax.Array, alpha_sum: jax.Array, gamma: Optional[float],
                  reference_rounding: bool, gamma_min: float = 0.0) -> jax.Array:
  """gamma_t = alpha_t / sum_{s<=t} alpha_s with alpha_t = t, or a fixed gamma.

  ``reference_rounding`` applies the original's ``max(round(., 3), 0.01)``;
  then ``gamma_min`` floors the result, ``max(gamma_t, gamma_min)``.
  """
  if gamma is None:
    value = jnp.asarray(t, jnp.float32) / alpha_sum
  else:
    value = jnp.asarray(gamma, jnp.float32)
  value = estimators.reference_round(value) if reference_rounding else value
  return estimators.floor_schedule(value, gamma_min)


def anytime_averaging(gamma: Optional[float] = None, reference_rounding: bool = False,
                      gamma_min: float = 0.0) -> optax.GradientTransformation:
  """AnyTime averaging of the query point (the server's half of mu2sgd).

  Expects ``updates`` to be the increment of the anchor w (``-lr * a_t`` after
  the SGD transform) and ``params`` the current query point x_t.

  Args:
    gamma: fixed averaging weight, or ``None`` for alpha_t = t, i.e.
      gamma_t = 2 / (t + 1) (gamma_1 = 1).
    reference_rounding: reproduce the reference's ``max(round(., 3), 0.01)``.
    gamma_min: floor on gamma_t (0: none; 0.01: the original's floor, unrounded).
      With a floor, x stops averaging ever more iterates and follows an
      exponential average of the latest ones.

  Returns:
    A transform whose output is ``x_{t+1} - x_t``.
  """

  def init_fn(params):
    return AnytimeState(count=jnp.zeros([], jnp.int32),
                        anchor=jax.tree.map(jnp.array, params),
                        alpha_sum=jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("anytime_averaging needs params (the query point x_t).")
    t = state.count + 1
    alpha_sum = state.alpha_sum + t.astype(jnp.float32)
    g = anytime_gamma(t, alpha_sum, gamma, reference_rounding, gamma_min)
    anchor = jax.tree.map(lambda w, u: w + u, state.anchor, updates)
    new_updates = jax.tree.map(lambda w, x: (g * (w - x)).astype(x.dtype), anchor, params)
    return new_updates, AnytimeState(count=t, anchor=anchor, alpha_sum=alpha_sum)

  return optax.GradientTransformation(init_fn, update_fn)


STATE_FIELDS = ("lr",)
"""``optim`` fields that :func:`make_server_optimizer` puts in the optimiser's state
(``optax.inject_hyperparams``), not in the compiled program: runs that differ only
in them share one program (:func:`ftjax.loop.round_identity`)."""


def make_server_optimizer(optim_config) -> optax.GradientTransformation:
  """The server chain for the config's ``c.optim`` section.

  Args:
    optim_config: fields lr, weight_decay, estimator, gamma_schedule
      ('anytime' | 'fixed'), gamma, reference_rounding, gamma_min,
      server_momentum (0: none).

  Returns:
    An optax transform; call ``update(aggregate, state, params=x)``.
  """
  c = optim_config
  if not (isinstance(c.lr, (int, float)) and 0 < c.lr < float("inf")):
    raise ValueError(f"optim.lr must be a positive number, got {c.lr!r}.")
  parts = []
  if c.weight_decay:
    parts.append(optax.add_decayed_weights(c.weight_decay))
  server_momentum = c.get("server_momentum", 0.0)
  if (isinstance(server_momentum, bool) or not isinstance(server_momentum, (int, float))
      or not 0 <= server_momentum < 1):
    raise ValueError(f"optim.server_momentum must be a number in [0, 1) (0: no server "
                     f"momentum), got {server_momentum!r}.")
  if server_momentum:  # 0 adds nothing: the chain and its state stay as they were
    parts.append(optax.trace(decay=server_momentum))
  # The learning rate is a value in the optimizer state, not a constant of the
  # compiled round: runs that differ only in it share one program.
  parts.append(optax.inject_hyperparams(optax.sgd)(learning_rate=c.lr))
  gamma_min = c.get("gamma_min", 0.0)
  estimators.check_floor("gamma_min", gamma_min)
  if gamma_min and c.estimator != "mu2sgd":
    raise ValueError(f"optim.gamma_min floors mu2sgd's AnyTime gamma_t, but optim.estimator "
                     f"is {c.estimator!r}; set optim.gamma_min=0 or use optim.estimator=mu2sgd.")
  if c.estimator == "mu2sgd":
    if c.gamma_schedule not in ("anytime", "fixed"):
      raise ValueError(f"optim.gamma_schedule must be 'anytime' or 'fixed', got "
                       f"{c.gamma_schedule!r}.")
    gamma = None if c.gamma_schedule == "anytime" else c.gamma
    parts.append(anytime_averaging(gamma, c.reference_rounding, gamma_min))
  return optax.chain(*parts)
