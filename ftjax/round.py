"""One synchronous round, written once as the algorithm's steps.

:func:`make_round` builds the pure function ``(state, data, indices) ->
(state, metrics)`` from three steps:

1. :func:`make_local_updates`: every computed worker differentiates its loss
   on its minibatch (at x_t, and at x_{t-1} for mu2sgd), clips the gradients
   and runs its estimator.
2. :func:`make_server_rows`: the Byzantine workers' rows replace theirs (the
   attack sees the honest rows), and the robust aggregator reduces the worker
   axis.
3. The server step: the server optax chain applied to the aggregate, the
   BatchNorm statistics and the logged metrics.

The device layouts (one device, workers split over devices, aggregation on
coordinate slices) are applied around steps 1 and 2 by
:func:`ftjax.sharding.lay_out_round`; neither step is written again for them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from ftjax import attacks as attacks_lib
from ftjax import estimators
from ftjax import federated
from ftjax import models as models_lib
from ftjax import sharding
from ftjax import round_data
from ftjax.build import KEY_AGGREGATOR, KEY_ATTACK, KEY_PARTICIPANTS, Setup
# The run's state, and the data the round reads, live in their own modules; their
# names are the round's too.
from ftjax.round_data import DeviceData, make_device_data, sample_chunk  # noqa: F401
from ftjax.state import (TrainState, init_state, init_states, model_key,  # noqa: F401
                         model_keys, purpose_key)

PyTree = Any


# --------------------------------------------------------------------------
# Step 1: the workers' local updates
# --------------------------------------------------------------------------


def make_loss_fn(model) -> Callable:
  """One worker's loss on its minibatch: ``(params, stats, x, y, key) -> (loss, aux)``.

  ``key`` is the key data of the model's ``"dropout"`` stream (:func:`model_keys`).
  """

  def loss_fn(params, batch_stats, x, y, key):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    logits, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.wrap_key_data(key)})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, mutated.get("batch_stats", {}))

  return loss_fn


def make_worker_gradients(setup: Setup) -> Callable:
  """``(params, batch_stats, prev_params, x, y, keys) -> (out, prev_grads, prev_stats)``.

  ``x`` [n, b, ...] and ``y`` [n, b] are n workers' minibatches and ``keys``
  [n, 2] their model keys (the same for mu2sgd's second pass, which reuses the
  sample);
  ``out = ((loss, (logits, stats)), grads)`` has a leading worker axis, and
  ``prev_grads`` and ``prev_stats`` are the same workers' gradients and updated
  running statistics at ``prev_params`` on the same minibatches (mu2sgd's
  second pass), or None when ``prev_params`` is None.

  With a chunk size k (``setup.worker_chunk``), the workers go through a
  ``lax.map`` in chunks of k, each chunk a vmap over its k workers, so that
  only k workers' activations are live at a time: the same per-worker values,
  with peak memory bounded in W.
  """
  value_and_grad = jax.value_and_grad(make_loss_fn(setup.model), has_aux=True)

  def passes(grads, params, batch_stats, prev_params, x, y, keys):
    out = grads(params, batch_stats, x, y, keys)
    if prev_params is None:
      return out, None, None
    (_, (_, prev_stats)), prev_grads = grads(prev_params, batch_stats, x, y, keys)
    return out, prev_grads, prev_stats

  def gradients(params, batch_stats, prev_params, x, y, keys):
    chunk = setup.worker_chunk
    if 0 < chunk < x.shape[0]:
      return jax.lax.map(lambda xy: passes(value_and_grad, params, batch_stats, prev_params,
                                           *xy), (x, y, keys), batch_size=chunk)
    return passes(jax.vmap(value_and_grad, in_axes=(None, None, 0, 0, 0)), params, batch_stats,
                  prev_params, x, y, keys)

  return gradients


def make_local_sgd(setup: Setup) -> Callable:
  """The workers' K local steps (:func:`ftjax.federated.local_sgd`) over the worker axis.

  ``(params, batch_stats, prev_params, x, y, keys) -> (out, None, None)`` like
  :func:`make_worker_gradients`, with ``x`` [n, K, b, ...], ``y`` [n, K, b]
  and ``keys`` [n, K, 2] (one model key per local step):
  ``out = ((loss, (logits, stats)), sent)``, the first step's loss and logits,
  the statistics after the K steps and what each worker sends (already
  clipped step by step). Chunked over the workers as the gradients are.
  """
  value_and_grad = jax.value_and_grad(make_loss_fn(setup.model), has_aux=True)
  trajectory = jax.vmap(federated.local_sgd(value_and_grad, setup.federated, setup.clip),
                        in_axes=(None, None, 0, 0, 0))

  def local(params, batch_stats, prev_params, x, y, keys):
    del prev_params  # mu2sgd is refused with local steps (federated.settings)
    chunk = setup.worker_chunk
    if 0 < chunk < x.shape[0]:
      (loss, logits, stats), sent = jax.lax.map(
          lambda xy: trajectory(params, batch_stats, *xy), (x, y, keys), batch_size=chunk)
    else:
      (loss, logits, stats), sent = trajectory(params, batch_stats, x, y, keys)
    return ((loss, (logits, stats)), sent), None, None

  return local


def make_local_updates(setup: Setup, local_steps: Optional[bool] = None) -> Callable:
  """Step 1: ``(shared, per_worker) -> (updates, gathered, worker_state)``.

  ``shared = (params, batch_stats, prev_params)`` (``prev_params`` None
  without mu2sgd); ``per_worker = (x, y, worker_state, keys)`` with a leading
  worker axis (``keys`` from :func:`model_keys`). Each worker's gradients are
  clipped to ``setup.clip`` and fed to its estimator; ``gathered = (loss,
  logits, stats, prev_stats)`` are what the server step logs and folds into
  the BatchNorm statistics. With local
  steps (``local_steps``, default ``setup.federated.local``; ``x`` [n, K, b,
  ...]) the estimator is fed what each worker sends after its K steps
  (:func:`make_local_sgd`), each step's gradient clipped.
  """
  local_steps = setup.federated.local if local_steps is None else local_steps
  if local_steps:
    gradients, clip_rows = make_local_sgd(setup), lambda tree: tree
  else:
    gradients = make_worker_gradients(setup)
    clip_rows = jax.vmap(functools.partial(estimators.clip_by_global_norm, max_norm=setup.clip))

  def worker_update(grads, worker_state, prev_grads):
    if setup.needs_prev:
      return setup.worker_tx.update(grads, worker_state, prev_grads=prev_grads)
    return setup.worker_tx.update(grads, worker_state)

  def local_updates(shared, per_worker):
    params, batch_stats, prev_params = shared
    x, y, worker_state, keys = per_worker
    if not local_steps:
      keys = keys[:, 0]  # one step: the first local step's key
    ((loss, (logits, stats)), grads), prev_grads, prev_stats = gradients(
        params, batch_stats, prev_params, x, y, keys)
    grads = clip_rows(grads)
    if setup.needs_prev:
      prev_grads = clip_rows(prev_grads)
    updates, worker_state = jax.vmap(worker_update)(grads, worker_state, prev_grads)
    return updates, (loss, logits, stats, prev_stats), worker_state

  return local_updates


# --------------------------------------------------------------------------
# Step 2: the server's rows (attack, then aggregation)
# --------------------------------------------------------------------------


def attack_draws(setup: Setup, params: PyTree, key: jax.Array) -> list:
  """The random values of every attack the round serves, as one flat list of leaves.

  Drawn for the whole rows from their shapes, so that a layout holding slices
  of the rows passes each device its slice (:meth:`ftjax.attacks.Attack.draw`).
  """
  ctx = _attack_context(setup)
  honest = jax.tree.map(lambda p: jax.ShapeDtypeStruct((setup.num_honest,) + p.shape, p.dtype),
                        params)
  return [leaf for a in round_data.attack_members(setup) for leaf in jax.tree.leaves(a.draw(honest, key, ctx))]


def _attack_context(setup: Setup) -> attacks_lib.AttackContext:
  return attacks_lib.AttackContext(num_byzantine=setup.num_byzantine,
                                   aggregator=setup.aggregator,
                                   num_classes=setup.dataset.num_classes)


def make_server_rows(setup: Setup, params_like: PyTree, attack_index: Optional[jax.Array]
                     ) -> Callable:
  """Step 2: ``(rows, extras, given, valid) -> (aggregate, (diagnostics, aggregator_state))``.

  ``rows`` are the computed workers' updates (honest first); the attack
  (``setup.attack``, or the member of ``setup.attacks`` at ``attack_index``)
  writes the Byzantine rows from the honest ones (and their own, for the
  attacks that send them), then ``setup.aggregator`` reduces the rows (with
  client sampling, the drawn workers' rows), updating its state (() for a
  stateless rule). ``extras`` are the attacks' draws (:func:`attack_draws`);
  ``given`` holds the round's ``"attack"`` and ``"aggregator"`` keys, the
  rule's ``"state"``, with client sampling the ``"drawn"`` workers and with
  ``aggregator.weights`` the per-worker ``"weights"``, for a rule that reads
  it the server's own update ``"server"`` (:func:`server_update`);
  ``valid`` is the layout's column mask (:func:`ftjax.sharding.lay_out_round`).
  """
  f, h = setup.num_byzantine, setup.num_honest
  ctx = _attack_context(setup)
  members = round_data.attack_members(setup)
  honest_shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct((h,) + p.shape, p.dtype),
                               params_like)
  # Where each member's draws sit in the flat extras list.
  layouts, start = [], 0
  for a in members:
    drawn = jax.eval_shape(lambda k, a=a: a.draw(honest_shapes, k, ctx), jax.random.key(0))
    count = len(jax.tree.leaves(drawn))
    layouts.append((jax.tree.structure(drawn), start, count))
    start += count
  sizes = [p.size for p in jax.tree.leaves(params_like)]

  def byzantine_rows(member, layout, honest, own, extras, key):
    treedef, first, count = layout
    draws = None if count == 0 else jax.tree.unflatten(treedef, extras[first:first + count])
    return member(honest, own, key, ctx, draws=draws)

  def server_rows(rows, extras, given, valid):
    attack_key, aggregator_key = given["attack"], given["aggregator"]
    honest = jax.tree.map(lambda u: u[:h], rows)
    if f:
      own = jax.tree.map(lambda u: u[h:], rows) if members[0].uses_own_updates else None
      calls = [functools.partial(byzantine_rows, m, lay) for m, lay in zip(members, layouts)]
      if len(calls) == 1:
        byzantine = calls[0](honest, own, extras, attack_key)
      else:
        byzantine = jax.lax.switch(attack_index, calls, honest, own, extras, attack_key)
      # The zero columns that pad a leaf stay zero (an inf or nan attack fills them).
      byzantine = valid(byzantine, sizes)
      rows = jax.tree.map(lambda a, z: jnp.concatenate([a, z.astype(a.dtype)]), honest,
                          byzantine)
    else:
      rows = honest
    weights = given.get("weights")
    if "drawn" in given:  # client sampling: the drawn workers' rows
      rows = jax.tree.map(lambda r: r[given["drawn"]], rows)
      weights = None if weights is None else weights[given["drawn"]]
    if weights is not None:  # stateless (build refuses weights with a stateful rule)
      aggregate, diagnostics = setup.aggregator(rows, aggregator_key, weights=weights)
      return aggregate, (diagnostics, given["state"])
    aggregate, diagnostics, state = setup.aggregator.update(rows, aggregator_key,
                                                            given["state"],
                                                            server=given.get("server"))
    return aggregate, (diagnostics, state)

  return server_rows


# --------------------------------------------------------------------------
# Step 3: the server step, and the round
# --------------------------------------------------------------------------


def summarize_diagnostics(diagnostics: dict, num_honest: int,
                          byzantine: Optional[jax.Array] = None) -> dict:
  """Turns an aggregator's diagnostics into scalars for logging.

  Scalars pass through; a per-row vector ``v`` becomes ``v_honest`` and
  ``v_byzantine``, its sums over the honest and the Byzantine rows (e.g. how
  many Byzantine rows CTMA kept): the first ``num_honest`` rows are honest,
  or, given, ``byzantine`` bool [rows] marks the Byzantine ones.
  """
  out = {}
  for name, value in diagnostics.items():
    value = jnp.asarray(value)
    if value.ndim == 0:
      out[name] = value.astype(jnp.float32)
    elif value.ndim == 1:
      value = value.astype(jnp.float32)
      if byzantine is None:
        byzantine = jnp.arange(value.shape[0]) >= num_honest
      out[f"{name}_honest"] = jnp.where(byzantine, 0.0, value).sum()
      out[f"{name}_byzantine"] = jnp.where(byzantine, value, 0.0).sum()
  return out


def update_batch_stats(mode: str, old: PyTree, stats: PyTree, prev_stats: Optional[PyTree],
                       num_honest: int) -> PyTree:
  """The running BatchNorm statistics after a round (``model.batch_stats``; docs/data.md).

  Args:
    mode: "honest_mean": the mean of the honest workers' updated statistics,
      one EMA step with their mean batch statistics; "sequential": the
      original program's, every computed worker's pass folded into the EMA one
      after another in worker order, each worker's pass at x_t followed by its
      mu2sgd pass at x_{t-1} (:func:`ftjax.models.fold_batch_stats`).
    old: the running statistics the round started from.
    stats: [n, ...] each computed worker's updated statistics after its pass at x_t.
    prev_stats: [n, ...] the same after its pass at x_{t-1}, or None.
    num_honest: h; the first h workers are honest.

  Returns:
    The new running statistics, like ``old``.
  """
  if mode == "honest_mean":
    return jax.tree.map(lambda s: s[:num_honest].mean(0), stats)
  passes = stats
  if prev_stats is not None:  # [n, 2, ...] -> [2n, ...]: worker 0 at x_t, at x_{t-1}, worker 1 ...
    passes = jax.tree.map(lambda a, b: jnp.stack([a, b], 1).reshape((-1,) + a.shape[1:]),
                          stats, prev_stats)
  return models_lib.fold_batch_stats(old, models_lib.batch_stats_of_pass(old, passes))


def worker_state_rows(setup: Setup) -> int:
  """Rows of ``TrainState.worker_state`` in the round: the computed workers, padded.

  ``setup.num_computed``; in the sharded layout rounded up to a multiple of
  the device count, so that the rows split evenly over the devices (the
  padding rows are computed and thrown away, and a checkpoint holding them is
  restored into any layout, :meth:`ftjax.checkpoint.Checkpointer.restore_latest`).
  """
  if not setup.sharded:
    return setup.num_computed
  return sharding.padded_workers(setup.num_computed, setup.num_devices)


def _pad_workers(tree: PyTree, rows: int, axis: int = 0) -> PyTree:
  """``tree``'s leaves with zero rows appended on ``axis`` up to ``rows`` rows."""
  def pad(a):
    if a.shape[axis] == rows:
      return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, rows - a.shape[axis])
    return jnp.pad(a, widths)
  return jax.tree.map(pad, tree)


