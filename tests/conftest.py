"""Test session set-up: 8 simulated CPU devices, TF kept off accelerators; fixtures shared by the modules."""

import os

# Must happen before jax is imported anywhere: tests run the same sharded code
# as a TPU slice, on 8 simulated host devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "jax")
# The test extra installs libtpu for the compile-only tests: its compiler only, no TPU backend to probe for.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

import helpers  # noqa: E402
from noisy_student.cpu import allocator  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
# Compiled steps persist across test processes (xdist workers, subprocesses use the CLI's own cache) and runs.
jax.config.update(
  "jax_compilation_cache_dir",
  os.environ.get(
    "NOISY_STUDENT_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "noisy_student", "jax_tests")
  ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def pytest_configure(config):
  # The allocator users' entry points run under: pytest re-executes itself once (xdist workers inherit
  # it); XLA compiles about 1.5x faster under it, and compiling is most of this suite's time. jax has
  # been imported but has allocated nothing yet. Output capture is undone first, so the new process
  # writes to the terminal, not to the old one's capture files.
  if not hasattr(config, "workerinput") and allocator.will_reexec():
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
      capture.stop_global_capturing()
    allocator.reexec_with_fast_allocator()
  config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores (CI runs it)")


@pytest.fixture(scope="session")
def data_dir() -> str:
  """A tfds data_dir with the embedded digits dataset, prepared once per test process (helpers.py)."""
  return helpers.digits_data_dir()
