"""The seam between the algorithms and the backend-specific fast code.

The algorithms (aggregators, attacks, estimators, models, the round) are
written as the formulas they implement and call a small set of primitives
from the modules of this package:

* :mod:`ftjax.kernels.rows`: reductions over the leading worker axis (row
  means and weighted sums, fusion barriers), with the order statistics and
  trimmed sums of :mod:`ftjax.kernels.select` and the row distances, Gram
  matrices, pairwise distances and row mixing of
  :mod:`ftjax.kernels.distances` reachable from it;
* :mod:`ftjax.kernels.layers`: the convolution and the BatchNorm -> ReLU ->
  2x2 max pool block of the models.

Every primitive has a plain version (``jax.numpy``/``lax``, the definition)
and may have fast versions for a backend. Which one runs is a *kernel set*:

* ``"plain"``: the plain versions everywhere;
* ``"cpu"``: the XLA:CPU versions (selection networks, radix select, sliced
  distances, blocked Gram products, per-worker convolutions, a fused BatchNorm block with a
  hand-written backward pass), each of which still falls back to the plain
  version for shapes where it does not help;
* ``"auto"``: ``"cpu"`` on the CPU backend, ``"plain"`` on GPU and TPU.

The choice is a field of :class:`ftjax.aggregators.Aggregator` and of the
Flax layers of :mod:`ftjax.models`, so it is part of their identity and of
jit's cache key. An aggregator makes its kernel set visible to the primitives
while its call is traced, through :func:`use` and :func:`current`, so a
user-written rule that calls these primitives runs with the kernels of the
aggregator that wraps it. The model layers resolve their own field and pass
the result to the primitives of :mod:`ftjax.kernels.layers` explicitly, because
the backward pass of a layer is traced after its call has returned. Every fast primitive is tested equal to its plain
version (``tests/test_kernels_rows.py``, ``tests/test_kernels_layers.py``).

A second setting, :func:`shard_coordinates`, says that the rows seen by the
primitives are one device's slice of the coordinates, the others living on
the other devices of a mesh axis (``ftjax.sharding.shard_aggregator`` and
``ftjax.sharding.shard_round``). The primitives that reduce over coordinates
(:func:`ftjax.kernels.rows.sqdist`, :func:`ftjax.kernels.rows.gram`,
:func:`ftjax.kernels.rows.coordinate_sum`) then add the devices' partial
results with one ``psum`` over that axis, and the fusion barrier
:func:`ftjax.kernels.rows.isolate` makes its predicate common with one scalar
``psum``, so the same aggregator and attack code runs on one device or on
coordinate slices.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import jax

KERNEL_SETS = ("auto", "plain", "cpu")
"""Names a user can type (``config.kernels``)."""

_AUTO = {"cpu": "cpu"}  # backend -> kernel set; any other backend: "plain"

_current: contextvars.ContextVar[str] = contextvars.ContextVar("ftjax_kernels", default="auto")
_coordinate_axis: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "ftjax_coordinate_axis", default=None)


def check(name: str) -> str:
  """Validates a kernel-set name and returns it.

  Raises:
    ValueError: for a name outside :data:`KERNEL_SETS`.
  """
  if not isinstance(name, str) or name not in KERNEL_SETS:
    raise ValueError(f"Unknown kernel set {name!r}; choose one of: {', '.join(KERNEL_SETS)}.")
  return name


def resolve(name: str = "auto") -> str:
  """``"plain"`` or ``"cpu"``: the kernel set ``name`` stands for on this backend."""
  check(name)
  if name == "auto":
    return _AUTO.get(jax.default_backend(), "plain")
  return name


@contextlib.contextmanager
def use(name: str) -> Iterator[str]:
  """Makes ``name`` the kernel set of the primitives traced inside the block.

  Nested blocks override outer ones; ``"auto"`` inside a block keeps the outer
  choice.

  Yields:
    The resolved kernel set, ``"plain"`` or ``"cpu"``.
  """
  check(name)
  if name == "auto":
    name = _current.get()
  token = _current.set(name)
  try:
    yield resolve(name)
  finally:
    _current.reset(token)


def current() -> str:
  """The resolved kernel set (``"plain"`` or ``"cpu"``) at this point of tracing.

  Primitives read it when they are called. Functions traced later (the
  backward pass of a ``custom_vjp``, a ``custom_vmap`` rule) must not: the
  primitive picks its implementation when it is called and closes over it.
  """
  return resolve(_current.get())


@contextlib.contextmanager
def shard_coordinates(axis: Optional[str]) -> Iterator[Optional[str]]:
  """Inside the block, rows hold one slice of the coordinates per device of ``axis``.

  For code traced inside ``shard_map`` over a mesh whose axis ``axis`` splits
  the coordinates (the trailing axes) of the rows: the rows primitives that
  reduce over coordinates complete their reduction with a ``psum`` over
  ``axis``. ``None`` turns the setting off inside the block.

  Yields:
    ``axis``.
  """
  token = _coordinate_axis.set(axis)
  try:
    yield axis
  finally:
    _coordinate_axis.reset(token)


def coordinate_axis() -> Optional[str]:
  """The mesh axis the coordinates are split over at this point of tracing, or None."""
  return _coordinate_axis.get()
