"""Tests for ftjax.models: sizes, variable trees, BatchNorm semantics, and that the
plain and cpu kernel sets give the same outputs and per-worker gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftjax import kernels
from ftjax import models


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
    return loss, (logits, mut.get("batch_stats", {}))
  return loss_fn


def _per_worker_grads(model, variables, x, y):
  f = jax.vmap(jax.value_and_grad(_loss_fn(model), has_aux=True), in_axes=(None, None, 0, 0))
  return jax.jit(f)(variables["params"], variables.get("batch_stats", {}), x, y)


# --------------------------------------------------------------------------
# Sizes and variable trees.


def test_param_counts_match_reference():
  shapes = lambda name, shape: jax.eval_shape(lambda: _init(models.make_model(name), shape))
  mnist = shapes("simple_mnist", (1, 28, 28, 1))
  assert _n_params(mnist) == 29_034
  resnet = shapes("resnet18", (1, 32, 32, 3))
  assert _n_params(resnet) == 11_173_962
  cifar = shapes("simple_cifar10", (1, 32, 32, 3))
  dense = cifar["params"]["Dense_0"]["kernel"]
  assert dense.shape == (32 * 8 * 8, 10)


def test_variable_trees_name_the_layers():
  mnist = jax.eval_shape(lambda: _init(models.make_model("simple_mnist"), (1, 28, 28, 1)))
  assert sorted(mnist["params"]) == ["BatchNorm_0", "BatchNorm_1", "Conv_0", "Conv_1",
                                     "Dense_0"]
  assert sorted(mnist["batch_stats"]) == ["BatchNorm_0", "BatchNorm_1"]
  assert mnist["params"]["Conv_1"]["kernel"].shape == (5, 5, 16, 32)
  assert sorted(mnist["params"]["BatchNorm_1"]) == ["bias", "scale"]
  assert sorted(mnist["batch_stats"]["BatchNorm_1"]) == ["mean", "var"]
  resnet = jax.eval_shape(lambda: _init(models.make_model("resnet18"), (1, 32, 32, 3)))
  assert sorted(resnet["params"]["BasicBlock_2"]) == [
      "BatchNorm_0", "BatchNorm_1", "BatchNorm_2", "Conv_0", "Conv_1", "Conv_2"]
  assert resnet["params"]["BasicBlock_2"]["Conv_2"]["kernel"].shape == (1, 1, 64, 128)
  assert sorted(resnet["params"]["BasicBlock_1"]) == [
      "BatchNorm_0", "BatchNorm_1", "Conv_0", "Conv_1"]
  for kset in ("plain", "cpu"):  # the kernel set never changes the tree
    tree = jax.eval_shape(lambda: _init(models.make_model("simple_mnist", kernels=kset),
                                        (1, 28, 28, 1)))
    assert jax.tree.structure(tree) == jax.tree.structure(mnist)


@pytest.mark.parametrize("name,shape", [
    ("simple_mnist", (3, 8, 8, 1)), ("simple_mnist", (3, 28, 28, 1)),
    ("simple_cifar10", (2, 32, 32, 3)), ("tiny_cnn", (3, 8, 8, 1)), ("mlp", (3, 8, 8, 1)),
])  # resnet18's output is checked in test_resnet18_kernel_sets_agree.
def test_output_shapes_and_collections(name, shape):
  model = models.make_model(name, num_classes=7, kernels="plain")
  variables = _init(model, shape)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.ones(shape))
  assert logits.shape == (shape[0], 7)
  assert np.all(np.isfinite(logits))
  assert ("batch_stats" in variables) == (name != "mlp")


# --------------------------------------------------------------------------
# BatchNorm.


@pytest.mark.parametrize("kset", ["plain", "cpu"])
def test_batchnorm_train_uses_batch_stats_and_updates_running_stats(kset):
  bn = models.BatchNorm(kernels=kset)
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


@pytest.mark.parametrize("kset", ["plain", "cpu"])
def test_batchnorm_relu_max_pool_block_is_the_three_layers(kset):
  # The block against BatchNorm, ReLU and flax's max pool applied one after the
  # other, in training (values and running statistics) and in evaluation.
  x = jnp.round(_normal(2, (4, 7, 6, 3)) * 2.0) + 1.0  # ties, odd height
  block = models.BatchNormReLUMaxPool(kernels=kset)
  bn = models.BatchNorm(kernels="plain")
  variables = block.init(jax.random.key(0), x, train=True)
  variables = {"params": {"scale": jnp.array([1.0, -2.0, 0.5]),
                          "bias": jnp.array([0.1, 0.0, -0.3])},
               "batch_stats": variables["batch_stats"]}
  pool = lambda y: nn.max_pool(jax.nn.relu(y), (2, 2), strides=(2, 2))
  got, got_mut = block.apply(variables, x, train=True, mutable=["batch_stats"])
  ref, ref_mut = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(got, pool(ref), rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got_mut, ref_mut)
  stats = {"params": variables["params"], "batch_stats": ref_mut["batch_stats"]}
  np.testing.assert_allclose(block.apply(stats, x, train=False),
                             pool(bn.apply(stats, x, train=False)), rtol=1e-6, atol=1e-6)


def test_model_train_mode_couples_examples_eval_mode_does_not():
  model = models.make_model("tiny_cnn", kernels="plain")
  variables = _init(model, (4, 8, 8, 1))
  x = _normal(2, (4, 8, 8, 1))
  x2 = x.at[3].multiply(5.0)  # changes only the last example
  train = lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  evaluate = lambda x: model.apply(variables, x, train=False)
  assert not np.allclose(train(x)[:3], train(x2)[:3], atol=1e-4)
  np.testing.assert_allclose(evaluate(x)[:3], evaluate(x2)[:3], rtol=1e-6)


# --------------------------------------------------------------------------
# Kernel sets agree.


_REFERENCE = {}


def _reference_grads(name, dtype, shape, workers=3):
  """The plain kernels' results, computed once per model, dtype, shape and W."""
  key = (name, jnp.dtype(dtype).name, shape, workers)
  if key not in _REFERENCE:
    model, variables, x, y = _model_case(name, dtype, "plain", shape, workers)
    _REFERENCE[key] = (variables, x, y, _per_worker_grads(model, variables, x, y))
  return _REFERENCE[key]


