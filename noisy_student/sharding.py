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


def create_mesh(data: Optional[int] = None, fsdp: int = 1,
                devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices; `data=None` takes whatever `fsdp` leaves."""
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"fsdp={fsdp} must divide the number of devices ({len(devices)}).")
  if data is None:
    data = len(devices) // fsdp
  if data * fsdp != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} != {len(devices)} devices.")
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


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
