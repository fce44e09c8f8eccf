"""Tests for ftjax.models and ftjax.conv: sizes, BatchNorm semantics, and that
every convolution formulation computes the same outputs and per-worker gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftjax import conv as conv_lib
from ftjax import models

IMPLS = sorted(conv_lib.CONV_IMPLS)
FAST_IMPLS = [i for i in IMPLS if i != "xla"]
# im2col is kept only as a benchmark baseline and is slow to compile: its layers
# are checked here, the whole-model comparisons run on the custom-VJP paths.
MODEL_IMPLS = [i for i in FAST_IMPLS if i != "im2col"]


def _init(model, shape, dtype=jnp.float32, seed=0):
  # One compiled program (op-by-op init compiles a sampler per parameter shape).
  init = jax.jit(lambda key: model.init(key, jnp.zeros(shape, dtype), train=False))
  return init(jax.random.key(seed, impl="rbg"))  # threefry compiles ~10x slower here


def _normal(seed, shape, dtype=np.float32):
  # NumPy data: jax.random.normal costs a compile per shape, seconds on CPU.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _labels(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 10, shape), jnp.int32)


def _n_params(variables):
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


def _loss_fn(model):
  def loss_fn(params, batch_stats, x, y):
    logits, mut = model.apply({"params": params, "batch_stats": batch_stats}, x,
                              train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, mut["batch_stats"])
  return loss_fn


def _per_worker_grads(model, variables, x, y):
  f = jax.vmap(jax.value_and_grad(_loss_fn(model), has_aux=True), in_axes=(None, None, 0, 0))
  return jax.jit(f)(variables["params"], variables["batch_stats"], x, y)


# --------------------------------------------------------------------------
# Sizes.


def test_param_counts_match_reference():
  shapes = lambda name, shape: jax.eval_shape(lambda: _init(models.make_model(name), shape))
  mnist = shapes("simple_mnist", (1, 28, 28, 1))
  assert _n_params(mnist) == 29_034
  resnet = shapes("resnet18", (1, 32, 32, 3))
  assert _n_params(resnet) == 11_173_962
  cifar = shapes("simple_cifar10", (1, 32, 32, 3))
  dense = cifar["params"]["Dense_0"]["kernel"]
  assert dense.shape == (32 * 8 * 8, 10)


@pytest.mark.parametrize("name,shape", [
    ("simple_mnist", (3, 8, 8, 1)), ("simple_mnist", (3, 28, 28, 1)),
    ("simple_cifar10", (2, 32, 32, 3)), ("tiny_cnn", (3, 8, 8, 1)), ("mlp", (3, 8, 8, 1)),
])  # resnet18's output is checked in test_resnet18_formulations_agree_at_tiny_batch.
def test_output_shapes_and_collections(name, shape):
  model = models.make_model(name, num_classes=7, conv_impl="xla")
  variables = _init(model, shape)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.ones(shape))
  assert logits.shape == (shape[0], 7)
  assert np.all(np.isfinite(logits))
  assert ("batch_stats" in variables) == (name != "mlp")


# --------------------------------------------------------------------------
# BatchNorm.


def test_batchnorm_train_uses_batch_stats_and_updates_running_stats():
  bn = conv_lib.BatchNorm()
  x = _normal(1, (5, 3, 2, 4)) * 3.0 + 2.0
  variables = bn.init(jax.random.key(0), x, train=True)
  # Initialisation leaves PyTorch's initial running statistics.
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(4))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(4))

  y, mut = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  xn = np.asarray(x, np.float64).reshape(-1, 4)
  expect = (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 4), expect, rtol=1e-4, atol=1e-5)
  # PyTorch: momentum 0.1, and the running variance uses the unbiased estimate.
  np.testing.assert_allclose(mut["batch_stats"]["mean"], 0.1 * xn.mean(0), rtol=1e-5)
  np.testing.assert_allclose(mut["batch_stats"]["var"], 0.9 + 0.1 * xn.var(0, ddof=1),
                             rtol=1e-5)

  # Evaluation normalises with the running statistics, not the batch's.
  stats = mut["batch_stats"]
  y_eval = bn.apply({"params": variables["params"], "batch_stats": stats}, x, train=False)
  expect_eval = (xn - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
  np.testing.assert_allclose(np.asarray(y_eval).reshape(-1, 4), expect_eval, rtol=1e-4,
                             atol=1e-5)


def test_model_train_mode_couples_examples_eval_mode_does_not():
  model = models.make_model("tiny_cnn", conv_impl="xla")
  variables = _init(model, (4, 8, 8, 1))
  x = _normal(2, (4, 8, 8, 1))
  x2 = x.at[3].multiply(5.0)  # changes only the last example
  train = lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  evaluate = lambda x: model.apply(variables, x, train=False)
  assert not np.allclose(train(x)[:3], train(x2)[:3], atol=1e-4)
  np.testing.assert_allclose(evaluate(x)[:3], evaluate(x2)[:3], rtol=1e-6)


# --------------------------------------------------------------------------
# Formulations agree.


@functools.lru_cache(maxsize=None)
def _conv_grads_fn(impl, stride, padding):
  conv = conv_lib.CONV_IMPLS[impl].conv
  f = lambda k, x, dy: jnp.vdot(conv(x, k, stride, padding), dy)
  return jax.jit(jax.vmap(jax.value_and_grad(f, argnums=(0, 1)), in_axes=(None, 0, 0)))


def _conv_grads(impl, k, x, dy, stride, padding):
  return _conv_grads_fn(impl, stride, padding)(k, x, dy)  # compiled once per shape


@pytest.mark.parametrize("impl,kernel,stride,padding,size", [
    (impl, *case) for impl in MODEL_IMPLS for case in [(5, 1, 2, 7), (3, 2, 1, 7), (1, 2, 0, 6)]
] + [("im2col", 3, 2, 1, 7)])
def test_conv_formulations_match_xla_under_vmap(impl, kernel, stride, padding, size):
  x = _normal(3, (3, 2, size, size, 3))  # [W, b, H, W, C]
  k = _normal(4, (kernel, kernel, 3, 5))
  out_size = (size + 2 * padding - kernel) // stride + 1
  dy = _normal(5, (3, 2, out_size, out_size, 5))

  (v_ref, (dk_ref, dx_ref)) = _conv_grads("xla", k, x, dy, stride, padding)
  (v, (dk, dx)) = _conv_grads(impl, k, x, dy, stride, padding)
  assert dk.shape == (3,) + k.shape  # one weight gradient per worker
  np.testing.assert_allclose(v, v_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", sorted({  # one case per distinct max-pool function
    conv_lib.CONV_IMPLS[i].max_pool: i for i in FAST_IMPLS}.values()))
def test_max_pool_gradient_breaks_ties_like_xla(impl):
  # Integer-valued input: many tied maxima; odd width checks the floor mode.
  x = jnp.round(_normal(6, (2, 3, 6, 7, 2)) * 1.5)
  w = _normal(7, (3, 3, 3, 2))

  def grad(pool):
    return jax.jit(jax.vmap(jax.grad(lambda x: jnp.vdot(pool(x), w))))(x)

  ref = grad(conv_lib.CONV_IMPLS["xla"].max_pool)
  got = grad(conv_lib.CONV_IMPLS[impl].max_pool)
  assert float(jnp.abs(ref).sum()) > 0
  np.testing.assert_array_equal(got, ref)


_REFERENCE = {}


def _reference_grads(name, dtype, shape):
  """The plain-vmap ("xla") results, computed once per model, dtype and shape."""
  key = (name, jnp.dtype(dtype).name, shape)
  if key not in _REFERENCE:
    model, variables, x, y = _model_case(name, dtype, "xla", shape)
    _REFERENCE[key] = (variables, x, y, _per_worker_grads(model, variables, x, y))
  return _REFERENCE[key]


def _model_case(name, dtype, impl, shape, workers=3, batch=4):
  model = models.make_model(name, dtype=dtype, conv_impl=impl)
  variables = _init(model, (1,) + shape, dtype)
  x = _normal(8, (workers, batch) + shape, dtype)
  y = _labels(9, (workers, batch))
  return model, variables, x, y


@pytest.mark.parametrize("impl", MODEL_IMPLS)
@pytest.mark.parametrize("name,shape", [
    ("simple_mnist", (10, 10, 1)), ("tiny_cnn", (8, 8, 1))])
def test_per_worker_gradients_match_xla_float32(impl, name, shape):
  variables, x, y, ref = _reference_grads(name, jnp.float32, shape)
  (loss_ref, (logits_ref, stats_ref)), g_ref = ref
  fast = models.make_model(name, conv_impl=impl)
  # Same variables: the formulation must not change the parameter tree.
  assert jax.tree.structure(_init(fast, (1,) + shape)) == jax.tree.structure(variables)
  (loss, (logits, stats)), g = _per_worker_grads(fast, variables, x, y)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  np.testing.assert_allclose(logits, logits_ref, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               stats, stats_ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5), g, g_ref)
  # Gradients really are per worker.
  leaf = jax.tree.leaves(g)[0]
  assert leaf.shape[0] == 3 and not np.allclose(leaf[0], leaf[1])


@pytest.mark.parametrize("impl_name", ["auto", "shifted"])
def test_per_worker_gradients_match_xla_float64(impl_name):
  impl = models.resolve_conv_impl(impl_name)
  with jax.enable_x64(True):
    variables, x, y, ((loss_ref, _), g_ref) = _reference_grads(
        "simple_mnist", jnp.float64, (10, 10, 1))
    assert jax.tree.leaves(variables)[0].dtype == jnp.float64
    fast = models.make_model("simple_mnist", dtype=jnp.float64, conv_impl=impl)
    (loss, _), g = _per_worker_grads(fast, variables, x, y)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-13)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13),
                 g, g_ref)


def test_vmapped_gradient_equals_each_workers_own_gradient():
  impl = models.resolve_conv_impl("auto")
  model, variables, x, y = _model_case("simple_mnist", jnp.float32, impl, (8, 8, 1))
  _, g = _per_worker_grads(model, variables, x, y)
  one_worker = jax.jit(jax.value_and_grad(_loss_fn(model), has_aux=True))
  for wkr in range(x.shape[0]):
    _, gw = one_worker(variables["params"], variables["batch_stats"], x[wkr], y[wkr])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[wkr], b, rtol=1e-4, atol=1e-6),
                 g, gw)


def test_resnet18_output_shape():
  model = models.make_model("resnet18", num_classes=7)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: _init(model, (1, 32, 32, 3)))
  logits, mut = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
  assert logits.shape == (2, 7)
  assert jax.tree.structure(mut["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


# --------------------------------------------------------------------------
# Names and bad input.


def test_unknown_names_and_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="simple_mnist.*resnet18"):
    models.make_model("lenet")
  with pytest.raises(ValueError, match="auto.*xla.*patches"):
    models.make_model("simple_mnist", conv_impl="cudnn")
  with pytest.raises(ValueError, match="auto.*xla"):
    models.resolve_conv_impl("fast")
  with pytest.raises(ValueError, match="float32 or float64"):
    models.make_model("mlp", dtype=jnp.int32)
  with pytest.raises(ValueError, match="num_classes"):
    models.make_model("mlp", num_classes=1)
  if not jax.config.read("jax_enable_x64"):
    with pytest.raises(ValueError, match="jax_enable_x64"):
      models.make_model("mlp", dtype=jnp.float64)


def test_auto_resolves_by_backend():
  for name in conv_lib.CONV_IMPLS:
    assert models.resolve_conv_impl(name) == name
  auto = models.resolve_conv_impl("auto")
  assert auto in conv_lib.CONV_IMPLS
  if jax.default_backend() == "cpu":
    assert auto != "xla"  # the plain formulation is the slow one on CPU
  else:
    assert auto == "xla"


def test_batch_norm_custom_gradient_matches_autodiff():
  x = _normal(10, (3, 4, 5, 6)) * 2.0 + 1.0
  scale = jnp.linspace(0.5, 2.0, 6)
  bias = jnp.linspace(-1.0, 1.0, 6)
  w = [_normal(11 + i, s) for i, s in enumerate([x.shape, (6,), (6,)])]

  def reference(x, scale, bias):
    mean = x.mean((0, 1, 2))
    var = jnp.square(x - mean).mean((0, 1, 2))
    return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias, mean, var

  def loss(fn):  # also sends cotangents into the returned statistics
    return lambda *a: sum(jnp.vdot(o, wi) for o, wi in zip(fn(*a), w))

  custom = lambda x, s, b: conv_lib.batch_norm_train(x, s, b, 1e-5)
  grads = lambda fn: jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(x, scale, bias)
  for got, ref in zip(grads(custom), grads(reference)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_many_workers_fall_back_to_grouped_weight_gradient():
  # Past conv._MAX_UNROLLED_WORKERS the custom batching rule stops unrolling;
  # the gradients must still equal the plain XLA path.
  workers = conv_lib._MAX_UNROLLED_WORKERS + 6
  x = jax.random.normal(jax.random.key(1), (workers, 4, 8, 8, 1))
  y = jnp.zeros((workers, 4), jnp.int32)
  grads = []
  for impl in ("unrolled", "xla"):
    model = models.make_model("tiny_cnn", conv_impl=impl)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)

    def loss(params, stats, xb, yb):
      logits, _ = model.apply({"params": params, "batch_stats": stats}, xb, train=True,
                              mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    grads.append(jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, None, 0, 0)))(
        variables["params"], variables["batch_stats"], x, y))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (3, 7, 5, 2)])  # even, and odd (floor mode)
def test_fused_batch_norm_relu_max_pool_matches_separate_ops(shape):
  # Integer-valued inputs tie inside many windows; a negative scale flips which
  # element is the maximum; cotangents also flow into the returned statistics.
  c = shape[-1]
  x = jnp.round(_normal(12, shape) * 2.0)
  scale = jnp.linspace(-1.5, 2.0, c)
  bias = jnp.linspace(-0.5, 0.3, c)
  pooled_shape = (shape[0], shape[1] // 2, shape[2] // 2, c)
  w = [_normal(13, pooled_shape), _normal(14, (c,)), _normal(15, (c,))]

  def separate(x, s, b):
    y, mean, var = conv_lib.batch_norm_train(x, s, b, 1e-5)
    return conv_lib.CONV_IMPLS["xla"].max_pool(jax.nn.relu(y)), mean, var

  fused = lambda x, s, b: conv_lib.batch_norm_relu_max_pool(x, s, b, 1e-5)
  for got, ref in zip(jax.jit(fused)(x, scale, bias), jax.jit(separate)(x, scale, bias)):
    np.testing.assert_array_equal(got, ref)

  def grads(fn):
    loss = lambda *a: sum(jnp.vdot(o, wi) for o, wi in zip(fn(*a), w))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)

  # A cotangent routed to another element of a tied window would differ by
  # the size of the cotangent itself, far above these tolerances.
  for g, r in zip(grads(fused), grads(separate)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_fused_batch_norm_relu_max_pool_float64_and_vmap():
  with jax.enable_x64(True):
    x = _normal(16, (3, 2, 6, 6, 4), jnp.float64)
    scale, bias = jnp.linspace(-1.0, 1.0, 4), jnp.linspace(0.2, -0.2, 4)
    r = _normal(17, (3, 2, 3, 3, 4), jnp.float64)

    def loss(pool_fn):
      return lambda x, s, b: jnp.vdot(pool_fn(x, s, b), r[0])

    fused = lambda x, s, b: conv_lib.batch_norm_relu_max_pool(x, s, b, 1e-5)[0]
    separate = lambda x, s, b: conv_lib.CONV_IMPLS["xla"].max_pool(
        jax.nn.relu(conv_lib.batch_norm_train(x, s, b, 1e-5)[0]))
    per_worker = lambda fn: jax.jit(jax.vmap(jax.grad(loss(fn), argnums=(0, 1, 2)),
                                             in_axes=(0, None, None)))(x, scale, bias)
    for g, r_ in zip(per_worker(fused), per_worker(separate)):
      assert g.dtype == jnp.float64
      np.testing.assert_allclose(g, r_, rtol=1e-11, atol=1e-13)


def _unrolled_grad_convs(dtype, workers=3, batch=4):
  """The convolution equations of the CPU path's vmapped per-worker gradient."""
  with jax.enable_x64(dtype == jnp.float64):
    model, variables, x, y = _model_case("simple_mnist", dtype, "unrolled", (12, 12, 1),
                                         workers=workers, batch=batch)
    f = jax.vmap(jax.value_and_grad(_loss_fn(model), has_aux=True), in_axes=(None, None, 0, 0))
    jaxpr = jax.make_jaxpr(f)(variables["params"], variables["batch_stats"], x, y).jaxpr
  return conv_lib.conv_eqns(jaxpr)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_unrolled_gradient_uses_only_plain_forward_convolutions(dtype):
  # Inside a lax.scan/while body XLA:CPU runs a convolution on its fast library
  # path only when it already is a plain NHWC x HWIO forward convolution; autodiff's
  # transposed convolutions fell back to a generic one there, ~50x slower. The CPU
  # path therefore writes every convolution of the per-worker gradient (forward,
  # input gradient, per-worker weight gradients) in that form.
  plain = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))
  convs = _unrolled_grad_convs(dtype)
  # Layer 2's forward, input gradient and one weight gradient per worker (3), and
  # layer 1's weight gradients in float32 (float64 takes shifted matmuls there).
  assert len(convs) >= 5, len(convs)
  for eqn in convs:
    p = eqn.params
    assert p["dimension_numbers"] == plain, p["dimension_numbers"]
    assert p["feature_group_count"] == 1 and p["batch_group_count"] == 1
    assert set(p["lhs_dilation"]) == {1} and set(p["rhs_dilation"]) == {1}


