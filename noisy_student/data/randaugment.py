"""RandAugment (Cubuk et al. 2020) with the official EfficientNet op set and magnitude mapping, as tf ops.

Each of `num_layers` layers picks one of the 16 ops uniformly and always applies it at magnitude M (0..10
scale, L = M / 10, no clamping: M = 15 is allowed and gives e.g. a 45 degree rotation). Images are uint8
[h, w, 3]; geometric ops and Cutout fill with 128. All randomness is stateless from an explicit seed ([2]
int tensor), so a given seed always gives the same augmentation - the pipeline stays resumable.

One deliberate difference from the official TF code: Contrast blends towards the grayscale image's mean
intensity (PIL's definition); the official code uses pixel_count / 256 there, which is a known bug.
"""

import math

import tensorflow as tf

FILL = 128
TRANSLATE_CONST = 100.0  # pixels at L = 1 (official, for 224px ImageNet inputs)
CUTOUT_CONST = 40.0  # half side at L = 1 (official)

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")


def blend(image1, image2, factor):
  """image1 + factor * (image2 - image1), extrapolating when factor > 1, clipped to uint8 (as PIL)."""
  a, b = tf.cast(image1, tf.float32), tf.cast(image2, tf.float32)
  return tf.cast(tf.clip_by_value(a + factor * (b - a), 0.0, 255.0), tf.uint8)


def _transform(image, transform, fill=FILL):
  """Projective transform (output pixel -> input pixel, 8 params), nearest neighbour, constant fill."""
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(tf.reshape(transform, [1, 8]), tf.float32),
      output_shape=tf.shape(image)[:2], fill_value=tf.cast(fill, tf.float32),
      interpolation="NEAREST", fill_mode="CONSTANT")
  return out[0]


def autocontrast(image):
  """Per channel, stretch [min, max] to [0, 255]; constant channels stay."""
  def channel(c):
    c = tf.cast(c, tf.float32)
    lo, hi = tf.reduce_min(c), tf.reduce_max(c)
    stretched = tf.clip_by_value((c - lo) * 255.0 / tf.maximum(hi - lo, 1.0), 0.0, 255.0)
    return tf.cast(tf.where(hi > lo, stretched, c), tf.uint8)
  return tf.stack([channel(image[..., i]) for i in range(3)], -1)


def equalize(image):
  """Per-channel histogram equalization (PIL's ImageOps.equalize)."""
  def channel(c):
    c = tf.cast(c, tf.int32)
    hist = tf.histogram_fixed_width(c, [0, 255], nbins=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    safe = tf.maximum(step, 1)
    lut = (tf.cumsum(hist) + safe // 2) // safe
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.cast(tf.where(step > 0, tf.gather(lut, c), c), tf.uint8)
  return tf.stack([channel(image[..., i]) for i in range(3)], -1)


def invert(image):
  return 255 - image


def rotate(image, degrees, fill=FILL):
  """Rotation about the image centre by `degrees` (counter-clockwise for positive)."""
  theta = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  shape = tf.cast(tf.shape(image), tf.float32)
  cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
  cos, sin = tf.cos(theta), tf.sin(theta)
  # Output pixel (x, y) samples the input at the inverse rotation about (cx, cy); y points down.
  return _transform(image, [cos, -sin, cx - cos * cx + sin * cy,
                            sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0], fill)


def posterize(image, bits):
  """Keeps the top `bits` bits of every value (bits <= 0 gives black, as the official shift by 8)."""
  shift = tf.cast(tf.clip_by_value(8 - bits, 0, 8), tf.uint8)
  kept = tf.bitwise.left_shift(tf.bitwise.right_shift(image, tf.minimum(shift, 7)), tf.minimum(shift, 7))
  return tf.where(shift >= 8, tf.zeros_like(image), kept)


def solarize(image, threshold):
  """Inverts values >= threshold (threshold 256 or more is the identity)."""
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image, addition, threshold=128):
  """Adds `addition` to values below threshold, clipped to 255."""
  added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int32) + addition, 0, 255), tf.uint8)
  return tf.where(tf.cast(image, tf.int32) < threshold, added, image)


def color(image, factor):
  """Saturation: 0 grayscale, 1 identity."""
  gray = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
  return blend(gray, image, factor)


def contrast(image, factor):
  """0 gives the mean gray level, 1 identity."""
  mean = tf.reduce_mean(tf.cast(tf.image.rgb_to_grayscale(image), tf.float32))
  return blend(tf.fill(tf.shape(image), tf.cast(mean, tf.uint8)), image, factor)


