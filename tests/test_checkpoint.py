"""checkpoint.py: a train state saved and restored bit for bit onto any sharding, the newest of several steps,
the exported EMA variables, and errors that name the folder and the variable."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from noisy_student import checkpoint, sharding, train


def tiny_state(seed: int, classes: int = 3, step: int = 7) -> train.TrainState:
  """A real TrainState of a one-layer model with a batch norm, its arrays drawn from `seed`: RMSProp moments
  after one update, EMA copies that differ from the weights, the rng as raw uint32 key data."""
  rng = np.random.default_rng(seed)

  def draw(*shape):
    return rng.normal(size=shape).astype(np.float32)

  params = {"dense": {"kernel": draw(4, classes), "bias": draw(classes)}, "head_bn": {"scale": draw(4)}}
  tx = train.create_optimizer("rmsprop", 0.1, weight_decay=1e-5)
  _, opt_state = tx.update(jax.tree.map(lambda p: draw(*p.shape), params), tx.init(params), params)
  return train.TrainState(
    step=jnp.int32(step),
    params=params,
    batch_stats={"head_bn": {"mean": draw(4)}},
    opt_state=opt_state,
    ema_params=jax.tree.map(lambda p: draw(*p.shape), params),
    ema_batch_stats={"head_bn": {"mean": draw(4)}},
    rng=jax.random.key_data(jax.random.key(seed)),
  )


def assert_bit_identical(actual, desired):
  """Same tree, and every leaf the same bytes: same shape, dtype and values."""
  assert jax.tree.structure(actual) == jax.tree.structure(desired)
  for (path, a), d in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(desired)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(d), strict=True, err_msg=jax.tree_util.keystr(path))


def _steps(folder):
  return sorted(int(p) for p in os.listdir(folder) if p.isdigit())


def test_saved_state_restores_bit_identical_onto_another_sharding(tmp_path):
  """Saved from one device, restored onto a template of other values split over 8 devices (fsdp over 2):
  every leaf - step, rng, weights, batch statistics, RMSProp moments, EMA copies - comes back exactly, with the
  template's shardings."""
  folder = str(tmp_path / "ckpt")
  state = tiny_state(0)
  with checkpoint.create_manager(folder) as manager:
    assert checkpoint.restore_latest(manager, state) is None  # an empty folder: start from scratch
    assert checkpoint.save(manager, state, int(state.step))
  mesh = sharding.create_mesh(4, 2)
  shardings = sharding.state_shardings(tiny_state(1), mesh, "fsdp", min_size=4)
  template = jax.device_put(tiny_state(1, step=0), shardings)
  with checkpoint.create_manager(folder) as manager:  # a restarted job: a new manager on the same folder
    restored = checkpoint.restore_latest(manager, template)
  assert isinstance(restored, train.TrainState) and int(restored.step) == 7
  assert_bit_identical(restored, state)
  assert restored.rng.dtype == np.uint32 and restored.rng.shape == (2,)
  assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, restored)) == jax.tree.leaves(shardings)
  assert restored.params["dense"]["kernel"].sharding.spec == PartitionSpec("fsdp")  # really split: (4, 3)


def test_the_newest_step_is_restored_and_only_the_newest_n_are_kept(tmp_path):
  folder = str(tmp_path / "ckpt")
  with checkpoint.create_manager(folder, max_to_keep=2, save_interval_steps=5) as manager:
    # Steps off the interval are skipped unless forced (the final step of a run, a SIGTERM).
    saved = {step: checkpoint.save(manager, tiny_state(step, step=step), step) for step in (0, 3, 5, 10)}
    assert saved == {0: True, 3: False, 5: True, 10: True}
    assert checkpoint.save(manager, tiny_state(12, step=12), 12, force=True)
    manager.wait_until_finished()
    assert _steps(folder) == [10, 12] and manager.all_steps() == [10, 12]
    restored = checkpoint.restore_latest(manager, tiny_state(99))
  assert int(restored.step) == 12
  assert_bit_identical(restored, tiny_state(12, step=12))
  with checkpoint.create_manager(folder, max_to_keep=None) as manager:  # keep all: nothing more is deleted
    for step in (13, 14, 15):
      checkpoint.save(manager, tiny_state(step, step=step), step)
    manager.wait_until_finished()
  assert _steps(folder) == [10, 12, 13, 14, 15]


def test_a_state_of_another_model_is_refused_naming_the_step_folder_and_variables(tmp_path):
  folder = str(tmp_path / "ckpt")
  with checkpoint.create_manager(folder) as manager:
    checkpoint.save(manager, tiny_state(0), 7)
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
      checkpoint.restore_latest(manager, tiny_state(0, classes=4))
  # 8 arrays differ (kernel and bias of the weights, their EMA copies and both moments); the first 5 are named.
  assert str(error.value) == (
    f"The checkpoint at step 7 in {folder} does not match the model (a different model, class count, "
    "optimizer or config.optimizer.frozen?): "
    "ema_params/dense/bias: checkpoint has shape (3,), model expects (4,); "
    "ema_params/dense/kernel: checkpoint has shape (4, 3), model expects (4, 4); "
    "opt_state/1/0/nu/dense/bias: checkpoint has shape (3,), model expects (4,); "
    "opt_state/1/0/nu/dense/kernel: checkpoint has shape (4, 3), model expects (4, 4); "
    "opt_state/1/2/trace/dense/bias: checkpoint has shape (3,), model expects (4,) (and 3 more)"
  )


