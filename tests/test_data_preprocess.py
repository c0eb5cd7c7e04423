"""Official preprocessing: center-crop arithmetic, random-sized crop constraints, small-image crop."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import color_digits
from noisy_student import normalization as normalization_lib
from noisy_student.data import preprocess


def _encode(image, fmt):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, quality=95)
  return tf.constant(buf.getvalue())


@pytest.fixture(scope="module")
def photo():
  """A 375x500 natural-ish image (tiled, tinted digits with a gradient), as JPEG and PNG of the same pixels."""
  tiles = np.concatenate([color_digits(125, 8)[i % 8] for i in range(4)], axis=1)[:, :500]
  img = np.concatenate([tiles] * 3, axis=0)  # 375 x 500
  img = np.clip(img.astype(int) + np.linspace(0, 40, 500)[None, :, None], 0, 255).astype(np.uint8)
  jpeg = _encode(img, "JPEG")
  decoded = tf.io.decode_jpeg(jpeg).numpy()
  return jpeg, _encode(decoded, "PNG"), decoded


def test_center_window_official_formula():
  window = preprocess.center_window(tf.constant([375, 500]), 224).numpy()
  side = int(224 / (224 + 32) * 375)  # 328
  assert window.tolist() == [(375 - side + 1) // 2, (500 - side + 1) // 2, side, side] == [24, 86, 328, 328]
  assert preprocess.center_window(tf.constant([600, 600]), 600).numpy()[2] == int(600 / 632 * 600)


def test_center_crop_jpeg_and_png_paths_agree(photo):
  jpeg, png, decoded = photo
  a = preprocess.center_crop(jpeg, 224).numpy()
  b = preprocess.center_crop(png, 224).numpy()
  assert a.shape == (224, 224, 3) and a.dtype == np.uint8
  # decode_and_crop_jpeg equals decode-then-crop except for chroma upsampling at the window's edge.
  diff = np.abs(a.astype(int) - b.astype(int))
  assert (diff[:, :-2] == 0).all() and diff.max() <= 6
  manual = preprocess.resize(tf.constant(decoded[24 : 24 + 328, 86 : 86 + 328]), 224).numpy()
  np.testing.assert_array_equal(b, manual)


def test_center_train_crop_is_the_eval_crop_and_flips_per_seed(photo):
  """crop='center' (FixRes-style fine-tuning at the test size): the eval crop, mirrored when the seed says so."""
  jpeg = photo[0]
  center = preprocess.eval_image(jpeg, 64).numpy()
  np.testing.assert_array_equal(
    preprocess.train_image(jpeg, 64, tf.constant([0, 0]), crop="center", flip=False).numpy(), center
  )
  flipped = [preprocess.train_image(jpeg, 64, tf.constant([s, 0]), crop="center").numpy() for s in range(8)]
  assert all(np.array_equal(f, center) or np.array_equal(f, center[:, ::-1]) for f in flipped)
  assert any(np.array_equal(f, center[:, ::-1]) for f in flipped)


def test_inception_crop_windows_respect_constraints(photo):
  shape = tf.constant([375, 500])
  areas, ratios = [], []
  for s in range(60):
    y, x, h, w = preprocess.distorted_window(shape, tf.constant([s, 1], tf.int64)).numpy()
    assert 0 <= y and y + h <= 375 and 0 <= x and x + w <= 500
    areas.append(h * w / (375 * 500))
    ratios.append(w / h)
  areas, ratios = np.array(areas), np.array(ratios)
  assert areas.min() >= 0.08 - 0.01 and areas.max() <= 1.0
  assert ratios.min() >= 0.75 - 0.02 and ratios.max() <= 4 / 3 + 0.02
  assert areas.std() > 0.1  # really random-sized


def test_inception_crop_deterministic_per_seed(photo):
  jpeg = photo[0]
  a = preprocess.inception_crop(jpeg, 64, tf.constant([7, 7], tf.int64)).numpy()
  b = preprocess.inception_crop(jpeg, 64, tf.constant([7, 7], tf.int64)).numpy()
  c = preprocess.inception_crop(jpeg, 64, tf.constant([8, 7], tf.int64)).numpy()
  assert a.shape == (64, 64, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_inception_crop_falls_back_to_center_crop():
  # A 2x300 strip: no window with aspect 3/4..4/3 covers 8% of it, so all 10 attempts fail.
  strip = np.tile(np.arange(300, dtype=np.uint8)[None, :, None], [2, 1, 3])
  png = _encode(strip, "PNG")
  out = preprocess.inception_crop(png, 16, tf.constant([1, 2], tf.int64), flip=False).numpy()
  np.testing.assert_array_equal(out, preprocess.center_crop(png, 16).numpy())


def test_pad_crop_is_a_window_of_the_reflect_padded_image():
  img = color_digits(32, 1)[0]
  padded = np.pad(img, [[4, 4], [4, 4], [0, 0]], mode="reflect")
  offsets = set()
  for s in range(100):
    out = preprocess.pad_crop(tf.constant(img), 32, tf.constant([s, 3], tf.int64)).numpy()
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    match = [(y, x) for y in range(9) for x in range(9) if np.array_equal(padded[y : y + 32, x : x + 32], out)]
    assert match
    offsets.add(match[0])
  ys, xs = zip(*offsets)
  assert (min(ys), max(ys), min(xs), max(xs)) == (0, 8, 0, 8)  # offsets span [0, 2 pad] on both axes


def test_grayscale_becomes_rgb_and_normalize():
  gray = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 4
  out = preprocess.resize_whole(_encode(gray[..., 0], "PNG"), 8).numpy()
  assert out.shape == (8, 8, 3)
  np.testing.assert_array_equal(out[..., 0], gray[..., 0])
  np.testing.assert_array_equal(out[..., 2], gray[..., 0])
  mean = np.array(normalization_lib.MEAN_RGB)
  x = preprocess.normalize(tf.constant(np.broadcast_to(np.round(mean), (2, 2, 3)).astype(np.uint8))).numpy()
  assert x.dtype == np.float32 and np.abs(x).max() < 0.01
  white = preprocess.normalize(tf.fill([1, 1, 3], tf.constant(255, tf.uint8))).numpy()[0, 0]
  np.testing.assert_allclose(white, (255 - mean) / np.array(normalization_lib.STDDEV_RGB), rtol=1e-6)


def test_normalize_pixels_equals_the_tf_normalize_bit_for_bit():
  """The labeling job ships uint8 and normalizes inside the jitted step: every pixel value must land on the
  same float32 as the tf.data normalization the trainer's pipelines use."""
  import jax  # pylint: disable=g-import-not-at-top

  pixels = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1).reshape(16, 16, 3)
  expected = preprocess.normalize(tf.constant(pixels)).numpy()
  np.testing.assert_array_equal(normalization_lib.normalize_pixels(pixels), expected)
  on_device = jax.jit(normalization_lib.normalize_pixels)(pixels)
  assert on_device.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(on_device), expected)


