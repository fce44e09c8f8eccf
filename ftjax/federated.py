"""Federated settings: local steps, client sampling, data over the honest workers only.

The paper's round is synchronous SGD: every worker sends one clipped,
estimated gradient of one minibatch per round. The federated settings change
three things around that round (docs/federated.md has the formulas):

* **Local steps** (``federated.local_steps = K``): every worker takes K SGD
  steps of rate ``federated.local_lr`` on K minibatches of its own data,
  starting from the server's model x_t, and sends the average of the K
  clipped gradients along its path, (x_t - x_{t,K}) / (K lr), a pseudo-gradient
  (``send="pseudo_gradient"``, the default: it is on the scale of a gradient,
  so the estimators, the server learning rate and the attacks keep their
  meaning, and K = 1 is the paper's round exactly), or the model change
  x_t - x_{t,K} itself (``send="model_change"``, FedAvg's convention; use
  ``optim.lr = 1`` for FedAvg's server step).
* **Client sampling** (``federated.participants = m``): each round m of the W
  workers, drawn without replacement from the round's key, send their rows;
  the number of Byzantine workers among them varies from round to round.
  The rule is built for m rows and the f of ``aggregator.f`` (default: the
  expected count f m / W rounded up); every round logs how many Byzantine
  workers were drawn (``sampled_byzantine``) and whether that exceeded the
  rule's f (``sampled_over_f``). Every worker computes its update each round
  and the workers not drawn keep their estimator state: the drawn ones send.
* **Data over the honest workers only** (``data.honest_only``): the
  partition splits the training set over the W - f honest workers. The
  Byzantine workers hold no shard; those whose attack runs the honest
  algorithm on data (``sf``, ``lf``, ``none``) draw their minibatches i.i.d.
  from the whole training split, as an attacker who knows the training
  distribution.

:func:`settings` checks the config's federated fields against the rest of
the run in one sentence each; the round calls :func:`local_sgd` and
:func:`draw_participants`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ftjax import estimators
from ftjax import registry

PyTree = Any

SEND_MODES = ("pseudo_gradient", "model_change")


@dataclasses.dataclass(frozen=True)
class Federated:
  """The federated settings of a run (all off by default: the paper's round)."""
  local_steps: int = 1             # K local SGD steps per worker per round
  local_lr: float = 0.1            # the workers' local learning rate (K > 1)
  send: str = "pseudo_gradient"    # what a worker sends after its K steps (SEND_MODES)
  participants: int = 0            # m workers drawn per round; 0: all W
  honest_only: bool = False        # the data is split over the honest workers only
  weights: Any = None              # per-worker weights: None, "examples" or a tuple of W

  @property
  def local(self) -> bool:
    """Whether the workers take local steps (K > 1)."""
    return self.local_steps > 1


class FederatedError(ValueError):
  """A federated setting that cannot run with the rest of the config."""


def _field(section, name: str, default):
  return default if section is None else section.get(name, default)


def settings(c, num_workers: int, attack, needs_prev: bool, batch_stats_mode: str) -> Federated:
  """The run's :class:`Federated`, checked against the rest of the config.

  Raises:
    FederatedError: one sentence saying what to change.
  """
  section = c.get("federated", None)
  k = registry.int_at_least(1)("federated.local_steps", _field(section, "local_steps", 1))
  lr = registry.positive("federated.local_lr", _field(section, "local_lr", 0.1))
  send = _field(section, "send", "pseudo_gradient")
  if send not in SEND_MODES:
    raise FederatedError(f"Unknown federated.send {send!r}; valid: {', '.join(SEND_MODES)}.")
  m = registry.int_at_least(0, "0: every worker")(
      "federated.participants", _field(section, "participants", 0) or 0)
  if m > num_workers:
    raise FederatedError(f"federated.participants={m} is more than workers.num={num_workers}; "
                         f"draw at most every worker (0: every worker).")
  honest_only = bool(c.data.get("honest_only", False))
  weights = _weights(c.aggregator.get("weights", None), num_workers)
  fed = Federated(k, float(lr), send, 0 if m == num_workers else m, honest_only, weights)
  _check_compatible(fed, attack, needs_prev, batch_stats_mode)
  return fed


def _weights(value, num_workers: int):
  """``aggregator.weights`` checked: None, "examples" or W nonnegative numbers."""
  if value is None or value == "none":
    return None
  if value == "examples":
    return value
  if isinstance(value, str):
    raise FederatedError(f"aggregator.weights must be 'none', 'examples' or {num_workers} "
                         f"numbers, got {value!r}.")
  numbers = tuple(value)
  if (len(numbers) != num_workers
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                 and v >= 0 for v in numbers) or not sum(numbers) > 0):
    raise FederatedError(f"aggregator.weights must be {num_workers} finite nonnegative numbers "
                         f"(one per worker, not all zero), got {value!r}.")
  return tuple(float(v) for v in numbers)


