"""sharding.py on the 8 simulated CPU devices: mesh shapes, the batch split, the fsdp rule, host <-> global batches."""

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from noisy_student import sharding, train
from noisy_student.models import create_model

# The CPU suite simulates 8 devices (conftest.py); on one accelerator these tests cannot run.
pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs exactly 8 devices")


@pytest.mark.parametrize("fsdp,data", [(1, 8), (2, 4), (8, 1)])
def test_mesh_takes_for_data_what_fsdp_leaves(fsdp, data):
  mesh = sharding.create_mesh(fsdp=fsdp)
  assert dict(mesh.shape) == {"data": data, "fsdp": fsdp}
  assert mesh.axis_names == sharding.BATCH_AXES and mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  assert list(mesh.devices.flat) == jax.devices()  # fsdp neighbours are consecutive devices
  sharding.check_auto_axes(mesh)
  assert sharding.batch_devices(mesh) == 8


def test_mesh_over_some_devices_and_the_errors_for_impossible_shapes():
  mesh = sharding.create_mesh(2, 2, devices=jax.devices()[4:])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2} and sharding.batch_devices(mesh) == 4
  assert [d.id for d in mesh.devices.flat] == [4, 5, 6, 7]
  for fsdp in (0, 3, 16):
    with pytest.raises(ValueError, match=rf"^fsdp={fsdp} must divide the number of devices \(8\)\.$"):
      sharding.create_mesh(fsdp=fsdp)
  with pytest.raises(ValueError, match=r"^mesh data=3 x fsdp=2 = 6 != 8 devices\.$"):
    sharding.create_mesh(3, 2)


def test_explicit_axes_are_refused_naming_them():
  explicit = jax.make_mesh((8, 1), sharding.BATCH_AXES, axis_types=(AxisType.Explicit,) * 2)
  with pytest.raises(ValueError, match=r"AxisType.Auto axes .*got \{'data': Explicit, 'fsdp': Explicit\}"):
    sharding.check_auto_axes(explicit)


def test_fsdp_splits_the_largest_divisible_dimension_of_large_arrays_only():
  spec = sharding.fsdp_spec
  P = PartitionSpec
  assert spec((3, 3, 64, 96), 8) == P(None, None, None, "fsdp")  # a kernel: its output channels
  assert spec((3, 3, 96, 64), 8) == P(None, None, "fsdp")
  assert spec((1001, 24), 8) == P(None, "fsdp")  # the largest (1001) does not divide: the next one
  assert spec((128, 128), 8) == P("fsdp")  # a tie: the first
  assert spec((2**14,), 8) == P("fsdp")
  # Replicated: fsdp=1, fewer than 2**14 elements (biases, batch-norm vectors), or no divisible dimension.
  assert spec((3, 3, 64, 96), 1) == P()
  assert spec((8, 2048), 8) == P(None, "fsdp") and spec((8, 2047), 8) == P()  # 16,384 and 16,376 elements
  assert spec((64,), 8) == P() and spec((), 8) == P()
  assert spec((131, 129), 8) == P()  # 16,899 elements, neither dimension a multiple of 8
  assert spec((64, 64), 8, min_size=1024) == P("fsdp")


