"""Tests for ftjax.kernels.layers: every cpu primitive equals its plain version.

Values and gradients are compared under ``jax.vmap`` over a worker axis, as the
training step uses the primitives (shared weights, per-worker inputs), against
the plain versions (JAX's own convolution, reduce-window max pool and autodiff)
and, for BatchNorm, against NumPy.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftjax import kernels
from ftjax import models
from ftjax.kernels import layers

F32 = dict(rtol=1e-4, atol=1e-4)
F64 = dict(rtol=1e-11, atol=1e-11)
# Past 64 workers the cpu convolutions stop running once per worker and fall
# back to the batched forms plain vmap produces.
MANY_WORKERS = 66


def _normal(seed, shape, dtype=np.float32):
  # NumPy data: jax.random.normal costs a compile per shape, seconds on CPU.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _tol(dtype):
  return F64 if jnp.dtype(dtype) == jnp.float64 else F32


def _x64(dtype):
  return jax.enable_x64(jnp.dtype(dtype) == jnp.float64)


# --------------------------------------------------------------------------
# Convolution.


@functools.lru_cache(maxsize=None)
def _conv_grads_fn(kset, stride, padding, in_axes):
  f = lambda k, x, dy: jnp.vdot(layers.conv2d(x, k, stride, padding, kset), dy)
  g = jax.value_and_grad(f, argnums=(0, 1))
  return jax.jit(jax.vmap(g, in_axes=in_axes) if in_axes else g)


def _check_conv(kernel, stride, padding, hw, c, o, workers, dtype, in_axes=(None, 0, 0)):
  with _x64(dtype):
    k_shape = (kernel, kernel, c, o)
    k = _normal(4, ((workers,) if in_axes and in_axes[0] == 0 else ()) + k_shape, dtype)
    lead = (workers,) if in_axes else ()
    x = _normal(3, lead + (2,) + hw + (c,), dtype)
    out_hw = tuple((s + 2 * padding - kernel) // stride + 1 for s in hw)
    dy = _normal(5, lead + (2,) + out_hw + (o,), dtype)
    ref_v, (ref_dk, ref_dx) = _conv_grads_fn("plain", stride, padding, in_axes)(k, x, dy)
    v, (dk, dx) = _conv_grads_fn("cpu", stride, padding, in_axes)(k, x, dy)
    if in_axes:
      assert dk.shape == (workers,) + k_shape  # one weight gradient per worker
    for got, ref in [(v, ref_v), (dk, ref_dk), (dx, ref_dx)]:
      assert got.dtype == dtype and got.shape == ref.shape
      np.testing.assert_allclose(got, ref, **_tol(dtype))
    if in_axes and workers > 1:
      assert not np.allclose(dk[0], dk[1])


# (kernel, stride, padding, input height x width, input channels, output channels)
_CONV_CASES = [
    (5, 1, 2, (7, 7), 1, 3),    # first layer: one channel, shifted-sum forward
    (3, 1, 1, (6, 5), 3, 4),    # first layer: few channels, uneven shape
    (5, 1, 2, (7, 9), 6, 5),    # per-worker forward and input gradient
    (3, 1, 0, (6, 7), 6, 4),    # no padding
    (3, 2, 1, (7, 8), 6, 5),    # strided: gradients phase by phase, uneven phases
    (1, 2, 0, (7, 6), 6, 4),    # 1x1 strided shortcut: empty phases
    (3, 3, 1, (10, 8), 5, 4),   # stride 3
    (1, 1, 1, (5, 5), 6, 3),    # padding >= kernel size: autodiff's input gradient
]


@pytest.mark.parametrize("kernel,stride,padding,hw,c,o", _CONV_CASES)
def test_conv2d_cpu_matches_plain_under_vmap_float32(kernel, stride, padding, hw, c, o):
  _check_conv(kernel, stride, padding, hw, c, o, 3, jnp.float32)


@pytest.mark.parametrize("kernel,stride,padding,hw,c,o", [
    (5, 1, 2, (7, 7), 1, 3), (3, 2, 1, (7, 8), 2, 4), (5, 1, 2, (7, 9), 6, 5),
    (3, 2, 1, (7, 8), 6, 5)])
def test_conv2d_cpu_matches_plain_under_vmap_float64(kernel, stride, padding, hw, c, o):
  # Few input channels take one matmul per kernel offset for the float64 weight gradient.
  _check_conv(kernel, stride, padding, hw, c, o, 3, jnp.float64)


@pytest.mark.parametrize("kernel,stride,padding,hw,c,o", [
    (5, 1, 2, (6, 6), 1, 2), (3, 1, 1, (5, 6), 6, 3), (3, 2, 1, (7, 7), 6, 3)])
def test_conv2d_cpu_matches_plain_past_64_workers(kernel, stride, padding, hw, c, o):
  _check_conv(kernel, stride, padding, hw, c, o, MANY_WORKERS, jnp.float32)


@pytest.mark.parametrize("kernel,stride,padding,hw,c,o", [
    (5, 1, 2, (7, 7), 1, 3), (3, 1, 1, (6, 5), 6, 4), (3, 2, 1, (7, 8), 6, 5),
    (3, 3, 1, (10, 8), 5, 4)])
def test_conv2d_cpu_matches_plain_without_vmap(kernel, stride, padding, hw, c, o):
  _check_conv(kernel, stride, padding, hw, c, o, 1, jnp.float32, in_axes=None)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_cpu_matches_plain_with_per_worker_kernels(stride):
  _check_conv(3, stride, 1, (7, 6), 6, 4, 3, jnp.float32, in_axes=(0, 0, 0))


def test_conv2d_matches_numpy():
  x = np.random.default_rng(40).standard_normal((2, 5, 6, 3))
  k = np.random.default_rng(41).standard_normal((3, 3, 3, 4))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ref = np.zeros((2, 3, 3, 4))  # stride 2
  for i in range(3):
    for j in range(3):
      patch = xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]
      ref[:, i, j] = np.einsum("nhwc,hwco->no", patch, k)
  for kset in ("plain", "cpu"):
    got = layers.conv2d(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.float32), 2, 1, kset)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Max pool.


@pytest.mark.parametrize("hw", [(6, 7), (5, 4)])  # odd sizes check the floor mode
def test_max_pool2_cpu_matches_plain_including_ties(hw):
  # Integer-valued input: many tied maxima, whose cotangent must go to the same element.
  x = jnp.round(_normal(6, (3, 2) + hw + (2,)) * 1.5)
  w = _normal(7, (3, 2, hw[0] // 2, hw[1] // 2, 2))

  def run(kset):
    f = lambda x, w: jnp.vdot(layers.max_pool2(x, kset), w)
    return jax.jit(jax.vmap(jax.value_and_grad(f)))(x, w)

  (v, g), (v_ref, g_ref) = run("cpu"), run("plain")
  assert float(jnp.abs(g_ref).sum()) > 0
  np.testing.assert_array_equal(v, v_ref)
  np.testing.assert_array_equal(g, g_ref)
  pooled = np.asarray(x)[:, :, :hw[0] // 2 * 2, :hw[1] // 2 * 2].reshape(
      3, 2, hw[0] // 2, 2, hw[1] // 2, 2, 2).max(axis=(3, 5))
  np.testing.assert_array_equal(jax.vmap(lambda x: layers.max_pool2(x, "cpu"))(x), pooled)


# --------------------------------------------------------------------------
# BatchNorm.


def _numpy_batch_norm(x, scale, bias, eps=1e-5):
  x = np.asarray(x, np.float64)
  axes = tuple(range(x.ndim - 1))
  mean, var = x.mean(axes), x.var(axes)
  return (x - mean) / np.sqrt(var + eps) * np.asarray(scale) + np.asarray(bias), mean, var


def _reference_bn(x, scale, bias, eps=1e-5):
  # Autodiff of the textbook formula, written here independently of the module.
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  var = jnp.square(x - mean).mean(axes)
  return (x - mean) / jnp.sqrt(var + eps) * scale + bias, mean, var


def _grads_with_stat_cotangents(fn, x, scale, bias, ws, vmapped):
  """Per-worker gradients of a loss that also sends cotangents into the statistics."""
  loss = lambda x, s, b, *w: sum(jnp.vdot(o, wi) for o, wi in zip(fn(x, s, b), w))
  g = jax.value_and_grad(loss, argnums=(0, 1, 2))
  if vmapped:
    g = jax.vmap(g, in_axes=(0, None, None) + (0,) * len(ws))
  return jax.jit(g)(x, scale, bias, *ws)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("kset", ["plain", "cpu"])
def test_batch_norm_train_matches_numpy_and_autodiff(kset, dtype):
  with _x64(dtype):
    x = _normal(10, (3, 4, 5, 5, 6), dtype) * 2.0 + 1.0  # [W, N, H, W, C]
    scale = jnp.linspace(0.5, 2.0, 6, dtype=dtype)
    bias = jnp.linspace(-1.0, 1.0, 6, dtype=dtype)
    ws = [_normal(11, x.shape, dtype), _normal(12, (3, 6), dtype), _normal(13, (3, 6), dtype)]
    outs = jax.jit(jax.vmap(lambda x: layers.batch_norm_train(x, scale, bias, 1e-5, kset)))(x)
    for wkr in range(3):
      for got, ref in zip(outs, _numpy_batch_norm(x[wkr], scale, bias)):
        assert got.dtype == dtype
        np.testing.assert_allclose(got[wkr], ref, **_tol(dtype))
    fn = lambda x, s, b: layers.batch_norm_train(x, s, b, 1e-5, kset)
    got = _grads_with_stat_cotangents(fn, x, scale, bias, ws, True)
    ref = _grads_with_stat_cotangents(_reference_bn, x, scale, bias, ws, True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **_tol(dtype)), got, ref)


def _three_plain_ops(x, scale, bias):
  y, mean, var = _reference_bn(x, scale, bias)
  return nn.max_pool(jax.nn.relu(y), (2, 2), strides=(2, 2)), mean, var


@pytest.mark.parametrize("kset", ["plain", "cpu"])
@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (3, 7, 5, 2)])  # even, and odd (floor mode)
def test_batch_norm_relu_max_pool_matches_the_three_ops(kset, shape):
  # Integer-valued inputs tie inside many windows; a negative scale flips which
  # element is the maximum; cotangents also flow into the returned statistics.
  c = shape[-1]
  x = jnp.round(_normal(12, (3,) + shape) * 2.0)
  scale = jnp.linspace(-1.5, 2.0, c)
  bias = jnp.linspace(-0.5, 0.3, c)
  pooled = (3, shape[0], shape[1] // 2, shape[2] // 2, c)
  ws = [_normal(13, pooled), _normal(14, (3, c)), _normal(15, (3, c))]
  fused = lambda x, s, b: layers.batch_norm_relu_max_pool(x, s, b, 1e-5, kset)
  vm = lambda fn: jax.jit(jax.vmap(fn, in_axes=(0, None, None)))(x, scale, bias)
  for got, ref in zip(vm(fused), vm(_three_plain_ops)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  # A cotangent routed to another element of a tied window would differ by the
  # size of the cotangent itself, far above these tolerances.
  got = _grads_with_stat_cotangents(fused, x, scale, bias, ws, True)
  ref = _grads_with_stat_cotangents(_three_plain_ops, x, scale, bias, ws, True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, ref)


def test_batch_norm_relu_max_pool_cpu_equals_plain_exactly_on_ties():
  # Same expression for the normalised values, so the same pooled values bit
  # for bit, and the same winner of every tied window.
  x = jnp.round(_normal(16, (2, 6, 6, 3)) * 2.0)
  scale, bias = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.0, 0.5, -0.5])
  outs = {k: jax.jit(lambda x, k=k: layers.batch_norm_relu_max_pool(x, scale, bias, 1e-5, k))(x)
          for k in ("plain", "cpu")}
  for a, b in zip(outs["cpu"], outs["plain"]):
    np.testing.assert_array_equal(a, b)


def test_batch_norm_relu_max_pool_float64_under_vmap():
  with jax.enable_x64(True):
    x = _normal(16, (3, 2, 7, 6, 4), jnp.float64)
    scale, bias = jnp.linspace(-1.0, 1.0, 4), jnp.linspace(0.2, -0.2, 4)
    ws = [_normal(17, (3, 2, 3, 3, 4), jnp.float64), _normal(18, (3, 4), jnp.float64),
          _normal(19, (3, 4), jnp.float64)]
    for kset in ("plain", "cpu"):
      fused = lambda x, s, b: layers.batch_norm_relu_max_pool(x, s, b, 1e-5, kset)
      got = _grads_with_stat_cotangents(fused, x, scale, bias, ws, True)
      ref = _grads_with_stat_cotangents(_three_plain_ops, x, scale, bias, ws, True)
      assert jax.tree.leaves(got)[0].dtype == jnp.float64
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13),
                   got, ref)


# --------------------------------------------------------------------------
# Which kernel set runs.


def _conv_eqns(jaxpr) -> list:
  """Every conv_general_dilated equation in ``jaxpr`` and the jaxprs nested in it."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      found.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(inner, "eqns"):
          found += _conv_eqns(inner)
  return found


