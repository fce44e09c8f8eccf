"""The layer primitives of the models: convolution, 2x2 max pool, BatchNorm.

Each primitive takes a ``kernels`` argument, the kernel set (see
:mod:`ftjax.kernels`): ``None`` reads :func:`ftjax.kernels.current`, a name is
resolved with :func:`ftjax.kernels.resolve`. The primitive picks its
implementation when it is called; a custom gradient or batching rule traced
later is part of that implementation and never reads the kernel set again.

The plain versions are the definitions: ``lax.conv_general_dilated``,
``flax.linen.max_pool`` and BatchNorm in ``jax.numpy``, differentiated and
vmapped by JAX. The cpu versions compute the same values and gradients in the
form XLA:CPU runs fast, under the training step's
``jax.vmap(jax.value_and_grad(loss), in_axes=(None, None, 0, 0))``:

* Convolution (in :mod:`ftjax.kernels.conv`). Under vmap the forward pass and
  the input gradient fold the worker axis into the batch axis (the kernel is shared), but the *weight*
  gradient is a per-worker convolution with two batched operands, which JAX
  lowers to a grouped convolution that XLA:CPU runs far below its matmul
  speed. The cpu convolution computes its gradients in a ``jax.custom_vjp``
  whose ``custom_vmap`` rules run the weight gradient, the forward convolution
  and the stride-1 input gradient once per worker: XLA:CPU runs each
  convolution on one core and hands ready work to its other threads only when
  more than 8 thunks are ready at once, so one convolution over all workers'
  examples would leave the other cores idle. The gradients are written out as
  plain forward convolutions (strided ones as one stride-1 convolution per
  phase of the stride), the only form XLA:CPU runs on its fast convolution
  library inside a ``lax.scan`` body too. First layers with at most a few input
  channels use a fused shifted-input sum for the forward pass (and, in
  float64, one matmul per kernel offset for the weight gradient).
* Max pool. XLA's reduce-window backward (select-and-scatter) is slow under
  vmap on CPU; the cpu max pool is a reshape whose custom backward sends the
  cotangent to the first maximum of each window, as select-and-scatter does,
  so both give the same gradients, ties included.
* BatchNorm. A closed-form backward pass (two fused reductions and one
  elementwise pass) instead of autodiff's several walks over the activations;
  and BatchNorm -> ReLU -> 2x2 max pool, the block that walks a small CNN's
  largest activations, as one fused op with a hand-written backward pass that
  takes two sweeps over the activations.
"""
from __future__ import annotations

import functools
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ftjax import kernels as kernels_lib
from ftjax.kernels.conv import MAX_UNROLLED_WORKERS, cpu_conv, plain_conv

Array = jax.Array



def _resolve(kernels: str | None) -> str:
  return kernels_lib.current() if kernels is None else kernels_lib.resolve(kernels)


# --------------------------------------------------------------------------
# Public primitives.


def conv2d(x: Array, kernel: Array, stride: int = 1, padding: int = 0,
           kernels: str | None = None) -> Array:
  """2-D convolution with symmetric zero padding (cross-correlation, as PyTorch).

  Args:
    x: inputs [N, H, W, C].
    kernel: weights [kh, kw, C, O].
    stride: stride in both spatial dimensions.
    padding: zeros added on each side of both spatial dimensions.
    kernels: the kernel set; ``None`` for the one in scope (:func:`ftjax.kernels.use`).

  Returns:
    [N, (H + 2p - kh) // stride + 1, (W + 2p - kw) // stride + 1, O].
  """
  if _resolve(kernels) == "cpu":
    return cpu_conv(x, kernel, stride, padding)
  return plain_conv(x, kernel, stride, padding)


def max_pool2(x: Array, kernels: str | None = None) -> Array:
  """2x2 max pool with stride 2; odd trailing rows and columns are dropped (floor mode).

  Args:
    x: [N, H, W, C].
    kernels: the kernel set; ``None`` for the one in scope.

  Returns:
    [N, H // 2, W // 2, C].
  """
  if _resolve(kernels) == "cpu":
    return _reshape_max_pool(x)
  return _plain_max_pool(x)


def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float,
                     kernels: str | None = None) -> tuple[Array, Array, Array]:
  """Training-mode BatchNorm over all axes but the last.

  Args:
    x: activations [..., C].
    scale: [C].
    bias: [C].
    epsilon: added to the variance.
    kernels: the kernel set; ``None`` for the one in scope.

  Returns:
    (normalised x, batch mean [C], biased batch variance [C]).
  """
  if _resolve(kernels) == "cpu":
    return _cpu_batch_norm_train(x, scale, bias, epsilon)
  return _plain_batch_norm_train(x, scale, bias, epsilon)