def test_unrolled_runs_one_convolution_per_worker():
  # XLA:CPU spreads ready convolutions over its threads only when more than 8 are
  # ready at once, so the CPU path runs layer 2's forward convolution and input
  # gradient once per worker (W convolutions of b examples), never once over all
  # W*b examples.
  workers, batch = 3, 4
  shapes = [(e.invars[0].aval.shape, e.invars[1].aval.shape)
            for e in _unrolled_grad_convs(jnp.float32, workers, batch)]
  assert not [s for s in shapes if s[0][0] == workers * batch], shapes
  # Layer 2 (16 -> 32 channels): forward with the kernel, input gradient with the
  # flipped kernel's channels swapped; each once per worker, on b examples.
  assert [lhs[0] for lhs, rhs in shapes if rhs == (5, 5, 16, 32)] == [batch] * workers, shapes
  assert [lhs[0] for lhs, rhs in shapes if rhs == (5, 5, 32, 16)] == [batch] * workers, shapes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("kind,stride,padding", [
    ("forward", 1, 2), ("forward", 2, 1), ("input_grad", 1, 2), ("input_grad", 1, 0)])
def test_per_worker_convolutions_equal_one_merged_convolution(dtype, kind, stride, padding):
  with jax.enable_x64(dtype == jnp.float64):
    x = _normal(30, (3, 2, 9, 9, 6), dtype)
    k = _normal(31, (3, 3, 6, 4) if kind == "forward" else (3, 3, 4, 6), dtype)
    ks = _normal(32, (3,) + k.shape, dtype)
    per_worker = conv_lib._per_worker_conv(kind, stride, padding)
    if kind == "forward":
      merged = lambda x, k: conv_lib._xla_conv(x, k, stride, padding)
    else:
      merged = lambda x, k: conv_lib._canonical_input_grad(x, k, padding)
    for in_axes, args in [((0, None), (x, k)), ((0, 0), (x, ks)), ((None, 0), (x[0], ks))]:
      got = jax.jit(jax.vmap(per_worker, in_axes=in_axes))(*args)
      ref = jax.jit(jax.vmap(merged, in_axes=in_axes))(*args)
      assert got.dtype == dtype and got.shape == ref.shape
      tol = dict(rtol=1e-12, atol=1e-12) if dtype == jnp.float64 else dict(rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(got, ref, **tol)
  with pytest.raises(ValueError, match="per-worker"):
    conv_lib._per_worker_conv("input_grad", 2, 1)


def test_unrolled_gradients_in_a_scan_match_outside():
  # The same per-worker gradients whether the step runs on its own or in a scan body.
  model, variables, x, y = _model_case("simple_mnist", jnp.float32, "unrolled", (12, 12, 1))
  f = jax.vmap(jax.grad(lambda *a: _loss_fn(model)(*a)[0]), in_axes=(None, None, 0, 0))
  args = (variables["params"], variables["batch_stats"], x, y)
  alone = jax.jit(f)(*args)
  scanned = jax.jit(lambda *a: jax.lax.scan(lambda c, _: (c, f(*a)), 0, None, length=2)[1])(*args)
  for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(scanned)):
    np.testing.assert_allclose(b[0], a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b[1], a, rtol=1e-5, atol=1e-6)