def test_state_shardings_shard_params_moments_and_ema_copies_alike():
  model = create_model("efficientnet-tiny", num_classes=10)
  tx = train.create_optimizer("rmsprop", 0.1, weight_decay=1e-5)
  state = jax.eval_shape(lambda: train.create_train_state(model, tx, jax.random.key(0), 16))
  mesh = sharding.create_mesh(4, 2)
  specs = {
    jax.tree_util.keystr(path): s.spec
    for path, s in jax.tree_util.tree_leaves_with_path(sharding.state_shardings(state, mesh, "fsdp"))
  }
  split = {k: v for k, v in specs.items() if v != PartitionSpec()}
  # efficientnet-tiny has two arrays of 2**14 elements or more; each is split alike in the params, both
  # RMSProp moments and the EMA copy.
  kernels = {
    "['blocks_6']['project_conv']['kernel']": PartitionSpec(None, None, "fsdp"),  # (1, 1, 288, 80)
    "['head_conv']['kernel']": PartitionSpec(None, None, None, "fsdp"),
  }  # (1, 1, 80, 320)
  copies = (".params", ".ema_params", ".opt_state[1][0].nu", ".opt_state[1][2].trace")
  assert split == {prefix + k: v for prefix in copies for k, v in kernels.items()}
  assert all(
    isinstance(s, NamedSharding) and s.mesh == mesh
    for s in jax.tree.leaves(sharding.state_shardings(state, mesh, "fsdp"))
  )
  # 'replicate', or 'fsdp' on a mesh without an fsdp axis, replicate everything.
  assert set(jax.tree.leaves(jax.tree.map(lambda s: s.spec, sharding.state_shardings(state, mesh)))) == {
    PartitionSpec()
  }
  flat = sharding.state_shardings(state, sharding.create_mesh(), "fsdp")
  assert {s.spec for s in jax.tree.leaves(flat)} == {PartitionSpec()}
  with pytest.raises(ValueError, match=r"param_sharding='zero'; expected one of \('replicate', 'fsdp'\)"):
    sharding.state_shardings(state, mesh, "zero")


def test_an_fsdp_array_keeps_one_slice_per_fsdp_index_replicated_over_data():
  mesh = sharding.create_mesh(4, 2)
  kernel = np.arange(8 * 2048, dtype=np.float32).reshape(8, 2048)
  placed = jax.device_put(kernel, sharding.state_shardings(kernel, mesh, "fsdp"))
  assert placed.sharding.spec == PartitionSpec(None, "fsdp")
  for shard in placed.addressable_shards:
    column = shard.device.id % 2  # the fsdp index: devices 0, 2, 4, 6 hold the first half
    np.testing.assert_array_equal(shard.data, kernel[:, column * 1024 : (column + 1) * 1024])
  np.testing.assert_array_equal(np.asarray(placed), kernel)


def test_host_batch_becomes_a_global_batch_split_in_device_order_and_comes_back_exactly():
  mesh = sharding.create_mesh(4, 2)
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.integers(0, 256, (16, 4, 4, 3), dtype=np.uint8),
    "targets": rng.dirichlet(np.ones(10), 16).astype(np.float32),
    "is_labeled": np.arange(16) < 8,
  }
  on_devices = sharding.host_to_global(batch, mesh)
  assert on_devices.keys() == batch.keys()
  for name, x in on_devices.items():
    assert isinstance(x, jax.Array) and x.shape == batch[name].shape and x.dtype == batch[name].dtype
    assert x.sharding == sharding.batch_sharding(mesh) == NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    for shard in x.addressable_shards:  # device i holds rows 2i, 2i + 1
      i = shard.device.id
      np.testing.assert_array_equal(shard.data, batch[name][2 * i : 2 * i + 2])
    back = multihost_utils.global_array_to_host_local_array(x, mesh, PartitionSpec(sharding.BATCH_AXES))
    np.testing.assert_array_equal(np.asarray(back), batch[name], strict=True)
    np.testing.assert_array_equal(np.asarray(x), batch[name], strict=True)


def test_a_batch_the_devices_cannot_split_evenly_is_an_error():
  mesh = sharding.create_mesh(4, 2)
  for rows in (12, 4):
    with pytest.raises(ValueError, match=rf"axis 0 is partitioned 8 times, but the dimension size is {rows}"):
      sharding.host_to_global({"image": np.zeros((rows, 2, 2, 3), np.float32)}, mesh)
  # Over a mesh of 4 of the devices the same 12 rows are 3 per device.
  four = sharding.create_mesh(devices=jax.devices()[:4])
  assert sharding.host_to_global({"x": np.zeros((12, 3))}, four)["x"].addressable_shards[0].data.shape == (3, 3)
