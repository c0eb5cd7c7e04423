"""The eval-mode forward pass that evaluation, the labeling job and ImageNet-P share.

Every pipeline hands uint8 pixels to the devices; `make_forward` standardizes them there (normalization.py,
fused into the stem) and runs the model without noise (no dropout, no stochastic depth, moving batch-norm
statistics), giving float32 logits. It is a pure function of (variables, images): each user jits it with its
own shardings and outputs (evaluate.py: top-k counts; label.py: the logits; imagenet_p.py: top-5 classes).

Micro-batching (the labeling job): each device runs its rows in forward passes of `micro_batch_size(...)`
images, a loop inside the step. Eval mode has no batch statistics, so the logits are the same, and on CPU
small passes keep the activations in cache (efficientnet-b0 at 224: 8 images per pass run ~1.15-1.2x faster
than 32).
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from noisy_student import normalization as normalization_lib
from noisy_student import sharding

# (variables, images [B, S, S, 3]) -> float32 logits [B, classes]
Forward = Callable[[Any, jax.Array], jax.Array]

CPU_PIXELS_PER_PASS = 8 * 224 * 224  # per forward pass on XLA:CPU: b0's activations then stay in cache


def micro_batch_size(per_device: int, micro_batch: int = 0, backend: str = "", image_pixels: int = 224 * 224) -> int:
  """Images per forward pass within one device's share of a batch: the largest divisor of `per_device`
  that is at most `micro_batch`. 0 means automatic: on CPU as many images as make CPU_PIXELS_PER_PASS
  (8 at 224 px, where it was measured; every image of a 16 px batch), elsewhere the whole share."""
  if micro_batch <= 0:
    on_cpu = (backend or jax.default_backend()) == "cpu"
    micro_batch = max(1, CPU_PIXELS_PER_PASS // image_pixels) if on_cpu else per_device
  return max(d for d in range(1, min(micro_batch, per_device) + 1) if per_device % d == 0)


def make_forward(
  model, normalization: str = "imagenet", *, mesh: Optional[Mesh] = None, micro_batch: Optional[int] = None
) -> Forward:
  """(variables, images) -> float32 eval-mode logits, to be called inside the caller's jit.

  micro_batch None: one pass over the whole batch, with the variables sharded as they come (replicated, or
  fsdp-sharded EMA weights): evaluation. micro_batch >= 0 (0: automatic, see micro_batch_size) needs the
  mesh: each device loops over its rows of the batch-sharded images in passes (a shard_map over the mesh's
  batch axes), with a whole copy of the variables (replicated, as the labeling job loads them); the logits
  come out batch-sharded.
  """
  normalization_lib.check_normalization(normalization)  # an unknown name fails here, not in a trace

  def forward(variables, images):
    images = normalization_lib.model_input(images, normalization)
    return model.apply(variables, images, train=False).astype(jnp.float32)

  if micro_batch is None:
    return forward
  if mesh is None:
    raise ValueError("make_forward: micro-batching runs per device and needs the mesh.")
  rows = PartitionSpec(sharding.BATCH_AXES)
  platform = sharding.platform(mesh)

  def per_device(variables, images):
    n = images.shape[0]
    # The platform of the devices compiled for, not the default backend (a CPU host compiling for a TPU).
    size = micro_batch_size(n, micro_batch, platform, image_pixels=images.shape[1] * images.shape[2])
    if size == n:
      return forward(variables, images)
    passes = images.reshape(n // size, size, *images.shape[1:])
    return lax.map(lambda part: forward(variables, part), passes).reshape(n, -1)

  return jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(), rows), out_specs=rows)
