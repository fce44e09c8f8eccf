"""Device meshes: the workers' gradients and the aggregation split over devices.

With one device (the default) nothing here is used. With several, the round's
per-worker gradients run under ``shard_map`` over a one-axis mesh named
``"workers"``: each device differentiates its own workers' losses, and one
all-gather of one flat row per worker brings the results back for the rest of
the round (estimator, attack, aggregator, server step), which is replicated
(``config.mesh.aggregation = "replicated"``, :func:`split_over_workers`).

The parameter-sharded layout: each device holds every worker's values for its
slice of the coordinates, the coordinate-wise work runs locally, and each
reduction over coordinates (a squared distance, a Gram matrix, a norm) is one
``psum`` of the devices' partial results
(:func:`ftjax.kernels.shard_coordinates`). :func:`shard_aggregator` runs an
aggregator that way; :func:`shard_round` runs the round's middle that way
(``config.mesh.aggregation = "sharded"``): the per-worker work and state stay
on the workers' devices, one all-to-all takes their rows to coordinate
slices, and the attack and the aggregator run there. No device holds W x d
values (docs/scaling.md).

On CPU, XLA exposes one device unless asked for more before JAX starts:
:func:`expose_cpu_devices` is the explicit way to ask (``main.py
--cpu_devices=N`` calls it). Library code never changes ``XLA_FLAGS`` on its
own.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ftjax import kernels as kernels_lib

PyTree = Any

WORKER_AXIS = "workers"
"""The mesh axis the worker axis is split over."""

COORDINATE_AXIS = "model"
"""The default name of a mesh axis that splits the coordinates (parameters)."""

AGGREGATION_LAYOUTS = ("replicated", "sharded")
"""Values of ``config.mesh.aggregation``."""


def expose_cpu_devices(count: int = 0) -> None:
  """Asks XLA for ``count`` CPU devices (0 = one per core).

  Sets ``XLA_FLAGS=--xla_force_host_platform_device_count``, so it only takes
  effect if called before JAX first creates its CPU client; a count already in
  ``XLA_FLAGS`` is left alone. Call it at the top of a script or notebook, or
  use ``main.py --cpu_devices=N``. XLA:CPU runs each convolution on one core,
  so splitting the workers over one device per core can help; which count is
  fastest depends on the step (docs/performance.md).

  Args:
    count: the number of CPU devices; 0 for one per core.
  """
  if not isinstance(count, int) or isinstance(count, bool) or count < 0:
    raise ValueError(f"count must be an integer >= 0 (0 = one per core), got {count!r}.")
  current = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in current:
    return
  count = count or os.cpu_count() or 1
  os.environ["XLA_FLAGS"] = f"{current} --xla_force_host_platform_device_count={count}".strip()


def device_mesh(devices: int = 0, axis: str = WORKER_AXIS) -> Optional[Mesh]:
  """The one-axis mesh named ``axis`` of the first ``devices`` devices (0 = all).

  The local devices; after :func:`initialize_distributed` with several
  processes, the devices of every process (``jax.devices()``).

  Returns:
    The mesh, or None when that is a single device (no split).

  Raises:
    ValueError: a negative or non-integer count, or more devices than exist.
  """
  if not isinstance(devices, int) or isinstance(devices, bool) or devices < 0:
    raise ValueError(f"devices must be a non-negative integer (0 = all local devices), "
                     f"got {devices!r}.")
  # Several processes (jax.distributed): the mesh spans every process's devices.
  available = jax.devices() if jax.process_count() > 1 else jax.local_devices()
  if devices > len(available):
    raise ValueError(
        f"devices={devices} but only {len(available)} local "
        f"{jax.default_backend().upper()} device(s) exist; lower devices (0 = all). On CPU, "
        f"start the process with XLA_FLAGS=--xla_force_host_platform_device_count=N "
        f"(main.py --cpu_devices=N does that).")
  chosen = available[:devices or len(available)]
  if len(chosen) == 1:
    return None
  return Mesh(np.array(chosen), (axis,))


def worker_mesh(devices: int = 0) -> Optional[Mesh]:
  """The workers' mesh (axis :data:`WORKER_AXIS`): :func:`device_mesh`."""
  return device_mesh(devices, WORKER_AXIS)


