"""Conversion of Keras EfficientNets and official TF checkpoints gives our model the same function.

Keras parity: Keras 3 (JAX backend) EfficientNets with every weight randomized
(batch-norm statistics included) against ours on the same images, at the
native and at an odd size (TF 'SAME' padding differs between the two). TF
checkpoints: a real checkpoint written by TensorFlow under the official
names, with EMA copies, raw copies, RMSProp slots and global_step.
"""

import functools
import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import traverse_util  # noqa: E402

from noisy_student.models import convert, create_model  # noqa: E402

try:
  import keras  # noqa: E402
except ImportError:  # the TF checkpoint tests below do not need it
  keras = None
requires_keras_jax = pytest.mark.skipif(
  keras is None or keras.backend.backend() != "jax",
  reason="needs keras on the JAX backend (KERAS_BACKEND=jax before keras is first imported)",
)

MEAN = np.asarray(convert.IMAGENET_MEAN_RGB, np.float32)
STD = np.asarray(convert.IMAGENET_STDDEV_RGB, np.float32)


def normalize(pixels):
  """Our input pipeline's normalization: (x - mean * 255) / (std * 255)."""
  return ((pixels - MEAN * 255) / (STD * 255)).astype(np.float32)


def ours(model_name, variables, images, conv_impl="xla", num_classes=1000):
  model = create_model(model_name, num_classes=num_classes, conv_impl=conv_impl)
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))


# ----------------------------------------------------------------------------
# Keras.

SE_GATE_BIAS = 1.0
KERAS_MODELS = {"efficientnet-b0": "EfficientNetB0", "efficientnet-b3": "EfficientNetB3"}


@functools.lru_cache(maxsize=None)  # read-only after the build: tests share them
def build_keras(model_name, size, seed=0, imagenet_normalization=True):
  """A Keras EfficientNet for `size` x `size` inputs, every weight random.

  Keras's initializers compile one random kernel per weight shape (about 20 s
  for B0 on 2 cores); every weight is overwritten here, so the build uses
  zeros instead when Keras lets us.
  """
  from keras.src.applications import efficientnet as keras_efficientnet

  saved = (keras_efficientnet.CONV_KERNEL_INITIALIZER, keras_efficientnet.DENSE_KERNEL_INITIALIZER)
  keras_efficientnet.CONV_KERNEL_INITIALIZER = "zeros"
  keras_efficientnet.DENSE_KERNEL_INITIALIZER = "zeros"
  try:
    model = getattr(keras.applications, KERAS_MODELS[model_name])(
      weights=None, input_shape=(size, size, 3), classifier_activation=None
    )
  finally:
    keras_efficientnet.CONV_KERNEL_INITIALIZER, keras_efficientnet.DENSE_KERNEL_INITIALIZER = saved

  rng = np.random.default_rng(seed)
  for layer in model.layers:
    kind = type(layer).__name__
    if kind == "Normalization":
      continue
    for w in layer.weights:
      shape = tuple(w.shape)
      if w.name == "kernel":  # fan-in scaled, so the input still matters after 16-26 blocks
        fan_in = shape[0] if kind == "Dense" else (shape[0] * shape[1] * (1 if kind == "DepthwiseConv2D" else shape[2]))
        value = rng.normal(size=shape) * np.sqrt((1.0 if kind == "Dense" else 2.0) / fan_in)
      elif w.name == "gamma":
        value = rng.uniform(0.5, 1.5, shape)
      elif w.name in ("moving_mean", "moving_variance"):
        continue  # calibrated below
      elif layer.name.endswith("se_expand"):  # gates mostly open
        value = rng.normal(SE_GATE_BIAS, 0.5, shape)
      else:  # beta, other conv biases
        value = rng.normal(size=shape) * 0.1
      w.assign(value.astype(np.float32))

  # Keras numbers layer names per process (normalization_1, ...): find it by type.
  norm = next(layer for layer in model.layers if type(layer).__name__ == "Normalization")
  if imagenet_normalization:
    norm.adapt_mean.assign(MEAN)
    norm.adapt_variance.assign(np.square(STD))
  # Keras computes with constants snapshotted here (and baked into compiled
  # functions), so this must precede any call.
  norm.finalize_state()

  # Moving statistics: those of a calibration batch (one train-mode pass with
  # momentum 0, no dropout), then perturbed. Every batch norm then roughly
  # normalizes, so the logits stay O(1) yet depend on the input; fully random
  # statistics make the deeper models either explode or forget their input.
  bns = [layer for layer in model.layers if type(layer).__name__ == "BatchNormalization"]
  for layer in bns:
    layer.momentum = 0.0
  for layer in model.layers:
    if type(layer).__name__ == "Dropout":
      layer.rate = 0.0
  # Eager Keras takes ~25 s for this pass; compiled, a few.
  calibrate = jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=True)[1])
  stats = calibrate(
    [v.value for v in model.trainable_variables],
    [v.value for v in model.non_trainable_variables],
    pixels(size, batch=2 if size > 200 else 8, seed=seed + 100),
  )
  for variable, value in zip(model.non_trainable_variables, stats):
    variable.assign(value)
  for layer in bns:
    var = np.asarray(layer.moving_variance.numpy())
    # Channels nearly constant over the calibration batch would amplify
    # float32 rounding without bound on other images: floor their variance.
    std = np.sqrt(np.maximum(var, 0.1 * var.mean()))
    layer.moving_mean.assign((layer.moving_mean.numpy() + 0.2 * std * rng.normal(size=std.shape)).astype(np.float32))
    layer.moving_variance.assign((std**2 * rng.uniform(0.7, 1.4, std.shape)).astype(np.float32))

  return model


