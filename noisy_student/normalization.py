"""Input statistics: uint8 RGB pixels -> the standardized float32 the models expect.

Pipelines hand uint8 pixels to the devices and the jitted steps standardize them there (a quarter of the
bytes a float32 batch would move). The formula lives here once, for numpy, jax and tf tensors alike, so
tf.data, the host and every step compute the same float32 values.
"""

import numpy as np

# ImageNet's per-channel mean and standard deviation, in 0..255 units.
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Per-dataset input statistics of the official code (its task_info.get_mean_std), in 0..255 units: the
# released SVHN teacher expects SVHN's own. config.data.normalization names one.
NORMALIZATIONS = {
  "imagenet": (MEAN_RGB, STDDEV_RGB),
  "svhn": (
    (0.4376821 * 255, 0.4437697 * 255, 0.47280442 * 255),
    (0.19803012 * 255, 0.20101562 * 255, 0.19703614 * 255),
  ),
}


def check_normalization(name: str) -> str:
  if name not in NORMALIZATIONS:
    raise ValueError(f"config.data.normalization={name!r} is not one of {sorted(NORMALIZATIONS)}.")
  return name


# Multiplies by the float32 reciprocal of the std instead of dividing: XLA:CPU divides that way anyway, so
# tf.data and a jitted step give bit-identical floats (within 1 ulp of a true division).
def standardize(pixels, normalization: str = "imagenet"):
  """float32 pixels (tf, numpy or jax) -> standardized: the one formula every path shares."""
  mean, stddev = NORMALIZATIONS[check_normalization(normalization)]
  return (pixels - np.asarray(mean, np.float32)) * (np.float32(1.0) / np.asarray(stddev, np.float32))


def normalize_pixels(images, normalization: str = "imagenet"):
  """uint8 numpy or jax pixels -> standardized float32 (inside a jitted step it fuses into the stem)."""
  return standardize(images.astype(np.float32), normalization)


def model_input(images, normalization: str = "imagenet"):
  """What a step feeds the model: uint8 pixels standardized; float images are taken as standardized
  already (tests and benchmarks feed random floats)."""
  if images.dtype == np.uint8:
    return normalize_pixels(images, normalization)
  return images
