"""RandAugment (Cubuk et al. 2020) with the official EfficientNet op set and magnitude mapping, as tf ops.

Each of `num_layers` layers picks one of the 16 ops uniformly and always applies it at magnitude M (0..10
scale, L = M / 10, no clamping: M = 15 is allowed and gives e.g. a 45 degree rotation). Images are uint8
[h, w, 3]; geometric ops and Cutout fill with 128. All randomness is stateless from an explicit seed ([2]
int tensor), so a given seed always gives the same augmentation - the pipeline stays resumable.

Every op takes one image [h, w, 3] or a batch [b, h, w, 3] (per-image arguments then [b]).
`sample_layers` draws one image's choices from its seed; `randaugment_batch` applies a batch's draws, each
op once on the images that drew it (the input pipeline's path: for small images the per-op dispatch, not
the pixels, is what costs); `randaugment` is the same for one image.

Ops compute what the official TF code computes, including what its uint8 arithmetic makes of levels past
the 0..10 scale (Posterize and Solarize: `official_posterize_bits`, `official_solarize_threshold`) and its
truncations (Sharpness, AutoContrast). One deliberate difference: Contrast blends towards the grayscale
image's mean intensity (PIL's definition); the official code uses pixel_count / 256 there, a known bug.
"""

import functools
import math

import tensorflow as tf

FILL = 128
TRANSLATE_CONST = 100.0  # pixels at L = 1 (official, for 224px ImageNet inputs)
CUTOUT_CONST = 40.0  # half side at L = 1 (official)

OPS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "Posterize",
  "Solarize",
  "Color",
  "Contrast",
  "Brightness",
  "Sharpness",
  "ShearX",
  "ShearY",
  "TranslateX",
  "TranslateY",
  "Cutout",
  "SolarizeAdd",
)


def _image_or_batch(op):
  """Lets an op written for [b, h, w, 3] batches also take one [h, w, 3] image."""

  @functools.wraps(op)
  def wrapped(image, *args, **kwargs):
    image = tf.convert_to_tensor(image)
    if image.shape.rank == 3:
      return op(image[None], *args, **kwargs)[0]
    return op(image, *args, **kwargs)

  return wrapped


def _per_image(value, images, dtype=tf.float32):
  """A scalar or [b] argument as [b] (one value per image of the batch)."""
  return tf.broadcast_to(tf.cast(value, dtype), tf.shape(images)[:1])


def blend(image1, image2, factor):
  """image1 + factor * (image2 - image1), extrapolating when factor > 1, clipped to uint8 (as PIL)."""
  a, b = tf.cast(image1, tf.float32), tf.cast(image2, tf.float32)
  return tf.cast(tf.clip_by_value(a + factor * (b - a), 0.0, 255.0), tf.uint8)


def _transform(images, rows, fill=FILL):
  """Projective transform per image (output pixel -> input pixel; `rows`: 6 affine entries, each scalar or
  [b]), nearest neighbour, constant fill."""
  entries = [_per_image(r, images) for r in rows] + [tf.zeros(tf.shape(images)[:1])] * 2
  return tf.raw_ops.ImageProjectiveTransformV3(
    images=images,
    transforms=tf.stack(entries, axis=1),
    output_shape=tf.shape(images)[1:3],
    fill_value=tf.cast(fill, tf.float32),
    interpolation="NEAREST",
    fill_mode="CONSTANT",
  )


@_image_or_batch
def autocontrast(images):
  """Per channel, stretch [min, max] to [0, 255]; constant channels stay."""
  c = tf.cast(images, tf.float32)
  lo = tf.reduce_min(c, axis=[1, 2], keepdims=True)
  hi = tf.reduce_max(c, axis=[1, 2], keepdims=True)
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  stretched = tf.clip_by_value(c * scale - lo * scale, 0.0, 255.0)  # the official code's float32 steps
  return tf.cast(tf.where(hi > lo, stretched, c), tf.uint8)


