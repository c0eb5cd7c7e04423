"""Shared helpers for the data tests: a prepared digits data_dir and small natural-ish images."""

import atexit
import functools
import os
import shutil
import socket
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


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(devices: int = 1) -> dict:
  """Environment for a `python -m noisy_student` (or `-c`) subprocess: the repo importable, `devices`
  simulated CPU devices, TensorFlow quiet."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


def free_port() -> int:
  """A free TCP port on 127.0.0.1 for a jax.distributed coordinator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def load_config(name: str, arg=None):
  """configs/NAME.py's get_config(arg), locked as the command line locks it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.lock()
  return config