def pixels(size, batch=2, seed=1):
  """Raw RGB images that differ in their global statistics (coarse 4x4 colour blocks + noise).

  I.i.d. noise images would all pool to nearly the same features, and the
  logits would hardly depend on the input.
  """
  rng = np.random.default_rng(seed)
  cell = -(-size // 4)
  coarse = np.kron(rng.uniform(0, 255, (batch, 4, 4, 3)), np.ones((1, cell, cell, 1)))
  return (0.8 * coarse[:, :size, :size] + rng.uniform(0, 51, (batch, size, size, 3))).astype(np.float32)


def check_keras_parity(model_name, size):
  kmodel = build_keras(model_name, size)
  variables = convert.from_keras(kmodel)
  x = pixels(size)
  expected = kmodel.predict(x, verbose=0)
  assert expected.shape == (2, 1000)
  assert expected.std() > 0.3  # a real function of the input, not near-constant
  assert np.abs(expected[0] - expected[1]).max() > 0.1
  for impl in ("xla", "shifted"):
    got = ours(model_name, variables, normalize(x), impl)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, err_msg=f"conv_impl={impl}")


@requires_keras_jax
@pytest.mark.parametrize("size", [224, 225])
def test_keras_b0_same_logits(size):
  check_keras_parity("efficientnet-b0", size)


@requires_keras_jax
@pytest.mark.slow
@pytest.mark.parametrize("size", [300, 301])
def test_keras_b3_same_logits(size):
  check_keras_parity("efficientnet-b3", size)


@requires_keras_jax
def test_keras_variables_land_where_expected():
  kmodel = build_keras("efficientnet-b0", 224)
  v = convert.from_keras(kmodel)
  get = lambda layer, i: np.asarray(kmodel.get_layer(layer).weights[i].numpy())
  # block2b is the flat block 2 (stage 1 has one block); depthwise [k,k,C,1] -> [k,k,1,C].
  np.testing.assert_array_equal(
    v["params"]["blocks_2"]["depthwise_conv"]["kernel"], get("block2b_dwconv", 0).transpose(0, 1, 3, 2)
  )
  np.testing.assert_array_equal(v["params"]["blocks_2"]["se"]["expand"]["bias"], get("block2b_se_expand", 1))
  np.testing.assert_array_equal(v["batch_stats"]["blocks_15"]["project_bn"]["var"], get("block7a_project_bn", 3))
  np.testing.assert_array_equal(v["params"]["head_bn"]["scale"], get("top_bn", 0))
  np.testing.assert_array_equal(v["params"]["classifier"]["kernel"], get("predictions", 0))
  leaves = jax.tree.leaves(v)
  keras_weights = sum(len(layer.weights) for layer in kmodel.layers if type(layer).__name__ != "Normalization")
  assert len(leaves) == keras_weights


