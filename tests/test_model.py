"""EfficientNet: exact sizes, TF 'SAME' parity, kernel equivalence, noise."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_trees_close
from noisy_student.models import create_model, efficientnet, ops

# Trainable parameters and batch-norm statistics with a 1000-class head
# (docs/efficientnet.md; equal for Keras, timm and the TF code).
REFERENCE_COUNTS = {
  "b0": (5_288_548, 42_016),
  "b1": (7_794_184, 62_048),
  "b2": (9_109_994, 67_568),
  "b3": (12_233_232, 87_296),
  "b4": (19_341_616, 125_200),
  "b5": (30_389_784, 172_736),
  "b6": (43_040_704, 224_432),
  "b7": (66_347_960, 310_720),
  "b8": (87_413_142, 380_032),
  "l2": (480_309_308, 1_090_688),
}


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def init_tiny(size=16, num_classes=10, batch=4, **overrides):
  model = create_model("efficientnet-tiny", num_classes=num_classes, **overrides)
  images = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images)
  return model, variables, images


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_parameter_and_batch_stat_counts_match_reference(name):
  model = create_model(f"efficientnet-{name}")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert (count(shapes["params"]), count(shapes["batch_stats"])) == REFERENCE_COUNTS[name]


def test_round_filters_and_repeats_follow_the_official_rules():
  assert efficientnet.round_filters(32, 1.0) == 32
  assert efficientnet.round_filters(32, 1.1) == 32  # 35.2 -> 32 (not < 0.9 * 35.2)
  assert efficientnet.round_filters(1280, 4.3) == 5504
  assert efficientnet.round_filters(16, 0.25) == 8  # never below the divisor
  assert efficientnet.round_repeats(3, 3.1) == 10
  blocks = efficientnet.block_table(1.0, 1.0)
  assert len(blocks) == 16
  assert [b.stride for b in blocks if b.stride == 2] == [2, 2, 2, 2]


def test_unknown_model_or_option_is_a_clear_error():
  with pytest.raises(ValueError, match="efficientnet-b9"):
    create_model("efficientnet-b9")
  with pytest.raises(ValueError, match="dropout"):
    create_model("efficientnet-b0", dropout=0.1)
  model, variables, images = init_tiny()
  with pytest.raises(ValueError, match="conv_impl"):
    jax.eval_shape(model.clone(conv_impl="cuda").apply, variables, images)


# --- TF 'SAME' padding and the two kernel implementations --------------------


@pytest.mark.parametrize("size", [7, 8, 15, 16])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels", [3, 6])  # 3: the stem's direct multiply-adds; 6: im2col
def test_convolutions_match_tensorflow_same_padding(size, kernel, stride, channels):
  tf = pytest.importorskip("tensorflow")
  assert (channels <= ops.DIRECT_MAX_IN_CHANNELS) == (channels == 3)
  rng = np.random.default_rng(size * 100 + kernel * 10 + stride + channels * 1000)
  x = rng.normal(size=(2, size, size + 1, channels)).astype(np.float32)
  dw = rng.normal(size=(kernel, kernel, channels, 1)).astype(np.float32)
  full = rng.normal(size=(kernel, kernel, channels, 5)).astype(np.float32)
  tf_dw = tf.nn.depthwise_conv2d(x, dw, [1, stride, stride, 1], "SAME").numpy()
  tf_full = tf.nn.conv2d(x, full, stride, "SAME").numpy()
  for impl in ("xla", "shifted"):
    ours_dw = ops.depthwise_conv2d(jnp.asarray(x), jnp.asarray(dw.transpose(0, 1, 3, 2)), stride, impl)
    np.testing.assert_allclose(ours_dw, tf_dw, atol=1e-4, rtol=1e-4, err_msg=impl)
    ours_full = ops.conv2d(jnp.asarray(x), jnp.asarray(full), stride, impl)
    np.testing.assert_allclose(ours_full, tf_full, atol=1e-4, rtol=1e-4, err_msg=impl)


@pytest.mark.parametrize("size,kernel,stride", [(9, 3, 1), (10, 5, 2), (9, 5, 2), (12, 3, 2)])
def test_depthwise_implementations_agree_on_values_and_gradients(size, kernel, stride):
  keys = jax.random.split(jax.random.key(size), 3)
  x = jax.random.normal(keys[0], (3, size, size + 2, 8))
  w = jax.random.normal(keys[1], (kernel, kernel, 1, 8))
  out_shape = jax.eval_shape(lambda x, w: ops.depthwise_conv2d(x, w, stride, "xla"), x, w).shape
  g = jax.random.normal(keys[2], out_shape)
  results = {}
  for impl in ("xla", "shifted"):
    out, vjp = jax.vjp(lambda x, w: ops.depthwise_conv2d(x, w, stride, impl), x, w)
    results[impl] = (out, *vjp(g))
  assert_trees_close(results["shifted"], results["xla"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size,stride", [(9, 1), (10, 2), (11, 2)])
def test_few_channel_convolution_gradients_match_xla(size, stride):
  # The stem's direct form has a hand-written VJP (that of im2col + matmul).
  keys = jax.random.split(jax.random.key(size), 3)
  x = jax.random.normal(keys[0], (2, size, size + 1, 3))
  w = jax.random.normal(keys[1], (3, 3, 3, 7))
  out_shape = jax.eval_shape(lambda x, w: ops.conv2d(x, w, stride, "xla"), x, w).shape
  g = jax.random.normal(keys[2], out_shape)
  results = {}
  for impl in ("xla", "shifted"):
    out, vjp = jax.vjp(lambda x, w: ops.conv2d(x, w, stride, impl), x, w)
    results[impl] = (out, *vjp(g))
  assert_trees_close(results["shifted"], results["xla"], rtol=1e-5, atol=1e-6)
  # and without gradients the direct form gives the same outputs
  assert_trees_close(
    jax.jit(lambda x, w: ops.conv2d(x, w, stride, "shifted"))(x, w), results["xla"][0], rtol=1e-5, atol=1e-6
  )


def test_fused_batch_norm_matches_autodiff_of_the_textbook_formula():
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (4, 5, 5, 6)) * 3 + 1
  scale = jax.random.normal(keys[1], (6,))
  bias = jax.random.normal(keys[2], (6,))
  g = jax.random.normal(keys[3], x.shape)

  def reference(x, scale, bias, swish):
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    y = (x - mean) / jnp.sqrt(var + 1e-3) * scale + bias
    return (y * jax.nn.sigmoid(y) if swish else y), mean, var

  for swish in (True, False):
    fused = lambda x, s, b: ops.batch_norm_train(x, s, b, 1e-3, swish)[0]
    plain = lambda x, s, b: reference(x, s, b, swish)[0]
    out, vjp = jax.vjp(fused, x, scale, bias)
    ref_out, ref_vjp = jax.vjp(plain, x, scale, bias)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(vjp(g), ref_vjp(g)):
      np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    _, mean, var = ops.batch_norm_train(x, scale, bias, 1e-3, swish)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(var, x.var(axis=(0, 1, 2)), rtol=1e-4)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _loss_and_grads(model, variables, images, train):
  def loss(params):
    logits, _ = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      images,
      train=train,
      mutable=["batch_stats"],
      rngs={"dropout": jax.random.key(3)},
    )
    return jnp.sum(jnp.sin(logits)), logits

  (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  return logits, grads


@pytest.mark.parametrize("size", [16, 17])
def test_whole_model_is_the_same_with_either_implementation(size):
  model, variables, images = init_tiny(size=size, dropout_rate=0.0, survival_prob=1.0)
  results = {impl: _loss_and_grads(model.clone(conv_impl=impl), variables, images, True) for impl in ("xla", "shifted")}
  # Every element within 1e-3 of itself plus 1e-3 of its leaf's largest value: sums reassociate. The
  # gradients reach ~1e3; those zero in exact arithmetic (a bias feeding batch norm) hold ~1e-4 of float
  # noise, under the floor's 1e-3.
  assert_trees_close(results["shifted"], results["xla"], rtol=1e-3, atol=1e-3, floor=1.0)


# --- noise and modes ---------------------------------------------------------


def test_eval_mode_is_deterministic_and_ignores_rngs():
  model, variables, images = init_tiny()
  apply = jax.jit(model.apply, static_argnames="train")
  a = apply(variables, images, train=False)
  b = apply(variables, images, train=False, rngs={"dropout": jax.random.key(9)})
  np.testing.assert_array_equal(a, b)
  assert a.dtype == jnp.float32 and a.shape == (4, 10)


def test_train_mode_noise_differs_per_rng_and_dropout_matches_eval_in_expectation():
  model, variables, images = init_tiny(dropout_rate=0.5, survival_prob=1.0, batch=8)
  apply = jax.jit(
    lambda key: model.apply(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": key})[0]
  )
  first, second = apply(jax.random.key(1)), apply(jax.random.key(2))
  assert not np.allclose(first, second)
  clean = jax.jit(lambda v: model.clone(dropout_rate=0.0).apply(v, images, train=True, mutable=["batch_stats"])[0])(
    variables
  )
  samples = np.asarray(jax.vmap(apply)(jax.random.split(jax.random.key(0), 400)))
  # Dropout before the (linear) classifier is unbiased: E[noised] == clean,
  # checked to 5 standard errors of the Monte Carlo mean.
  standard_error = samples.std(axis=0) / np.sqrt(len(samples))
  assert np.all(np.abs(samples.mean(axis=0) - clean) <= 5 * standard_error + 1e-5)
  assert np.all(standard_error > 0)


def test_stochastic_depth_is_per_example_and_unbiased():
  x = jnp.ones((20000, 2, 2, 3))
  out = efficientnet.stochastic_depth(x, 0.8, jax.random.key(0))
  per_example = np.asarray(out[:, 0, 0, 0])
  assert set(np.unique(per_example).round(6)) == {0.0, 1.25}
  assert np.all(out == out[:, :1, :1, :1])  # one draw per example
  assert abs(per_example.mean() - 1.0) < 0.02


def test_stochastic_depth_is_linear_in_depth_and_only_on_skip_blocks():
  probs = [efficientnet.block_survival_prob(i, 16, 0.8) for i in range(16)]
  assert probs[0] == 1.0 and probs[8] == pytest.approx(0.9)
  np.testing.assert_allclose(np.diff(probs), -0.2 / 16)
  # In efficientnet-tiny (one block per stage) only block 0 has a skip, and
  # block 0 always survives: train mode without dropout is deterministic. In
  # efficientnet-small later blocks have skips, and their branches drop.
  for name, has_random_blocks in (("efficientnet-tiny", False), ("efficientnet-small", True)):
    spec = efficientnet.MODEL_SPECS[name]
    table = efficientnet.block_table(spec.width, spec.depth)
    skips = [i for i, b in enumerate(table) if b.stride == 1 and b.in_filters == b.out_filters]
    assert (skips != [0]) == has_random_blocks
    model = create_model(name, num_classes=10, dropout_rate=0.0, survival_prob=0.5)
    images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images)
    run = jax.jit(
      lambda key: model.apply(variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": key})[0]
    )
    outputs_differ = not np.allclose(run(jax.random.key(1)), run(jax.random.key(2)))
    assert outputs_differ == has_random_blocks, name


def test_gradients_reach_every_parameter():
  model, variables, images = init_tiny()
  _, grads = _loss_and_grads(model, variables, images, train=True)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  dead = [jax.tree_util.keystr(path) for path, g in flat if not np.any(np.asarray(g) != 0)]
  assert not dead, f"no gradient reaches {dead}"


def test_batch_stats_update_with_momentum_in_train_mode():
  model, variables, images = init_tiny(bn_momentum=0.9)
  _, updated = jax.jit(
    lambda v: model.apply(v, images, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
  )(variables)
  stem = updated["batch_stats"]["stem_bn"]
  x = ops.conv2d(images, variables["params"]["stem_conv"]["kernel"], 2, "xla")
  np.testing.assert_allclose(stem["mean"], 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stem["var"], 0.9 + 0.1 * x.var(axis=(0, 1, 2)), rtol=1e-4)


def test_small_image_keeps_stages_two_and_three_at_stride_one():
  for small_image, head_size in ((False, 1), (True, 4)):
    model, variables, images = init_tiny(size=32, small_image=small_image)
    _, state = jax.eval_shape(
      functools.partial(model.apply, train=False, capture_intermediates=True), variables, images
    )
    head = state["intermediates"]["head_conv"]["__call__"][0]
    assert head.shape[1:3] == (head_size, head_size)


def test_bfloat16_compute_keeps_float32_parameters_and_close_logits():
  model, variables, images = init_tiny(batch=8)
  ref = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  half = model.clone(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda: half.init(jax.random.key(0), images, train=False))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype("float32")}
  out = jax.jit(functools.partial(half.apply, train=False))(variables, images)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.1 * float(jnp.abs(ref).max()))


def test_rematerialization_changes_nothing_but_memory():
  model, variables, images = init_tiny(dropout_rate=0.0, survival_prob=0.7)
  plain = _loss_and_grads(model, variables, images, True)
  remat = _loss_and_grads(model.clone(remat=True), variables, images, True)
  # The same arithmetic recomputed (bit for bit on CPU): every element within 1e-5 of itself plus 1e-6 of the
  # gradients' scale (~1e3).
  assert_trees_close(remat, plain, rtol=1e-5, atol=1e-6, floor=1e3)