@_image_or_batch
def equalize(images):
  """Per-channel histogram equalization (PIL's ImageOps.equalize)."""
  channels = tf.transpose(tf.cast(images, tf.int32), [0, 3, 1, 2])  # [b, 3, h, w]
  rows = tf.shape(channels)[0] * 3
  values = tf.reshape(channels, [rows, -1])
  hist = tf.reshape(
    tf.math.bincount(
      tf.reshape(values + tf.range(rows)[:, None] * 256, [-1]), minlength=rows * 256, maxlength=rows * 256
    ),
    [rows, 256],
  )
  # PIL: step = (pixels - count of the largest value present) // 255.
  top = tf.gather(hist, tf.reduce_max(values, axis=1), batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - top) // 255
  safe = tf.maximum(step, 1)[:, None]
  lut = (tf.cumsum(hist, axis=1) + safe // 2) // safe
  lut = tf.clip_by_value(tf.concat([tf.zeros([rows, 1], tf.int32), lut[:, :-1]], 1), 0, 255)
  out = tf.where(step[:, None] > 0, tf.gather(lut, values, batch_dims=1), values)
  return tf.transpose(tf.reshape(tf.cast(out, tf.uint8), tf.shape(channels)), [0, 2, 3, 1])


def invert(image):
  return 255 - image


@_image_or_batch
def rotate(images, degrees, fill=FILL):
  """Rotation about the image centre by `degrees` (counter-clockwise for positive)."""
  theta = _per_image(degrees, images) * (math.pi / 180.0)
  shape = tf.cast(tf.shape(images), tf.float32)
  cy, cx = (shape[1] - 1) / 2, (shape[2] - 1) / 2
  cos, sin = tf.cos(theta), tf.sin(theta)
  # Output pixel (x, y) samples the input at the inverse rotation about (cx, cy); y points down.
  return _transform(images, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy], fill)


def posterize(image, bits):
  """Keeps the top `bits` bits of every value (PIL's; bits <= 0 gives black). RandAugment passes its level
  through `official_posterize_bits`."""
  shift = tf.cast(tf.clip_by_value(8 - bits, 0, 8), tf.uint8)
  kept = tf.bitwise.left_shift(tf.bitwise.right_shift(image, tf.minimum(shift, 7)), tf.minimum(shift, 7))
  return tf.where(shift >= 8, tf.zeros_like(image), kept)


def official_posterize_bits(bits: int) -> int:
  """The bits the official code actually keeps for Posterize's `int(4 L)`: it shifts uint8 pixels by
  `8 - bits` converted to uint8 (wrapping), and TF's shift kernels clamp shifts to [0, 7], so any `bits`
  outside 1..8 (M < 2.5, or M >= 22.5 such as the paper's 27) keeps 1 bit, not none or all."""
  return bits if 1 <= bits <= 8 else 1


def official_solarize_threshold(threshold: int) -> int:
  """The threshold the official code actually compares uint8 pixels with for Solarize's `int(256 L)`:
  converted to uint8, it wraps, so M = 10 inverts every pixel and M = 27 inverts those >= 179."""
  return threshold % 256


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


@_image_or_batch
def contrast(images, factor):
  """0 gives the mean gray level, 1 identity."""
  # Sums of integers below 2**24 are exact in float32, so the mean does not depend on the batch.
  mean = tf.reduce_mean(tf.cast(tf.image.rgb_to_grayscale(images), tf.float32), axis=[1, 2, 3], keepdims=True)
  return blend(tf.broadcast_to(tf.cast(mean, tf.uint8), tf.shape(images)), images, factor)


def brightness(image, factor):
  """0 black, 1 identity."""
  return blend(tf.zeros_like(image), image, factor)