def worker_weights(fed: Federated, sizes: Optional[jax.Array], num_workers: int,
                   dtype: Any) -> Optional[jax.Array]:
  """The per-worker weights [W] the rule gets, or None (unweighted).

  ``"examples"``: each worker's shard size (``sizes``, the partition's); a
  worker without a shard (the Byzantine ones under ``data.honest_only``)
  counts the median shard, and without a partition every worker counts 1.
  """
  if fed.weights is None:
    return None
  if fed.weights != "examples":
    return jnp.asarray(fed.weights, dtype)
  if sizes is None:
    return jnp.ones((num_workers,), dtype)
  sizes = sizes.astype(dtype)
  missing = num_workers - sizes.shape[0]
  return jnp.concatenate([sizes, jnp.full((missing,), jnp.median(sizes), dtype)])


def _check_compatible(fed: Federated, attack, needs_prev: bool, batch_stats_mode: str) -> None:
  if fed.local and needs_prev:
    raise FederatedError(
        f"federated.local_steps={fed.local_steps} with optim.estimator='mu2sgd': mu2sgd's "
        f"correction differentiates at x_(t-1) on the round's minibatch, which K local steps "
        f"do not define; use optim.estimator='momentum' or 'sgd' with local steps.")
  if fed.local and batch_stats_mode == "sequential":
    raise FederatedError("model.batch_stats='sequential' folds one pass per worker per round; "
                         "with local steps use model.batch_stats='honest_mean'.")
  if fed.participants and attack.needs_aggregator:
    raise FederatedError(
        f"Attack {attack.name!r} searches against the server's rule on all W rows, but with "
        f"federated.participants={fed.participants} the rule sees the drawn rows only; "
        f"choose an attack without a search or federated.participants=0.")


def sampled_f(declared: Optional[int], num_byzantine: int, num_workers: int,
              participants: int) -> int:
  """The f the rule is built for when m of W workers are drawn.

  ``aggregator.f`` when set; otherwise the expected number of Byzantine
  workers among the drawn, f m / W, rounded up.
  """
  if declared is not None:
    return declared
  return math.ceil(num_byzantine * participants / num_workers)


def draw_participants(key: jax.Array, num_workers: int, participants: int) -> jax.Array:
  """The round's drawn workers: int32 [m], without replacement, in increasing order.

  Increasing order keeps the honest workers (the first W - f) ahead of the
  Byzantine ones among the drawn, as in the full round.
  """
  drawn = jax.random.choice(key, num_workers, (participants,), replace=False)
  return jnp.sort(drawn).astype(jnp.int32)


def local_sgd(value_and_grad: Callable, fed: Federated, clip: Optional[float]) -> Callable:
  """One worker's K local steps: ``(params, stats, xs, ys, keys) -> ((loss, logits, stats), sent)``.

  ``xs`` [K, b, ...] and ``ys`` [K, b] are the worker's K minibatches, ``keys``
  [K, 2] the model's key data for each step;
  ``value_and_grad(params, stats, x, y, key) -> ((loss, (logits, stats)), grads)``.
  Each step's gradient is clipped to ``clip`` before the step
  p <- p - local_lr * g. ``loss`` and ``logits`` are the first step's (at the
  server's model, as the paper's round logs them); ``stats`` the BatchNorm
  statistics after the K steps; ``sent`` the pseudo-gradient (the mean of the
  K clipped gradients, which for K = 1 is the clipped gradient itself) or the
  model change, per ``fed.send``.
  """
  clip_one = functools.partial(estimators.clip_by_global_norm, max_norm=clip)

  def step(carry, xy):
    params, stats, total = carry
    (loss, (logits, stats)), grads = value_and_grad(params, stats, *xy)
    grads = clip_one(grads)
    params = jax.tree.map(lambda p, g: (p - fed.local_lr * g).astype(p.dtype), params, grads)
    return (params, stats, jax.tree.map(jnp.add, total, grads)), (loss, logits)

  def trajectory(params, batch_stats, xs, ys, keys):
    zeros = jax.tree.map(jnp.zeros_like, params)
    (last, stats, total), (loss, logits) = jax.lax.scan(
        step, (params, batch_stats, zeros), (xs, ys, keys))
    if fed.send == "model_change":
      sent = jax.tree.map(jnp.subtract, params, last)
    else:
      sent = jax.tree.map(lambda t: t / fed.local_steps, total)
    return (loss[0], logits[0], stats), sent

  return trajectory
