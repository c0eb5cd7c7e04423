"""Mesh and batch-sharding helpers: one code path from a laptop CPU to a multi-host TPU pod.

The mesh has axes ('data', 'fsdp'); the batch is sharded over both. Axis types are chosen on purpose
(`AxisType.Auto`): jax 0.10's `jax.make_mesh` defaults to Explicit axes, which changes how unsharded inputs
and shard_map behave; Auto keeps the classic jit-with-NamedSharding (pjit) model.
"""

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")


def create_mesh(data: Optional[int] = None, fsdp: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices; `data=None` takes whatever `fsdp` leaves."""
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"fsdp={fsdp} must divide the number of devices ({len(devices)}).")
  if data is None:
    data = len(devices) // fsdp
  if data * fsdp != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} != {len(devices)} devices.")
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def platform(mesh: Mesh) -> str:
  """'cpu', 'gpu' or 'tpu': what the mesh's devices are, which is what a step is compiled for (a CPU process
  may build a mesh of compile-only TPU devices), so implementation choices follow it, not the default backend."""
  return mesh.devices.flat[0].platform


def check_auto_axes(mesh: Mesh) -> None:
  """Steps are written for Auto axes: the classic jit-with-NamedSharding model, where XLA propagates
  shardings and a reduction over the batch (loss mean, BN statistics, eval counts) is a global one.
  Explicit axes (jax.make_mesh's default in 0.10) put shardings into types; not tested under."""
  if any(t != AxisType.Auto for t in mesh.axis_types):
    raise ValueError(
      f"steps expect a mesh with AxisType.Auto axes (sharding.create_mesh); got "
      f"{dict(zip(mesh.axis_names, mesh.axis_types))}."
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over both mesh axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_devices(mesh: Mesh) -> int:
  """How many ways the batch is split (the global batch must be a multiple of it)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def host_to_global(tree: Any, mesh: Mesh) -> Any:
  """Host-local numpy batches (this process's rows) -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


# ----------------------------------------------------------------------------- parameter sharding rules

PARAM_SHARDINGS = ("replicate", "fsdp")
FSDP_MIN_SIZE = 2**14  # arrays smaller than this (biases, BN vectors, small kernels) stay replicated


def fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> PartitionSpec:
  """The rule for one array: its largest dimension divisible by the fsdp axis, split over 'fsdp'.

  Applied per array, so parameters, their optimizer moments and EMA copies (same shapes) shard alike.
  Arrays below `min_size` elements or without a divisible dimension are replicated.
  """
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return PartitionSpec()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return PartitionSpec(*([None] * dim + ["fsdp"]))
  return PartitionSpec()


def state_shardings(tree: Any, mesh: Mesh, mode: str = "replicate", min_size: int = FSDP_MIN_SIZE) -> Any:
  """NamedShardings for a train-state pytree (arrays or ShapeDtypeStructs): 'replicate' or 'fsdp'.

  fsdp (for L0-L2-sized models) keeps 1/fsdp of every large array per device; jit inserts the all-gathers
  before use and reduce-scatters the gradients, so the step computes the same numbers as replicated.
  """
  if mode not in PARAM_SHARDINGS:
    raise ValueError(f"param_sharding={mode!r}; expected one of {PARAM_SHARDINGS}.")
  fsdp = mesh.shape["fsdp"] if mode == "fsdp" else 1
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp, min_size)), tree)
