"""The cpu convolution: its gradients written as plain forward convolutions.

Part of the cpu kernel set of :mod:`ftjax.kernels.layers` (whose docstring
says why): a ``jax.custom_vjp`` convolution whose ``custom_vmap`` rules run the
weight gradient, the forward convolution and the stride-1 input gradient once
per worker, each written as a plain NHWC x HWIO forward convolution (strided
ones as one stride-1 convolution per phase of the stride). Equal to
``lax.conv_general_dilated`` and its autodiff gradients (tests/test_kernels_layers.py).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
_DIMS = ("NHWC", "HWIO", "NHWC")

# Above this many workers the per-worker convolutions are not unrolled.
MAX_UNROLLED_WORKERS = 64

# Up to this many input channels the cpu forward convolution is written as a sum
# of shifted inputs times kernel rows: XLA:CPU's convolution runs several times
# below its matmul rate when the contraction is this short.
_SHIFTED_MAX_CHANNELS = 4


def plain_conv(x: Array, kernel: Array, stride: int, padding: int) -> Array:
  """The definition: ``lax.conv_general_dilated`` with symmetric padding, NHWC x HWIO."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)), dimension_numbers=_DIMS)


def _canonical_input_grad(dy: Array, kernel: Array, padding: int) -> Array:
  """dL/dx of a stride-1 convolution as a plain convolution of ``dy``.

  ``dy`` convolved with the flipped kernel with its channel axes swapped, so XLA
  sees a forward convolution in the layout its fast library path takes.
  Autodiff's transposed convolution gives the same sums, but inside a
  ``lax.scan``/``while`` body XLA:CPU leaves it in a layout that falls back to a
  generic convolution. Needs ``padding < kernel size``.
  """
  kh, kw = kernel.shape[:2]
  k = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
  return lax.conv_general_dilated(
      dy, k, window_strides=(1, 1),
      padding=((kh - 1 - padding, kh - 1 - padding), (kw - 1 - padding, kw - 1 - padding)),
      dimension_numbers=_DIMS)


def _canonical_weight_grad(x: Array, dy: Array, padding: int) -> Array:
  """dL/dkernel of a stride-1 convolution as one plain convolution.

  The examples become the contracted feature axis and the input channels the
  batch: x [N,H,W,C] -> [C,H,W,N] convolved with dy [N,Ho,Wo,O] -> [Ho,Wo,N,O]
  as the kernel gives [C,kh,kw,O]. It is the form XLA rewrites the weight
  gradient into on its own outside loops; written out, it keeps XLA:CPU's fast
  convolution inside ``lax.scan`` bodies too. Strided convolutions take
  ``_strided_weight_grad``.
  """
  out = lax.conv_general_dilated(
      x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), window_strides=(1, 1),
      padding=((padding, padding), (padding, padding)), dimension_numbers=_DIMS)
  return out.transpose(1, 2, 0, 3)


def _interleave(phases: list[list[Array]], axis: int, stride: int, size: tuple[int, int]) -> Array:
  """Puts phases[u][v] at rows u::stride and columns v::stride of the two axes from ``axis``.

  Each phase is zero-padded to the largest phase's size; the result is cropped to ``size``.
  """
  big = tuple(max(p.shape[axis + d] for row in phases for p in row) for d in (0, 1))

  def pad(p):
    cfg = [(0, 0)] * p.ndim
    cfg[axis], cfg[axis + 1] = (0, big[0] - p.shape[axis]), (0, big[1] - p.shape[axis + 1])
    return jnp.pad(p, cfg)

  rows = [jnp.stack([pad(p) for p in row], axis=axis + 2) for row in phases]
  out = jnp.stack(rows, axis=axis + 1)  # [..., big0, stride, big1, stride, ...]
  shape = out.shape[:axis] + (big[0] * stride, big[1] * stride) + out.shape[axis + 4:]
  out = out.reshape(shape)
  return lax.slice_in_dim(lax.slice_in_dim(out, 0, size[0], axis=axis), 0, size[1], axis=axis + 1)