def _model_case(name, dtype, kset, shape, workers=3, batch=4):
  model = models.make_model(name, dtype=dtype, kernels=kset)
  variables = _init(model, (1,) + shape, dtype)
  x = _normal(8, (workers, batch) + shape, dtype)
  y = _labels(9, (workers, batch))
  return model, variables, x, y


@pytest.mark.parametrize("name,shape,workers", [
    ("simple_mnist", (10, 10, 1), 3), ("simple_cifar10", (8, 8, 3), 3),
    ("tiny_cnn", (8, 8, 1), 3), ("tiny_cnn", (8, 8, 1), 70),  # 70: past 64, the fallback
    ("cnn_mnist", (16, 16, 1), 3), ("resnet20", (8, 8, 3), 3)])
@pytest.mark.slow
def test_per_worker_gradients_cpu_match_plain_float32(name, shape, workers):
  variables, x, y, ref = _reference_grads(name, jnp.float32, shape, workers)
  (loss_ref, (logits_ref, stats_ref)), g_ref = ref
  fast = models.make_model(name, kernels="cpu")
  (loss, (logits, stats)), g = _per_worker_grads(fast, variables, x, y)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  np.testing.assert_allclose(logits, logits_ref, rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               stats, stats_ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5), g, g_ref)
  # Gradients really are per worker.
  leaf = jax.tree.leaves(g)[0]
  assert leaf.shape[0] == workers and not np.allclose(leaf[0], leaf[1])


