"""Official EfficientNet preprocessing as tf ops for tf.data: train crops, eval crop (uint8 out).

All randomness is stateless with an explicit seed (a [2] int tensor), so the pipeline is deterministic and a
resumed run reproduces every crop. Crop functions take *encoded* bytes (JPEG or PNG) and return uint8
[size, size, 3]: JPEGs are decoded only inside the crop window (`decode_and_crop_jpeg`), as the official
code does, which is what makes ImageNet input fast. Grayscale images become RGB.
"""

import tensorflow as tf

from noisy_student import normalization as normalization_lib

CROP_PADDING = 32


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 [h, w, 3]; an already decoded uint8 image (a video frame)
  passes through."""
  encoded = tf.convert_to_tensor(encoded)
  if encoded.dtype == tf.uint8:
    return encoded
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _shape(encoded):
  """[h, w] of an encoded image; cheap for JPEG (header only)."""
  return tf.cond(
    tf.io.is_jpeg(encoded), lambda: tf.image.extract_jpeg_shape(encoded)[:2], lambda: tf.shape(decode(encoded))[:2]
  )


def _decode_window(encoded, window):
  """Decodes only the window [y, x, h, w] (JPEG) or decodes then crops (other formats)."""

  def jpeg():
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

  def other():
    return tf.image.crop_to_bounding_box(decode(encoded), window[0], window[1], window[2], window[3])

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def resize_float(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bicubic resize to [size, size], float32, as the official code: TF1's `resize_bicubic` (output pixel i
  samples input i * in / out, the cubic convolution kernel with a = -0.75, edge pixels repeated).
  `tf.image.resize`'s bicubic is another filter (half-pixel centers, a = -0.5): up to 115 levels apart on a
  noisy image."""
  return tf.raw_ops.ResizeBicubic(images=image[None], size=[size, size], align_corners=False, half_pixel_centers=False)[
    0
  ]


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """`resize_float`, rounded back to uint8 (what RandAugment and the uint8 input path take)."""
  return tf.cast(tf.round(tf.clip_by_value(resize_float(image, size), 0.0, 255.0)), tf.uint8)


def center_window(shape, size: int, crop_padding: int = CROP_PADDING):
  """Official eval window: side int(size / (size + pad) * min(h, w)), centered; [y, x, h, w]."""
  h, w = shape[0], shape[1]
  side = tf.cast(size / (size + crop_padding) * tf.cast(tf.minimum(h, w), tf.float64), tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])


def center_crop(encoded: tf.Tensor, size: int, crop_padding: int = CROP_PADDING) -> tf.Tensor:
  """Eval: official center crop with crop padding 32, then bicubic resize to size."""
  window = center_window(_shape(encoded), size, crop_padding)
  return resize(_decode_window(encoded, window), size)


def distorted_window(
  shape, seed, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10
):
  """Official random-sized crop window [y, x, h, w]; the whole image when all attempts fail."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.concat([shape, [3]], 0),
    bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
    seed=seed,
    min_object_covered=min_object_covered,
    aspect_ratio_range=aspect_ratio_range,
    area_range=area_range,
    max_attempts=max_attempts,
    use_image_if_no_bounding_boxes=True,
  )
  return tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])


def inception_crop(encoded: tf.Tensor, size: int, seed: tf.Tensor, flip: bool = True) -> tf.Tensor:
  """Train: distorted bounding-box crop (fallback: center crop), bicubic resize, random flip."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  shape = _shape(encoded)
  window = distorted_window(shape, seeds[0])
  # When every attempt fails the sampler returns the full image; the official code then center-crops.
  failed = tf.reduce_all(tf.equal(window[2:], shape))
  window = tf.cond(failed, lambda: center_window(shape, size), lambda: window)
  image = resize(_decode_window(encoded, window), size)
  return tf.image.stateless_random_flip_left_right(image, seeds[1]) if flip else image


