"""Training library: sharded step parity, kill-and-resume, recipe numbers, losses, eval counts, checkpoints."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import assert_trees_close
from noisy_student import checkpoint, sharding, train, trainer
from noisy_student import normalization as normalization_lib
from noisy_student.models import create_model

NUM_CLASSES = 10
IMAGE = 16
BATCH = 16


def make_batch(step, batch=BATCH):
  """Deterministic per-step batch: half labeled (one-hot), half pseudo-labeled (soft targets)."""
  rng = np.random.default_rng(1000 + step)
  labels = rng.integers(0, NUM_CLASSES, batch)
  soft = rng.dirichlet(np.ones(NUM_CLASSES), batch).astype(np.float32)
  is_labeled = np.arange(batch) < batch // 2
  targets = np.where(is_labeled[:, None], np.eye(NUM_CLASSES, dtype=np.float32)[labels], soft)
  return {
    "image": rng.normal(size=(batch, IMAGE, IMAGE, 3)).astype(np.float32),
    "targets": targets.astype(np.float32),
    "is_labeled": is_labeled,
  }


@pytest.fixture(scope="module")
def setup():
  """One model / optimizer / initial state for the module (the jitted init costs ~15 s on CPU)."""
  model = create_model("efficientnet-tiny", num_classes=NUM_CLASSES)
  # No warmup, so the first step already moves the weights.
  schedule = train.learning_rate_schedule(0.4, BATCH * 16, steps_per_epoch=10, total_steps=100, warmup_epochs=0)
  tx = train.create_optimizer("rmsprop", schedule, weight_decay=1e-5)
  state = jax.device_get(train.create_train_state(model, tx, jax.random.key(0), IMAGE))
  return model, tx, schedule, state


_STEP_FNS = {}
# The CPU suite simulates 8 devices (conftest.py); on one accelerator these tests cannot run.
needs_8_devices = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices, found fewer")


def _step_fn(setup, mesh_shape, param_sharding="replicate"):
  """(mesh, state shardings, step), compiled once per mesh shape and rule for the module."""
  key = (mesh_shape, param_sharding)
  if key not in _STEP_FNS:
    model, tx, schedule, init = setup
    data, fsdp = mesh_shape
    mesh = sharding.create_mesh(data, fsdp, devices=jax.devices()[: data * fsdp])
    shardings = sharding.state_shardings(init, mesh, param_sharding)
    _STEP_FNS[key] = (
      mesh,
      shardings,
      train.make_train_step(model, tx, mesh, schedule=schedule, state_shardings=shardings),
    )
  return _STEP_FNS[key]


def run_steps(setup, mesh_shape, start_state, first, last, param_sharding="replicate"):
  mesh, shardings, step_fn = _step_fn(setup, mesh_shape, param_sharding)
  state = jax.device_put(jax.device_get(start_state), shardings)
  metrics = []
  for step in range(first, last):
    state, m = step_fn(state, sharding.host_to_global(make_batch(step), mesh))
    trainer.check_finite(m["loss"], step)
    metrics.append(jax.device_get(m))
  if param_sharding == "fsdp":  # the returned state really is split: large arrays over the 'fsdp' axis
    specs = [tuple(x.sharding.spec) for x in jax.tree.leaves(state.opt_state) + jax.tree.leaves(state.params)]
    assert any("fsdp" in s for s in specs) and any(s == () for s in specs), specs
  return jax.device_get(state), metrics


@pytest.mark.parametrize("mesh_shape,param_sharding", [((4, 2), "replicate"), ((8, 1), "replicate"), ((2, 4), "fsdp")])
@needs_8_devices
def test_train_step_on_8_devices_matches_1_device(setup, mesh_shape, param_sharding):
  init = setup[3]
  one, m1 = run_steps(setup, (1, 1), init, 0, 1)
  many, m8 = run_steps(setup, mesh_shape, init, 0, 1, param_sharding)
  np.testing.assert_allclose(m8[0]["loss"], m1[0]["loss"], rtol=1e-5)
  np.testing.assert_allclose(m8[0]["grad_norm"], m1[0]["grad_norm"], rtol=1e-4)
  assert int(one.step) == int(many.step) == 1
  # The step really trained: params moved by about lr per element (RMSProp's first step).
  moved = np.max(np.abs(one.params["classifier"]["kernel"] - init.params["classifier"]["kernel"]))
  assert 1e-3 < moved < 1.0
  for name in ("params", "batch_stats", "ema_params", "ema_batch_stats", "opt_state"):
    # Each leaf within 1e-4 of its scale, at least 1e-2: leaves zero in exact arithmetic (the bias of a batch
    # norm feeding another) hold ~1e-7 of reassociation noise after one step, different on every mesh.
    assert_trees_close(getattr(many, name), getattr(one, name), atol=1e-4, floor=1e-2)
  # EMA warm-up: after step 0 the average is 0.1 * old + 0.9 * new.
  np.testing.assert_allclose(
    one.ema_params["classifier"]["kernel"],
    0.1 * init.params["classifier"]["kernel"] + 0.9 * one.params["classifier"]["kernel"],
    rtol=1e-5,
    atol=1e-7,
  )


def test_kill_and_resume_is_bit_identical(setup, tmp_path):
  init = setup[3]
  straight, straight_metrics = run_steps(setup, (1, 1), init, 0, 3)

  first, _ = run_steps(setup, (1, 1), init, 0, 2)
  manager = checkpoint.create_manager(str(tmp_path / "ckpt"), max_to_keep=2)
  checkpoint.save(manager, first, int(first.step))
  manager.wait_until_finished()
  del first
  # "Restart": a fresh state of the same model, overwritten by the latest checkpoint.
  mesh, _, _ = _step_fn(setup, (1, 1))
  restored = checkpoint.restore_latest(checkpoint.create_manager(str(tmp_path / "ckpt")), train.replicate(init, mesh))
  assert int(restored.step) == 2
  resumed, resumed_metrics = run_steps(setup, (1, 1), restored, int(restored.step), 3)

  assert resumed_metrics[-1]["loss"] == straight_metrics[-1]["loss"]
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_restore_with_other_class_count_names_the_variable(setup, tmp_path):
  model, tx, _, state = setup
  manager = checkpoint.create_manager(str(tmp_path / "ckpt"))
  checkpoint.save(manager, state, 0)
  manager.wait_until_finished()
  other = create_model("efficientnet-tiny", num_classes=NUM_CLASSES + 1)
  template = jax.eval_shape(lambda: train.create_train_state(other, tx, jax.random.key(0), IMAGE))
  with pytest.raises(
    checkpoint.CheckpointMismatchError,
    match=r"params/classifier/bias: checkpoint .* shape \(10,\), model expects \(11,\)",
  ):
    checkpoint.restore_latest(manager, template)


def test_learning_rate_schedule_numbers():
  # batch 1024 -> peak 0.016 * 4; 100 steps per epoch.
  peak = 0.064
  lr = train.learning_rate_schedule(0.016, 1024, steps_per_epoch=100, total_steps=3000, warmup_epochs=1)
  np.testing.assert_allclose([lr(0), lr(50), lr(100)], [0.0, peak / 2, peak], rtol=1e-6)
  # Staircase: x0.97 once 2.4 epochs (240 steps) have passed, counted from step 0 as in TF.
  np.testing.assert_allclose([lr(239), lr(240), lr(480)], [peak, peak * 0.97, peak * 0.97**2], rtol=1e-6)
  # With TF's rule a 5-epoch warmup ends at floor(5 / 2.4) = 2 decays.
  lr5 = train.learning_rate_schedule(0.016, 1024, 100, 3000, warmup_epochs=5)
  np.testing.assert_allclose([lr5(499), lr5(500)], [peak * 499 / 500, peak * 0.97**2], rtol=1e-6)
  cos = train.learning_rate_schedule(0.1, 256, 100, total_steps=1000, warmup_epochs=0, schedule="cosine")
  np.testing.assert_allclose([cos(0), cos(500), cos(1000)], [0.1, 0.05, 0.0], rtol=1e-6, atol=1e-9)
  with pytest.raises(ValueError, match="linear"):
    train.learning_rate_schedule(0.1, 256, 100, 1000, schedule="linear")


def test_ema_warmup_rule():
  np.testing.assert_allclose(train.ema_decay_at(0, 0.9999), 0.1, rtol=1e-6)
  np.testing.assert_allclose(train.ema_decay_at(90, 0.9999), 0.91, rtol=1e-6)
  np.testing.assert_allclose(train.ema_decay_at(10**6, 0.9999), 0.9999, rtol=1e-7)


def test_weight_decay_mask_skips_batch_norm_only():
  params = {
    "stem_conv": {"kernel": 1.0},
    "stem_bn": {"scale": 1.0, "bias": 1.0},
    "blocks_0": {"se": {"reduce": {"bias": 1.0}}, "project_bn": {"scale": 1.0}},
    "classifier": {"bias": 1.0},
  }
  assert train.weight_decay_mask(params) == {
    "stem_conv": {"kernel": True},
    "stem_bn": {"scale": False, "bias": False},
    "blocks_0": {"se": {"reduce": {"bias": True}}, "project_bn": {"scale": False}},
    "classifier": {"bias": True},
  }


def test_rmsprop_first_two_steps_match_tf_formula():
  lr, wd, eps = 0.1, 0.01, 1e-3
  tx = train.create_optimizer("rmsprop", lr, wd)
  params = {"w": jnp.array([1.0, -2.0]), "x_bn": {"scale": jnp.array([3.0])}}
  grads = {"w": jnp.array([0.5, 0.25]), "x_bn": {"scale": jnp.array([1.0])}}
  opt_state = tx.init(params)
  ms = {"w": np.ones(2), "x_bn": np.ones(1)}  # TF initialises the mean square to 1
  mom = {"w": np.zeros(2), "x_bn": np.zeros(1)}
  p = {"w": np.array([1.0, -2.0]), "x_bn": np.array([3.0])}
  for _ in range(2):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    for k, g in (("w", np.array([0.5, 0.25]) + wd * p["w"]), ("x_bn", np.array([1.0]))):
      ms[k] = 0.9 * ms[k] + 0.1 * g**2
      mom[k] = 0.9 * mom[k] + lr * g / np.sqrt(ms[k] + eps)
      p[k] = p[k] - mom[k]
  np.testing.assert_allclose(params["w"], p["w"], rtol=1e-6)
  np.testing.assert_allclose(params["x_bn"]["scale"], p["x_bn"], rtol=1e-6)


class FixedLogits:
  """Stands in for the model: returns given logits (and echoes batch_stats), so losses are hand-checkable."""

  def __init__(self, logits):
    self.logits = jnp.asarray(logits, jnp.float32)

  def apply(self, variables, images, train, mutable=(), rngs=None):
    if mutable:
      return self.logits, {"batch_stats": variables["batch_stats"]}
    return self.logits


def log_softmax(z):
  z = np.asarray(z, np.float64)
  return z - np.log(np.sum(np.exp(z), -1, keepdims=True))


def test_loss_is_smoothed_ce_on_labeled_plus_soft_ce_on_pseudo_labeled():
  logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0], [0.0, 3.0, 0.0]])
  targets = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], np.float32)
  is_labeled = np.array([True, False, True])
  batch = {"image": np.zeros((3, 1, 1, 3), np.float32), "targets": targets, "is_labeled": is_labeled}
  loss, (_, metrics) = train.loss_fn({}, {}, batch, jax.random.key(0), model=FixedLogits(logits), label_smoothing=0.1)
  ls = log_softmax(logits)
  smoothed = np.array([1 - 0.1 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
  row0 = -np.sum(smoothed * ls[0])  # labeled, label smoothing
  row1 = -np.sum(np.array([0.2, 0.3, 0.5]) * ls[1])  # pseudo-labeled: teacher distribution as is
  row2 = -np.sum(smoothed * ls[2])
  np.testing.assert_allclose(loss, (row0 + row1 + row2) / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics["labeled_loss"], (row0 + row2) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["unlabeled_loss"], row1, rtol=1e-6)
  assert float(metrics["accuracy"]) == 0.5  # row 0 right, row 2 wrong; row 1 not counted


def test_non_finite_loss_raises_naming_the_step():
  trainer.check_finite(jnp.float32(1.5), 3)
  with pytest.raises(FloatingPointError, match="at step 7"):
    trainer.check_finite(jnp.float32(math.nan), 7)
  with pytest.raises(FloatingPointError, match="at step 8"):
    trainer.check_finite(np.float32(np.inf), 8)


@pytest.mark.parametrize("normalization", ["imagenet", "svhn"])
def test_uint8_pixels_train_as_the_host_standardized_ones(setup, normalization):
  """The uint8 input contract: the step standardizes uint8 pixels on the device exactly as the host would,
  and passes a float (already standardized) batch through, so old and new pipelines train alike."""
  model, tx, schedule, init = setup
  mesh = sharding.create_mesh(1, 1, devices=jax.devices()[:1])
  step_fn = train.make_train_step(model, tx, mesh, schedule=schedule, normalization=normalization)
  batch = make_batch(0)
  pixels = np.random.default_rng(7).integers(0, 256, batch["image"].shape, dtype=np.uint8)
  on_host = normalization_lib.normalize_pixels(pixels, normalization)
  assert on_host.dtype == np.float32
  results = []
  for images in (pixels, on_host):
    state = train.replicate(init, mesh)  # fresh buffers: the step donates its state
    results.append(jax.device_get(step_fn(state, sharding.host_to_global(dict(batch, image=images), mesh))))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_explicit_axis_mesh_is_refused(setup):
  mesh = jax.make_mesh((jax.device_count(), 1), sharding.BATCH_AXES, axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  with pytest.raises(ValueError, match="AxisType.Auto"):
    train.make_train_step(setup[0], setup[1], mesh)
