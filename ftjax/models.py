"""Flax models: the reference's, the peers' standard networks, and two tiny test models.

All models take NHWC float inputs and ``train: bool`` and return logits. Models
with BatchNorm keep running statistics in the ``"batch_stats"`` collection;
``train=True`` normalises with the minibatch's statistics (each worker's own
under the step's vmap) and ``train=False`` with the running ones.

A model builds its layers from one :class:`Layers` given at its root (the
Flax ``ModuleDef`` pattern), which binds their dtype and kernel set once. The
layers are plain Flax modules whose arithmetic comes from
:mod:`ftjax.kernels.layers`. Each has a ``kernels`` field, the kernel set of
:mod:`ftjax.kernels` (``"auto"``, ``"plain"`` or ``"cpu"``), which picks how
the layer's convolution, pooling and BatchNorm are written for the backend;
every kernel set computes the same function and the same gradients. A layer
resolves its own field (``"auto"``: the backend's set) and passes the result to
the primitives, so a model computes the same way whatever kernel set is in
scope where it is called.
"""
from __future__ import annotations

import dataclasses

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ftjax import kernels as kernels_lib
from ftjax.kernels import layers

Array = jax.Array


# --------------------------------------------------------------------------
# Layers.


def torch_uniform(fan_in: int) -> Callable[..., Array]:
  """PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  (kaiming_uniform with a=sqrt(5) reduces to this bound for the weight, and
  PyTorch uses the same bound for the bias.)

  Args:
    fan_in: number of inputs feeding one output unit.

  Returns:
    A Flax initializer.
  """
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Conv(nn.Module):
  """2-D convolution with PyTorch-style symmetric integer padding and init.

  Attributes:
    features: output channels.
    kernel_size: square kernel side.
    stride: stride in both spatial dimensions.
    padding: zeros added on each side of both spatial dimensions.
    use_bias: whether to add a bias.
    dtype: parameter and computation dtype.
    kernels: kernel set of the convolution ("auto", "plain" or "cpu").
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    k = self.kernel_size
    init = torch_uniform(c * k * k)
    kernel = self.param("kernel", init, (k, k, c, self.features), self.dtype)
    y = layers.conv2d(x.astype(self.dtype), kernel, self.stride, self.padding,
                      kernels_lib.resolve(self.kernels))
    if self.use_bias:
      y = y + self.param("bias", init, (self.features,), self.dtype)
    return y


class Dense(nn.Module):
  """Fully connected layer with PyTorch's default init.

  Attributes:
    features: output units.
    dtype: parameter and computation dtype.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = torch_uniform(x.shape[-1])
    kernel = self.param("kernel", init, (x.shape[-1], self.features), self.dtype)
    bias = self.param("bias", init, (self.features,), self.dtype)
    return x.astype(self.dtype) @ kernel + bias


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with PyTorch's semantics.

  Training normalises with the batch's biased variance and updates the running
  statistics with the unbiased one (as torch.nn.BatchNorm2d does); evaluation
  normalises with the running statistics.

  Attributes:
    momentum: Flax convention, running = momentum * running + (1 - momentum) *
      batch; 0.9 is PyTorch's momentum=0.1.
    epsilon: added to the variance (PyTorch default 1e-5).
    dtype: parameter, statistics and computation dtype.
    kernels: kernel set of the normalisation ("auto", "plain" or "cpu").
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Normalises ``x`` [..., C]; ``train`` uses and records the batch's statistics."""
    k = kernels_lib.resolve(self.kernels)
    x = x.astype(self.dtype)
    scale, bias, run_mean, run_var = self._variables(x.shape[-1])
    if not train:
      return self._normalise_with_running(x, scale, bias, run_mean, run_var)
    y, mean, var = layers.batch_norm_train(x, scale, bias, self.epsilon, k)
    self._record(run_mean, run_var, mean, var, x.size // x.shape[-1])
    return y

  def _variables(self, c: int):
    """(scale, bias, running mean, running variance), with PyTorch's initial values."""
    scale = self.param("scale", nn.initializers.ones, (c,), self.dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.dtype)
    mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), self.dtype)
    var = self.variable("batch_stats", "var", jnp.ones, (c,), self.dtype)
    return scale, bias, mean, var

  def _normalise_with_running(self, x: Array, scale: Array, bias: Array, run_mean,
                              run_var) -> Array:
    inv = lax.rsqrt(run_var.value + self.epsilon) * scale
    return x * inv + (bias - run_mean.value * inv)

  def _record(self, run_mean, run_var, mean: Array, var: Array, n: int) -> None:
    """Updates the running statistics from a batch of ``n`` values per channel.

    The running variance takes the unbiased batch variance, as PyTorch's.
    """
    if self.is_initializing():
      return  # Initialisation leaves PyTorch's initial statistics.
    unbiased = var * (n / max(n - 1, 1))
    m = self.momentum
    run_mean.value = m * run_mean.value + (1 - m) * lax.stop_gradient(mean)
    run_var.value = m * run_var.value + (1 - m) * lax.stop_gradient(unbiased)


