"""Shared test helpers: the prepared digits data_dir, small real images, subprocess environments and the
command line on configs/digits.py, a free port, configs as the command line locks them, and tree comparison."""

import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import jax
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


# ----------------------------------------------------------------------------- configs/digits.py, run


def digits_config():
  """configs/digits.py reading the prepared digits data_dir: what cli_command runs, for in-process runs."""
  config = load_config("digits")
  config.data.data_dir = digits_data_dir()
  return config


def cli_command(workdir, *overrides) -> list:
  """`python -m noisy_student` on configs/digits.py and the prepared digits data_dir, then `overrides`
  (`--config.KEY=VALUE` or launcher flags); run it from REPO with subprocess_env(), as run_cli does."""
  return [
    sys.executable,
    "-m",
    "noisy_student",
    "--config=configs/digits.py",
    f"--workdir={workdir}",
    f"--config.data.data_dir={digits_data_dir()}",
    *overrides,
  ]


def process_flags(port: int, process_id: int, num_processes: int = 2) -> tuple:
  """The launcher flags of one of `num_processes` CLI processes sharing a coordinator on 127.0.0.1:port."""
  return (f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}", f"--process_id={process_id}")


def run_cli(workdir, *overrides, devices: int = 1, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
  """cli_command run to its end on `devices` simulated CPU devices (or in `env`), output captured as text."""
  return subprocess.run(
    cli_command(workdir, *overrides),
    cwd=REPO,
    env=env or subprocess_env(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def start_cli(workdir, *overrides, devices: int = 1, env=None, **popen) -> subprocess.Popen:
  """cli_command started in the background, stderr merged into a text stdout pipe unless `popen` says
  otherwise: a test reads the log line by line (to signal the run at a chosen point) or communicate()s."""
  options = dict(
    cwd=REPO, env=env or subprocess_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  return subprocess.Popen(cli_command(workdir, *overrides), **{**options, **popen})


# ----------------------------------------------------------------------------- comparing pytrees


def assert_trees_close(actual, desired, *, rtol: float = 0.0, atol: float = 0.0, floor: float = 0.0) -> None:
  """Same structure, and leaf by leaf np.testing.assert_allclose(actual, desired, rtol, atol * scale), with
  scale the leaf's largest |desired| (at least `floor`); a failure names the leaf.

  atol is relative to each leaf's own scale because one tree mixes scales (gradients of 1e3 beside 1e-1, step
  counts beside moments). The floor is for leaves that are zero in exact arithmetic (the bias of a batch norm
  feeding another batch norm): they hold only float noise, different for every mesh or kernel.
  """
  assert jax.tree.structure(actual) == jax.tree.structure(desired), (
    f"{jax.tree.structure(actual)} != {jax.tree.structure(desired)}"
  )
  for (path, d), a in zip(jax.tree_util.tree_leaves_with_path(desired), jax.tree.leaves(actual)):
    a, d = np.asarray(a, np.float64), np.asarray(d, np.float64)
    scale = max(float(np.max(np.abs(d), initial=0.0)), floor)
    np.testing.assert_allclose(a, d, rtol=rtol, atol=atol * scale, err_msg=jax.tree_util.keystr(path))