def test_unknown_crop_names_are_errors(photo):
  with pytest.raises(ValueError, match="inception"):
    preprocess.train_image(photo[0], 32, tf.constant([0, 0]), crop="random")
  with pytest.raises(ValueError, match="center"):
    preprocess.eval_image(photo[0], 32, crop="inception")


def _legacy_bicubic_reference(image, size, table_size=1024, a=-0.75):
  """TF1 `resize_bicubic` in numpy, from its definition: output pixel i samples input i * in / out; the
  cubic with a = -0.75 at the fractional offset rounded to 1/1024 (TF's coefficient table); edge pixels
  repeated."""

  def cubic(s):
    s = np.abs(s)
    return np.where(
      s <= 1, ((a + 2) * s - (a + 3)) * s * s + 1, np.where(s < 2, ((a * s - 5 * a) * s + 8 * a) * s - 4 * a, 0.0)
    )

  def weights(n_in, n_out):
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
      x = i * (n_in / n_out)
      base = int(np.floor(x))
      delta = np.rint((x - base) * table_size) / table_size
      for tap in (-1, 0, 1, 2):
        w[i, min(max(base + tap, 0), n_in - 1)] += cubic(tap - delta)
    return w

  wy, wx = weights(image.shape[0], size), weights(image.shape[1], size)
  return np.einsum("yh,hwc,xw->yxc", wy, image.astype(np.float64), wx, optimize=True)


@pytest.mark.parametrize("shape,size", [((328, 328), 224), ((375, 500), 64), ((8, 11), 16), ((7, 7), 7)])
def test_resize_is_the_official_legacy_bicubic(shape, size):
  """The official code resizes with TF1's resize_bicubic; tf.image.resize's bicubic is another filter."""
  image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
  reference = _legacy_bicubic_reference(image, size)
  out = preprocess.resize_float(tf.constant(image), size).numpy()
  assert out.shape == (size, size, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, reference, atol=2e-3)
  rounded = preprocess.resize(tf.constant(image), size).numpy()
  assert rounded.dtype == np.uint8
  np.testing.assert_array_equal(rounded, np.round(np.clip(out, 0, 255)).astype(np.uint8))
  if shape != (size, size):  # tf.image.resize's bicubic (half-pixel centers, a = -0.5) is far from it
    other = tf.image.resize(image, [size, size], method="bicubic").numpy()
    assert np.abs(other - reference).max() > 10
  else:  # the same size: every output pixel is its input pixel
    np.testing.assert_array_equal(rounded, image)


@pytest.mark.parametrize("normalization", sorted(normalization_lib.NORMALIZATIONS))
def test_normalizations_are_the_official_statistics_on_both_paths(normalization):
  """config.data.normalization: ImageNet's or SVHN's mean/std (the official task_info), the same float32 in
  tf.data and in a jitted step."""
  import jax  # pylint: disable=g-import-not-at-top

  official = {
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    "svhn": ([0.4376821, 0.4437697, 0.47280442], [0.19803012, 0.20101562, 0.19703614]),
  }
  mean, std = (np.asarray(v) * 255 for v in official[normalization])
  pixels = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1).reshape(16, 16, 3)
  expected = preprocess.normalize(tf.constant(pixels), normalization).numpy()
  np.testing.assert_allclose(expected, (pixels - mean) / std, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(
    np.asarray(jax.jit(normalization_lib.normalize_pixels, static_argnums=1)(pixels, normalization)), expected
  )
  with pytest.raises(ValueError, match=r"config.data.normalization='cifar' is not one of \['imagenet', 'svhn'\]"):
    preprocess.normalize(tf.constant(pixels), "cifar")