def runs_placement(mesh: Optional[Mesh], axis: str, place: Callable) -> Callable:
  """Puts stacked runs' states (and their data) where the runs live.

  No runs mesh: ``place`` (the round's own placement). A runs mesh: the runs
  axis (the leading axis of the states, and of a per-run partition table) is
  split over the devices and the rest of the data replicated; XLA partitions
  the vmapped round along it, every device training its own runs.
  """
  if mesh is None:
    return lambda tree, data=False: place(tree)
  split = NamedSharding(mesh, PartitionSpec(axis))

  def spread(tree, data=False):
    if not data:
      return jax.device_put(tree, split)
    tree = replicate(mesh, tree)
    if tree.table is None:
      return tree
    return tree._replace(table=jax.device_put(tree.table, split),
                         sizes=jax.device_put(tree.sizes, split))

  return spread


def replicate(mesh: Optional[Mesh], tree: PyTree) -> PyTree:
  """Puts ``tree`` on every device of ``mesh`` (unchanged without a mesh)."""
  if mesh is None:
    return tree
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def replicated_struct(mesh: Optional[Mesh], struct: jax.ShapeDtypeStruct
                      ) -> jax.ShapeDtypeStruct:
  """``struct`` with a replicated sharding on ``mesh`` (unchanged without a mesh)."""
  if mesh is None:
    return struct
  return jax.ShapeDtypeStruct(struct.shape, struct.dtype,
                              sharding=NamedSharding(mesh, PartitionSpec()))


def constrain_replicated(mesh: Mesh, tree: PyTree) -> PyTree:
  """``tree`` constrained to be replicated on ``mesh`` (inside jit)."""
  return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec()))


def split_over_workers(fn: Callable, mesh: Mesh, num_shared: int) -> Callable:
  """Runs a per-worker function with its worker axis split over ``mesh``.

  Args:
    fn: ``fn(*shared, *per_worker) -> outputs`` where the ``per_worker``
      arguments have a leading worker axis n, as do all outputs (a pytree).
    mesh: a mesh with the axis :data:`WORKER_AXIS`.
    num_shared: how many leading arguments are the same for every worker
      (replicated); the others are split.

  Returns:
    A function with ``fn``'s signature and results. A worker count that the
    device count does not divide is padded with repeated workers whose
    results are dropped.
  """
  devices = mesh.devices.size
  split = PartitionSpec(WORKER_AXIS)
  replicated = PartitionSpec()

  def wrapped(*args):
    shared, per_worker = args[:num_shared], args[num_shared:]
    n = jax.tree.leaves(per_worker)[0].shape[0]
    per_worker = repeat_workers(per_worker, padded_workers(n, devices))
    one = jax.eval_shape(fn, *shared, *jax.tree.map(lambda a: a[:1], per_worker))
    unravel = jax.flatten_util.ravel_pytree(
        jax.tree.map(lambda s: jnp.zeros(s.shape[1:], s.dtype), one))[1]

    def local(*local_args):
      out = fn(*local_args)
      return jax.vmap(lambda o: jax.flatten_util.ravel_pytree(o)[0])(out)

    in_specs = (replicated,) * num_shared + jax.tree.map(lambda _: split, per_worker)
    flat = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=split,
                         check_vma=False)(*shared, *per_worker)
    # Gathered and replicated here: left to sharding propagation, the worker
    # axis would stay split into the aggregator, which would then exchange
    # data at every step of its selection network.
    flat = jax.lax.with_sharding_constraint(flat, NamedSharding(mesh, replicated))[:n]
    return jax.vmap(unravel)(flat)

  return wrapped


