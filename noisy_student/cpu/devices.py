"""One XLA:CPU device per core for the command line's jobs on a CPU host.

XLA:CPU splits each fused op of a program over its thread pool and joins after it. An EfficientNet step is
hundreds of small ops, and every join waits for the slowest thread: for whichever one the input pipeline's
threads (JPEG decoding, augmentation) preempted on the same cores. With one host device per core, each
device runs its share of the batch on its own thread, and only the batch-norm statistics and gradients
cross devices. 2-core AMD EPYC, b0 at batch 32: labeling model 81.6 -> 98.5 img/s; the train step with its
input pipeline (`benchmarks/train_step.py`, what the CLI runs) 19.7 - 21.9 -> 30.3 - 35.4 img/s, though
the bare step with no pipeline beside it is a little slower split (`benchmarks/model_throughput.py`:
34.3 - 37.3 -> 29.8 - 32.5); the digits demo's tiny model runs as fast either way. The device count must be
in XLA_FLAGS before jax initializes its backends; it only adds host devices, so it is harmless where an
accelerator is the default backend.
"""

import os
from typing import MutableMapping, Optional

_FLAG = "--xla_force_host_platform_device_count"
MAX_DEVICES = 8  # batch sizes are powers of two; per-device copies of the weights stay few


def device_count_for(cores: Optional[int] = None) -> int:
  """The largest power of two <= min(cores, MAX_DEVICES)."""
  cores = max(1, min(cores or os.cpu_count() or 1, MAX_DEVICES))
  return 1 << (cores.bit_length() - 1)


def split_per_core(environ: Optional[MutableMapping[str, str]] = None, cores: Optional[int] = None) -> int:
  """Adds the host device count to environ['XLA_FLAGS'] unless it already sets one; returns the count set
  (0 when XLA_FLAGS already chose)."""
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if _FLAG in flags:
    return 0
  count = device_count_for(cores)
  environ["XLA_FLAGS"] = " ".join(p for p in (flags, f"{_FLAG}={count}") if p)
  return count
