"""Worker-side estimators as optax-style gradient transformations.

Each worker turns its clipped stochastic gradient(s) into the update it sends to
the server. The training step vmaps these transforms over the worker axis, so
every state below is per worker; stacked, its leaves gain a leading axis W.

Three estimators (Dahan & Levy, ICML 2024; docs/estimators.md):

* ``sgd``: the clipped gradient itself.
* ``momentum(beta)``: m_1 = g_1, m_t = beta * m_{t-1} + (1 - beta) * g_t; the
  first momentum (``init``) and the weight on g_t (``dampening``) are options, so
  ByzFL's and PyTorch's conventions are reproducible too.
* ``mu2sgd(beta)``: the corrected momentum of mu2sgd (STORM-style),
  d_1 = g(x_1; z_1), d_t = g(x_t; z_t) + (1 - beta_t) * (d_{t-1} - g(x_{t-1}; z_t)).
  It needs the gradient at the previous query point on the same minibatch,
  passed as the extra argument ``prev_grads``.

Per-worker gradient clipping is applied by the step to every gradient before it
reaches these transforms; see :func:`clip_by_global_norm`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

PyTree = Any

ESTIMATOR_NAMES = ("sgd", "momentum", "mu2sgd")

MOMENTUM_INITS = ("gradient", "zero")
"""The first momentum: ``"gradient"`` (m_1 = g_1) or ``"zero"`` (m_0 = 0)."""


class EstimatorState(NamedTuple):
  """State shared by all worker estimators."""
  count: jax.Array  # int32 []: number of updates done so far
  trace: PyTree     # like params: m_{t-1} (momentum) or d_{t-1} (mu2sgd); () for sgd


def reference_round(value: jax.Array) -> jax.Array:
  """The original program's schedule quirk: ``max(round(value, 3), 0.01)``."""
  return jnp.maximum(jnp.round(value, 3), 0.01)