class BatchNormReLUMaxPool(BatchNorm):
  """BatchNorm -> ReLU -> 2x2 max pool (stride 2, floor mode), as one block.

  Exactly ``max_pool2(relu(BatchNorm(x)))``, with BatchNorm's variables and
  semantics. A block because the cpu kernels run the three operations of
  training as one fused op that walks the activations fewer times; the plain
  kernels run them one after the other.
  """

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """BatchNorm, ReLU and max pool of ``x`` [N, H, W, C] -> [N, H//2, W//2, C]."""
    k = kernels_lib.resolve(self.kernels)
    x = x.astype(self.dtype)
    scale, bias, run_mean, run_var = self._variables(x.shape[-1])
    if not train:
      y = self._normalise_with_running(x, scale, bias, run_mean, run_var)
      return layers.max_pool2(nn.relu(y), k)
    # In training one primitive: its plain version is the same three ops in order.
    y, mean, var = layers.batch_norm_relu_max_pool(x, scale, bias, self.epsilon, k)
    self._record(run_mean, run_var, mean, var, x.size // x.shape[-1])
    return y


# How the training step turns a round's forward passes into running statistics
# (model.batch_stats; docs/data.md).
BATCH_STATS_MODES = ("honest_mean", "sequential")

# PyTorch's BatchNorm momentum, the weight of a new batch: 1 - BatchNorm.momentum.
TORCH_MOMENTUM = 0.1


def fold_batch_stats(old: Any, per_pass: Any, momentum: float = TORCH_MOMENTUM) -> Any:
  """Running statistics after K training-mode forward passes, one after another.

  The original program keeps one model, whose BatchNorm layers update their
  running statistics at every training-mode forward pass,
  ``s_k = (1 - m) s_{k-1} + m b_k``. After K passes, in closed form,

    s_K = (1 - m)^K s_0 + sum_{k=1..K} m (1 - m)^(K - k) b_k,

  which is what this computes, so that the passes can run in parallel (vmapped
  over workers) and be folded afterwards.

  Args:
    old: the running statistics s_0 (a pytree, e.g. ``{"mean": [C], "var": [C]}``
      per layer).
    per_pass: like ``old`` with a leading axis K: each pass's own batch
      statistics b_k, in pass order (the variance unbiased, as PyTorch records it).
    momentum: m, PyTorch's convention (the weight of the newest batch).

  Returns:
    s_K, like ``old``.
  """

  def fold(s0, b):
    k = b.shape[0]
    weights = momentum * (1 - momentum) ** np.arange(k - 1, -1, -1, dtype=np.float64)
    return ((1 - momentum) ** k * s0
            + jnp.tensordot(jnp.asarray(weights, b.dtype), b, axes=1)).astype(s0.dtype)

  return jax.tree.map(fold, old, per_pass)


def batch_stats_of_pass(old: Any, updated: Any, momentum: float = TORCH_MOMENTUM) -> Any:
  """A pass's own batch statistics b from the running ones it returned.

  A training-mode ``apply`` from running statistics ``old`` returns
  ``updated = (1 - m) old + m b``; this solves for b (leaves of ``updated``
  may carry leading axes, e.g. workers).
  """
  return jax.tree.map(lambda s0, u: (u - (1 - momentum) * s0) / momentum, old, updated)


# --------------------------------------------------------------------------
# The layer implementations a model is built from, chosen once at its root.


@dataclasses.dataclass(frozen=True)
class Layers:
  """The layers of a model, with their dtype and kernel set bound once.

  A model takes one ``Layers`` (its ``layers`` field) and builds every layer
  from it, so the kernel set and dtype are chosen at the root and never passed
  layer by layer. Another implementation of the same layers (a subclass
  overriding a method) changes every model at once.

  Attributes:
    dtype: parameter and computation dtype.
    kernels: kernel set of the convolutions, pooling and BatchNorm ("auto",
      "plain" or "cpu"; a matmul has one form on every backend).
  """
  dtype: Any = jnp.float32
  kernels: str = "auto"

  def conv(self, features: int, kernel_size: int, **kwargs) -> nn.Module:
    return Conv(features, kernel_size, dtype=self.dtype, kernels=self.kernels, **kwargs)

  def dense(self, features: int, **kwargs) -> nn.Module:
    return Dense(features, dtype=self.dtype, **kwargs)

  def batch_norm(self, **kwargs) -> nn.Module:
    return BatchNorm(dtype=self.dtype, kernels=self.kernels, **kwargs)

  def batch_norm_relu_max_pool(self, **kwargs) -> nn.Module:
    """BatchNorm -> ReLU -> MaxPool2 as one block, which the cpu kernels fuse."""
    return BatchNormReLUMaxPool(dtype=self.dtype, kernels=self.kernels, **kwargs)

  def max_pool2(self, x: Array) -> Array:
    """2x2 max pool, stride 2, floor mode (PyTorch's ``max_pool2d(x, 2, 2)``)."""
    return layers.max_pool2(x, kernels_lib.resolve(self.kernels))

  def dropout(self, rate: float) -> nn.Module:
    """Dropout of ``rate``, called as ``(x, deterministic=not train)``.

    In training its mask is drawn from the ``"dropout"`` stream that the round
    passes to ``apply`` (one key per worker, round and local step; docs/data.md).
    """
    return nn.Dropout(rate)


# --------------------------------------------------------------------------
# Models.


class SimpleCNN(nn.Module):
  """Conv5x5(16)-BN-ReLU-MaxPool2-Conv5x5(32)-BN-ReLU-MaxPool2-Dense.

  29,034 parameters on 28x28x1 inputs; any input size of at least 4x4 works
  (the Dense layer's width follows the input).

  Attributes:
    num_classes: output logits.
    channels: channels of the two convolutions.
    layers: the layer implementations.
  """
  num_classes: int = 10
  channels: Sequence[int] = (16, 32)
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    for i, ch in enumerate(self.channels):
      x = self.layers.conv(ch, 5, padding=2)(x)
      # Named BatchNorm_i, as the reference's variable tree has it.
      x = self.layers.batch_norm_relu_max_pool(name=f"BatchNorm_{i}")(x, train)
    x = x.reshape(x.shape[0], -1)
    return self.layers.dense(self.num_classes)(x)


class TinyCNN(nn.Module):
  """Conv3x3(4)-BN-ReLU-MaxPool2-Dense: a fast conv+BN model for tests (8x8 inputs).

  Attributes:
    num_classes: output logits.
    layers: the layer implementations.
  """
  num_classes: int = 10
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = self.layers.conv(4, 3, padding=1)(x)
    x = self.layers.batch_norm_relu_max_pool(name="BatchNorm_0")(x, train)
    x = x.reshape(x.shape[0], -1)
    return self.layers.dense(self.num_classes)(x)


class MLP(nn.Module):
  """Flatten-[Dense(h)-ReLU(-Dropout)] for each hidden width h-Dense, without BatchNorm.

  Attributes:
    num_classes: output logits.
    hidden: hidden width, or a sequence of them (one hidden layer each).
    dropout: dropout rate after every hidden layer (0: none).
    layers: the layer implementations.
  """
  num_classes: int = 10
  hidden: int | Sequence[int] = 32
  dropout: float = 0.0
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = x.reshape(x.shape[0], -1)
    for width in ((self.hidden,) if isinstance(self.hidden, int) else self.hidden):
      x = nn.relu(self.layers.dense(width)(x))
      if self.dropout:
        x = self.layers.dropout(self.dropout)(x, deterministic=not train)
    return self.layers.dense(self.num_classes)(x)


class LogReg(nn.Module):
  """Multinomial logistic regression: one Dense layer on the flattened image.

  Attributes:
    num_classes: output logits.
    layers: the layer implementations.
  """
  num_classes: int = 10
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    del train
    return self.layers.dense(self.num_classes)(x.reshape(x.shape[0], -1))


def _flatten_channels_first(x: Array) -> Array:
  """[N, H, W, C] -> [N, C H W], PyTorch's ``view(N, -1)`` order of an NCHW tensor."""
  return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)