def brightness(image, factor):
  """0 black, 1 identity."""
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blend with PIL's SMOOTH-filtered image (borders unfiltered); 1 is the identity."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.cast(tf.round(tf.clip_by_value(smooth, 0.0, 255.0)), tf.uint8)
  inner = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
  return blend(degenerate, image, factor)


def shear_x(image, level, fill=FILL):
  return _transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], fill)


def shear_y(image, level, fill=FILL):
  return _transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0], fill)


def translate_x(image, pixels, fill=FILL):
  """Content moves right by `pixels`."""
  return _transform(image, [1.0, 0.0, -tf.cast(pixels, tf.float32), 0.0, 1.0, 0.0, 0.0, 0.0], fill)


def translate_y(image, pixels, fill=FILL):
  """Content moves down by `pixels`."""
  return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, -tf.cast(pixels, tf.float32), 0.0, 0.0], fill)


def cutout(image, pad_size, seed, fill=FILL):
  """A (2 pad_size)-square at a uniformly random centre (clipped at borders) set to `fill`."""
  shape = tf.shape(image)
  center = tf.random.stateless_uniform([2], seed, minval=0, maxval=tf.int32.max, dtype=tf.int32)
  cy, cx = center[0] % shape[0], center[1] % shape[1]
  rows = tf.range(shape[0])[:, None, None]
  cols = tf.range(shape[1])[None, :, None]
  inside = (rows >= cy - pad_size) & (rows < cy + pad_size) & (cols >= cx - pad_size) & (cols < cx + pad_size)
  return tf.where(inside, tf.cast(fill, image.dtype), image)


def _signed(value, seed):
  """value with a random sign (official `_randomly_negate_tensor`)."""
  negate = tf.random.stateless_uniform([], seed) < 0.5
  return tf.where(negate, -value, value)


def apply_op(image, name, magnitude, seed, translate_const=TRANSLATE_CONST, cutout_const=CUTOUT_CONST):
  """Applies op `name` at magnitude M (official level -> argument mapping)."""
  level = magnitude / 10.0
  factor = level * 1.8 + 0.1
  if name == "AutoContrast":
    return autocontrast(image)
  if name == "Equalize":
    return equalize(image)
  if name == "Invert":
    return invert(image)
  if name == "Rotate":
    return rotate(image, _signed(level * 30.0, seed))
  if name == "Posterize":
    return posterize(image, int(level * 4))
  if name == "Solarize":
    return solarize(image, int(level * 256))
  if name == "Color":
    return color(image, factor)
  if name == "Contrast":
    return contrast(image, factor)
  if name == "Brightness":
    return brightness(image, factor)
  if name == "Sharpness":
    return sharpness(image, factor)
  if name == "ShearX":
    return shear_x(image, _signed(level * 0.3, seed))
  if name == "ShearY":
    return shear_y(image, _signed(level * 0.3, seed))
  if name == "TranslateX":
    return translate_x(image, _signed(level * translate_const, seed))
  if name == "TranslateY":
    return translate_y(image, _signed(level * translate_const, seed))
  if name == "Cutout":
    return cutout(image, int(level * cutout_const), seed)
  if name == "SolarizeAdd":
    return solarize_add(image, int(level * 110))
  raise ValueError(f"Unknown RandAugment op {name!r}; expected one of {OPS}.")


def randaugment(image, num_layers: int, magnitude: float, seed, translate_const=TRANSLATE_CONST,
                cutout_const=CUTOUT_CONST):
  """`num_layers` uniformly chosen ops at magnitude M on a uint8 [h, w, 3] image."""
  if image.dtype != tf.uint8:
    raise TypeError(f"RandAugment works on uint8 images, got {image.dtype}.")
  shape = image.shape
  seeds = tf.random.experimental.stateless_split(tf.convert_to_tensor(seed), 2 * max(num_layers, 1))
  for layer in range(num_layers):
    choice = tf.random.stateless_uniform([], seeds[2 * layer], 0, len(OPS), dtype=tf.int32)
    op_seed = seeds[2 * layer + 1]
    branches = [
        (lambda name=name: tf.ensure_shape(
            apply_op(image, name, magnitude, op_seed, translate_const, cutout_const), shape))
        for name in OPS
    ]
    image = tf.switch_case(choice, branches)
  return image