def clip_by_global_norm(tree: PyTree, max_norm: Optional[float]) -> PyTree:
  """Scales ``tree`` by ``min(1, max_norm / ||tree||)`` (global L2 norm).

  Args:
    tree: one worker's gradient pytree.
    max_norm: the clipping threshold C; ``None`` disables clipping.

  Returns:
    The clipped pytree (same structure and dtypes).
  """
  if max_norm is None:
    return tree
  norm = optax.tree.norm(tree)
  # Written with a `where` so that a zero gradient does not divide by zero.
  scale = jnp.where(norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
  return jax.tree.map(lambda g: (g * scale).astype(g.dtype), tree)


def sgd() -> optax.GradientTransformationExtraArgs:
  """The plain (already clipped) gradient, a baseline the reference lacks."""

  def init_fn(params):
    del params
    return EstimatorState(count=jnp.zeros([], jnp.int32), trace=())

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return updates, EstimatorState(count=state.count + 1, trace=())

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def momentum(beta: float = 0.9, init: str = "gradient",
             dampening: Optional[float] = None) -> optax.GradientTransformationExtraArgs:
  """Momentum of the gradients: ``m_t = beta * m_{t-1} + (1 - dampening) * g_t``.

  Args:
    beta: the momentum coefficient.
    init: ``"gradient"``: m_1 = g_1, the recursion from t = 2 on (ftjax's
      default, and PyTorch's buffer); ``"zero"``: m_0 = 0, the recursion from
      t = 1 on, so m_1 = (1 - dampening) * g_1 (ByzFL's).
    dampening: the weight on g_t is ``1 - dampening``; None takes ``beta``, an
      exponential moving average (``m_t = beta m_{t-1} + (1 - beta) g_t``);
      0 is PyTorch's SGD default.

  Returns:
    An optax transform whose state trace is ``m_{t-1}``.
  """
  keep = 1 - (beta if dampening is None else dampening)

  def init_fn(params):
    return EstimatorState(count=jnp.zeros([], jnp.int32),
                          trace=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if init == "zero":  # the trace starts at m_0 = 0
      new = jax.tree.map(lambda g, m: (beta * m + keep * g).astype(g.dtype),
                         updates, state.trace)
    else:
      first = state.count == 0
      new = jax.tree.map(
          lambda g, m: jnp.where(first, g, beta * m + keep * g).astype(g.dtype),
          updates, state.trace)
    return new, EstimatorState(count=state.count + 1, trace=new)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def floor_schedule(value: jax.Array, floor: float) -> jax.Array:
  """``max(value, floor)``: a schedule that stops decreasing at ``floor`` (0: unchanged)."""
  return jnp.maximum(value, floor) if floor else value


def check_floor(name: str, floor: float) -> None:
  """Refuses a schedule floor outside [0, 1] (a weight beta_t or gamma_t lies there)."""
  if not isinstance(floor, (int, float)) or isinstance(floor, bool) or not 0 <= floor <= 1:
    raise ValueError(f"optim.{name} must be a number between 0 and 1 (0 keeps the paper's "
                     f"schedule, 0.01 is the original program's floor), got {floor!r}.")


def mu2sgd_beta(t: jax.Array, beta: Optional[float], reference_rounding: bool,
                beta_min: float = 0.0) -> jax.Array:
  """The corrected-momentum weight beta_t at round ``t`` (1-based).

  Args:
    t: the round number, ``t >= 1``.
    beta: a fixed beta, or ``None`` for the schedule ``beta_t = 1 / t``.
    reference_rounding: apply the reference's ``max(round(., 3), 0.01)``.
    beta_min: floor, ``beta_t = max(beta_t, beta_min)`` after any rounding;
      0.01 is the original program's floor without its rounding.

  Returns:
    beta_t as a float32 scalar.
  """
  value = (jnp.asarray(beta, jnp.float32) if beta is not None
           else 1.0 / jnp.asarray(t, jnp.float32))
  value = reference_round(value) if reference_rounding else value
  return floor_schedule(value, beta_min)


def mu2sgd(beta: Optional[float] = None, reference_rounding: bool = False,
           beta_min: float = 0.0) -> optax.GradientTransformationExtraArgs:
  """Corrected momentum of mu2sgd (the workers' half of the double momentum).

  ``update(grads, state, prev_grads=...)`` where ``grads = g(x_t; z_t)`` and
  ``prev_grads = g(x_{t-1}; z_t)`` are evaluated on the same minibatch.

  Args:
    beta: fixed beta; ``None`` uses ``beta_t = 1 / t``.
    reference_rounding: reproduce the reference's rounding and 0.01 floor.
    beta_min: floor on beta_t (0: none; 0.01: the original's floor, unrounded).

  Returns:
    An optax transform whose state trace is ``d_{t-1}``.
  """

  def init_fn(params):
    return EstimatorState(count=jnp.zeros([], jnp.int32),
                          trace=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, *, prev_grads=None, **extra_args):
    del params, extra_args
    if prev_grads is None:
      raise ValueError("mu2sgd needs prev_grads, the gradient at the previous query "
                       "point on the same minibatch.")
    t = state.count + 1
    keep = 1.0 - mu2sgd_beta(t, beta, reference_rounding, beta_min)
    first = state.count == 0
    new = jax.tree.map(
        lambda g, d, gp: jnp.where(first, g, g + (keep * (d - gp)).astype(g.dtype)),
        updates, state.trace, prev_grads)
    return new, EstimatorState(count=t, trace=new)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


ESTIMATORS: dict[str, Callable[..., optax.GradientTransformationExtraArgs]] = {
    "sgd": lambda c: sgd(),
    "momentum": lambda c: momentum(c.momentum, c.get("momentum_init", "gradient"),
                                   c.get("dampening", None)),
    "mu2sgd": lambda c: mu2sgd(
        None if c.beta_schedule == "1/t" else c.momentum, c.reference_rounding,
        c.get("beta_min", 0.0)),
}


def needs_previous_gradient(name: str) -> bool:
  """Whether the estimator evaluates a second gradient at x_{t-1}."""
  return name == "mu2sgd"


def make_estimator(optim_config) -> optax.GradientTransformationExtraArgs:
  """Builds the worker estimator named by ``optim_config.estimator``.

  Args:
    optim_config: the ``c.optim`` section (fields estimator, momentum,
      beta_schedule, reference_rounding, beta_min, momentum_init, dampening).

  Returns:
    The optax transform (one worker's; the step vmaps it).
  """
  name = optim_config.estimator
  if name not in ESTIMATORS:
    raise ValueError(f"Unknown estimator {name!r}; valid names: {', '.join(ESTIMATORS)}.")
  if optim_config.beta_schedule not in ("1/t", "fixed"):
    raise ValueError(f"optim.beta_schedule must be '1/t' or 'fixed', got "
                     f"{optim_config.beta_schedule!r}.")
  uses_momentum = name == "momentum" or (name == "mu2sgd" and
                                          optim_config.beta_schedule == "fixed")
  beta = optim_config.momentum
  if uses_momentum and not (isinstance(beta, (int, float)) and 0 <= beta <= 1):
    raise ValueError(f"optim.momentum is a weight in [0, 1], got {beta!r}.")
  beta_min = optim_config.get("beta_min", 0.0)
  check_floor("beta_min", beta_min)
  if beta_min and name != "mu2sgd":
    raise ValueError(f"optim.beta_min floors mu2sgd's beta_t, but optim.estimator is "
                     f"{name!r}; set optim.beta_min=0 or use optim.estimator=mu2sgd.")
  check_momentum_convention(name, optim_config.get("momentum_init", "gradient"),
                            optim_config.get("dampening", None))
  return ESTIMATORS[name](optim_config)


def check_momentum_convention(name: str, init: Any, dampening: Any) -> None:
  """Refuses a bad ``optim.momentum_init`` or ``optim.dampening``, or either set away
  from its default with an estimator other than ``momentum``."""
  if init not in MOMENTUM_INITS:
    raise ValueError(f"optim.momentum_init must be 'gradient' (m_1 = g_1) or 'zero' "
                     f"(m_0 = 0, ByzFL's), got {init!r}.")
  if dampening is not None and (isinstance(dampening, bool) or not isinstance(
      dampening, (int, float)) or not 0 <= dampening <= 1):
    raise ValueError(f"optim.dampening must be a number in [0, 1] (the gradient's weight is "
                     f"1 - dampening), or None for 1 - optim.momentum; got {dampening!r}.")
  if name != "momentum" and (init != "gradient" or dampening is not None):
    raise ValueError(f"optim.momentum_init and optim.dampening shape the momentum estimator, "
                     f"but optim.estimator is {name!r}; leave them at 'gradient' and None or "
                     f"use optim.estimator=momentum.")