def to_size(image: tf.Tensor, size: int) -> tf.Tensor:
  """A decoded image resized to [size, size] unless it already is (small images: CIFAR, SVHN, digits)."""
  return tf.cond(tf.reduce_all(tf.equal(tf.shape(image)[:2], [size, size])), lambda: image, lambda: resize(image, size))


def pad_crop_draw(seed: tf.Tensor, pad: int = 4, flip: bool = False):
  """One image's pad-crop randomness: {'offset': [2] int32 in [0, 2 pad], 'flip': bool (False unless
  `flip`)}, for pad_crop_batch."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  offset = tf.random.stateless_uniform([2], seeds[0], minval=0, maxval=2 * pad + 1, dtype=tf.int32)
  mirror = tf.random.stateless_uniform([], seeds[1]) < 0.5
  return {"offset": offset, "flip": tf.logical_and(mirror, flip)}


def pad_crop_batch(images: tf.Tensor, offset: tf.Tensor, flip: tf.Tensor, pad: int = 4) -> tf.Tensor:
  """Reflect-pad [b, h, w, 3] by `pad`, take each image's [h, w] window at offset [b, 2], mirrored where
  flip [b]: the official small-image crop, per image in one gather."""
  height, width = tf.shape(images)[1], tf.shape(images)[2]
  padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
  rows = offset[:, :1] + tf.range(height)[None]
  cols = offset[:, 1:] + tf.range(width)[None]
  cols = tf.where(flip[:, None], tf.reverse(cols, [1]), cols)
  out = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
  return tf.ensure_shape(out, images.shape)


def pad_crop(image: tf.Tensor, size: int, seed: tf.Tensor, pad: int = 4, flip: bool = False) -> tf.Tensor:
  """Small images (CIFAR/SVHN path): resize to size if needed, reflect-pad `pad`, random size crop (and
  random mirror with `flip`)."""
  draw = pad_crop_draw(seed, pad, flip)
  return pad_crop_batch(to_size(image, size)[None], draw["offset"][None], draw["flip"][None], pad)[0]


def resize_whole(encoded: tf.Tensor, size: int) -> tf.Tensor:
  """Whole image resized to size (eval for tiny images such as digits, where cropping loses strokes)."""
  return to_size(decode(encoded), size)


def normalize(image: tf.Tensor, normalization: str = "imagenet") -> tf.Tensor:
  """uint8 RGB -> float32 standardized by the dataset's statistics (normalization.py), in tf ops: the steps' own
  standardization as a tf reference (the pipelines hand uint8 to the devices and do not call it)."""
  return normalization_lib.standardize(tf.cast(image, tf.float32), normalization)


TRAIN_CROPS = ("inception", "pad_crop", "resize", "center")
EVAL_CROPS = ("center", "resize")


def train_image(encoded, size, seed, crop="inception", flip=True, pad=4):
  """uint8 [size, size, 3] for training with the named crop (see TRAIN_CROPS)."""
  if crop == "inception":
    return inception_crop(encoded, size, seed, flip=flip)
  if crop == "pad_crop":
    return pad_crop(decode(encoded), size, seed, pad=pad, flip=flip)
  if crop in ("resize", "center"):  # 'center': the eval crop, for FixRes-style fine-tuning at test size
    image = resize_whole(encoded, size) if crop == "resize" else center_crop(encoded, size)
    return tf.image.stateless_random_flip_left_right(image, seed) if flip else image
  raise ValueError(f"Unknown train crop {crop!r}; expected one of {TRAIN_CROPS}.")


def eval_image(encoded, size, crop="center"):
  """uint8 [size, size, 3] for evaluation / labeling (no randomness)."""
  if crop == "center":
    return center_crop(encoded, size)
  if crop == "resize":
    return resize_whole(encoded, size)
  raise ValueError(f"Unknown eval crop {crop!r}; expected one of {EVAL_CROPS}.")
