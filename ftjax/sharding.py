"""Device meshes: the workers' gradients split over local devices.

With one device (the default) nothing here is used. With several, the round's
per-worker gradients run under ``shard_map`` over a one-axis mesh named
``"workers"``: each device differentiates its own workers' losses, and one
all-gather of one flat row per worker brings the results back for the rest of
the round (estimator, attack, aggregator, server step), which is replicated.

On CPU, XLA exposes one device unless asked for more before JAX starts:
:func:`expose_cpu_devices` is the explicit way to ask (``main.py
--cpu_devices=N`` calls it). Library code never changes ``XLA_FLAGS`` on its
own.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

WORKER_AXIS = "workers"
"""The mesh axis the worker axis is split over."""


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


def worker_mesh(devices: int = 0) -> Optional[Mesh]:
  """The one-axis mesh of the first ``devices`` local devices (0 = all).

  Returns:
    The mesh, or None when that is a single device (no split).

  Raises:
    ValueError: a negative or non-integer count, or more devices than exist.
  """
  if not isinstance(devices, int) or isinstance(devices, bool) or devices < 0:
    raise ValueError(f"devices must be a non-negative integer (0 = all local devices), "
                     f"got {devices!r}.")
  available = jax.local_devices()
  if devices > len(available):
    raise ValueError(
        f"devices={devices} but only {len(available)} local "
        f"{jax.default_backend().upper()} device(s) exist; lower devices (0 = all). On CPU, "
        f"start the process with XLA_FLAGS=--xla_force_host_platform_device_count=N "
        f"(main.py --cpu_devices=N does that).")
  chosen = available[:devices or len(available)]
  if len(chosen) == 1:
    return None
  return Mesh(np.array(chosen), (WORKER_AXIS,))


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
    padded = -(-n // devices) * devices
    if padded != n:
      rows = np.arange(padded) % n
      per_worker = jax.tree.map(lambda a: a[rows], per_worker)
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


# With the workers split over CPU devices, a host loop keeps at most this many
# rounds in flight: with dozens of multi-device calls queued, XLA:CPU's device
# threads deadlock in the all-gather and XLA aborts the process after its
# rendezvous timeout (a bare shard_map all-gather on 2 CPU devices reproduces
# it with 64 calls queued and runs 20,000 calls with up to 16 queued).
MAX_ROUNDS_IN_FLIGHT = 2