@requires_keras_jax
def test_keras_other_input_normalization_is_refused_or_mapped():
  """Keras input layers other than our normalization: refused, or ours fed the mapped input."""
  size = 128
  kmodel = build_keras("efficientnet-b0", size, imagenet_normalization=False)
  with pytest.raises(ValueError, match="check_input_normalization=False"):
    convert.from_keras(kmodel)
  variables = convert.from_keras(kmodel, check_input_normalization=False)
  scale, offset = convert.keras_input_transform(kmodel)
  np.testing.assert_allclose(scale, 1 / 255, rtol=1e-6)  # Rescaling(1/255), Normalization(0, 1)
  np.testing.assert_allclose(offset, 0, atol=1e-7)
  x = pixels(size)
  got = ours("efficientnet-b0", variables, (x * scale + offset).astype(np.float32))
  np.testing.assert_allclose(got, kmodel.predict(x, verbose=0), atol=1e-4, rtol=1e-4)


@requires_keras_jax
def test_keras_input_transform_of_imagenet_weights_layout():
  """With weights='imagenet' Keras stores variance = std and rescales by 1/sqrt(std) after."""
  layers = keras.layers
  inputs = keras.Input((4, 4, 3))
  x = layers.Rescaling(1 / 255)(inputs)
  x = layers.Normalization(mean=list(convert.IMAGENET_MEAN_RGB), variance=list(convert.IMAGENET_STDDEV_RGB))(x)
  x = layers.Rescaling([1 / np.sqrt(s) for s in convert.IMAGENET_STDDEV_RGB])(x)
  x = layers.ZeroPadding2D(name="stem_conv_pad")(x)
  model = keras.Model(inputs, x)
  scale, offset = convert.keras_input_transform(model)
  want_scale, want_offset = convert.imagenet_input_transform()
  np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
  np.testing.assert_allclose(offset, want_offset, rtol=1e-6)
  raw = pixels(4)
  np.testing.assert_allclose(np.asarray(model(raw))[:, 1:-1, 1:-1], normalize(raw), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# Official TF checkpoints.

TINY = "efficientnet-tiny"


def official_names(params):
  """Our variable keys -> official TF names, by the reference's rules.

  In a block, convolutions and batch norms are numbered in creation order:
  [expand], project -> conv2d, conv2d_1; [expand_bn], depthwise_bn, project_bn
  -> tpu_batch_normalization, _1, _2.
  """
  bn_leaves = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}
  names = {}

  def bn(module_key, tf_layer):
    for leaf, tf_leaf in bn_leaves.items():
      coll = "params" if leaf in ("scale", "bias") else "batch_stats"
      names[(coll,) + module_key + (leaf,)] = f"{TINY}/{tf_layer}/{tf_leaf}"

  names[("params", "stem_conv", "kernel")] = f"{TINY}/stem/conv2d/kernel"
  bn(("stem_bn",), "stem/tpu_batch_normalization")
  blocks = sorted((k for k in params if k.startswith("blocks_")), key=lambda k: int(k[7:]))
  for b in blocks:
    convs = (["expand_conv"] if "expand_conv" in params[b] else []) + ["project_conv"]
    bns = (["expand_bn"] if "expand_bn" in params[b] else []) + ["depthwise_bn", "project_bn"]
    for i, conv in enumerate(convs):
      names[("params", b, conv, "kernel")] = f"{TINY}/{b}/conv2d{'_1' if i else ''}/kernel"
    for i, norm in enumerate(bns):
      bn((b, norm), f"{b}/tpu_batch_normalization{f'_{i}' if i else ''}")
    names[("params", b, "depthwise_conv", "kernel")] = f"{TINY}/{b}/depthwise_conv2d/depthwise_kernel"
    for ours_name, tf_layer in (("reduce", "conv2d"), ("expand", "conv2d_1")):
      for leaf in ("kernel", "bias"):
        names[("params", b, "se", ours_name, leaf)] = f"{TINY}/{b}/se/{tf_layer}/{leaf}"
  names[("params", "head_conv", "kernel")] = f"{TINY}/head/conv2d/kernel"
  bn(("head_bn",), "head/tpu_batch_normalization")
  names[("params", "classifier", "kernel")] = f"{TINY}/head/dense/kernel"
  names[("params", "classifier", "bias")] = f"{TINY}/head/dense/bias"
  return names