def test_compatibility_names_missing_extra_and_reshaped_variables():
  saved = {"a": np.zeros((2, 3)), "b": {"c": np.zeros(4)}, "old": np.zeros(1)}
  expected = {"a": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": {"c": np.zeros(5)}, "new": np.zeros((1, 2))}
  with pytest.raises(checkpoint.CheckpointMismatchError) as error:
    checkpoint.check_compatible(saved, expected, where="the export in /x")
  assert str(error.value) == (
    "The export in /x does not match the model (a different model, class count, optimizer or "
    "config.optimizer.frozen?): b/c: checkpoint has shape (4,), model expects (5,); new: missing from the "
    "checkpoint (model expects shape (1, 2)); old: in the checkpoint (shape (1,)) but not in the model"
  )
  checkpoint.check_compatible(saved, saved)  # shapes are all it compares (dtypes are the template's)


def test_export_loads_onto_a_template_replicated_over_8_devices(tmp_path):
  """The EMA variables a finished run exports, loaded by a labeling job onto its own mesh: the exported values,
  each on the template's sharding; a template without shardings gets the default device."""
  folder = str(tmp_path / "run" / checkpoint.EXPORT_DIR)
  state = tiny_state(0)
  exported = train.eval_variables(state)
  checkpoint.save_inference_variables(folder, exported)
  assert os.path.exists(os.path.join(folder, "_CHECKPOINT_METADATA"))
  mesh = sharding.create_mesh()
  replicated = NamedSharding(mesh, PartitionSpec())
  other = train.eval_variables(tiny_state(1))
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), other)
  loaded = checkpoint.load_inference_variables(folder, template)
  assert_bit_identical(loaded, {"params": state.ema_params, "batch_stats": state.ema_batch_stats})
  for x, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(exported)):
    assert x.sharding == replicated and len(x.addressable_shards) == 8
    for shard in x.addressable_shards:
      np.testing.assert_array_equal(shard.data, want)
  plain = checkpoint.load_inference_variables(folder, jax.eval_shape(lambda: other))
  assert all(x.devices() == {jax.devices()[0]} for x in jax.tree.leaves(plain))
  assert_bit_identical(plain, exported)
  # Exporting again (a rerun's final step) replaces the export.
  checkpoint.save_inference_variables(folder, other)
  assert_bit_identical(checkpoint.load_inference_variables(folder, template), other)


def test_a_missing_or_mismatched_export_is_an_error_naming_the_folder(tmp_path):
  template = jax.eval_shape(lambda: train.eval_variables(tiny_state(0)))
  nowhere = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match=f"No exported teacher variables in {re.escape(str(nowhere))} "):
    checkpoint.load_inference_variables(str(nowhere), template)
  unfinished = tmp_path / "unfinished"  # a folder without orbax's metadata: an interrupted copy, say
  unfinished.mkdir()
  with pytest.raises(FileNotFoundError, match=re.escape(str(unfinished))):
    checkpoint.load_inference_variables(str(unfinished), template)
  folder = str(tmp_path / checkpoint.EXPORT_DIR)
  checkpoint.save_inference_variables(folder, train.eval_variables(tiny_state(0)))
  other = jax.eval_shape(lambda: train.eval_variables(tiny_state(0, classes=10)))
  with pytest.raises(
    checkpoint.CheckpointMismatchError,
    match=rf"^The exported variables in {re.escape(folder)} does not match the model .*"
    r"params/dense/bias: checkpoint has shape \(3,\), model expects \(10,\); "
    r"params/dense/kernel: checkpoint has shape \(4, 3\), model expects \(4, 10\)$",
  ):
    checkpoint.load_inference_variables(folder, other)


def test_relative_folders_are_taken_from_the_current_directory(tmp_path, monkeypatch):
  """`--workdir=workdirs/run`: orbax wants absolute paths, so a relative folder is resolved where the job runs."""
  monkeypatch.chdir(tmp_path)
  state = tiny_state(0)
  folder = os.path.join("workdirs", "run", "checkpoints")
  with checkpoint.create_manager(folder) as manager:
    checkpoint.save(manager, state, 7)
  assert _steps(tmp_path / folder) == [7]
  with checkpoint.create_manager(folder) as manager:
    assert_bit_identical(checkpoint.restore_latest(manager, tiny_state(1, step=0)), state)
  export = os.path.join("workdirs", "run", checkpoint.EXPORT_DIR)
  checkpoint.save_inference_variables(export, train.eval_variables(state))
  assert (tmp_path / export / "_CHECKPOINT_METADATA").exists()
  template = jax.eval_shape(lambda: train.eval_variables(state))
  assert_bit_identical(checkpoint.load_inference_variables(export, template), train.eval_variables(state))
  elsewhere = os.path.join(os.getcwd(), "elsewhere")  # the error names the folder it looked in
  with pytest.raises(FileNotFoundError, match=f"No exported teacher variables in {re.escape(elsewhere)} "):
    checkpoint.load_inference_variables("elsewhere", template)
