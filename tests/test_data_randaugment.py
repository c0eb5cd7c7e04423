"""RandAugment ops on real images (upscaled, tinted scikit-learn digits): shape, dtype, range, behaviour.

Where PIL defines the op (ImageOps / ImageEnhance, which the official implementation imitates) the tf op is
compared with PIL pixel by pixel.
"""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from helpers import color_digits
from noisy_student.data import randaugment as ra

SEED = tf.constant([3, 4], tf.int64)


@pytest.fixture(scope="module")
def images():
  return color_digits(32, 8)


def _pil(image):
  return Image.fromarray(image)


def _check(out, like):
  out = np.asarray(out)
  assert out.shape == like.shape and out.dtype == np.uint8
  return out


@pytest.mark.parametrize("name", ra.OPS)
@pytest.mark.parametrize("magnitude", [0, 5, 10, 15])
def test_every_op_keeps_shape_dtype(images, name, magnitude):
  img = images[0]
  out = _check(ra.apply_op(tf.constant(img), name, magnitude, SEED), img)
  assert 0 <= out.min() and out.max() <= 255


def test_invert_twice_is_identity(images):
  for img in images:
    once = _check(ra.invert(tf.constant(img)), img)
    np.testing.assert_array_equal(once, 255 - img)
    np.testing.assert_array_equal(ra.invert(once), img)


def test_solarize(images):
  img = images[1]
  np.testing.assert_array_equal(ra.solarize(tf.constant(img), 256), img)  # above max: identity
  np.testing.assert_array_equal(ra.solarize(tf.constant(img), 0), 255 - img)
  for t in (64, 128, 200):
    np.testing.assert_array_equal(ra.solarize(tf.constant(img), t), ImageOps.solarize(_pil(img), t))


def test_solarize_add(images):
  img = images[2]
  np.testing.assert_array_equal(ra.solarize_add(tf.constant(img), 0), img)
  out = _check(ra.solarize_add(tf.constant(img), 110), img).astype(int)
  low = img < 128
  np.testing.assert_array_equal(out[low], np.minimum(img[low].astype(int) + 110, 255))
  np.testing.assert_array_equal(out[~low], img[~low])


def test_posterize_matches_pil(images):
  img = images[3]
  np.testing.assert_array_equal(ra.posterize(tf.constant(img), 8), img)
  np.testing.assert_array_equal(ra.posterize(tf.constant(img), 0), np.zeros_like(img))
  for bits in (1, 4, 6):
    np.testing.assert_array_equal(ra.posterize(tf.constant(img), bits), ImageOps.posterize(_pil(img), bits))


def _official_level_arg(value):
  """What the official TF1 code's Python int argument becomes next to a uint8 image: a uint8 constant
  (numpy of its time wrapped out-of-range ints silently; today's numpy needs the explicit modulo)."""
  return tf.constant(np.uint8(value % 256))


@pytest.mark.parametrize("magnitude", [0, 1, 2, 5, 9, 10, 15, 20, 22, 23, 27, 30])
def test_posterize_and_solarize_levels_as_the_official_code_computes_them(images, magnitude):
  """The official ops run TF's uint8 kernels on the wrapped level arguments: shift by `8 - int(4 L)` (TF
  clamps shifts to [0, 7]) and compare with `int(256 L)`. At the paper's M = 27 Posterize leaves 1 bit and
  Solarize inverts pixels >= 179; at M = 10 Solarize inverts everything."""
  img = tf.constant(images[6])
  level = magnitude / 10
  shift = _official_level_arg(8 - int(level * 4))
  official = tf.bitwise.left_shift(tf.bitwise.right_shift(img, shift), shift)
  np.testing.assert_array_equal(ra.apply_op(img, "Posterize", magnitude, SEED), official)
  official = tf.where(img < _official_level_arg(int(level * 256)), img, 255 - img)
  np.testing.assert_array_equal(ra.apply_op(img, "Solarize", magnitude, SEED), official)
  if magnitude == 27:
    assert set(np.unique(ra.apply_op(img, "Posterize", 27, SEED))) <= {0, 128}
    np.testing.assert_array_equal(ra.apply_op(img, "Solarize", 27, SEED), ImageOps.solarize(_pil(images[6]), 179))
  if magnitude == 10:
    np.testing.assert_array_equal(ra.apply_op(img, "Solarize", 10, SEED), 255 - images[6])


