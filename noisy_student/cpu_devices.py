"""One XLA:CPU device per core for inference-only jobs (the labeling job).

XLA:CPU splits each fused op of a program over its thread pool and joins after it. efficientnet-b0 inference
is hundreds of small ops, and on 2 cores those joins cost about a fifth of the time: with one host device
per core, each device runs its share of the batch on its own thread, join-free (labeling 2 cores: model
81.6 -> 98.5 img/s, job 56.7 -> 69.1). A train step needs cross-device reductions every step and gets no
faster (b0: 14.1 -> 12.9 img/s), so only inference jobs split the CPU. The device count must be in
XLA_FLAGS before jax initializes its backends; it only adds host devices, so it is harmless where an
accelerator is the default backend.
"""

import os
from typing import MutableMapping, Optional

_FLAG = "--xla_force_host_platform_device_count"
MAX_DEVICES = 8  # batch sizes are powers of two; per-device copies of the weights stay few


def inference_device_count(cores: Optional[int] = None) -> int:
  """The largest power of two <= min(cores, MAX_DEVICES)."""
  cores = max(1, min(cores or os.cpu_count() or 1, MAX_DEVICES))
  return 1 << (cores.bit_length() - 1)


def split_for_inference(environ: Optional[MutableMapping[str, str]] = None,
                        cores: Optional[int] = None) -> int:
  """Adds the host device count to environ['XLA_FLAGS'] unless it already sets one; returns the count set
  (0 when XLA_FLAGS already chose)."""
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "")
  if _FLAG in flags:
    return 0
  count = inference_device_count(cores)
  environ["XLA_FLAGS"] = " ".join(p for p in (flags, f"{_FLAG}={count}") if p)
  return count