@pytest.mark.slow
def test_per_worker_gradients_cpu_match_plain_float64():
  with jax.enable_x64(True):
    variables, x, y, ((loss_ref, _), g_ref) = _reference_grads(
        "simple_mnist", jnp.float64, (10, 10, 1))
    assert jax.tree.leaves(variables)[0].dtype == jnp.float64
    fast = models.make_model("simple_mnist", dtype=jnp.float64, kernels="cpu")
    (loss, _), g = _per_worker_grads(fast, variables, x, y)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-13)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13),
                 g, g_ref)


@pytest.mark.slow
def test_resnet18_kernel_sets_agree():
  # Tiny inputs keep the compile short; every layer kind (stride-2 3x3, 1x1
  # shortcut, BatchNorm then ReLU) is on the path. In float64: through twenty
  # layers, and BatchNorm over a handful of values in the last stages, float32
  # rounding alone moves a few gradient entries by 1e-4 of the largest.
  with jax.enable_x64(True):
    variables, x, y, ((loss_ref, (logits_ref, _)), g_ref) = _reference_grads(
        "resnet18", jnp.float64, (8, 8, 3), workers=2)
    assert logits_ref.shape == (2, 4, 10)
    fast = models.make_model("resnet18", dtype=jnp.float64, kernels="cpu")
    (loss, (logits, _)), g = _per_worker_grads(fast, variables, x, y)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-12)
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      assert a.dtype == jnp.float64
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11 * float(np.abs(b).max()))


@pytest.mark.slow
def test_vmapped_gradient_equals_each_workers_own_gradient():
  model, variables, x, y = _model_case("simple_mnist", jnp.float32, "auto", (8, 8, 1))
  _, g = _per_worker_grads(model, variables, x, y)
  one_worker = jax.jit(jax.value_and_grad(_loss_fn(model), has_aux=True))
  for wkr in range(x.shape[0]):
    _, gw = one_worker(variables["params"], variables["batch_stats"], x[wkr], y[wkr])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[wkr], b, rtol=1e-4, atol=1e-6),
                 g, gw)