def _plain_forward(eqn) -> bool:
  """NHWC x HWIO -> NHWC, no dilation, no feature or batch groups."""
  plain = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))
  p = eqn.params
  return (p["dimension_numbers"] == plain and p["feature_group_count"] == 1
          and p["batch_group_count"] == 1 and set(p["lhs_dilation"]) == {1}
          and set(p["rhs_dilation"]) == {1})


def _has_custom_vjp(jaxpr) -> bool:
  return "custom_vjp_call" in str(jaxpr)


def test_primitives_read_the_kernel_set_in_scope_unless_given_one():
  x, k = _normal(20, (2, 6, 6, 6)), _normal(21, (3, 3, 6, 4))
  trace = lambda **kw: jax.make_jaxpr(lambda x, k: layers.conv2d(x, k, 1, 1, **kw))(x, k)
  with kernels.use("plain"):
    assert not _has_custom_vjp(trace())
    assert _has_custom_vjp(trace(kernels="cpu"))
  with kernels.use("cpu"):
    assert _has_custom_vjp(trace())
    assert not _has_custom_vjp(trace(kernels="plain"))
  with pytest.raises(ValueError, match="auto, plain, cpu"):
    layers.conv2d(x, k, 1, 1, "fast")


def test_backward_traced_outside_the_scope_keeps_the_cpu_form():
  # The backward pass is traced after the forward call returns, outside any
  # `use` block: it must still be the cpu form (plain forward convolutions only).
  x, k = _normal(22, (2, 6, 6, 6)), _normal(23, (3, 3, 6, 4))
  with kernels.use("plain"):
    with kernels.use("cpu"):
      y, vjp = jax.vjp(lambda x, k: layers.conv2d(x, k, 2, 1), x, k)
    convs = _conv_eqns(jax.make_jaxpr(vjp)(y).jaxpr)
  assert convs and all(_plain_forward(e) for e in convs)
  with kernels.use("cpu"):
    with kernels.use("plain"):
      y, vjp = jax.vjp(lambda x, k: layers.conv2d(x, k, 2, 1), x, k)
    convs = _conv_eqns(jax.make_jaxpr(vjp)(y).jaxpr)
  assert not all(_plain_forward(e) for e in convs)  # autodiff's transposed convolutions