def batch_norm_relu_max_pool(x: Array, scale: Array, bias: Array, epsilon: float,
                             kernels: str | None = None) -> tuple[Array, Array, Array]:
  """BatchNorm -> ReLU -> 2x2 max pool: ``max_pool2(relu(batch_norm_train(x)))``.

  Args:
    x: activations [N, H, W, C].
    scale: [C].
    bias: [C].
    epsilon: added to the variance.
    kernels: the kernel set; ``None`` for the one in scope.

  Returns:
    (pooled [N, H//2, W//2, C], batch mean [C], biased batch variance [C]).
  """
  k = _resolve(kernels)
  if k == "cpu":
    return _fused_batch_norm_relu_max_pool(x, scale, bias, epsilon)
  y, mean, var = batch_norm_train(x, scale, bias, epsilon, k)
  return max_pool2(nn.relu(y), k), mean, var


def scan_friendly(kernels: str, num_workers: int) -> bool:
  """Whether the models' training gradient runs at full speed in a ``lax.scan`` body.

  True when every convolution in the per-worker gradient that this kernel set
  produces under a vmap over ``num_workers`` workers is a plain forward
  convolution (NHWC x HWIO, no dilation, no feature or batch groups), the only
  form XLA:CPU runs on its fast convolution library inside a loop body. On
  CPU that holds for the cpu kernels up to 64 workers; the plain kernels
  (autodiff's transposed convolutions) and more workers (the per-worker weight
  gradients fall back to one grouped convolution) are not. Other backends have
  no such slow path. The models' convolutions all pad by less than their
  kernel size, which the cpu input gradient needs to be written this way.

  Args:
    kernels: a kernel-set name (``"auto"``, ``"plain"`` or ``"cpu"``).
    num_workers: size of the vmapped worker axis (with ``workers.chunk``, the
      chunk size: each chunk of workers is its own vmap).

  Returns:
    Whether a scanned chunk of training rounds keeps the fast convolutions.
  """
  k = kernels_lib.resolve(kernels)
  if jax.default_backend() != "cpu":
    return True
  return k == "cpu" and num_workers <= MAX_UNROLLED_WORKERS


# --------------------------------------------------------------------------
# Plain versions.


def _plain_max_pool(x: Array) -> Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def _bn_stats(x: Array):
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  xc = x - mean
  # Two-pass variance: E[x^2]-E[x]^2 loses digits that float64 parity needs.
  return mean, xc, jnp.square(xc).mean(axes)


def _plain_batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float):
  mean, xc, var = _bn_stats(x)
  return xc * (lax.rsqrt(var + epsilon) * scale) + bias, mean, var


# --------------------------------------------------------------------------
# cpu max pool.