def place(setup: Setup, tree: PyTree) -> PyTree:
  """Puts ``tree`` on ``setup``'s devices, replicated (unchanged with one device).

  The jitted round takes its state and data replicated over the mesh; arrays
  from elsewhere (a restored checkpoint, a notebook) go through this first.
  In the sharded layout a :class:`TrainState`'s ``worker_state`` is split
  over the workers instead, its worker axis padded with zero rows to
  :func:`worker_state_rows` (a state with a leading runs axis,
  :func:`init_states`, is split on its second axis).
  """
  if not (setup.sharded and isinstance(tree, TrainState)):
    return sharding.replicate(setup.mesh, tree)
  axis = jnp.ndim(tree.step)  # 1 with a leading runs axis
  worker_state = jax.device_put(
      _pad_workers(tree.worker_state, worker_state_rows(setup), axis),
      sharding.worker_split(setup.mesh, axis))
  return sharding.replicate(setup.mesh, tree._replace(worker_state=()))._replace(
      worker_state=worker_state)


def _constrain_layout(setup: Setup, state: TrainState) -> TrainState:
  """The layout :func:`place` gives, which a host loop's compiled round takes back."""
  if not setup.sharded:
    return state
  return sharding.constrain_replicated(setup.mesh, state._replace(worker_state=()))._replace(
      worker_state=jax.lax.with_sharding_constraint(
          state.worker_state, sharding.worker_split(setup.mesh)))