def padded_workers(num_workers: int, num_devices: int) -> int:
  """The worker count rounded up to a multiple of ``num_devices``: rows of a split worker axis."""
  return -(-num_workers // num_devices) * num_devices


def repeat_workers(tree: PyTree, padded: int) -> PyTree:
  """``tree``'s leaves [n, ...] extended to ``padded`` rows by repeating workers from the first.

  Leaves that already have ``padded`` rows (a state padded with rows of its
  own) are kept.

  The extra workers' results are dropped; repeating real ones keeps their
  computations finite.
  """
  n = jax.tree.leaves(tree)[0].shape[0]
  if padded == n:
    return tree
  rows = np.arange(padded) % n
  return jax.tree.map(lambda a: a if a.shape[0] == padded else a[rows], tree)


def worker_split(mesh: Mesh, leading: int = 0) -> NamedSharding:
  """The sharding that splits axis ``leading`` of an array over :data:`WORKER_AXIS`."""
  return NamedSharding(mesh, PartitionSpec(*(None,) * leading, WORKER_AXIS))




# --------------------------------------------------------------------------
# The parameter-sharded layout
# --------------------------------------------------------------------------


def coordinate_mesh(devices: int = 0, axis: str = COORDINATE_AXIS) -> Optional[Mesh]:
  """The coordinate-sharded aggregation's mesh: :func:`device_mesh` named ``axis``."""
  return device_mesh(devices, axis)


def _padded_columns(n: int, num_devices: int) -> int:
  return -(-n // num_devices) * num_devices


def shard_rows(updates: PyTree, mesh: Mesh, axis: str = COORDINATE_AXIS) -> list[jax.Array]:
  """The leaves of ``updates`` in the coordinate-sharded layout (inside jit).

  Each leaf [W, ...] is flattened to [W, n] and padded with zero columns to a
  multiple of the device count of ``axis``, and constrained to be split over
  ``axis`` along its columns: from replicated rows XLA takes each device's
  slice; from rows split over the workers on the same axis it is one
  all-to-all.

  Returns:
    The list of [W, n_padded] leaves, in ``jax.tree.leaves`` order.
  """
  num = mesh.shape[axis]
  out = []
  for leaf in jax.tree.leaves(updates):
    flat = leaf.reshape(leaf.shape[0], -1)
    n = flat.shape[1]
    if _padded_columns(n, num) != n:
      flat = jnp.pad(flat, ((0, 0), (0, _padded_columns(n, num) - n)))
    out.append(jax.lax.with_sharding_constraint(
        flat, NamedSharding(mesh, PartitionSpec(None, axis))))
  return out


def _by_dtype(arrays: list) -> dict:
  """Indices of ``arrays`` grouped by dtype (a packed buffer holds one dtype)."""
  groups = {}
  for i, a in enumerate(arrays):
    groups.setdefault(jnp.dtype(a.dtype), []).append(i)
  return groups


def workers_to_coordinates(leaves: list[jax.Array], axis: str) -> list[jax.Array]:
  """This device's workers' rows -> every worker's values for this device's columns.

  For code inside ``shard_map`` over a mesh axis ``axis`` of D devices that
  splits the workers: each leaf [k, ...] holds this device's k workers (device
  j holds workers j k to j k + k - 1). Each leaf is flattened to [k, n],
  padded with zero columns to D c columns (c = ceil(n / D), the layout of
  :func:`shard_rows`), and all leaves of one dtype travel in one
  ``all_to_all``.

  Returns:
    One [D k, c] array per leaf: every worker's values (in worker order) for
    this device's columns ``[j c, j c + c)`` of the flattened leaf.
  """
  num = jax.lax.axis_size(axis)
  out = [None] * len(leaves)
  for idx in _by_dtype(leaves).values():
    k = leaves[idx[0]].shape[0]
    parts, widths = [], []
    for i in idx:
      flat = leaves[i].reshape(k, -1)
      c = -(-flat.shape[1] // num)
      flat = jnp.pad(flat, ((0, 0), (0, num * c - flat.shape[1])))
      parts.append(flat.reshape(k, num, c))
      widths.append(c)
    packed = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2)
    # [k, D, C] -> [D, k, C]: block j comes from device j, i.e. workers j k to j k + k - 1.
    got = jax.lax.all_to_all(packed, axis, split_axis=1, concat_axis=0)
    got = got.reshape(num * k, -1)
    start = 0
    for i, c in zip(idx, widths):
      out[i] = got[:, start:start + c]
      start += c
  return out


def gather_coordinates(leaves: list[jax.Array], axis: str,
                       shapes: list[tuple[int, ...]]) -> list[jax.Array]:
  """This device's columns of some vectors -> the whole vectors, on every device.

  For code inside ``shard_map``: leaf i [c_i] holds columns ``[j c_i, j c_i +
  c_i)`` of a flattened vector of ``prod(shapes[i])`` values padded to D c_i
  (the layout of :func:`shard_rows`). All leaves of one dtype travel in one
  ``all_gather``; the padding is cut off.

  Returns:
    The vectors, shaped ``shapes``.
  """
  out = [None] * len(leaves)
  for idx in _by_dtype(leaves).values():
    packed = leaves[idx[0]] if len(idx) == 1 else jnp.concatenate([leaves[i] for i in idx])
    got = jax.lax.all_gather(packed, axis)  # [D, C]
    start = 0
    for i in idx:
      c = leaves[i].shape[0]
      out[i] = got[:, start:start + c].reshape(-1)[:math.prod(shapes[i])].reshape(shapes[i])
      start += c
  return out


def column_mask(columns: int, size: int, axis: str) -> jax.Array:
  """bool [columns]: which of this device's columns lie inside a leaf of ``size`` values.

  For code inside ``shard_map`` in the layout of :func:`shard_rows`; False on
  the zero columns that pad the leaf to a multiple of the device count.
  """
  start = jax.lax.axis_index(axis) * columns
  return start + jnp.arange(columns) < size


def shard_aggregator(aggregator: Callable, mesh: Mesh, axis: str = COORDINATE_AXIS,
                     gather: bool = True) -> Callable:
  """Runs ``aggregator`` on coordinate slices of the rows, one slice per device of ``axis``.

  The rows are laid out so that each device holds every worker's values for
  its slice of the coordinates (:func:`shard_rows`; zero columns pad each
  leaf to a multiple of the device count). The aggregator then runs under
  ``shard_map`` with :func:`ftjax.kernels.shard_coordinates` set: its
  coordinate-wise steps (medians, trimmed means, weighted sums of rows) are
  local, and its reductions over coordinates (``rows.sqdist``, ``rows.gram``,
  ``rows.coordinate_sum``) are completed by one ``psum`` each, so every device
  takes the same decisions (kept rows, Krum's choice, Weiszfeld weights) as
  one device holding all the rows would. Zero columns add nothing to a norm, a
  distance or a Gram entry, and every rule maps them to zero; they are cut off
  the aggregate.

  Every rule of :mod:`ftjax.aggregators` qualifies. A user-written rule
  (``aggregators.rule``) qualifies when its sums over coordinates go through
  those three primitives; a plain ``jnp.sum`` over coordinates would only see
  the device's slice.

  Args:
    aggregator: ``aggregator(rows, key) -> (aggregate, diagnostics)``, e.g. an
      :class:`ftjax.aggregators.Aggregator`.
    mesh: the device mesh; its axis ``axis`` splits the coordinates (other
      axes, if any, hold copies).
    axis: the name of that axis.
    gather: whether the aggregate comes back replicated (one all-gather of d
      values); with False it stays split over ``axis`` (each leaf's flat
      padded vector, sharded) for a caller that continues in that layout.

  Returns:
    ``fn(rows, key=None) -> (aggregate, diagnostics)`` with ``aggregator``'s
    results; call it under ``jax.jit``. The diagnostics are replicated.
  """
  if axis not in mesh.axis_names:
    raise ValueError(f"The mesh has axes {mesh.axis_names}, not {axis!r}; pass axis= one of "
                     f"them.")
  split, replicated = PartitionSpec(None, axis), PartitionSpec()

  def fn(updates: PyTree, key: Optional[jax.Array] = None):
    leaves, treedef = jax.tree.flatten(updates)
    if not leaves or any(jnp.ndim(l) < 1 for l in leaves):
      raise ValueError("updates must be a non-empty pytree of arrays stacked on a leading "
                       "worker axis.")
    flat = shard_rows(updates, mesh, axis)

    shapes = [tuple(l.shape[1:]) for l in leaves]

    def local(flat, *key):
      with kernels_lib.shard_coordinates(axis):
        aggregate, diagnostics = aggregator(jax.tree.unflatten(treedef, flat), *key)
      out = jax.tree.leaves(aggregate)
      return (gather_coordinates(out, axis, shapes) if gather else out), diagnostics

    keys = () if key is None else (key,)
    # check_vma=False: the psums make the diagnostics (and the all-gather the
    # aggregate) equal on every device, which the replicated out_spec then
    # takes as they are.
    out, diagnostics = jax.shard_map(
        local, mesh=mesh, in_specs=([split] * len(flat),) + (replicated,) * len(keys),
        out_specs=(replicated if gather else [PartitionSpec(axis)] * len(flat), replicated),
        check_vma=False)(flat, *keys)
    if not gather:
      return out, diagnostics
    return jax.tree.unflatten(treedef, out), diagnostics

  return fn


def shard_round(worker_fn: Callable, coordinate_fn: Callable, mesh: Mesh, num_rows: int,
                axis: str = WORKER_AXIS) -> Callable:
  """A round whose per-worker work is split over the workers and the rest over coordinates.

  One ``shard_map`` over ``axis`` (D devices): each device runs ``worker_fn``
  on its own workers; their rows reach the coordinate layout (every worker's
  values for the device's slice of the coordinates, :func:`shard_rows`'
  layout) in one ``all_to_all`` (:func:`workers_to_coordinates`);
  ``coordinate_fn`` runs on those slices under
  :func:`ftjax.kernels.shard_coordinates`, and its d-value result is gathered
  back (:func:`gather_coordinates`). No device holds every worker's row.

  Args:
    worker_fn: ``worker_fn(shared, per_worker) -> (rows, gathered, kept)`` on
      this device's k workers (leading axis k of every ``per_worker`` leaf):
      ``rows``, a pytree of the workers' rows [k, ...]; ``gathered``, small
      per-worker outputs [k, ...] wanted whole on every device (losses);
      ``kept``, per-worker outputs [k, ...] that stay split (estimator states).
    coordinate_fn: ``coordinate_fn(rows, extras, replicated) -> (out, aux)``:
      ``rows`` has the structure of ``worker_fn``'s, each leaf [num_rows, c]
      (the first ``num_rows`` workers, this device's c columns of the
      flattened leaf); ``extras`` is the list given to the returned function,
      each leaf [L, c] likewise; ``out`` is like one row, each leaf [c]; ``aux``
      must be equal on every device (e.g. computed from ``psum`` results).
    mesh: the mesh; its axis ``axis`` splits both the workers and the
      coordinates.
    num_rows: how many workers (from the first) ``coordinate_fn`` sees; the
      rest pad the worker axis to a multiple of D.
    axis: the mesh axis.

  Returns:
    ``fn(shared, per_worker, extras, replicated) -> (out, aux, gathered,
    kept)`` (call it under ``jax.jit``): ``shared`` and ``replicated`` are
    replicated pytrees; ``per_worker`` a pytree of [D k, ...] leaves, split
    over ``axis``; ``extras`` a list of [L, D c] arrays in :func:`shard_rows`'
    layout. ``out`` (leaves shaped like one row) and ``aux`` come back
    replicated, ``gathered`` replicated with D k rows, ``kept`` split over
    ``axis`` with D k rows.
  """
  split, replicated = PartitionSpec(axis), PartitionSpec()

  def body(shared, per_worker, extras, rest):
    rows, gathered, kept = worker_fn(shared, per_worker)
    leaves, treedef = jax.tree.flatten(rows)
    coords = [c[:num_rows] for c in workers_to_coordinates(leaves, axis)]
    with kernels_lib.shard_coordinates(axis):
      out, aux = coordinate_fn(jax.tree.unflatten(treedef, coords), extras, rest)
    out_leaves, out_def = jax.tree.flatten(out)
    out = jax.tree.unflatten(out_def, gather_coordinates(
        out_leaves, axis, [tuple(l.shape[1:]) for l in leaves]))
    gathered = jax.tree.map(lambda g: jax.lax.all_gather(g, axis, tiled=True), gathered)
    return out, aux, gathered, kept

  def fn(shared, per_worker, extras, rest):
    # check_vma=False: out and aux are equal on every device (all-gather, psums).
    return jax.shard_map(
        body, mesh=mesh, in_specs=(replicated, split, PartitionSpec(None, axis), replicated),
        out_specs=(replicated, replicated, replicated, split),
        check_vma=False)(shared, per_worker, list(extras), rest)

  return fn


# --------------------------------------------------------------------------
# Several processes
# --------------------------------------------------------------------------


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Connects this process to the others of a multi-process run (``jax.distributed``).

  Must run before anything touches a device. Arguments left as None come from
  ``jax.distributed.initialize``'s own detection: ``JAX_COORDINATOR_ADDRESS``
  (with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` read by ftjax), SLURM,
  Open MPI, Kubernetes or a Cloud TPU pod slice (docs/scaling.md). On CPU the
  processes exchange data through gloo, JAX's default CPU collectives.

  Raises:
    ValueError: a bad count or id, or a cluster that JAX cannot detect.
  """
  env = os.environ
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  if num_processes is not None and (not isinstance(num_processes, int) or num_processes < 1):
    raise ValueError(f"num_processes must be an integer >= 1, got {num_processes!r}.")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, num_processes={num_processes}), got "
                     f"{process_id!r}.")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except (ValueError, TypeError) as e:
    raise ValueError(f"Cannot start the multi-process run ({e}); pass --coordinator_address, "
                     f"--num_processes and --process_id, or launch under SLURM, Open MPI or "
                     f"on a TPU pod slice (docs/scaling.md).") from None


# --------------------------------------------------------------------------
# The round's layouts
# --------------------------------------------------------------------------


def lay_out_round(local_fn: Callable, rows_fn: Callable, mesh: Optional[Mesh],
                  aggregation: str, num_rows: int) -> Callable:
  """Places the round's two halves on the devices, without rewriting either.

  The round is ``local_fn`` (every worker's local update) followed by
  ``rows_fn`` (the server's view of the rows: the attack, then the
  aggregator). This applies one of three layouts around them:

  * one device (``mesh`` None): one call after the other;
  * ``"replicated"``: ``local_fn``'s worker axis split over the devices
    (:func:`split_over_workers`), the rows gathered and ``rows_fn`` run on
    every device;
  * ``"sharded"``: :func:`shard_round`, ``rows_fn`` on each device's slice of
    the coordinates; the worker axis is padded to a multiple of the devices
    by repeating workers, and ``kept`` comes back with the padded rows.

  Args:
    local_fn: ``(shared, per_worker) -> (rows, gathered, kept)``, every output
      with a leading worker axis.
    rows_fn: ``(rows, extras, replicated, valid) -> (out, aux)``; ``extras`` a
      list of arrays laid out like rows (whole, or this device's slice in
      :func:`shard_rows`' layout), ``valid(tree, sizes)`` zeroes the columns
      that pad a leaf of ``sizes`` values (the identity outside the sharded
      layout).
    mesh: the workers' mesh, or None.
    aggregation: ``"replicated"`` or ``"sharded"``.
    num_rows: the workers ``rows_fn`` sees (the first ones).

  Returns:
    ``fn(shared, per_worker, extras, replicated) -> (out, aux, gathered, kept)``;
    ``extras`` given whole (a list of [L, ...] arrays).
  """
  def whole(tree, sizes):
    del sizes
    return tree

  if mesh is None or aggregation == "replicated":
    local = local_fn if mesh is None else split_over_workers(
        lambda shared, per_worker: local_fn(shared, per_worker), mesh, num_shared=1)

    def direct(shared, per_worker, extras, replicated):
      rows, gathered, kept = local(shared, per_worker)
      out, aux = rows_fn(rows, list(extras), replicated, whole)
      return out, aux, gathered, kept

    return direct

  devices = mesh.devices.size

  def valid(tree, sizes):
    return jax.tree.map(
        lambda z, size: z if size % devices == 0 else jnp.where(
            column_mask(z.shape[1], size, WORKER_AXIS), z, jnp.zeros((), z.dtype)),
        tree, jax.tree.unflatten(jax.tree.structure(tree), sizes))

  round_fn = shard_round(local_fn, lambda rows, extras, rest: rows_fn(rows, extras, rest, valid),
                         mesh, num_rows=num_rows)

  def sharded(shared, per_worker, extras, replicated):
    n = jax.tree.leaves(per_worker)[0].shape[0]
    per_worker = repeat_workers(per_worker, padded_workers(n, devices))
    extras = [piece for e in extras for piece in shard_rows(e, mesh, WORKER_AXIS)]
    out, aux, gathered, kept = round_fn(shared, per_worker, extras, replicated)
    return out, aux, jax.tree.map(lambda g: g[:n], gathered), kept

  return sharded