def _split_windows(x: Array) -> Array:
  """[N, H, W, C] -> [N, H/2, 2, W/2, 2, C], odd trailing rows/columns dropped (a bitcast)."""
  n, h, w, c = x.shape
  return x[:, : h // 2 * 2, : w // 2 * 2, :].reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def _reshape_max_pool(x: Array) -> Array:
  return _split_windows(x).max(axis=(2, 4))


def _reshape_max_pool_fwd(x):
  return _reshape_max_pool(x), x


def _reshape_max_pool_bwd(x, dy):
  n, h, w, c = x.shape
  win = _split_windows(x)
  a, b = win[:, :, 0, :, 0], win[:, :, 0, :, 1]
  c_, d = win[:, :, 1, :, 0], win[:, :, 1, :, 1]
  # The first maximum in row-major window order gets the whole cotangent, as in
  # XLA's select-and-scatter, so the plain and cpu pools agree on ties. The
  # winner comes from comparisons among x alone, never from x == max(x): XLA may
  # recompute x in this fusion with different rounding than in the forward one.
  take_b = b > a
  take_c = c_ > jnp.maximum(a, b)
  take_d = d > jnp.maximum(jnp.maximum(a, b), c_)
  zero = jnp.zeros_like(dy)
  g_d = jnp.where(take_d, dy, zero)
  g_c = jnp.where(take_c & ~take_d, dy, zero)
  g_b = jnp.where(take_b & ~take_c & ~take_d, dy, zero)
  g_a = jnp.where(~take_b & ~take_c & ~take_d, dy, zero)
  g = jnp.stack([jnp.stack([g_a, g_b], axis=3), jnp.stack([g_c, g_d], axis=3)], axis=2)
  g = g.reshape(n, h // 2 * 2, w // 2 * 2, c)
  dx = jnp.pad(g, ((0, 0), (0, h - h // 2 * 2), (0, w - w // 2 * 2), (0, 0)))
  return (dx,)


_reshape_max_pool.defvjp(_reshape_max_pool_fwd, _reshape_max_pool_bwd)


# --------------------------------------------------------------------------
# cpu BatchNorm, and the fused BatchNorm -> ReLU -> max pool block.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cpu_batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float):
  return _plain_batch_norm_train(x, scale, bias, epsilon)


def _bn_fwd(x, scale, bias, epsilon):
  mean, xc, var = _bn_stats(x)
  rstd = lax.rsqrt(var + epsilon)
  xhat = xc * rstd
  return (xhat * scale + bias, mean, var), (xhat, rstd, scale)


def _bn_bwd(epsilon, res, cts):
  # The closed-form backward needs two fused reductions and one elementwise pass,
  # where autodiff of the forward makes XLA walk the activations several times.
  del epsilon  # Enters through rstd.
  xhat, rstd, scale = res
  dy, dmean, dvar = cts
  axes = tuple(range(xhat.ndim - 1))
  dbias = dy.sum(axes)
  dscale = (dy * xhat).sum(axes)
  return _bn_input_grad(dy, xhat, rstd, scale, dbias, dscale, dmean, dvar), dscale, dbias


def _bn_input_grad(dy, xhat, rstd, scale, dbias, dscale, dmean, dvar):
  """BatchNorm's closed-form input gradient from the parameter gradients."""
  n = xhat.size // xhat.shape[-1]
  dx = (scale * rstd) * (dy - dbias / n - xhat * (dscale / n))
  # Cotangents of the returned statistics (zero in the models, which stop their
  # gradient, but kept so the function is correct on its own).
  return dx + dmean / n + xhat * (2 * dvar / (n * rstd))


_cpu_batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


def _bn_relu_pool_values(xc, rstd, scale, bias):
  # The same expression as the BatchNorm forward, on the split windows.
  return _split_windows(xc) * (rstd * scale) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_batch_norm_relu_max_pool(x: Array, scale: Array, bias: Array, epsilon: float):
  """``max_pool2(relu(batch_norm_train(x)))`` in the fewest passes over ``x``.

  The same values as the three ops in sequence (the pooled maximum of the
  normalised values, not of ``x``, so a negative scale is handled and ties
  break the same way), but the forward pass never writes the full-resolution
  normalised activations and the backward pass routes the pooled cotangent,
  applies the ReLU mask and the BatchNorm backward in one fused sweep over
  ``x``. On CPU the separate ops walk the largest activations of a small CNN
  several times more and dominate its training step.
  """
  out, mean, var, _, _ = _bnrp_forward(x, scale, bias, epsilon)
  return out, mean, var


def _bnrp_forward(x, scale, bias, epsilon):
  # The backward pass needs only the centred activations, so x can be freed.
  mean, xc, var = _bn_stats(x)
  rstd = lax.rsqrt(var + epsilon)
  pooled = _bn_relu_pool_values(xc, rstd, scale, bias).max(axis=(2, 4))
  return nn.relu(pooled), mean, var, xc, rstd


def _bnrp_fwd(x, scale, bias, epsilon):
  out, mean, var, xc, rstd = _bnrp_forward(x, scale, bias, epsilon)
  return (out, mean, var), (xc, rstd, scale, bias)


def _bnrp_bwd(epsilon, res, cts):
  del epsilon  # Enters through rstd.
  xc, rstd, scale, bias = res
  dout, dmean, dvar = cts
  n, h, w, c = xc.shape
  # Pass 1, on the pooled grid: which window element won (the first maximum of
  # the normalised values, as XLA's select-and-scatter picks), its centred
  # value, and the ReLU mask. Both the maximum and the winner come out of
  # max-reductions, which XLA:CPU writes to memory: a winner computed by
  # elementwise comparisons would be fused into the full-resolution pass below
  # and recomputed there for each of the four elements of its window, together
  # with whatever produced x (e.g. a convolution written as a sum of shifted
  # inputs). y == ymax compares a value with the maximum of the same values.
  y = _bn_relu_pool_values(xc, rstd, scale, bias)  # [N, H/2, 2, W/2, 2, C]
  ymax = y.max(axis=(2, 4))
  rank = jnp.array([[3, 2], [1, 0]], xc.dtype).reshape(1, 1, 2, 1, 2, 1)
  code = jnp.where(y == ymax[:, :, None, :, None, :], rank, -1).max(axis=(2, 4))
  winner = 3 - code  # 0..3 in row-major window order, as a float
  win = _split_windows(xc)
  x_win = jnp.where(winner == 3, win[:, :, 1, :, 1], jnp.where(
      winner == 2, win[:, :, 1, :, 0], jnp.where(winner == 1, win[:, :, 0, :, 1],
                                                 win[:, :, 0, :, 0])))
  g = jnp.where(ymax > 0, dout, jnp.zeros_like(dout))  # ReLU'(0) = 0, as jax.nn.relu
  axes = tuple(range(xc.ndim - 1))
  dbias = g.sum(axes)
  dscale = (g * (x_win * rstd)).sum(axes)
  # Pass 2, full resolution: route g to the winners and apply BatchNorm's
  # closed-form backward (see _bn_bwd) in the same sweep.
  pos = (2 * jnp.arange(2)[:, None] + jnp.arange(2)[None, :]).astype(xc.dtype)
  pos = pos.reshape(1, 1, 2, 1, 2, 1)
  dy = jnp.where(winner[:, :, None, :, None, :] == pos, g[:, :, None, :, None, :],
                 jnp.zeros((), g.dtype))
  dy = dy.reshape(n, h // 2 * 2, w // 2 * 2, c)
  if h % 2 or w % 2:
    dy = jnp.pad(dy, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  dx = _bn_input_grad(dy, xc * rstd, rstd, scale, dbias, dscale, dmean, dvar)
  return dx, dscale, dbias


_fused_batch_norm_relu_max_pool.defvjp(_bnrp_fwd, _bnrp_bwd)