def _loss_fn(model):
  def loss_fn(params, batch_stats, x, y):
    logits, mut = model.apply({"params": params, "batch_stats": batch_stats}, x,
                              train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), mut
  return loss_fn


def _train_grad_convs(name, kset, workers, shape, batch=2, dtype=jnp.float32):
  """The convolution equations of the training step's vmapped per-worker gradient."""
  model = models.make_model(name, kernels=kset, dtype=dtype)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1,) + shape, dtype), train=False))
  x = jax.ShapeDtypeStruct((workers, batch) + shape, dtype)
  y = jax.ShapeDtypeStruct((workers, batch), jnp.int32)
  f = jax.vmap(jax.value_and_grad(_loss_fn(model), has_aux=True), in_axes=(None, None, 0, 0))
  return _conv_eqns(jax.make_jaxpr(f)(variables["params"], variables["batch_stats"], x, y).jaxpr)


@pytest.mark.parametrize("kset", ["plain", "cpu"])
@pytest.mark.parametrize("workers", [17, 65])
@pytest.mark.parametrize("name,shape", [("simple_mnist", (12, 12, 1)), ("resnet18", (8, 8, 3))])
def test_scan_friendly_rule_matches_the_training_jaxpr(name, shape, workers, kset):
  if jax.default_backend() != "cpu":
    pytest.skip("the rule is about XLA:CPU")
  convs = _train_grad_convs(name, kset, workers, shape)
  assert convs
  assert layers.scan_friendly(kset, workers) == all(_plain_forward(e) for e in convs)