class ByzFLCNN(nn.Module):
  """ByzFL's ``cnn_mnist``: Conv5x5(20)-ReLU-MaxPool2-Conv5x5(50)-ReLU-MaxPool2-
  Dense(500)-ReLU-Dense.

  Unpadded convolutions; 431,080 parameters on 28x28x1 inputs (the Dense
  layer's width follows the input; at least 16x16). ByzFL's network ends in
  ``log_softmax`` and trains with the NLL loss: the same loss and predictions
  as these logits under cross-entropy.

  Attributes:
    num_classes: output logits.
    layers: the layer implementations.
  """
  num_classes: int = 10
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    del train  # No layer behaves differently in training.
    x = self.layers.max_pool2(nn.relu(self.layers.conv(20, 5)(x)))
    x = self.layers.max_pool2(nn.relu(self.layers.conv(50, 5)(x)))
    x = nn.relu(self.layers.dense(500)(_flatten_channels_first(x)))
    return self.layers.dense(self.num_classes)(x)


class TorchMNIST(nn.Module):
  """The PyTorch examples' MNIST net: Conv3x3(32)-ReLU-Conv3x3(64)-ReLU-MaxPool2-
  Dropout(0.25)-Dense(128)-ReLU-Dropout(0.5)-Dense.

  1,199,882 parameters on 28x28x1 inputs (the Dense layer's width follows the
  input; at least 6x6). The bucketing paper's code (Karimireddy, He and Jaggi,
  2022) trains it.

  Attributes:
    num_classes: output logits.
    layers: the layer implementations.
  """
  num_classes: int = 10
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = nn.relu(self.layers.conv(32, 3)(x))
    x = self.layers.max_pool2(nn.relu(self.layers.conv(64, 3)(x)))
    x = self.layers.dropout(0.25)(_flatten_channels_first(x), deterministic=not train)
    x = nn.relu(self.layers.dense(128)(x))
    x = self.layers.dropout(0.5)(x, deterministic=not train)
    return self.layers.dense(self.num_classes)(x)