def select_rows(keep: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """Per row of the leading axis, ``new`` where ``keep`` [rows] is True, else ``old``."""
  return jax.tree.map(
      lambda a, b: jnp.where(keep.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


def _keep_undrawn(drawn: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """Per computed worker (row), ``new`` if the worker was drawn this round, else ``old``."""
  if not jax.tree.leaves(new):
    return new
  rows = jax.tree.leaves(new)[0].shape[0]
  return select_rows(jnp.zeros((rows,), bool).at[drawn].set(True, mode="drop"), new, old)


def server_update(setup: Setup, state: TrainState, data: DeviceData) -> PyTree:
  """The server's own update g0, for a rule that reads it (fltrust).

  The gradient of the mean loss over all ``setup.server_examples`` of the
  server's examples (:func:`ftjax.sampling.set_aside`) as one batch, at x_t
  (the point the workers differentiate at), not augmented, clipped to
  ``setup.clip`` as a worker's gradient is; no estimator.
  """
  x, y = round_data.server_batch(setup, state, data)
  _, grads = jax.value_and_grad(make_loss_fn(setup.model), has_aux=True)(
      state.params, state.batch_stats, x, y, model_key(state, setup.num_workers, 0))
  return estimators.clip_by_global_norm(grads, max_norm=setup.clip)


def _given(setup: Setup, state: TrainState, data: DeviceData) -> dict:
  """What the server's rows get besides the rows (:func:`make_server_rows`): the round's
  keys, the rule's state, the per-worker weights and drawn workers when configured, and
  the server's own update for a rule that reads it."""
  step = state.step
  given = {"attack": jax.random.fold_in(purpose_key(state, KEY_ATTACK), step),
           "aggregator": jax.random.fold_in(purpose_key(state, KEY_AGGREGATOR), step),
           "state": state.aggregator_state}
  weights = federated.worker_weights(setup.federated, data.sizes, setup.num_workers,
                                     setup.dtype)
  if weights is not None:
    given["weights"] = weights
  if setup.federated.participants:
    given["drawn"] = federated.draw_participants(
        jax.random.fold_in(purpose_key(state, KEY_PARTICIPANTS), step), setup.num_workers,
        setup.federated.participants)
  if setup.aggregator.needs_server:
    given["server"] = server_update(setup, state, data)
  return given


def _metrics(setup: Setup, y, gathered, aggregate, diagnostics, drawn) -> dict:
  """The round's logged scalars: the honest workers' loss and accuracy (of the first local
  step), the aggregate's norm, the rule's diagnostics and, with client sampling, the
  Byzantine workers drawn."""
  h = setup.num_honest
  loss, logits = gathered[:2]
  first = y[:h, 0] if setup.federated.local else y[:h]
  byzantine = None if drawn is None else drawn >= h
  metrics = {
      "train_loss": loss[:h].mean().astype(jnp.float32),
      "train_acc": (jnp.argmax(logits[:h], -1) == first).mean(dtype=jnp.float32),
      "aggregate_norm": optax.tree.norm(aggregate).astype(jnp.float32),
      **summarize_diagnostics(diagnostics, h, byzantine),
  }
  if drawn is not None:
    metrics["sampled_byzantine"] = byzantine.sum().astype(jnp.float32)
    metrics["sampled_over_f"] = (byzantine.sum() > setup.aggregator.f).astype(jnp.float32)
  return metrics


def make_round(setup: Setup) -> Callable:
  """The pure synchronous round ``(state, data, indices) -> (state, metrics)``.

  ``indices`` int32 [W, b] are the workers' examples of this round (one entry
  of :func:`sample_chunk`); without them the round samples its own. In the
  sharded layout the returned ``worker_state`` has :func:`worker_state_rows`
  rows, split over the workers.
  """
  local_updates = make_local_updates(setup)

  def train_step(state: TrainState, data: DeviceData, idx: Optional[jax.Array] = None):
    if idx is None:
      idx = sample_chunk(setup, state, data, 1)[0]
    x, y = round_data.minibatches(setup, state, data, idx)
    given = _given(setup, state, data)
    middle = sharding.lay_out_round(
        local_updates, make_server_rows(setup, state.params, data.attack), setup.mesh,
        setup.aggregation, num_rows=setup.num_computed)
    extras = attack_draws(setup, state.params, given["attack"]) if setup.num_byzantine else []
    worker_state = state.worker_state
    if setup.sharded:
      worker_state = _pad_workers(worker_state, worker_state_rows(setup))
    aggregate, (diagnostics, aggregator_state), gathered, new_worker_state = middle(
        (state.params, state.batch_stats, state.prev_params if setup.needs_prev else None),
        (x, y, worker_state, model_keys(setup, state)), extras, given)
    drawn = given.get("drawn")
    if drawn is not None:  # the workers not drawn keep their estimator state
      new_worker_state = _keep_undrawn(drawn, new_worker_state, worker_state)

    # Step 3: the server step.
    server_updates, server_state = setup.server_tx.update(
        aggregate, state.server_state, state.params)
    new_state = TrainState(
        step=state.step + 1, params=optax.apply_updates(state.params, server_updates),
        prev_params=state.params if setup.needs_prev else (),
        batch_stats=update_batch_stats(setup.batch_stats_mode, state.batch_stats,
                                       gathered[2], gathered[3], setup.num_honest),
        server_state=server_state, worker_state=new_worker_state, rng=state.rng,
        aggregator_state=aggregator_state)
    return _constrain_layout(setup, new_state), _metrics(setup, y, gathered, aggregate,
                                                         diagnostics, drawn)

  return train_step