def test_scan_friendly_tells_plain_from_transposed_convolutions():
  x = _normal(20, (2, 6, 6, 3))
  k = _normal(21, (3, 3, 3, 4))

  def grads(impl, stride):
    conv = conv_lib.CONV_IMPLS[impl].conv
    loss = lambda x, k: jnp.sum(conv(x, k, stride, 1) ** 2)
    return jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, k).jaxpr

  assert conv_lib.scan_friendly(jax.make_jaxpr(lambda x, k: conv_lib._xla_conv(x, k, 1, 1))(
      x, k).jaxpr)
  assert conv_lib.scan_friendly(grads("unrolled", 1))
  assert conv_lib.scan_friendly(grads("unrolled", 2))      # strided: one convolution per phase
  assert not conv_lib.scan_friendly(grads("xla", 1))       # autodiff's transposed convolutions
  assert not conv_lib.scan_friendly(grads("xla", 2))


@pytest.mark.parametrize("kernel,stride,padding,size", [
    (3, 2, 1, 8), (3, 2, 1, 7), (1, 2, 0, 7), (5, 2, 2, 9), (3, 3, 1, 10), (7, 2, 3, 12)])
def test_strided_gradients_by_phase_match_autodiff(kernel, stride, padding, size):
  # Odd sizes leave input rows past the last window (zero gradient); a 1x1 kernel
  # with stride 2 has empty phases; stride 3 and a 7x7 kernel have uneven ones.
  x = _normal(30, (2, size, size, 3))
  k = _normal(31, (kernel, kernel, 3, 4))
  y, vjp = jax.vjp(lambda x, k: conv_lib._xla_conv(x, k, stride, padding), x, k)
  dy = _normal(32, y.shape)
  dx_ref, dk_ref = vjp(dy)
  dx = conv_lib._strided_input_grad(dy, k, stride, padding, (size, size))
  dk = conv_lib._strided_weight_grad(x, dy, k.shape, stride, padding)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-5)
