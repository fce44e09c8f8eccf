"""Backend policy: how a run is laid out on the machine, one function per choice.

Every choice that depends on the backend (CPU, GPU, TPU) and not on the maths
lives here, with its reason, so that the round and the loop never guess:

* :func:`kernel_set`: which implementation of the layers and worker-axis
  primitives (:mod:`ftjax.kernels`).
* :func:`worker_chunk`: how many workers are differentiated at once.
* :func:`loop_kind`: whether the rounds between two evaluations run inside
  one ``lax.scan`` or as a host loop over the jitted round.
* :func:`runs_layout`: how several runs (a sweep's seeds) share one program.
* :data:`MAX_ROUNDS_IN_FLIGHT`: how many multi-device rounds a host loop
  queues.

:func:`describe` writes the choices as the one line a run prints at start-up.
"""

from __future__ import annotations

from typing import Optional

import jax

from ftjax import kernels as kernels_lib
from ftjax.kernels import layers

LOOPS = ("auto", "scan", "host")
RUNS_LAYOUTS = ("vmap", "map", "unroll")

UNROLL_MAX_RUNS = 4
"""Up to this many runs of one program are unrolled on CPU (:func:`runs_layout`)."""

AUTO_CHUNK = 16
"""Workers per chunk that :func:`worker_chunk` picks on CPU above 64 workers."""

MAX_ROUNDS_IN_FLIGHT = 2
"""Rounds a host loop keeps queued when the workers are split over devices.

With dozens of multi-device calls queued, XLA:CPU's device threads deadlock in
the all-gather and XLA aborts the process after its rendezvous timeout
(``benchmarks/allgather_deadlock.py`` reproduces it with a bare ``shard_map``
all-gather on 2 CPU devices)."""


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def kernel_set(kernels: str) -> str:
  """The kernel set that runs: ``kernels`` itself, or the backend's choice for "auto".

  The CPU kernels rewrite the convolutions and worker-axis primitives into the
  forms XLA:CPU runs on its fast libraries; other backends run the plain
  JAX definitions (:func:`ftjax.kernels.resolve`).
  """
  return kernels_lib.resolve(kernels_lib.check(kernels))


def worker_chunk(kernels: str, num_workers: int, chunk: Optional[int] = None) -> int:
  """Workers differentiated at once on a device that computes ``num_workers``.

  ``chunk`` is the user's ``workers.chunk`` (0: all at once). Unset, on CPU
  with the cpu kernels above 64 workers the per-worker convolutions give way
  to one grouped convolution that XLA:CPU runs on a slow path, and every
  worker's activations are live at once: chunks of :data:`AUTO_CHUNK`
  workers keep the fast path and bound the memory
  (docs/benchmarks/scaling.md). The plain kernels are not chunked on CPU (a
  loop body holds autodiff's transposed convolutions, slow inside any loop);
  other backends vectorise the whole worker axis.

  Returns:
    The chunk size, or 0 for all workers in one vmap.
  """
  if chunk is None:
    chunk = (AUTO_CHUNK if _on_cpu() and kernel_set(kernels) == "cpu"
             and num_workers > layers.MAX_UNROLLED_WORKERS else 0)
  return chunk if 0 < chunk < num_workers else 0


def loop_kind(loop: str, kernels: str, vmapped_workers: int, builtin_model: bool) -> str:
  """The chunk loop: "scan" (rounds inside one ``lax.scan``) or "host".

  ``loop`` is the user's choice; "auto" scans, except on CPU when the round's
  convolutions would not all be plain forward convolutions
  (:func:`ftjax.kernels.layers.scan_friendly`): inside a loop body XLA:CPU
  runs the others on a slow generic path, while a host loop over the jitted,
  donated round keeps its fast convolution library. A user's own model is not
  known to be scan-friendly, so on CPU it takes the host loop.

  Args:
    loop: "auto", "scan" or "host".
    kernels: the kernel set.
    vmapped_workers: the size of the vmapped worker axis (a chunk, with chunking).
    builtin_model: whether the model is one of ftjax's.
  """
  if loop not in LOOPS:
    raise ValueError(f"Unknown loop {loop!r}; valid: {', '.join(LOOPS)}.")
  if loop != "auto":
    return loop
  if not _on_cpu():
    return "scan"
  friendly = builtin_model and layers.scan_friendly(kernels, vmapped_workers)
  return "scan" if friendly else "host"


def runs_layout(num_runs: int) -> str:
  """How ``num_runs`` runs of one program (a sweep's seeds) share it.

  "vmap" makes the runs' rounds one wider computation, "map" runs them one
  after another inside the program, "unroll" compiles one copy of the round
  per run (independent computations that XLA:CPU's thunk executor runs side
  by side). On CPU up to :data:`UNROLL_MAX_RUNS` runs are unrolled: in
  docs/benchmarks/sweep.md, part (b), the unrolled runs kept the speed of the
  seeds run one after another where the vmap lost a tenth on 28x28 inputs
  (the per-run convolutions become grouped ones). Every copy is compiled, so
  more runs, and every other backend, use the vmap.
  """
  if _on_cpu() and num_runs <= UNROLL_MAX_RUNS:
    return "unroll"
  return "vmap"


def check_runs_layout(layout: Optional[str]) -> None:
  if layout is not None and layout not in RUNS_LAYOUTS:
    raise ValueError(f"Unknown runs_layout {layout!r}; valid: {', '.join(RUNS_LAYOUTS)}.")


def describe(*, kernels: str, loop: str, chunk: int, devices: int, aggregation: str,
             runs: int = 1, layout: Optional[str] = None) -> str:
  """The start-up line naming every choice above."""
  parts = [f"{jax.default_backend()}", f"kernels={kernel_set(kernels)}", f"loop={loop}",
           f"worker chunk={chunk or 'all'}"]
  if devices > 1:
    parts.append(f"workers over {devices} devices ({aggregation} aggregation)")
  if runs > 1:
    parts.append(f"{runs} runs ({layout or runs_layout(runs)})")
  return "Backend: " + ", ".join(parts) + "."