def tiny_reference(num_classes=10):
  """Random variables for our tiny model (shapes by eval_shape), and official-name arrays.

  Returns (flax variables, {tf name: EMA array}, {tf name: raw array}); the EMA
  arrays are the flax variables in TF layout, the raw ones differ.
  """
  model = create_model(TINY, num_classes=num_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  rng = np.random.default_rng(3)
  flat = {}
  for key, spec in traverse_util.flatten_dict(shapes).items():
    if key[-1] == "kernel":
      value = rng.normal(size=spec.shape) / np.sqrt(np.prod(spec.shape[:-1]))
    elif key[-1] in ("var", "scale"):
      value = rng.uniform(0.5, 1.5, spec.shape)
    else:  # bias, mean
      value = rng.normal(size=spec.shape) * 0.2
    flat[key] = value.astype(np.float32)
  variables = traverse_util.unflatten_dict(flat)
  names = official_names(variables["params"])
  assert set(names) == set(flat), "the test's name table does not cover the model"
  ema, raw = {}, {}
  for key, name in names.items():
    value = np.asarray(flat[key])
    if key[-2] == "depthwise_conv":
      value = value.transpose(0, 1, 3, 2)  # ours [k,k,1,C] -> TF [k,k,C,1]
    ema[name] = value
    raw[name] = (value + rng.normal(size=value.shape) + 1).astype(np.float32)
  return variables, ema, raw


def write_checkpoint(directory, tensors):
  """A TF1 name-based checkpoint (as the official trainer writes) with exactly these names."""
  import tensorflow as tf

  tf.config.set_visible_devices([], "GPU")
  var_list = {name: tf.Variable(value) for name, value in tensors.items()}
  saver = tf.compat.v1.train.Saver(var_list=var_list)
  return saver.save(sess=None, save_path=os.path.join(directory, "model.ckpt"), global_step=1234)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  variables, ema, raw = tiny_reference()
  rng = np.random.default_rng(4)
  tensors = dict(raw)
  for name, value in ema.items():
    tensors[name + "/ExponentialMovingAverage"] = value
    for slot in ("RMSProp", "RMSProp_1"):  # optimizer slots of trainable variables
      if not name.endswith(("moving_mean", "moving_variance")):
        tensors[f"{name}/{slot}"] = rng.normal(size=value.shape).astype(np.float32)
  tensors["global_step"] = np.int64(1234)
  directory = str(tmp_path_factory.mktemp("tf_ckpt"))
  prefix = write_checkpoint(directory, tensors)
  return directory, prefix, variables, ema, raw


def test_tf_checkpoint_loads_with_ema_everywhere(tiny_checkpoint):
  directory, prefix, reference, ema, raw = tiny_checkpoint
  for path in (directory, prefix):
    loaded = convert.load_tf_checkpoint(path, TINY)
    flat = traverse_util.flatten_dict(loaded)
    want = traverse_util.flatten_dict(reference)
    assert set(flat) == set(want)
    for key in want:
      np.testing.assert_array_equal(flat[key], want[key], err_msg="/".join(key))
    assert loaded["params"]["classifier"]["kernel"].shape == (
      reference["params"]["classifier"]["kernel"].shape
    )  # num_classes=10 inferred

  # Spot checks written out by hand: the EMA copy wins, layouts change as documented.
  p, s = loaded["params"], loaded["batch_stats"]
  np.testing.assert_array_equal(  # block 0 has no expansion: conv2d is the projection
    p["blocks_0"]["project_conv"]["kernel"], ema[f"{TINY}/blocks_0/conv2d/kernel"]
  )
  np.testing.assert_array_equal(p["blocks_1"]["expand_conv"]["kernel"], ema[f"{TINY}/blocks_1/conv2d/kernel"])
  np.testing.assert_array_equal(p["blocks_1"]["project_conv"]["kernel"], ema[f"{TINY}/blocks_1/conv2d_1/kernel"])
  dw = ema[f"{TINY}/blocks_1/depthwise_conv2d/depthwise_kernel"]
  assert dw.shape[-1] == 1 and p["blocks_1"]["depthwise_conv"]["kernel"].shape[-2] == 1
  np.testing.assert_array_equal(p["blocks_1"]["depthwise_conv"]["kernel"][:, :, 0, :], dw[:, :, :, 0])
  np.testing.assert_array_equal(
    s["blocks_1"]["project_bn"]["var"], ema[f"{TINY}/blocks_1/tpu_batch_normalization_2/moving_variance"]
  )
  np.testing.assert_array_equal(
    s["blocks_0"]["project_bn"]["mean"], ema[f"{TINY}/blocks_0/tpu_batch_normalization_1/moving_mean"]
  )
  np.testing.assert_array_equal(p["head_bn"]["bias"], ema[f"{TINY}/head/tpu_batch_normalization/beta"])
  assert not np.allclose(p["classifier"]["bias"], raw[f"{TINY}/head/dense/bias"])

  # Same function as the model the checkpoint was written from.
  x = np.random.default_rng(5).normal(size=(2, 19, 19, 3)).astype(np.float32)
  np.testing.assert_allclose(
    ours(TINY, loaded, x, num_classes=10), ours(TINY, reference, x, num_classes=10), rtol=1e-6, atol=1e-6
  )


def test_tf_variables_without_ema_use_raw():
  _, ema, raw = tiny_reference()
  loaded = convert.tf_variables_to_flax(raw, TINY)
  np.testing.assert_array_equal(loaded["params"]["stem_conv"]["kernel"], raw[f"{TINY}/stem/conv2d/kernel"])
  np.testing.assert_array_equal(
    loaded["batch_stats"]["stem_bn"]["mean"], raw[f"{TINY}/stem/tpu_batch_normalization/moving_mean"]
  )


def test_tf_missing_extra_and_misshaped_variables_are_named():
  _, ema, _ = tiny_reference()

  missing = dict(ema)
  del missing[f"{TINY}/blocks_2/se/conv2d_1/bias"]
  with pytest.raises(
    ValueError,
    match=r"missing \(1\):\n.*blocks_2/se/conv2d_1/bias "
    r"\(expected shape \[\d+\]",
  ):
    convert.tf_variables_to_flax(missing, TINY)

  extra = dict(ema)
  extra[f"{TINY}/blocks_0/conv2d_7/kernel"] = np.zeros((1, 1, 8, 8), np.float32)
  extra[f"{TINY}/blocks_0/conv2d_7/kernel/RMSProp"] = np.zeros((1, 1, 8, 8), np.float32)
  with pytest.raises(
    ValueError,
    match=r"unexpected .*\(1\):\n.*blocks_0/conv2d_7/kernel "
    r"\(shape \[1, 1, 8, 8\]\)",
  ):
    convert.tf_variables_to_flax(extra, TINY)

  name = f"{TINY}/blocks_1/depthwise_conv2d/depthwise_kernel"
  misshaped = dict(ema)
  k, _, c, _ = ema[name].shape
  misshaped[name] = np.zeros((k, k, 1, c), np.float32)  # already in Flax layout: wrong for TF
  with pytest.raises(
    ValueError,
    match=rf"wrong shape \(1\):\n.*{name}: expected shape "
    rf"\[{k}, {k}, {c}, 1\], found \[{k}, {k}, 1, {c}\]",
  ):
    convert.tf_variables_to_flax(misshaped, TINY)

  with pytest.raises(
    ValueError,
    match=r"head/dense/kernel: expected shape \[\d+, 7\], "
    r"found \[\d+, 10\]",
  ):
    convert.tf_variables_to_flax(ema, TINY, num_classes=7)

  with pytest.raises(ValueError, match="variables are under efficientnet-tiny/"):
    convert.tf_variables_to_flax(ema, "efficientnet-b0")


def test_tf_unreadable_checkpoint_names_the_path(tmp_path):
  with pytest.raises(ValueError, match=str(tmp_path)):
    convert.load_tf_checkpoint(str(tmp_path / "nothing"), TINY)
