"""Test session set-up: 8 simulated CPU devices, TF kept off accelerators."""

import os

# Must happen before jax is imported anywhere: tests run the same sharded code
# as a TPU slice, on 8 simulated host devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores (CI runs it)")