def test_scan_friendly_rule_float64_and_auto():
  if jax.default_backend() != "cpu":
    pytest.skip("the rule is about XLA:CPU")
  with jax.enable_x64(True):
    convs = _train_grad_convs("simple_mnist", "cpu", 3, (12, 12, 1), dtype=jnp.float64)
  assert convs and all(_plain_forward(e) for e in convs)
  assert layers.scan_friendly("cpu", 3) and layers.scan_friendly("auto", 64)
  assert not layers.scan_friendly("auto", 65) and not layers.scan_friendly("plain", 1)


def test_scan_friendly_everywhere_off_cpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for kset in ("auto", "plain", "cpu"):
    for workers in (1, 17, 65, 257):
      assert layers.scan_friendly(kset, workers)
  with pytest.raises(ValueError, match="auto, plain, cpu"):
    layers.scan_friendly("xla", 17)


def test_cpu_convolutions_run_once_per_worker():
  # XLA:CPU spreads ready convolutions over its threads only when more than 8 are
  # ready at once, so the cpu kernels run layer 2's forward convolution and input
  # gradient once per worker (W convolutions of b examples), never once over all
  # W*b examples.
  workers, batch = 3, 4
  shapes = [(e.invars[0].aval.shape, e.invars[1].aval.shape)
            for e in _train_grad_convs("simple_mnist", "cpu", workers, (12, 12, 1), batch)]
  assert not [s for s in shapes if s[0][0] == workers * batch], shapes
  # Layer 2 (16 -> 32 channels): forward with the kernel, input gradient with the
  # flipped kernel's channels swapped; each once per worker, on b examples.
  assert [lhs[0] for lhs, rhs in shapes if rhs == (5, 5, 16, 32)] == [batch] * workers, shapes
  assert [lhs[0] for lhs, rhs in shapes if rhs == (5, 5, 32, 16)] == [batch] * workers, shapes