def _strided_input_grad(dy: Array, kernel: Array, stride: int, padding: int,
                        in_hw: tuple[int, int]) -> Array:
  """dL/dx of a strided convolution as one plain stride-1 convolution per phase.

  Input row s*q+u of the padded input only meets kernel rows u, u+s, ...: its
  gradient is a full stride-1 correlation of ``dy`` with that sub-kernel. No
  multiplication by inserted zeros, unlike spreading ``dy`` out by the stride.
  """
  hp, wp = in_hw[0] + 2 * padding, in_hw[1] + 2 * padding
  n, ho, wo, _ = dy.shape
  c = kernel.shape[2]
  phases = []
  for u in range(stride):
    row = []
    for v in range(stride):
      sub = kernel[u::stride, v::stride]
      qh, qw = -(-(hp - u) // stride), -(-(wp - v) // stride)
      if sub.shape[0] == 0 or sub.shape[1] == 0:
        row.append(jnp.zeros((n, qh, qw, c), dy.dtype))
        continue
      mh, mw = sub.shape[:2]
      out = lax.conv_general_dilated(
          dy, jnp.flip(sub, (0, 1)).swapaxes(2, 3), window_strides=(1, 1),
          padding=((mh - 1, max(qh - ho, 0)), (mw - 1, max(qw - wo, 0))),
          dimension_numbers=_DIMS)
      row.append(out[:, :qh, :qw])
    phases.append(row)
  dxpad = _interleave(phases, 1, stride, (hp, wp))
  return dxpad[:, padding:padding + in_hw[0], padding:padding + in_hw[1]]


def _strided_weight_grad(x: Array, dy: Array, kernel_shape: tuple[int, ...], stride: int,
                         padding: int) -> Array:
  """dL/dkernel of a strided convolution as one plain convolution per phase.

  Kernel row s*m+u only meets padded input rows u, u+s, ...: its gradient is the
  stride-1 weight gradient of that phase of the input with ``dy``. Spreading
  ``dy`` out by the stride instead multiplies by inserted zeros, which made
  ResNet-18's step markedly slower.
  """
  kh, kw, c, o = kernel_shape
  xpad = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  phases = []
  for u in range(stride):
    row = []
    for v in range(stride):
      mh, mw = len(range(u, kh, stride)), len(range(v, kw, stride))
      if mh == 0 or mw == 0:
        row.append(jnp.zeros((max(mh, 1), max(mw, 1), c, o), dy.dtype))
        continue
      xs = xpad[:, u::stride, v::stride]
      row.append(_canonical_weight_grad(xs, dy, 0)[:mh, :mw])
    phases.append(row)
  return _interleave(phases, 0, stride, (kh, kw))


def _shifted_weight_grad(x: Array, dy: Array, kernel_shape: tuple[int, ...], stride: int,
                         padding: int) -> Array:
  """dL/dkernel as kh*kw matmuls, one per kernel offset, stacked to [kh, kw, C, O].

  dk[i, j] = sum over examples and output pixels of the input shifted by (i, j)
  times the output cotangent: a [C, O] matmul contracting over N*Ho*Wo. Under
  vmap each becomes one batched dot_general over the workers, with neither a
  grouped convolution nor the kh*kw-wide patch matrix.
  """
  kh, kw, c, o = kernel_shape
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  _, ho, wo, _ = dy.shape
  d = dy.reshape(-1, o)
  rows = [jnp.einsum("mc,mo->co",
                     x[:, i : i + stride * (ho - 1) + 1 : stride,
                       j : j + stride * (wo - 1) + 1 : stride, :].reshape(-1, c), d)
          for i in range(kh) for j in range(kw)]
  return jnp.stack(rows).reshape(kh, kw, c, o)


def _once_per_worker(fn: Callable[..., Array], axis_size: int, in_batched, *args):
  """A custom_vmap rule's result: ``fn`` called on each worker's slice of the
  batched arguments (unbatched ones as they are), stacked."""
  outs = [fn(*(a[i] if batched else a for a, batched in zip(args, in_batched)))
          for i in range(axis_size)]
  return jnp.stack(outs), True


@functools.lru_cache(maxsize=None)
def _weight_grad_fn(kernel_shape: tuple[int, ...], dtype: Any, stride: int, padding: int):
  """Returns wgrad(x, dy) -> dL/dkernel whose vmap runs one convolution per worker.

  Under vmap with both operands batched, XLA's weight-gradient convolution turns
  into a grouped convolution that is several times slower on CPU than the same
  number of independent per-worker convolutions, so the batching rule unrolls
  the vmapped axis (its size is the number of workers: small and static).
  """
  kernel_aval = jax.ShapeDtypeStruct(kernel_shape, dtype)

  @jax.custom_batching.custom_vmap
  def wgrad(x, dy):
    if stride == 1:
      return _canonical_weight_grad(x, dy, padding)
    return _strided_weight_grad(x, dy, kernel_shape, stride, padding)

  @wgrad.def_vmap
  def _rule(axis_size, in_batched, x, dy):
    x_batched, dy_batched = in_batched
    if axis_size > MAX_UNROLLED_WORKERS:
      # Compile time grows with every unrolled convolution; past this many
      # workers fall back to the grouped convolution plain vmap produces.
      conv_t = lambda x, dy: jax.linear_transpose(
          lambda k: plain_conv(x, k, stride, padding), kernel_aval)(dy)[0]
      return jax.vmap(conv_t, in_axes=(0 if x_batched else None,
                                       0 if dy_batched else None))(x, dy), True
    return _once_per_worker(wgrad, axis_size, in_batched, x, dy)

  return wgrad


@functools.lru_cache(maxsize=None)
def _per_worker_conv(kind: str, stride: int, padding: int):
  """Returns conv(x, kernel) whose vmap runs one convolution per worker.

  ``kind`` is "forward" (``_plain_conv``) or "input_grad"
  (``_canonical_input_grad``, stride 1). Plain vmap folds the workers into the
  batch axis: one convolution over all their examples. XLA:CPU runs each
  convolution on one core, and its thunk executor hands ready work to a second
  thread only when more than 8 thunks are ready at once, so that one
  convolution keeps a single core busy while the others wait. One convolution
  per worker gives it W ready thunks, which it spreads over the cores. Same
  sums per example, so the same values.
  """
  if kind == "forward":
    fn = lambda x, kernel: plain_conv(x, kernel, stride, padding)
  elif kind == "input_grad" and stride == 1:
    fn = lambda dy, kernel: _canonical_input_grad(dy, kernel, padding)
  else:
    raise ValueError(f"no per-worker convolution {kind!r} with stride {stride}")

  @jax.custom_batching.custom_vmap
  def conv(x, kernel):
    return fn(x, kernel)

  @conv.def_vmap
  def _rule(axis_size, in_batched, x, kernel):
    x_batched, k_batched = in_batched
    if axis_size > MAX_UNROLLED_WORKERS or not x_batched:
      # Compile time grows with every unrolled convolution (as for the weight
      # gradients); an unbatched input has nothing to split.
      return jax.vmap(fn, in_axes=(0 if x_batched else None, 0 if k_batched else None))(
          x, kernel), True
    return _once_per_worker(conv, axis_size, in_batched, x, kernel)

  return conv


def _shifted_sum_conv(x: Array, kernel: Array, stride: int, padding: int) -> Array:
  """The forward convolution as a sum of shifted inputs times kernel entries (few channels)."""
  kh, kw, c, _ = kernel.shape
  _, h, w, _ = x.shape
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ho = (h + 2 * padding - kh) // stride + 1
  wo = (w + 2 * padding - kw) // stride + 1
  terms = [x[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride,
             ci : ci + 1] * kernel[i, j, ci]
           for i in range(kh) for j in range(kw) for ci in range(c)]
  return functools.reduce(jnp.add, terms)  # one fused elementwise loop


def _cpu_forward_conv(x: Array, kernel: Array, stride: int, padding: int) -> Array:
  if kernel.shape[2] <= _SHIFTED_MAX_CHANNELS:
    return _shifted_sum_conv(x, kernel, stride, padding)
  return _per_worker_conv("forward", stride, padding)(x, kernel)


def _cpu_weight_grad(x, dy, shape, dtype, stride, padding):
  if dtype == jnp.float64 and shape[2] <= _SHIFTED_MAX_CHANNELS:
    # XLA:CPU has no fast float64 convolution for a few input channels; kh*kw
    # matmuls are faster there.
    return _shifted_weight_grad(x, dy, shape, stride, padding)
  return _weight_grad_fn(shape, dtype, stride, padding)(x, dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def cpu_conv(x: Array, kernel: Array, stride: int, padding: int) -> Array:
  return _cpu_forward_conv(x, kernel, stride, padding)


def _cpu_conv_fwd(x, kernel, stride, padding):
  return _cpu_forward_conv(x, kernel, stride, padding), (x, kernel)


def _cpu_conv_bwd(stride, padding, res, dy):
  x, kernel = res
  if padding >= min(kernel.shape[:2]):
    # Outside the flipped-kernel form (no model pads this much): autodiff's own.
    _, x_vjp = jax.vjp(lambda x_: plain_conv(x_, kernel, stride, padding), x)
    (dx,) = x_vjp(dy)
  elif stride == 1:
    dx = _per_worker_conv("input_grad", 1, padding)(dy, kernel)
  else:
    dx = _strided_input_grad(dy, kernel, stride, padding, x.shape[1:3])
  dk = _cpu_weight_grad(x, dy, tuple(kernel.shape), jnp.dtype(kernel.dtype), stride, padding)
  return dx, dk.astype(kernel.dtype)


cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)
