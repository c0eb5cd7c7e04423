"""Shared helpers for the data tests: a prepared digits data_dir and small natural-ish images."""

import atexit
import functools
import shutil
import tempfile

import numpy as np


@functools.lru_cache(maxsize=None)
def digits_data_dir() -> str:
  """A tfds data_dir with the embedded digits dataset prepared once per test process (offline)."""
  from noisy_student.data import digits  # pylint: disable=g-import-not-at-top
  path = tempfile.mkdtemp(prefix="ns_digits_")
  atexit.register(shutil.rmtree, path, True)
  digits.prepare(path)
  return path


@functools.lru_cache(maxsize=None)
def color_digits(size: int = 32, count: int = 8) -> np.ndarray:
  """Real images for op tests: scikit-learn digits upscaled to size x size and tinted per channel."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from noisy_student.data import digits  # pylint: disable=g-import-not-at-top
  images, _ = digits.digits_arrays()
  x = tf.image.resize(images[:count].astype(np.float32), [size, size], method="bicubic").numpy()[..., 0]
  x = np.clip(x, 0, 255)
  rgb = np.stack([x, 0.6 * x + 60, 230 - 0.7 * x], -1)
  return np.round(np.clip(rgb, 0, 255)).astype(np.uint8)
