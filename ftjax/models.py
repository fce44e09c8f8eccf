"""Flax models of the reference (SPEC section 6) plus two tiny test models.

All models take NHWC float inputs and ``train: bool`` and return logits. Models
with BatchNorm keep running statistics in the ``"batch_stats"`` collection;
``train=True`` normalises with the minibatch's statistics (each worker's own
under the step's vmap) and ``train=False`` with the running ones.

The convolutions and max pools come from :mod:`ftjax.conv`; ``conv_impl``
selects how they are written (see ``conv.CONV_IMPLS``). Every formulation
computes the same function and the same gradients; they differ only in speed.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.conv import (CONV_IMPLS, BatchNorm, Conv, Dense, MaxPool2,  # noqa: F401
                        resolve_conv_impl)

Array = jax.Array


class SimpleCNN(nn.Module):
  """Conv5x5(16)-BN-ReLU-MaxPool2-Conv5x5(32)-BN-ReLU-MaxPool2-Dense.

  29,034 parameters on 28x28x1 inputs; any input size of at least 4x4 works
  (the Dense layer's width follows the input).

  Attributes:
    num_classes: output logits.
    channels: channels of the two convolutions.
    dtype: parameter and computation dtype.
    conv_impl: a key of ``CONV_IMPLS``.
  """
  num_classes: int = 10
  channels: Sequence[int] = (16, 32)
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    for ch in self.channels:
      x = Conv(ch, 5, padding=2, dtype=self.dtype, impl=self.conv_impl)(x)
      x = BatchNorm(dtype=self.dtype)(x, train, relu_max_pool=self.conv_impl)
    return Dense(self.num_classes, dtype=self.dtype)(x.reshape(x.shape[0], -1))


class TinyCNN(nn.Module):
  """Conv3x3(4)-BN-ReLU-MaxPool2-Dense: a fast conv+BN model for tests (8x8 inputs).

  Attributes:
    num_classes: output logits.
    dtype: parameter and computation dtype.
    conv_impl: a key of ``CONV_IMPLS``.
  """
  num_classes: int = 10
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = Conv(4, 3, padding=1, dtype=self.dtype, impl=self.conv_impl)(x)
    x = BatchNorm(dtype=self.dtype)(x, train, relu_max_pool=self.conv_impl)
    return Dense(self.num_classes, dtype=self.dtype)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
  """Flatten-Dense(hidden)-ReLU-Dense, without BatchNorm (no "batch_stats").

  Attributes:
    num_classes: output logits.
    hidden: hidden width.
    dtype: parameter and computation dtype.
    conv_impl: accepted for a uniform factory signature; unused.
  """
  num_classes: int = 10
  hidden: int = 32
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    del train  # No layer behaves differently in training.
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(Dense(self.hidden, dtype=self.dtype)(x))
    return Dense(self.num_classes, dtype=self.dtype)(x)


class BasicBlock(nn.Module):
  """ResNet basic block: two 3x3 conv-BN, 1x1 conv-BN shortcut when the shape changes.

  Attributes:
    features: output channels.
    stride: stride of the first conv and of the shortcut.
    dtype: parameter and computation dtype.
    conv_impl: a key of ``CONV_IMPLS``.
  """
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    conv = lambda k, s, p: Conv(self.features, k, stride=s, padding=p, use_bias=False,
                                dtype=self.dtype, impl=self.conv_impl)
    out = nn.relu(BatchNorm(dtype=self.dtype)(conv(3, self.stride, 1)(x), train))
    out = BatchNorm(dtype=self.dtype)(conv(3, 1, 1)(out), train)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = BatchNorm(dtype=self.dtype)(conv(1, self.stride, 0)(x), train)
    return nn.relu(out + x)


class ResNet18(nn.Module):
  """CIFAR ResNet-18: 3x3 stem, no max pool, stages [2, 2, 2, 2], average pool, Dense.

  11,173,962 parameters with 10 classes. The final 4x4 average pool of the
  reference is written as a global spatial mean, which is the same on 32x32
  inputs and also works on smaller test inputs.

  Attributes:
    num_classes: output logits.
    dtype: parameter and computation dtype.
    conv_impl: a key of ``CONV_IMPLS``.
  """
  num_classes: int = 10
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = Conv(64, 3, padding=1, use_bias=False, dtype=self.dtype, impl=self.conv_impl)(x)
    x = nn.relu(BatchNorm(dtype=self.dtype)(x, train))
    for i, features in enumerate((64, 128, 256, 512)):
      for j in range(2):
        stride = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(features, stride, dtype=self.dtype, conv_impl=self.conv_impl)(x, train)
    x = x.mean(axis=(1, 2))
    return Dense(self.num_classes, dtype=self.dtype)(x)


def _simple_mnist(**kw) -> nn.Module:
  return SimpleCNN(**kw)


def _simple_cifar10(**kw) -> nn.Module:
  # Same network; the Dense width (32*8*8 on 32x32x3) follows from the input.
  return SimpleCNN(**kw)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "simple_mnist": _simple_mnist,
    "simple_cifar10": _simple_cifar10,
    "resnet18": ResNet18,
    "tiny_cnn": TinyCNN,
    "mlp": MLP,
}

_DTYPES = (jnp.float32, jnp.float64)


def make_model(name: str, *, num_classes: int = 10, dtype: Any = jnp.float32,
               conv_impl: str = "auto") -> nn.Module:
  """Builds a model from the ``MODELS`` table.

  Args:
    name: a key of ``MODELS``.
    num_classes: number of output logits (at least 2).
    dtype: jnp.float32 or jnp.float64 (the latter needs ``jax_enable_x64``);
      used for the parameters, the running statistics and the computation.
    conv_impl: "auto", "xla", "patches" or "im2col"; see ``resolve_conv_impl``.

  Returns:
    An unbound flax.linen Module with ``__call__(x [N,H,W,C], train) -> logits``.

  Raises:
    ValueError: for an unknown name, conv_impl or dtype, or num_classes < 2.
  """
  if not isinstance(name, str) or name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(MODELS)}.")
  impl = resolve_conv_impl(conv_impl)
  if not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    dt = None
  if dt not in [jnp.dtype(d) for d in _DTYPES]:
    raise ValueError(f"dtype must be float32 or float64, got {dtype!r}.")
  if dt == jnp.float64 and not jax.config.read("jax_enable_x64"):
    raise ValueError("dtype float64 needs 64-bit JAX: call "
                     "jax.config.update('jax_enable_x64', True) first, or use float32.")
  return MODELS[name](num_classes=num_classes, dtype=dt.type, conv_impl=impl)