@pytest.mark.slow
def test_cpu_gradients_in_a_scan_match_outside():
  # The same per-worker gradients whether the step runs on its own or in a scan body.
  model, variables, x, y = _model_case("simple_mnist", jnp.float32, "cpu", (12, 12, 1))
  f = jax.vmap(jax.grad(lambda *a: _loss_fn(model)(*a)[0]), in_axes=(None, None, 0, 0))
  args = (variables["params"], variables["batch_stats"], x, y)
  alone = jax.jit(f)(*args)
  scanned = jax.jit(lambda *a: jax.lax.scan(lambda c, _: (c, f(*a)), 0, None, length=2)[1])(*args)
  for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(scanned)):
    np.testing.assert_allclose(b[0], a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b[1], a, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_auto_is_the_backends_kernel_set():
  def trace(kset):
    model, variables, x, y = _model_case("tiny_cnn", jnp.float32, kset, (8, 8, 1))
    f = jax.vmap(jax.grad(lambda *a: _loss_fn(model)(*a)[0]), in_axes=(None, None, 0, 0))
    return str(jax.make_jaxpr(f)(variables["params"], variables["batch_stats"], x, y))

  assert models.make_model("tiny_cnn").layers.kernels == "auto"
  backend_set = "cpu" if jax.default_backend() == "cpu" else "plain"
  cpu, plain = trace("cpu"), trace("plain")
  assert cpu != plain
  assert trace("auto") == (cpu if backend_set == "cpu" else plain)
  # The model's own field wins over a kernel set in scope.
  with kernels.use("plain"):
    assert trace("cpu") == cpu
  with kernels.use("cpu"):
    assert trace("plain") == plain


# --------------------------------------------------------------------------
# Names and bad input.


def test_unknown_names_and_bad_arguments_are_refused():
  assert set(models.MODELS) == {"simple_mnist", "simple_cifar10", "resnet18", "tiny_cnn", "mlp",
                                "resnet20", "cnn_mnist", "torch_mnist", "fc_mnist", "blades_mlp",
                                "logreg"}
  with pytest.raises(ValueError, match="simple_mnist.*resnet18"):
    models.make_model("lenet")
  with pytest.raises(ValueError, match="auto, plain, cpu"):
    models.make_model("simple_mnist", kernels="xla")
  with pytest.raises(ValueError, match="float32 or float64"):
    models.make_model("mlp", dtype=jnp.int32)
  with pytest.raises(ValueError, match="num_classes"):
    models.make_model("mlp", num_classes=1)
  if not jax.config.read("jax_enable_x64"):
    with pytest.raises(ValueError, match="jax_enable_x64"):
      models.make_model("mlp", dtype=jnp.float64)


# --------------------------------------------------------------------------
# The peers' networks: parameter counts from their layer shapes, forward passes.


def _conv(k, cin, cout, bias=True):
  return k * k * cin * cout + (cout if bias else 0)


def _dense(nin, nout):
  return nin * nout + nout


def _bn(c):
  return 2 * c  # scale and bias (the running statistics are not parameters)


def _resnet20_option_a():
  """He et al.'s CIFAR ResNet-20, counted block by block."""
  total = _conv(3, 3, 16, bias=False) + _bn(16)
  cin = 16
  for width in (16, 32, 64):
    for _ in range(3):
      total += _conv(3, cin, width, False) + _bn(width) + _conv(3, width, width, False) + _bn(width)
      cin = width  # option A: the shortcut has no parameters
  return total + _dense(64, 10)


@pytest.mark.parametrize("name,shape,count", [
    # ByzFL's cnn_mnist: two unpadded 5x5 convs, 28 -> 24 -> 12 -> 8 -> 4, so 50*4*4 = 800 inputs.
    ("cnn_mnist", (1, 28, 28, 1), _conv(5, 1, 20) + _conv(5, 20, 50) + _dense(800, 500)
     + _dense(500, 10)),
    # PyTorch's MNIST example: 28 -> 26 -> 24 -> 12 after the pool, 64*12*12 = 9216 inputs.
    ("torch_mnist", (1, 28, 28, 1), _conv(3, 1, 32) + _conv(3, 32, 64) + _dense(9216, 128)
     + _dense(128, 10)),
    ("fc_mnist", (1, 28, 28, 1), _dense(784, 100) + _dense(100, 10)),
    ("blades_mlp", (1, 28, 28, 1), _dense(784, 128) + _dense(128, 256) + _dense(256, 10)),
    ("logreg", (1, 28, 28, 1), _dense(784, 10)),
    ("resnet20", (1, 32, 32, 3), _resnet20_option_a()),
    # The reference's network, 28 -> 14 -> 7 (padded convs); on 32x32x3, 32 -> 16 -> 8.
    ("simple_mnist", (1, 28, 28, 1), _conv(5, 1, 16) + _bn(16) + _conv(5, 16, 32) + _bn(32)
     + _dense(32 * 7 * 7, 10)),
    ("simple_cifar10", (1, 32, 32, 3), _conv(5, 3, 16) + _bn(16) + _conv(5, 16, 32) + _bn(32)
     + _dense(32 * 8 * 8, 10)),
    ("tiny_cnn", (1, 8, 8, 1), _conv(3, 1, 4) + _bn(4) + _dense(4 * 4 * 4, 10)),
    ("mlp", (1, 8, 8, 1), _dense(64, 32) + _dense(32, 10)),
])
def test_models_have_their_published_parameter_counts(name, shape, count):
  published = {"cnn_mnist": 431_080, "torch_mnist": 1_199_882, "resnet20": 269_722,
               "simple_mnist": 29_034}
  assert count == published.get(name, count)  # the hand count is the published one
  variables = jax.eval_shape(lambda: _init(models.make_model(name), shape))
  assert _n_params(variables) == count


@pytest.mark.parametrize("name,shape", [
    ("cnn_mnist", (2, 16, 16, 1)), ("torch_mnist", (2, 8, 8, 1)), ("fc_mnist", (2, 8, 8, 1)),
    ("blades_mlp", (2, 8, 8, 1)), ("logreg", (2, 8, 8, 1)), ("resnet20", (2, 8, 8, 3)),
])
def test_peer_models_forward_in_both_modes(name, shape):
  model = models.make_model(name, num_classes=7, kernels="plain")
  variables = _init(model, shape)
  x = _normal(0, shape)
  logits = model.apply(variables, x, train=False)
  assert logits.shape == (shape[0], 7) and np.all(np.isfinite(logits))
  trained, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(1)})
  assert trained.shape == (shape[0], 7)
  assert ("batch_stats" in variables) == (name == "resnet20")