@_image_or_batch
def sharpness(images, factor):
  """Blend with the SMOOTH-filtered image (borders unfiltered); 1 is the identity.

  SMOOTH is [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 in float32, truncated to uint8 as the official code's
  depthwise convolution and cast do (PIL rounds instead): the taps are summed here in row-major order, which
  gives that convolution's floats bit for bit on CPUs without AVX-512 (with it, TF's kernel rounds a few
  pixels one level apart: the official result itself depends on the CPU). No convolution kernel: TF
  mis-shapes it on an empty batch.
  """
  pixels = tf.cast(images, tf.float32)
  height, width = tf.shape(pixels)[1] - 2, tf.shape(pixels)[2] - 2
  weights = [[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]
  total = None
  for dy in range(3):
    for dx in range(3):
      tap = pixels[:, dy : dy + height, dx : dx + width] * tf.constant(weights[dy][dx] / 13.0, tf.float32)
      total = tap if total is None else total + tap
  smooth = tf.cast(tf.clip_by_value(total, 0.0, 255.0), tf.uint8)
  border = [[0, 0], [1, 1], [1, 1], [0, 0]]
  inner = tf.pad(tf.ones_like(smooth, tf.bool), border)
  degenerate = tf.where(inner, tf.pad(smooth, border), images)
  return blend(degenerate, images, factor)


@_image_or_batch
def shear_x(images, level, fill=FILL):
  return _transform(images, [1.0, level, 0.0, 0.0, 1.0, 0.0], fill)


@_image_or_batch
def shear_y(images, level, fill=FILL):
  return _transform(images, [1.0, 0.0, 0.0, level, 1.0, 0.0], fill)


@_image_or_batch
def translate_x(images, pixels, fill=FILL):
  """Content moves right by `pixels`."""
  return _transform(images, [1.0, 0.0, -_per_image(pixels, images), 0.0, 1.0, 0.0], fill)


@_image_or_batch
def translate_y(images, pixels, fill=FILL):
  """Content moves down by `pixels`."""
  return _transform(images, [1.0, 0.0, 0.0, 0.0, 1.0, -_per_image(pixels, images)], fill)


@_image_or_batch
def cutout_at(images, pad_size, center, fill=FILL):
  """A (2 pad_size)-square around each image's `center` ([2], or [b, 2]; taken modulo the image size),
  clipped at the borders, set to `fill`."""
  shape = tf.shape(images)
  center = tf.reshape(center, [-1, 2])
  cy = (center[:, 0] % shape[1])[:, None, None, None]
  cx = (center[:, 1] % shape[2])[:, None, None, None]
  rows = tf.range(shape[1])[None, :, None, None]
  cols = tf.range(shape[2])[None, None, :, None]
  inside = (rows >= cy - pad_size) & (rows < cy + pad_size) & (cols >= cx - pad_size) & (cols < cx + pad_size)
  return tf.where(inside, tf.cast(fill, images.dtype), images)


def cutout(image, pad_size, seed, fill=FILL):
  """A (2 pad_size)-square at a uniformly random centre (clipped at borders) set to `fill`."""
  return cutout_at(image, pad_size, sample_layers(seed, 1)["center"], fill)


def _apply(images, name, magnitude, negate, center, translate_const, cutout_const):
  """Op `name` at magnitude M on a batch; negate [b] signs the signed ops, center [b, 2] places Cutout."""
  level = magnitude / 10.0
  factor = level * 1.8 + 0.1
  signed = lambda value: tf.where(negate, -value, value)
  if name == "AutoContrast":
    return autocontrast(images)
  if name == "Equalize":
    return equalize(images)
  if name == "Invert":
    return invert(images)
  if name == "Rotate":
    return rotate(images, signed(level * 30.0))
  if name == "Posterize":
    return posterize(images, official_posterize_bits(int(level * 4)))
  if name == "Solarize":
    return solarize(images, official_solarize_threshold(int(level * 256)))
  if name == "Color":
    return color(images, factor)
  if name == "Contrast":
    return contrast(images, factor)
  if name == "Brightness":
    return brightness(images, factor)
  if name == "Sharpness":
    return sharpness(images, factor)
  if name == "ShearX":
    return shear_x(images, signed(level * 0.3))
  if name == "ShearY":
    return shear_y(images, signed(level * 0.3))
  if name == "TranslateX":
    return translate_x(images, signed(level * translate_const))
  if name == "TranslateY":
    return translate_y(images, signed(level * translate_const))
  if name == "Cutout":
    return cutout_at(images, int(level * cutout_const), center)
  if name == "SolarizeAdd":
    return solarize_add(images, int(level * 110))
  raise ValueError(f"Unknown RandAugment op {name!r}; expected one of {OPS}.")


def apply_op(image, name, magnitude, seed, translate_const=TRANSLATE_CONST, cutout_const=CUTOUT_CONST):
  """Applies op `name` at magnitude M to one image (official level -> argument mapping); `seed` draws
  the sign of signed ops and Cutout's centre."""
  image = tf.convert_to_tensor(image)
  draws = sample_layers(seed, 1)
  return _apply(image[None], name, magnitude, draws["negate"], draws["center"], translate_const, cutout_const)[0]


def sample_layers(seed, num_layers: int):
  """One image's draws for `num_layers` layers, from one stateless call: {'op': [N] int32 index into OPS
  (uniform), 'negate': [N] bool (the sign of signed ops), 'center': [N, 2] int32 (Cutout's centre, taken
  modulo the image size)}."""
  bits = tf.random.stateless_uniform([num_layers, 4], seed, minval=0, maxval=tf.int32.max, dtype=tf.int32)
  return {"op": bits[:, 0] % len(OPS), "negate": bits[:, 1] % 2 == 1, "center": bits[:, 2:]}


def randaugment(
  image, num_layers: int, magnitude: float, seed, translate_const=TRANSLATE_CONST, cutout_const=CUTOUT_CONST
):
  """`num_layers` uniformly chosen ops at magnitude M on a uint8 [h, w, 3] image (a batch of one)."""
  draws = {k: v[None] for k, v in sample_layers(seed, num_layers).items()}
  return randaugment_batch(tf.convert_to_tensor(image)[None], draws, magnitude, translate_const, cutout_const)[0]


def randaugment_batch(images, draws, magnitude: float, translate_const=TRANSLATE_CONST, cutout_const=CUTOUT_CONST):
  """RandAugment on a uint8 [b, h, w, 3] batch with per-image `draws` (sample_layers' dict, batched:
  [b, N] ...): image i equals randaugment(images[i], N, M, seed_i). Each layer runs every op once, on the
  images that drew it, and stitches the results back in order.

  The graph is built once per process for each (N, M, constants) and reused by every pipeline and stage
  that asks again (building it is ~2,500 TF ops: seconds of Python per pipeline otherwise).
  """
  images = tf.convert_to_tensor(images)
  if images.dtype != tf.uint8:
    raise TypeError(f"RandAugment works on uint8 images, got {images.dtype}.")
  layers = _layers_function(int(draws["op"].shape[1]), float(magnitude), float(translate_const), float(cutout_const))
  out = layers(images, {k: draws[k] for k in ("op", "negate", "center")})
  return tf.ensure_shape(out, images.shape)


@functools.lru_cache(maxsize=None)
def _layers_function(num_layers: int, magnitude: float, translate_const: float, cutout_const: float):
  """randaugment_batch's graph for any batch and image size, traced on first use."""
  signature = [
    tf.TensorSpec([None, None, None, 3], tf.uint8),
    {
      "op": tf.TensorSpec([None, num_layers], tf.int32),
      "negate": tf.TensorSpec([None, num_layers], tf.bool),
      "center": tf.TensorSpec([None, num_layers, 2], tf.int32),
    },
  ]

  def layers(images, draws):
    for layer in range(num_layers):
      choice = draws["op"][:, layer]
      positions, results = [], []
      for k, name in enumerate(OPS):
        where = tf.cast(tf.where(tf.equal(choice, k))[:, 0], tf.int32)
        picked = tf.gather(images, where)
        # Every op also runs when no image drew it (on an empty batch: no cost, and no tf.cond, whose
        # per-branch graphs made building the pipeline slower).
        results.append(
          tf.ensure_shape(
            _apply(
              picked,
              name,
              magnitude,
              tf.gather(draws["negate"][:, layer], where),
              tf.gather(draws["center"][:, layer], where),
              translate_const,
              cutout_const,
            ),
            picked.shape,
          )
        )
        positions.append(where)
      images = tf.ensure_shape(tf.dynamic_stitch(positions, results), images.shape)
    return images

  return tf.function(layers, input_signature=signature, autograph=False)