class BasicBlock(nn.Module):
  """ResNet basic block: two 3x3 conv-BN, and a shortcut that matches a changed shape.

  Attributes:
    features: output channels.
    stride: stride of the first conv and of the shortcut.
    layers: the layer implementations.
    shortcut: when the shape changes, "conv" (a 1x1 conv-BN projection, He et
      al.'s option B) or "pad" (the input subsampled by the stride and its
      channels zero-padded, option A: no parameters).
  """
  features: int
  stride: int = 1
  layers: Layers = Layers()
  shortcut: str = "conv"

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    conv = lambda size, stride, padding: self.layers.conv(
        self.features, size, stride=stride, padding=padding, use_bias=False)
    out = nn.relu(self.layers.batch_norm()(conv(3, self.stride, 1)(x), train))
    out = self.layers.batch_norm()(conv(3, 1, 1)(out), train)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      if self.shortcut == "pad":
        extra = self.features - x.shape[-1]
        shortcut = jnp.pad(x[:, ::self.stride, ::self.stride, :],
                           ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
      else:
        shortcut = self.layers.batch_norm()(conv(1, self.stride, 0)(x), train)
    return nn.relu(out + shortcut)


class ResNet18(nn.Module):
  """CIFAR ResNet-18: 3x3 stem, no max pool, stages [2, 2, 2, 2], average pool, Dense.

  11,173,962 parameters with 10 classes. The final 4x4 average pool of the
  reference is written as a global spatial mean, which is the same on 32x32
  inputs and also works on smaller test inputs.

  Attributes:
    num_classes: output logits.
    layers: the layer implementations.
  """
  num_classes: int = 10
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = self.layers.conv(64, 3, padding=1, use_bias=False)(x)
    x = nn.relu(self.layers.batch_norm()(x, train))
    for i, features in enumerate((64, 128, 256, 512)):
      for j in range(2):
        stride = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(features, stride, layers=self.layers)(x, train)
    x = x.mean(axis=(1, 2))
    return self.layers.dense(self.num_classes)(x)


class ResNet20(nn.Module):
  """He et al. (2016)'s CIFAR ResNet-20: Conv3x3(16)-BN-ReLU, three stages of three
  basic blocks with 16, 32 and 64 channels (stride 2 entering the second and
  third), global average pool, Dense.

  The option-A shortcut of the paper's CIFAR experiments (subsample, zero-pad
  the channels; no parameters): 269,722 parameters with 10 classes.

  Attributes:
    num_classes: output logits.
    layers: the layer implementations.
  """
  num_classes: int = 10
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = self.layers.conv(16, 3, padding=1, use_bias=False)(x)
    x = nn.relu(self.layers.batch_norm()(x, train))
    for i, features in enumerate((16, 32, 64)):
      for j in range(3):
        stride = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(features, stride, layers=self.layers, shortcut="pad")(x, train)
    x = x.mean(axis=(1, 2))
    return self.layers.dense(self.num_classes)(x)


def _simple_mnist(**kw) -> nn.Module:
  return SimpleCNN(**kw)


def _simple_cifar10(**kw) -> nn.Module:
  # Same network; the Dense width (32*8*8 on 32x32x3) follows from the input.
  return SimpleCNN(**kw)


def _fc_mnist(**kw) -> nn.Module:
  # ByzFL's fc_mnist: 784-100-10.
  return MLP(hidden=100, **kw)


def _blades_mlp(**kw) -> nn.Module:
  # Blades' MNIST MLP: 784-128-256-10, dropout 0.2 after each hidden layer.
  return MLP(hidden=(128, 256), dropout=0.2, **kw)


# Each model's source and parameter count: docs/architecture.md, "Models".
MODELS: dict[str, Callable[..., nn.Module]] = {
    "simple_mnist": _simple_mnist,
    "simple_cifar10": _simple_cifar10,
    "resnet18": ResNet18,
    "resnet20": ResNet20,
    "cnn_mnist": ByzFLCNN,
    "torch_mnist": TorchMNIST,
    "fc_mnist": _fc_mnist,
    "blades_mlp": _blades_mlp,
    "logreg": LogReg,
    "tiny_cnn": TinyCNN,
    "mlp": MLP,
}

_DTYPES = (jnp.float32, jnp.float64)


def make_model(name: str, *, num_classes: int = 10, dtype: Any = jnp.float32,
               kernels: str = "auto") -> nn.Module:
  """Builds a model from the ``MODELS`` table.

  Args:
    name: a key of ``MODELS``.
    num_classes: number of output logits (at least 2).
    dtype: jnp.float32 or jnp.float64 (the latter needs ``jax_enable_x64``);
      used for the parameters, the running statistics and the computation.
    kernels: kernel set of the layers: "auto" (the backend's), "plain" or "cpu"
      (see :mod:`ftjax.kernels`).

  Returns:
    An unbound flax.linen Module with ``__call__(x [N,H,W,C], train) -> logits``.

  Raises:
    ValueError: for an unknown name, kernel set or dtype, or num_classes < 2.
  """
  if not isinstance(name, str) or name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(MODELS)}.")
  kernels_lib.check(kernels)
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
  return MODELS[name](num_classes=num_classes, layers=Layers(dtype=dt.type, kernels=kernels))
