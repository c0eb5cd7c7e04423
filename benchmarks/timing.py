"""Timing shared by the benchmarks."""

import time

import jax
import numpy as np


def time_alternating(fns, steps, warmup=0):
  """Median seconds per call of each fn, calls interleaved so a shared machine's drift hits all alike."""
  for fn in fns:
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = [[] for _ in fns]
  for _ in range(steps):
    for fn, t in zip(fns, times):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      t.append(time.perf_counter() - start)
  return [float(np.median(t)) for t in times]
