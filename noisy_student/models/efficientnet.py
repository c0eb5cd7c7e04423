"""EfficientNet (Tan & Le, 2019) as in the official TensorFlow release, in Flax linen.

The network is the B0 block table scaled in width and depth; every layer uses
TF 'SAME' padding computed from the actual input size, batch norm with
momentum 0.99 / epsilon 1e-3 and the official initializers, so that official
checkpoints convert exactly (see convert.py). Noise for the Noisy Student
student: dropout before the classifier and stochastic depth on skip blocks.
"""

import dataclasses
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from noisy_student.models import ops


@dataclasses.dataclass(frozen=True)
class BlockArgs:
  """One stage of the B0 table: `repeats` MBConv blocks."""

  kernel: int
  repeats: int
  in_filters: int
  out_filters: int
  expand_ratio: int
  stride: int
  se_ratio: float = 0.25


B0_BLOCKS: Tuple[BlockArgs, ...] = (
  BlockArgs(3, 1, 32, 16, 1, 1),
  BlockArgs(3, 2, 16, 24, 6, 2),
  BlockArgs(5, 2, 24, 40, 6, 2),
  BlockArgs(3, 3, 40, 80, 6, 2),
  BlockArgs(5, 3, 80, 112, 6, 1),
  BlockArgs(5, 4, 112, 192, 6, 2),
  BlockArgs(3, 1, 192, 320, 6, 1),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  width: float
  depth: float
  resolution: int
  dropout_rate: float
  test_resolution: Optional[int] = None

  @property
  def eval_resolution(self) -> int:
    return self.test_resolution or self.resolution


MODEL_SPECS = {
  "efficientnet-b0": ModelSpec(1.0, 1.0, 224, 0.2),
  "efficientnet-b1": ModelSpec(1.0, 1.1, 240, 0.2),
  "efficientnet-b2": ModelSpec(1.1, 1.2, 260, 0.3),
  "efficientnet-b3": ModelSpec(1.2, 1.4, 300, 0.3),
  "efficientnet-b4": ModelSpec(1.4, 1.8, 380, 0.4),
  "efficientnet-b5": ModelSpec(1.6, 2.2, 456, 0.4),
  "efficientnet-b6": ModelSpec(1.8, 2.6, 528, 0.5),
  "efficientnet-b7": ModelSpec(2.0, 3.1, 600, 0.5),
  "efficientnet-b8": ModelSpec(2.2, 3.6, 672, 0.5),
  # Noisy Student's larger models (paper appendix): train / test resolution.
  "efficientnet-l0": ModelSpec(2.8, 3.7, 380, 0.5, test_resolution=600),
  "efficientnet-l1": ModelSpec(3.9, 3.7, 380, 0.5, test_resolution=600),
  "efficientnet-l2": ModelSpec(4.3, 5.3, 475, 0.5, test_resolution=800),
  # Small variants of the same code for tests and the CPU demo.
  "efficientnet-tiny": ModelSpec(0.25, 0.25, 16, 0.2),
  "efficientnet-small": ModelSpec(0.5, 0.5, 32, 0.2),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Scales a channel count by `width`, to a multiple of 8, never 10% below."""
  scaled = filters * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


# ----------------------------------------------------------------------------
# Initializers of the official code.


def conv_kernel_init(key, shape, dtype=jnp.float32):
  """normal(0, sqrt(2 / fan_out)), fan_out = kh * kw * out_channels."""
  kh, kw, _, out_channels = shape
  return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / (kh * kw * out_channels))


def depthwise_kernel_init(key, shape, dtype=jnp.float32):
  """As conv_kernel_init with the channel multiplier (1) as out_channels."""
  kh, kw = shape[:2]
  return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / (kh * kw))


def dense_kernel_init(key, shape, dtype=jnp.float32):
  """uniform(+-1/sqrt(num_classes))."""
  limit = 1.0 / math.sqrt(shape[1])
  return jax.random.uniform(key, shape, dtype, -limit, limit)


# ----------------------------------------------------------------------------
# Layers.


class Conv(nn.Module):
  """Convolution without bias (unless `use_bias`), kernel HWIO, TF 'SAME'."""

  features: int
  kernel_size: int = 1
  stride: int = 1
  use_bias: bool = False
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", conv_kernel_init, (k, k, x.shape[-1], self.features))
    y = ops.conv2d(x, kernel.astype(self.dtype), self.stride, self.impl)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


class DepthwiseConv(nn.Module):
  """Depthwise convolution; kernel [k, k, 1, C] (channel multiplier 1)."""

  kernel_size: int
  stride: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", depthwise_kernel_init, (k, k, 1, x.shape[-1]))
    return ops.depthwise_conv2d(x, kernel.astype(self.dtype), self.stride, self.impl)


class BatchNorm(nn.Module):
  """Batch norm over the global batch, fused with swish when `swish`.

  Variables are named as Flax's BatchNorm: params {scale, bias},
  batch_stats {mean, var}; statistics are kept in float32.
  """

  momentum: float = 0.99
  epsilon: float = 1e-3
  swish: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if not train:
      act = ops.swish if self.swish else None
      return ops.batch_norm_inference(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, act)
    y, mean, var = ops.batch_norm_train(x, scale, bias, self.epsilon, self.swish)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
      ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
    return y


class SqueezeExcite(nn.Module):
  """Channel gating from globally pooled features (Hu et al., 2018)."""

  reduced_filters: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    pooled = ops.global_avg_pool(x)[:, None, None, :]
    s = Conv(self.reduced_filters, use_bias=True, dtype=self.dtype, name="reduce")(pooled)
    s = Conv(x.shape[-1], use_bias=True, dtype=self.dtype, name="expand")(ops.swish(s))
    return x * jax.nn.sigmoid(s)


def block_survival_prob(index: int, num_blocks: int, final_survival_prob: float) -> float:
  """Stochastic depth decays linearly with depth: block 0 always survives."""
  return 1.0 - (1.0 - final_survival_prob) * index / num_blocks


def stochastic_depth(x: jax.Array, survival_prob: float, rng: jax.Array) -> jax.Array:
  """Keeps each example's residual branch with probability p, scaled by 1/p."""
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  keep = jnp.floor(survival_prob + jax.random.uniform(rng, shape, jnp.float32))
  return x * (keep / survival_prob).astype(x.dtype)


class MBConvBlock(nn.Module):
  """Inverted residual: expand 1x1 -> depthwise kxk -> SE -> project 1x1 (+ skip)."""

  args: BlockArgs  # in_filters / out_filters already width-scaled
  survival_prob: float = 1.0
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    a = self.args
    bn = lambda name, swish: BatchNorm(self.bn_momentum, self.bn_epsilon, swish, name=name)
    expanded = a.in_filters * a.expand_ratio
    h = x
    if a.expand_ratio != 1:
      h = Conv(expanded, dtype=self.dtype, impl=self.impl, name="expand_conv")(h)
      h = bn("expand_bn", True)(h, train)
    h = DepthwiseConv(a.kernel, a.stride, impl=self.impl, dtype=self.dtype, name="depthwise_conv")(h)
    h = bn("depthwise_bn", True)(h, train)
    if a.se_ratio:
      reduced = max(1, int(a.in_filters * a.se_ratio))
      h = SqueezeExcite(reduced, dtype=self.dtype, name="se")(h)
    h = Conv(a.out_filters, dtype=self.dtype, impl=self.impl, name="project_conv")(h)
    h = bn("project_bn", False)(h, train)
    if a.stride == 1 and a.in_filters == a.out_filters:
      if train and self.survival_prob < 1.0:
        h = stochastic_depth(h, self.survival_prob, self.make_rng("dropout"))
      h = h + x
    return h


def block_table(
  width: float, depth: float, small_image: bool = False, blocks: Sequence[BlockArgs] = B0_BLOCKS
) -> Tuple[BlockArgs, ...]:
  """The flat list of blocks of a scaled model, in checkpoint order."""
  flat = []
  for stage, b in enumerate(blocks):
    stride = 1 if small_image and stage in (1, 2) else b.stride
    b = dataclasses.replace(
      b, in_filters=round_filters(b.in_filters, width), out_filters=round_filters(b.out_filters, width), stride=stride
    )
    for r in range(round_repeats(b.repeats, depth)):
      flat.append(b if r == 0 else dataclasses.replace(b, in_filters=b.out_filters, stride=1))
  return tuple(flat)


def shallow_layers_pattern(depth: float, stages: int) -> str:
  """Regex over parameter paths matching the stem and the blocks of the first `stages` stages of a model of
  depth coefficient `depth` (config.optimizer.frozen for FixRes-style fine-tuning)."""
  num_blocks = sum(round_repeats(b.repeats, depth) for b in B0_BLOCKS[:stages])
  return "^(" + "|".join(["stem_conv", "stem_bn"] + [f"blocks_{i}" for i in range(num_blocks)]) + ")/"


class EfficientNet(nn.Module):
  """EfficientNet classifier: NHWC normalized float images -> float32 logits.

  Attributes:
    width, depth: compound scaling coefficients.
    num_classes: classifier outputs.
    dropout_rate: dropout before the classifier (train mode only).
    survival_prob: stochastic depth survival at the last block; block i of N
      keeps its branch with 1 - (1 - survival_prob) * i / N (train mode only).
    small_image: stride 1 in stages 2 and 3, for 32x32 inputs (SVHN / CIFAR).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
    conv_impl: 'xla' (native convolutions, best on TPU/GPU), 'shifted'
      (shifted multiply-adds and matmuls, several times faster on XLA:CPU),
      or 'auto' (by backend). Same parameters and results either way.
    remat: rematerialize each block in the backward pass (for L2-sized models).
  """

  width: float = 1.0
  depth: float = 1.0
  num_classes: int = 1000
  dropout_rate: float = 0.2
  survival_prob: float = 0.8
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  small_image: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  remat: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    ops.resolve_impl(self.conv_impl)  # fail early on a bad name
    bn = lambda name, swish: BatchNorm(self.bn_momentum, self.bn_epsilon, swish, name=name)
    x = images.astype(self.dtype)
    x = Conv(
      round_filters(STEM_FILTERS, self.width),
      kernel_size=3,
      stride=2,
      impl=self.conv_impl,
      dtype=self.dtype,
      name="stem_conv",
    )(x)
    x = bn("stem_bn", True)(x, train)

    block_cls = nn.remat(MBConvBlock, static_argnums=(2,)) if self.remat else MBConvBlock
    blocks = block_table(self.width, self.depth, self.small_image)
    for i, args in enumerate(blocks):
      survival = block_survival_prob(i, len(blocks), self.survival_prob)
      x = block_cls(args, survival, self.bn_momentum, self.bn_epsilon, self.conv_impl, self.dtype, name=f"blocks_{i}")(
        x, train
      )

    x = Conv(round_filters(HEAD_FILTERS, self.width), impl=self.conv_impl, dtype=self.dtype, name="head_conv")(x)
    x = bn("head_bn", True)(x, train)
    x = ops.global_avg_pool(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=dense_kernel_init, name="classifier")(x)
    return logits.astype(jnp.float32)


def create_model(name: str, num_classes: int = 1000, *, platform: Optional[str] = None, **overrides) -> EfficientNet:
  """EfficientNet by its official name, e.g. 'efficientnet-b0' or 'efficientnet-l2'.

  `overrides` set any EfficientNet attribute (dropout_rate, survival_prob,
  dtype, conv_impl, small_image, remat, bn_momentum, ...). `platform`: that of the devices the model will be
  compiled for; conv_impl 'auto' is resolved for it now (a CPU process compiling for a TPU gets the TPU's
  convolutions), else when the model is traced, for the default backend.
  """
  if name not in MODEL_SPECS:
    raise ValueError(f"Unknown model {name!r}; known: {', '.join(MODEL_SPECS)}")
  spec = MODEL_SPECS[name]
  fields = {f.name for f in dataclasses.fields(EfficientNet)} - {"parent", "name"}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f"Unknown EfficientNet option(s) {sorted(unknown)}; known: {sorted(fields)}")
  kwargs = dict(width=spec.width, depth=spec.depth, dropout_rate=spec.dropout_rate)
  kwargs.update(overrides)
  if platform is not None:
    kwargs["conv_impl"] = ops.resolve_impl(kwargs.get("conv_impl", "auto"), platform)
  return EfficientNet(num_classes=num_classes, **kwargs)
