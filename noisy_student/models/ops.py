"""Convolution and batch-norm kernels, each with an XLA-native and a CPU-fast form.

XLA:CPU runs grouped (depthwise) convolutions and small convolutions far below
its matmul speed, so on CPU the same maths is expressed as shifted
multiply-adds and matmuls, with hand-written gradients where autodiff would
produce slow scatter or convolution ops. Every function here is pure and takes
the same parameters in every form, so a checkpoint does not care which ran.
"""

import functools
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "shifted")


def resolve_impl(impl: str, platform: Optional[str] = None) -> str:
  """'auto' -> 'shifted' on CPU (several times faster there), 'xla' elsewhere. `platform` is that of the
  devices the step is compiled for ('cpu', 'tpu', 'gpu'); None: the default backend's."""
  if impl not in IMPLS:
    raise ValueError(f"conv_impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "shifted" if (platform or jax.default_backend()) == "cpu" else "xla"
  return impl


def same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
  """TensorFlow 'SAME' padding for one spatial dim of the actual input size."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _pad_same(x: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
  ph = same_padding(x.shape[1], kh, stride)
  pw = same_padding(x.shape[2], kw, stride)
  if ph == (0, 0) and pw == (0, 0):
    return x
  return jnp.pad(x, ((0, 0), ph, pw, (0, 0)))


def _taps(xp: jax.Array, kh: int, kw: int, stride: int, out_h: int, out_w: int):
  """Yields (i, j, strided window of xp under kernel tap (i, j))."""
  n, _, _, c = xp.shape
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(
        xp, (0, i, j, 0), (n, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c), (1, stride, stride, 1)
      )
      yield i, j, window


# ----------------------------------------------------------------------------
# Dense-style convolutions (1x1 and the stem).


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, impl: str) -> jax.Array:
  """Convolution with TF 'SAME' padding; kernel is HWIO.

  1x1 stride-1 convolutions are matmuls over the flattened pixels on every
  backend; in the 'shifted' form a kxk convolution is im2col + matmul, or,
  over at most DIRECT_MAX_IN_CHANNELS inputs and without gradients, direct
  multiply-adds.
  """
  kh, kw, cin, cout = kernel.shape
  if kh == kw == 1 and stride == 1:
    n, h, w, _ = x.shape
    y = jnp.dot(x.reshape(n * h * w, cin), kernel.reshape(cin, cout))
    return y.reshape(n, h, w, cout)
  if resolve_impl(impl) == "shifted":
    if cin <= DIRECT_MAX_IN_CHANNELS:
      return _conv_direct(x, kernel, stride)
    return _conv_im2col(x, kernel, stride)
  padding = [same_padding(x.shape[1], kh, stride), same_padding(x.shape[2], kw, stride)]
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


# A convolution over at most this many input channels (the stem's RGB) runs, without gradients, as one
# multiply-add per tap and channel: XLA fuses it with the batch norm and swish after it, where im2col
# writes the patches out, reads them back into a matmul and writes its output (the stem alone was a tenth
# of efficientnet-b0's inference time that way; directly it is about half of that).
DIRECT_MAX_IN_CHANNELS = 4


def _conv_im2col(x, kernel, stride):
  kh, kw, cin, cout = kernel.shape
  out_h, out_w = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
  xp = _pad_same(x, kh, kw, stride)
  patches = jnp.concatenate([t for _, _, t in _taps(xp, kh, kw, stride, out_h, out_w)], axis=-1)
  n = x.shape[0]
  y = jnp.dot(patches.reshape(n * out_h * out_w, kh * kw * cin), kernel.reshape(kh * kw * cin, cout))
  return y.reshape(n, out_h, out_w, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_direct(x, kernel, stride):
  kh, kw, cin, _ = kernel.shape
  out_h, out_w = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
  y = None
  for i, j, window in _taps(_pad_same(x, kh, kw, stride), kh, kw, stride, out_h, out_w):
    for c in range(cin):
      term = window[..., c : c + 1] * kernel[i, j, c]
      y = term if y is None else y + term
  return y


def _conv_direct_fwd(x, kernel, stride):
  # Under differentiation the im2col form runs: its kernel gradient is one matmul, where the direct
  # form's would be a full-size reduction per tap and channel.
  return _conv_im2col(x, kernel, stride), (x, kernel)


def _conv_direct_bwd(stride, residuals, g):
  x, kernel = residuals
  return jax.vjp(lambda x, k: _conv_im2col(x, k, stride), x, kernel)[1](g)


_conv_direct.defvjp(_conv_direct_fwd, _conv_direct_bwd)


# ----------------------------------------------------------------------------
# Depthwise convolution.


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int, impl: str) -> jax.Array:
  """Depthwise convolution, TF 'SAME' padding; kernel is [kh, kw, 1, C]."""
  if resolve_impl(impl) == "shifted":
    return _depthwise_shifted(x, kernel, stride, tuple(x.shape[1:3]))
  kh, kw = kernel.shape[:2]
  padding = [same_padding(x.shape[1], kh, stride), same_padding(x.shape[2], kw, stride)]
  return lax.conv_general_dilated(
    x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1]
  )


def _depthwise_padded(xp, kernel, stride, out_h, out_w):
  kh, kw = kernel.shape[:2]
  out = None
  for i, j, window in _taps(xp, kh, kw, stride, out_h, out_w):
    term = window * kernel[i, j, 0]
    out = term if out is None else out + term
  return out


def _depthwise_shifted_passes(x, kernel, stride, barrier: bool):
  """(output, padded input). With `barrier` the padded input is materialized once (see the primal)."""
  kh, kw = kernel.shape[:2]
  xp = _pad_same(x, kh, kw, stride)
  if barrier:
    xp = lax.optimization_barrier(xp)
  out_h, out_w = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
  return _depthwise_padded(xp, kernel, stride, out_h, out_w), xp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shifted(x, kernel, stride, size):
  # Without gradients (inference), the padded input is materialized once: left to itself XLA reads the
  # centre tap from the unpadded input instead, which it then recomputes from x's producer (batch norm,
  # swish) inside the sum, and writes the sigmoid out separately for both uses: 1.2x the bytes moved.
  del size
  return _depthwise_shifted_passes(x, kernel, stride, barrier=True)[0]


def _depthwise_shifted_fwd(x, kernel, stride, size):
  del size  # x.shape[1:3]; the backward pass needs it, static
  # The padded input is what both passes read, so it is the residual: XLA
  # writes it once, fused with whatever produced x, and the backward pass
  # does not pad again.
  out, xp = _depthwise_shifted_passes(x, kernel, stride, barrier=False)
  return out, (xp, kernel)


def _depthwise_shifted_bwd(stride, size, residuals, g):
  xp, kernel = residuals
  kh, kw = kernel.shape[:2]
  n, _, _, c = xp.shape
  h, w = size
  out_h, out_w = g.shape[1:3]
  top, _ = same_padding(h, kh, stride)
  left, _ = same_padding(w, kw, stride)

  # Input gradient: the transposed convolution is again a shifted sum, over
  # the output gradient dilated by the stride, with the kernel flipped.
  def edges(before, size, out, k):
    lo = k - 1 - before
    hi = size + k - 1 - lo - ((out - 1) * stride + 1)
    return lo, hi

  zero = jnp.zeros((), g.dtype)
  gp = lax.pad(
    g, zero, [(0, 0, 0), (*edges(top, h, out_h, kh), stride - 1), (*edges(left, w, out_w, kw), stride - 1), (0, 0, 0)]
  )
  dx = None
  for i, j, window in _taps(gp, kh, kw, 1, h, w):
    term = window * kernel[kh - 1 - i, kw - 1 - j, 0]
    dx = term if dx is None else dx + term

  return dx.astype(xp.dtype), _depthwise_kernel_gradient(xp, g, kh, kw, stride).astype(kernel.dtype)


def _depthwise_kernel_gradient(xp, g, kh, kw, stride):
  """Per tap, sum(window * g) over batch and space, as a [kh, kw, 1, C] kernel.

  All taps are summed over chunks of rows in one variadic reduce, so XLA:CPU
  emits one loop that reads g and the padded input once for every tap; one
  reduce (or slice-and-add chain) per tap made it read both once per tap from
  memory, and block 1's kernel gradient took 2.5x as long. Only the chunk-row
  partial sums, 1/8 the size, are then reduced per tap. A 5x5 kernel's 25
  sums run faster over chunks of 4 rows (b0's train step 1.10x); a 3x3
  kernel's 9 slower (block 1: 78 against 49 ms).
  """
  n, _, _, c = xp.shape
  out_h, out_w = g.shape[1:3]
  chunk = _row_chunk(out_h, most=4 if kh * kw > 9 else 8)
  products = []
  for _, _, window in _taps(xp, kh, kw, stride, out_h, out_w):
    product = (window * g).astype(jnp.float32)
    if out_h % chunk:
      product = jnp.pad(product, ((0, 0), (0, chunk - out_h % chunk), (0, 0), (0, 0)))
    products.append(product.reshape(n, -1, chunk, out_w, c))
  zeros = [jnp.zeros((), jnp.float32)] * len(products)
  partials = lax.reduce(products, zeros, lambda a, b: [x + y for x, y in zip(a, b)], (2,))
  return jnp.sum(jnp.stack(partials), axis=(1, 2, 3)).reshape(kh, kw, 1, c)


def _row_chunk(rows: int, most: int = 8) -> int:
  """Rows summed per partial: a divisor of `rows` near `most` (no padding), else `most`."""
  for chunk in range(min(most, rows), most // 2, -1):
    if rows % chunk == 0:
      return chunk
  return min(most, rows)


_depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


# ----------------------------------------------------------------------------
# Batch norm fused with its activation.

Activation = Optional[Callable[[jax.Array], jax.Array]]


def _swish_grad(y):
  s = jax.nn.sigmoid(y)
  return s * (1 + y * (1 - s))


def batch_norm_inference(x, mean, var, scale, bias, epsilon: float, act: Activation) -> jax.Array:
  """Eval-mode batch norm: one multiply-add per element, then the activation."""
  a = scale * lax.rsqrt(var + epsilon)
  b = bias - mean * a
  y = x * a.astype(x.dtype) + b.astype(x.dtype)
  return y if act is None else act(y)


def batch_norm_train(
  x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, swish: bool
) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Train-mode batch norm over all but the channel axis, then swish or nothing.

  Returns (output, batch mean, batch variance); statistics are float32 and
  cover the global batch (under jit with a sharded batch XLA all-reduces).
  The gradient is written by hand so the backward pass recomputes the
  normalized input from x instead of storing it.
  """
  return _bn_train(x, scale, bias, epsilon, swish)


def _moments(x):
  count = x.size // x.shape[-1]
  total, total_sq = channel_sums([x, jnp.square(x.astype(jnp.float32))])
  mean = total / count
  var = jnp.maximum(total_sq / count - jnp.square(mean), 0.0)
  return mean, var


def channel_sums(arrays, chunk: int = 8):
  """Float32 sums over all but the last axis of same-shaped arrays, in one pass over them.

  XLA:CPU hands each plain reduction to a library kernel that reads its
  input from memory, so the input (x - mean) * inv of a batch-norm gradient
  was written out first and each sum read the whole activation again. One
  variadic reduce over chunks of `chunk` rows is a single loop XLA fuses with
  the arrays' producers; only its 1/chunk-sized partial sums are then summed
  by the library (batch norm over b0's largest activation, forward and
  backward: 1.3x faster). Reducing everything in the variadic reduce was
  slower and less accurate (one running sum per channel).
  """
  channels = arrays[0].shape[-1]
  rows = arrays[0].size // channels
  while rows % chunk:
    chunk //= 2
  parts = [a.astype(jnp.float32).reshape(rows // chunk, chunk, channels) for a in arrays]
  zeros = [jnp.zeros((), jnp.float32)] * len(parts)
  partials = lax.reduce(parts, zeros, lambda a, b: [u + v for u, v in zip(a, b)], (1,))
  return [jnp.sum(p, axis=0) for p in partials]


def _bn_train_forward(x, scale, bias, epsilon, swish):
  mean, var = _moments(x)
  inv = lax.rsqrt(var + epsilon)
  a = scale * inv
  b = bias - mean * a
  y = x * a.astype(x.dtype) + b.astype(x.dtype)
  out = y * jax.nn.sigmoid(y) if swish else y
  return (out, mean, var), (x, mean, inv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bn_train(x, scale, bias, epsilon, swish):
  return _bn_train_forward(x, scale, bias, epsilon, swish)[0]


def _bn_train_fwd(x, scale, bias, epsilon, swish):
  outputs, (x, mean, inv) = _bn_train_forward(x, scale, bias, epsilon, swish)
  return outputs, (x, mean, inv, scale, bias)


def _bn_train_bwd(epsilon, swish, residuals, cotangents):
  del epsilon
  x, mean, inv, scale, bias = residuals
  g = cotangents[0]  # statistics feed only the running averages
  a = (scale * inv).astype(x.dtype)
  xhat = (x - mean.astype(x.dtype)) * inv.astype(x.dtype)
  if swish:
    y = xhat * scale.astype(x.dtype) + bias.astype(x.dtype)
    g = g * _swish_grad(y)
  dbias, dscale = channel_sums([g, g * xhat])
  count = x.size // x.shape[-1]
  dx = a * (g - (dbias / count).astype(x.dtype) - xhat * (dscale / count).astype(x.dtype))
  return dx, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)


def swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


def global_avg_pool(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(x.dtype)