def _smooth_row_major(img):
  """SMOOTH in float32, taps summed in row-major order, each product rounded (no fused multiply-add)."""
  pixels = img.astype(np.float32)
  h, w = img.shape[0] - 2, img.shape[1] - 2
  weights = [[1, 1, 1], [1, 5, 1], [1, 1, 1]]
  total = np.zeros((h, w, img.shape[2]), np.float32)
  for dy in range(3):
    for dx in range(3):
      total = total + pixels[dy : dy + h, dx : dx + w] * np.float32(weights[dy][dx] / 13.0)
  return np.clip(total, 0, 255).astype(np.uint8)


def test_sharpness_and_autocontrast_truncate_as_the_official_code(images):
  """Sharpness: SMOOTH summed in float32 and truncated, then blended; AutoContrast: `x * scale + offset` in
  float32, truncated. Bit for bit against numpy's float32 arithmetic, on images and on random noise.

  The official code filters with TF's depthwise convolution, whose float32 sums depend on the CPU: on CPUs
  without AVX-512 it equals the row-major sum bit for bit; with AVX-512 its kernel rounds differently and a
  few pixels come out one level apart (measured: 5 of 3,072 after the blend). So against that convolution,
  computed here on this machine, the bound is one level on at most 1% of pixels.
  """
  noise = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
  kernel = tf.tile(tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32, shape=[3, 3, 1, 1]) / 13.0, [1, 1, 3, 1])
  for img in list(images[:3]) + list(noise):
    official = tf.nn.depthwise_conv2d(tf.cast(img, tf.float32)[None], kernel, [1, 1, 1, 1], "VALID")[0]
    official = tf.cast(tf.clip_by_value(official, 0.0, 255.0), tf.uint8).numpy()
    for smooth, exact in ((_smooth_row_major(img), True), (official, False)):
      degenerate = img.copy()
      degenerate[1:-1, 1:-1] = smooth
      for factor in (0.3, 1.9):
        blended = np.clip(degenerate + np.float32(factor) * (img.astype(np.float32) - degenerate), 0, 255)
        ours = np.asarray(ra.sharpness(tf.constant(img), factor)).astype(int)
        diff = np.abs(ours - blended.astype(np.uint8))
        if exact:
          np.testing.assert_array_equal(diff, 0)
        else:
          assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.01 * diff.size, (factor, np.count_nonzero(diff))
    low = (img // 3 + 70).astype(np.uint8)
    lo = low.min(axis=(0, 1)).astype(np.float32)
    hi = low.max(axis=(0, 1)).astype(np.float32)
    scale = np.float32(255.0) / (hi - lo)
    expected = np.clip(low.astype(np.float32) * scale + (-lo * scale), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(ra.autocontrast(tf.constant(low)), expected)


def test_autocontrast_and_equalize_match_pil(images):
  for img in images[:4]:
    low_contrast = (img // 3 + 70).astype(np.uint8)
    ac = _check(ra.autocontrast(tf.constant(low_contrast)), img)
    # PIL computes i * scale - lo * scale in float and truncates: its top value can come out 254.
    diff = ac.astype(int) - np.asarray(ImageOps.autocontrast(_pil(low_contrast))).astype(int)
    assert np.abs(diff).max() <= 1
    assert ac.reshape(-1, 3).min(0).tolist() == [0, 0, 0]
    assert set(ac.reshape(-1, 3).max(0).tolist()) <= {254, 255}  # float32 steps, truncated (as PIL too)
    eq = _check(ra.equalize(tf.constant(low_contrast)), img)
    np.testing.assert_array_equal(eq, ImageOps.equalize(_pil(low_contrast)))
  flat = np.full((16, 16, 3), 77, np.uint8)  # constant channels stay as they are
  np.testing.assert_array_equal(ra.autocontrast(tf.constant(flat)), flat)
  np.testing.assert_array_equal(ra.equalize(tf.constant(flat)), flat)


@pytest.mark.parametrize(
  "op,enhancer",
  [
    (ra.color, ImageEnhance.Color),
    (ra.contrast, ImageEnhance.Contrast),
    (ra.brightness, ImageEnhance.Brightness),
    (ra.sharpness, ImageEnhance.Sharpness),
  ],
)
def test_enhance_ops_match_pil(images, op, enhancer):
  img = images[4]
  np.testing.assert_array_equal(op(tf.constant(img), 1.0), img)  # factor 1 is the identity
  for factor in (0.1, 0.5, 1.9, 2.8):
    ours = _check(op(tf.constant(img), factor), img).astype(int)
    theirs = np.asarray(enhancer(_pil(img)).enhance(factor)).astype(int)
    # PIL rounds and uses integer luma; we truncate like the official code: off by a couple of levels.
    assert np.abs(ours - theirs).max() <= 3, (op.__name__, factor, np.abs(ours - theirs).max())


def test_enhance_ops_degenerate_ends(images):
  img = images[5]
  gray = np.asarray(ra.color(tf.constant(img), 0.0))
  assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
  assert len(np.unique(ra.contrast(tf.constant(img), 0.0))) == 1
  np.testing.assert_array_equal(ra.brightness(tf.constant(img), 0.0), np.zeros_like(img))


def test_geometric_identities(images):
  img = tf.constant(images[6])
  for out in (
    ra.rotate(img, 0.0),
    ra.shear_x(img, 0.0),
    ra.shear_y(img, 0.0),
    ra.translate_x(img, 0.0),
    ra.translate_y(img, 0.0),
    ra.cutout(img, 0, SEED),
  ):
    np.testing.assert_array_equal(out, images[6])


def test_rotate_90_is_rot90(images):
  img = images[6]
  np.testing.assert_array_equal(ra.rotate(tf.constant(img), 90.0), np.rot90(img, 1))
  np.testing.assert_array_equal(ra.rotate(tf.constant(img), -90.0), np.rot90(img, -1))
  out = np.asarray(ra.rotate(tf.constant(img), 45.0))
  assert (out[0, 0] == 128).all() and (out[-1, -1] == 128).all()  # corners filled with 128
  np.testing.assert_array_equal(out[16, 16], img[16, 16])  # near the centre nothing moves far


def test_translate_and_shear_move_pixels(images):
  img = images[7]
  out = np.asarray(ra.translate_x(tf.constant(img), 5.0))
  np.testing.assert_array_equal(out[:, 5:], img[:, :-5])
  assert (out[:, :5] == 128).all()
  out = np.asarray(ra.translate_y(tf.constant(img), -3.0))
  np.testing.assert_array_equal(out[:-3], img[3:])
  assert (out[-3:] == 128).all()
  out = np.asarray(ra.shear_x(tf.constant(img), 0.25))  # row y samples x + 0.25 y
  for y in (0, 8, 20):
    shift = round(0.25 * y)
    np.testing.assert_array_equal(out[y, : 32 - shift - 1], img[y, shift:31])


def test_cutout_square(images):
  img = np.full((32, 32, 3), 7, np.uint8)
  for s in range(5):
    out = np.asarray(ra.cutout(tf.constant(img), 4, tf.constant([s, 9], tf.int64)))
    rows, cols = np.nonzero((out == 128).all(-1))
    assert 1 <= len(rows) <= 64
    assert rows.max() - rows.min() < 8 and cols.max() - cols.min() < 8
    assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a full rectangle
    assert ((out == 128).all(-1) | (out == 7).all(-1)).all()


def test_randaugment_deterministic_per_seed(images):
  img = tf.constant(images[0])
  a = ra.randaugment(img, 2, 15, tf.constant([1, 2], tf.int64))
  b = ra.randaugment(img, 2, 15, tf.constant([1, 2], tf.int64))
  np.testing.assert_array_equal(a, b)
  _check(a, images[0])
  np.testing.assert_array_equal(ra.randaugment(img, 0, 15, SEED), images[0])  # N = 0: no-op
  outs = {np.asarray(ra.randaugment(img, 1, 9, tf.constant([s, 0], tf.int64))).tobytes() for s in range(40)}
  assert len(outs) >= 10  # 40 seeds pick many different ops


def test_randaugment_in_tf_data(images):
  ds = (
    tf.data.Dataset.from_tensor_slices(images)
    .enumerate()
    .map(lambda i, x: ra.randaugment(x, 2, 10, tf.stack([i, tf.constant(5, tf.int64)])))
  )
  first = np.stack(list(ds.as_numpy_iterator()))
  second = np.stack(list(ds.as_numpy_iterator()))
  assert first.shape == images.shape and first.dtype == np.uint8
  np.testing.assert_array_equal(first, second)


def test_randaugment_rejects_float():
  with pytest.raises(TypeError, match="uint8"):
    ra.randaugment(tf.zeros([8, 8, 3]), 1, 5, SEED)


def _batch_draws(seeds, num_layers):
  per_image = [ra.sample_layers(tf.constant(s, tf.int64), num_layers) for s in seeds]
  return {k: tf.stack([d[k] for d in per_image]) for k in per_image[0]}


@pytest.mark.parametrize("magnitude", [5, 15])
def test_batch_equals_per_image(magnitude):
  """randaugment_batch on a batch == randaugment on each image with that image's seed, bit for bit."""
  images = color_digits(24, 48)
  seeds = [[7, i] for i in range(len(images))]
  draws = _batch_draws(seeds, 2)
  assert len(set(np.asarray(draws["op"]).ravel())) >= 14  # nearly every op is exercised
  batch = ra.randaugment_batch(tf.constant(images), draws, magnitude, translate_const=10.0, cutout_const=4.0)
  for i, (image, seed) in enumerate(zip(images, seeds)):
    single = ra.randaugment(
      tf.constant(image), 2, magnitude, tf.constant(seed, tf.int64), translate_const=10.0, cutout_const=4.0
    )
    np.testing.assert_array_equal(batch[i], single, err_msg=f"image {i}")


def test_batch_every_op_and_sign():
  """Every op with both signs and per-image Cutout centres, in one batch, against one image at a time."""
  images = color_digits(20, 32)
  n = len(images)
  draws = {
    "op": tf.constant([[i % 16, (5 * i + 3) % 16] for i in range(n)], tf.int32),
    "negate": tf.constant([[i % 2 == 0, i % 3 == 0] for i in range(n)]),
    "center": tf.constant([[[3 * i, 7 * i], [i, 2 * i + 5]] for i in range(n)], tf.int32),
  }
  batch = np.asarray(ra.randaugment_batch(tf.constant(images), draws, 9, translate_const=6.0, cutout_const=5.0))
  for i in range(n):
    image = tf.constant(images[i])
    for layer in range(2):
      image = ra._apply(
        image[None],
        ra.OPS[int(draws["op"][i, layer])],
        9,
        draws["negate"][i, layer][None],
        draws["center"][i, layer][None],
        6.0,
        5.0,
      )[0]
    np.testing.assert_array_equal(batch[i], image, err_msg=f"image {i}")
  assert not np.array_equal(batch, images)


def test_batch_of_uneven_choices():
  """Ops no image drew are skipped cleanly; one op for the whole batch works too."""
  images = tf.constant(color_digits(16, 4))
  draws = {
    "op": tf.fill([4, 1], 3),
    "negate": tf.constant([[True], [False], [True], [False]]),
    "center": tf.zeros([4, 1, 2], tf.int32),
  }
  out = np.asarray(ra.randaugment_batch(images, draws, 10))
  np.testing.assert_array_equal(out[0], ra.rotate(images[0], -30.0))
  np.testing.assert_array_equal(out[1], ra.rotate(images[1], 30.0))
  with pytest.raises(TypeError, match="uint8"):
    ra.randaugment_batch(tf.zeros([2, 8, 8, 3]), draws, 5)
