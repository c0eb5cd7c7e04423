"""FixRes-style fine-tuning: frozen parameters (config.optimizer.frozen) and starting from an export (init_from)."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from helpers import digits_config, load_config
from noisy_student import checkpoint, iterate, sharding, train, trainer
from noisy_student.data import sources
from noisy_student.models import create_model
from noisy_student.models.efficientnet import shallow_layers_pattern

FROZEN = shallow_layers_pattern(0.25, 2)  # efficientnet-tiny: stem and blocks 0-1


def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def test_shallow_layers_pattern_names_the_stem_and_the_first_stages():
  assert shallow_layers_pattern(1.0, 3) == "^(stem_conv|stem_bn|blocks_0|blocks_1|blocks_2|blocks_3|blocks_4)/"
  # L2 (depth 5.3): stages of 1, 2, 2 blocks become 6 + 11 + 11.
  assert shallow_layers_pattern(5.3, 3).endswith("|blocks_27)/")


def test_frozen_parameters_get_no_update_and_their_statistics_still_move():
  model = create_model("efficientnet-tiny", num_classes=10)
  tx = train.create_optimizer("rmsprop", 0.05, weight_decay=1e-5, frozen=FROZEN)
  mesh = sharding.create_mesh()
  state = train.create_train_state(model, tx, jax.random.key(0), 16, mesh=mesh)
  before = jax.device_get(state)  # the step donates the state
  step = train.make_train_step(model, tx, mesh)
  rng = np.random.default_rng(0)
  for _ in range(3):
    batch = {
      "image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
      "targets": np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)],
      "is_labeled": np.ones(16, bool),
    }
    state, _ = step(state, sharding.host_to_global(batch, mesh))
  params, old = _flat(state.params), _flat(before.params)
  frozen = [k for k in params if k.startswith(("stem_", "blocks_0/", "blocks_1/"))]
  kernels = [k for k in params if k not in frozen and k.endswith("kernel")]
  assert len(frozen) > 10 and len(kernels) > 10
  for k in frozen:
    np.testing.assert_array_equal(params[k], old[k], err_msg=k)
  assert all(not np.array_equal(params[k], old[k]) for k in kernels)
  # Batch-norm statistics are not parameters: the frozen layers' still follow the data.
  stats, old_stats = _flat(state.batch_stats), _flat(before.batch_stats)
  assert not np.array_equal(stats["stem_bn/mean"], old_stats["stem_bn/mean"])
  # No optimizer moments are kept for frozen parameters.
  plain = train.create_optimizer("rmsprop", 0.05, weight_decay=1e-5).init(before.params)
  assert sum(x.size for x in jax.tree.leaves(state.opt_state)) < sum(x.size for x in jax.tree.leaves(plain))


def test_a_frozen_pattern_must_match_some_but_not_all_parameters():
  params = jax.eval_shape(
    lambda: create_model("efficientnet-tiny", num_classes=10).init(
      jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), train=False
    )
  )["params"]
  trainer.check_frozen(FROZEN, params)
  with pytest.raises(ValueError, match=r"frozen='\^stemconv/' matches 0 of \d+ parameters"):
    trainer.check_frozen("^stemconv/", params)
  with pytest.raises(ValueError, match="matches (\\d+) of \\1 parameters"):
    trainer.check_frozen("kernel|bias|scale", params)


def test_fine_tuning_at_a_larger_size_starts_from_the_export(tmp_path, monkeypatch):
  """A digits model exported at 16 px, fine-tuned at 24 px for a few steps with its shallow layers frozen:
  the run starts from the export exactly, the frozen layers end where they started, the rest move."""
  config = digits_config()
  config.model.name = "efficientnet-tiny"
  source = train.create_train_state(
    trainer.build_model(config), trainer.build_optimizer(config, 1, 1)[1], jax.random.key(7), 16
  )
  export = str(tmp_path / "pretrained" / checkpoint.EXPORT_DIR)
  checkpoint.save_inference_variables(export, train.eval_variables(source))

  config.update(mode="train", init_from=export, num_train_steps=4, log_every_steps=2, seed=3)
  config.model.image_size = 24
  config.data.update(
    labeled="tfds:digits:train[:200]",
    ratio=0,
    randaugment_layers=0,
    crop="center",
    flip=False,
    labeled_batch=16,
    eval_batch=64,
  )
  config.optimizer.update(frozen=FROZEN, warmup_epochs=0.0)
  config.evaluate.suites = ""

  fresh = train.create_train_state(
    trainer.build_model(config),
    trainer.build_optimizer(config, 1, 1)[1],
    jax.random.key(3),
    24,
    mesh=sharding.create_mesh(),
  )
  started = trainer.initialize_from(fresh, export)
  for got, want in [
    (started.params, source.ema_params),
    (started.ema_params, source.ema_params),
    (started.batch_stats, source.ema_batch_stats),
  ]:
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  workdir = tmp_path / "finetune"

  def unprepared_suite(*args):
    del args
    raise sources.DatasetNotPreparedError("imagenet_v2 is not prepared")

  # A robustness suite whose dataset is not prepared fails after training, but only after the export and
  # eval.json are written (a 10-class model cannot run the real suites: that is refused before training).
  monkeypatch.setattr(trainer, "robustness", unprepared_suite)
  with pytest.raises(sources.DatasetNotPreparedError, match="imagenet_v2"):
    trainer.train_and_evaluate(config, str(workdir))
  monkeypatch.undo()
  result = trainer.outputs.read_json(workdir / trainer.EVAL_FILE)
  assert result["step"] == 4 and result["count"] == 497
  # The final checkpoint (its optimizer state split by frozen / trained) restores and evaluates the same.
  assert trainer.evaluate_checkpoint(config, str(workdir)) == result
  template = jax.eval_shape(lambda: train.eval_variables(fresh))
  tuned = checkpoint.load_inference_variables(str(workdir / checkpoint.EXPORT_DIR), template)
  tuned, initial = _flat(tuned["params"]), _flat(source.ema_params)
  frozen = [k for k in tuned if k.startswith(("stem_", "blocks_0/", "blocks_1/"))]
  for k in frozen:  # the export holds EMA weights: an average of equal values, equal up to rounding
    np.testing.assert_allclose(tuned[k], initial[k], rtol=1e-6, atol=1e-7, err_msg=k)
  assert all(not np.allclose(tuned[k], initial[k]) for k in tuned if k not in frozen and k.endswith("kernel"))


def test_init_from_a_missing_export_names_the_folder(tmp_path):
  model = create_model("efficientnet-tiny", num_classes=10)
  state = train.create_train_state(model, train.create_optimizer("sgd", 0.1), jax.random.key(0), 16)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
    trainer.initialize_from(state, str(tmp_path / "nowhere"))


def test_frozen_layers_need_a_starting_point_and_the_loop_refuses_fine_tuning_keys(tmp_path):
  config = digits_config()
  config.update(mode="train", num_train_steps=2)
  config.data.update(labeled="tfds:digits:train[:64]", ratio=0, labeled_batch=16)
  config.optimizer.frozen = FROZEN
  with pytest.raises(ValueError, match="without config.init_from would freeze randomly initialized layers"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  config.mode = "iterate"
  with pytest.raises(ValueError, match="config.init_from / config.optimizer.frozen are for fine-tuning"):
    iterate.plan(config)


def test_a_stage_saved_before_new_config_keys_still_resumes(tmp_path):
  config = load_config("digits")
  saved = config.to_dict()
  del saved["init_from"], saved["evaluate"]
  saved["optimizer"].pop("frozen")
  trainer.outputs.write_json(tmp_path / iterate.STAGE_CONFIG, saved)
  iterate._check_same_config(tmp_path, config)  # pylint: disable=protected-access  # the added keys are at their defaults
  config.evaluate.suites = "imagenet_a"  # reporting only: may change on a rerun
  iterate._check_same_config(tmp_path, config)  # pylint: disable=protected-access
  config.optimizer.frozen = "^stem_"
  with pytest.raises(iterate.StageConfigMismatchError, match=r"optimizer.frozen: '' -> '\^stem_'"):
    iterate._check_same_config(tmp_path, config)  # pylint: disable=protected-access