def test_cnn_mnist_is_byzfls_layer_sequence():
  """The logits of a hand-written NumPy forward pass of ByzFL's network (float64)."""
  with jax.enable_x64(True):
    model = models.make_model("cnn_mnist", dtype=jnp.float64, kernels="plain")
    x = _normal(3, (2, 16, 16, 1), np.float64)
    variables = _init(model, x.shape, jnp.float64)
    got = np.asarray(model.apply(variables, x, train=False))
  p = jax.tree.map(np.asarray, variables["params"])

  def conv(a, w, b):  # valid 2-D convolution, NHWC with HWIO weights
    k = w.shape[0]
    out = np.zeros((a.shape[0], a.shape[1] - k + 1, a.shape[2] - k + 1, w.shape[3]))
    for i in range(out.shape[1]):
      for j in range(out.shape[2]):
        out[:, i, j] = np.einsum("nhwc,hwco->no", a[:, i:i + k, j:j + k], w)
    return out + b

  def pool(a):
    n, h, w, c = a.shape
    return a[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max((2, 4))

  a = pool(np.maximum(conv(np.asarray(x), p["Conv_0"]["kernel"], p["Conv_0"]["bias"]), 0))
  a = pool(np.maximum(conv(a, p["Conv_1"]["kernel"], p["Conv_1"]["bias"]), 0))
  a = a.transpose(0, 3, 1, 2).reshape(2, -1)  # PyTorch's NCHW flatten
  a = np.maximum(a @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
  np.testing.assert_allclose(got, a @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"],
                             rtol=1e-10, atol=1e-12)


def test_resnet20_option_a_shortcut_subsamples_and_pads_channels():
  block = models.BasicBlock(8, stride=2, shortcut="pad", layers=models.Layers(kernels="plain"))
  x = _normal(4, (1, 6, 6, 4))
  variables = _init(block, x.shape)
  zeroed = jax.tree.map(jnp.zeros_like, variables["params"])  # the residual branch gives 0
  out = block.apply({"params": zeroed, "batch_stats": variables["batch_stats"]}, x, train=False)
  want = np.zeros((1, 3, 3, 8), np.float32)
  want[..., 2:6] = np.asarray(x)[:, ::2, ::2, :]
  np.testing.assert_allclose(out, np.maximum(want, 0), rtol=0, atol=1e-6)
  assert "Conv_2" not in variables["params"]  # no projection


def test_dropout_follows_its_key_in_training_only():
  model = models.make_model("blades_mlp", kernels="plain")
  x = _normal(5, (4, 8, 8, 1))
  variables = _init(model, x.shape)
  run = lambda key: model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(key)})
  assert np.array_equal(run(1), run(1))
  assert not np.allclose(run(1), run(2))
  evaluated = model.apply(variables, x, train=False)  # no key needed, deterministic
  np.testing.assert_array_equal(evaluated, model.apply(variables, x, train=False))


def test_a_model_too_large_for_the_images_is_refused_at_build():
  from ftjax import train  # pylint: disable=import-outside-toplevel
  from tests.test_train import tiny_config  # pylint: disable=import-outside-toplevel
  # cnn_mnist's two unpadded 5x5 convolutions and pools leave nothing of 8x8 digits.
  with pytest.raises(train.ConfigError, match="too small for model 'cnn_mnist'"):
    train.build(tiny_config(**{"model.name": "cnn_mnist"}))
