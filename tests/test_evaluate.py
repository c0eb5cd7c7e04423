"""evaluate.py: exact top-1 / top-5 counts, class-subset ranking, mCE, and the robustness suites end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from noisy_student import checkpoint, evaluate, sharding, train, trainer
from noisy_student import normalization as normalization_lib
from noisy_student.config_defaults import base_config
from noisy_student.data import pipeline, sources

ONE = dict(process_index=0, process_count=1)


class FixedLogits:
  """Stands in for the model: the same given logits for any images."""

  def __init__(self, logits, num_classes=None):
    self.logits = jnp.asarray(logits, jnp.float32)
    self.num_classes = num_classes or self.logits.shape[-1]

  def apply(self, variables, images, train):
    return self.logits


def test_eval_counts_are_exact_and_sharding_independent():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(16, 10)).astype(np.float32)
  order = np.argsort(-logits, axis=-1)
  labels = np.concatenate([order[:6, 0], order[6:10, 3], order[10:, 7]])  # 6 top-1, 10 top-5
  mask = np.ones(16, bool)
  mask[[0, 7, 15]] = False  # padding rows: one top-1 hit, one top-5 hit, one miss
  batch = {"image": np.zeros((16, 1, 1, 3), np.float32), "label": labels, "mask": mask}
  expected = {"top1_correct": 5.0, "top5_correct": 8.0, "count": 13.0}
  model = FixedLogits(logits)
  assert {k: float(v) for k, v in evaluate.eval_step({}, batch, model=model).items()} == expected
  mesh = sharding.create_mesh(4, 2)
  counts = evaluate.make_eval_step(model, mesh)({}, sharding.host_to_global(batch, mesh))
  totals = evaluate.accumulate(evaluate.accumulate(None, counts), counts)
  assert totals == {k: 2 * v for k, v in expected.items()}
  assert evaluate.summary(totals) == {"top1": 5 / 13, "top5": 8 / 13, "count": 26.0}


def test_eval_step_standardizes_uint8_pixels_with_its_normalization():
  """The pipelines hand uint8 pixels to the step, which standardizes them on the device with the configured
  statistics: its counts are those of the model's logits on normalize_pixels(images, normalization)."""

  class ChannelMeans:  # a "model" whose logits are its inputs' channel means: they show the standardization
    num_classes = 3

    def apply(self, variables, images, train):
      del variables, train
      return images.mean(axis=(1, 2))

  pixels = np.random.default_rng(2).integers(0, 256, (16, 4, 4, 3), dtype=np.uint8)
  pixels[:8] = 115  # ImageNet's statistics rank channel 2 first here, SVHN's channel 0
  mask = np.ones(16, bool)
  mask[3] = False
  imagenet_logits = normalization_lib.normalize_pixels(pixels, "imagenet").mean(axis=(1, 2))
  labels = np.argmax(imagenet_logits, axis=-1)
  mesh = sharding.create_mesh()
  top1 = {}
  for normalization in ("imagenet", "svhn"):
    batch = sharding.host_to_global({"image": pixels, "label": labels, "mask": mask}, mesh)
    counts = evaluate.make_eval_step(ChannelMeans(), mesh, normalization=normalization)({}, batch)
    logits = normalization_lib.normalize_pixels(pixels, normalization).mean(axis=(1, 2))
    expected = evaluate.topk_counts(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    assert {k: float(v) for k, v in counts.items()} == {k: float(v) for k, v in expected.items()}
    top1[normalization] = float(counts["top1_correct"])
  assert top1["imagenet"] == 15 and top1["svhn"] < 15
  with pytest.raises(ValueError, match="config.data.normalization='cifar'"):
    evaluate.make_eval_step(ChannelMeans(), mesh, normalization="cifar")


def test_class_subset_ranks_only_its_classes():
  subset = np.asarray(evaluate.IMAGENET_A_CLASSES)
  outside = np.setdiff1d(np.arange(1000), subset)
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(64, 1000)).astype(np.float32)
  logits[:, outside[:3]] += 10.0  # the 1000-way winners are never ImageNet-A classes
  within = subset[np.argsort(-logits[:, subset], axis=-1)]
  labels = np.concatenate([within[:20, 0], within[20:30, 4], within[30:40, 5], outside[3:27]])
  counts = evaluate.topk_counts(jnp.asarray(logits), jnp.asarray(labels), jnp.ones(64), subset)
  assert {k: float(v) for k, v in counts.items()} == {"top1_correct": 20.0, "top5_correct": 30.0, "count": 64.0}
  # Over all 1000 classes the same rows have no top-1 hit at all.
  assert float(evaluate.topk_counts(jnp.asarray(logits), jnp.asarray(labels), jnp.ones(64))["top1_correct"]) == 0
  with pytest.raises(ValueError, match="reaches class 988, but the model has 10 classes"):
    evaluate.make_eval_step(FixedLogits(np.zeros((1, 10))), sharding.create_mesh(), subset)


def test_subset_lists_are_200_distinct_imagenet_classes():
  for classes in (evaluate.IMAGENET_A_CLASSES, evaluate.IMAGENET_R_CLASSES):
    assert len(classes) == 200 and list(classes) == sorted(set(classes)) and 0 <= classes[0] < classes[-1] < 1000
  assert len(evaluate.ALEXNET_CORRUPTION_ERROR) == 15


def test_mean_corruption_error_by_hand():
  full = {c: {s: 0.5 for s in evaluate.IMAGENET_C_SEVERITIES} for c in evaluate.IMAGENET_C_CORRUPTIONS}
  full["fog"] = {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6, 5: 0.5}  # errors 0.1 ... 0.5, mean 0.3
  result = evaluate.mean_corruption_error(full)
  assert result["ce"]["fog"] == pytest.approx(0.3 / 0.819324)
  assert result["ce"]["brightness"] == pytest.approx(0.5 / 0.564592)
  expected = np.mean([0.3 / 0.819324] + [0.5 / e for c, e in evaluate.ALEXNET_CORRUPTION_ERROR.items() if c != "fog"])
  assert result["mce"] == pytest.approx(expected)
  # Part of the benchmark is never reported as its mCE.
  partial = evaluate.mean_corruption_error({"fog": {1: 0.9, 2: 0.8}, "snow": {1: 0.5, 2: 0.5}})
  assert "mce" not in partial and "ce" not in partial
  assert partial["ce_partial"]["fog"] == pytest.approx(0.15 / 0.819324)
  assert partial["mce_partial"] == pytest.approx((0.15 / 0.819324 + 0.5 / 0.866816) / 2)
  with pytest.raises(ValueError, match="Unknown ImageNet-C corruption 'rain'"):
    evaluate.mean_corruption_error({"rain": {1: 0.5}})


def _constant_logit_variables(model, bias, image_size):
  """The model's variables with a zero classifier kernel: every image gets `bias` as its logits."""
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))()
  params = dict(variables["params"])
  params["classifier"] = {
    "kernel": jnp.zeros_like(params["classifier"]["kernel"]),
    "bias": jnp.asarray(bias, jnp.float32),
  }
  return {"params": params, "batch_stats": variables["batch_stats"]}


def _labels(spec, crop, mesh):
  source = sources.open_source(spec, **ONE)
  labels = []
  for batch in pipeline.eval_iterator(source, global_batch=8, image_size=16, crop=crop, mesh=mesh):
    labels.append(np.asarray(batch["label"])[np.asarray(batch["mask"]).astype(bool)])
  return np.concatenate(labels)


def _expected(labels, bias, classes=None):
  classes = np.arange(len(bias)) if classes is None else np.asarray(classes)
  ranked = classes[np.argsort(-bias[classes], kind="stable")]
  return {
    "top1": float(np.mean(labels == ranked[0])),
    "top5": float(np.mean(np.isin(labels, ranked[:5]))),
    "count": float(len(labels)),
  }


def _robustness(model, variables, config, mesh):
  """evaluate.robustness on the config's values, as the trainer passes them."""
  suites = evaluate.parse_suites(
    **config.evaluate, num_classes=config.model.num_classes, normalization=config.data.normalization
  )
  return evaluate.robustness(
    model,
    variables,
    suites,
    mesh,
    data_dir=config.data.data_dir or None,
    image_size=config.model.image_size,
    global_batch=config.data.eval_batch,
    normalization=config.data.normalization,
  )


@pytest.fixture(name="suite_config")
def fixture_suite_config():
  c = base_config()
  c.model.update(name="efficientnet-tiny", num_classes=1000, image_size=16)
  c.data.update(eval="tfds:imagenet2012:validation", eval_batch=8)
  c.evaluate.update(
    suites="imagenet_a,imagenet_r,imagenet_v2,imagenet_c",
    imagenet_c_corruptions="fog,snow",
    imagenet_c_severities="1,5",
  )
  return c


def test_robustness_suites_on_mocked_datasets(suite_config):
  """Every suite through tfds, preprocessing and the sharded step, against the same answers by hand: the model
  predicts a fixed ranking (zero classifier kernel), so each suite's accuracy follows from its labels."""
  mesh = sharding.create_mesh()
  model = trainer.build_model(suite_config)
  with tfds.testing.mock_data(num_examples=40):
    labels = {
      name: _labels(spec, crop, mesh)
      for name, (spec, _, crop) in evaluate.SUITES.items()
      if name not in ("imagenet_c", "imagenet_p")
    }  # imagenet_p: tests/test_imagenet_p.py
    c_labels = {
      (c, s): _labels(evaluate.SUITES["imagenet_c"][0].format(corruption=c, severity=s), "resize", mesh)
      for c in ("fog", "snow")
      for s in (1, 5)
    }
    # Rank the classes by how often they occur as labels of the 200-class suites (then of ImageNet-C), with
    # class 0 (in neither subset) above all: an evaluation that ignored the subsets would predict class 0.
    counts = lambda ls: np.bincount(np.concatenate(ls), minlength=1000)
    bias = (
      100 * counts([labels["imagenet_a"], labels["imagenet_r"]])
      + counts(list(c_labels.values()))
      - np.arange(1000) * 1e-4
    )
    bias[0] = 1e6
    variables = _constant_logit_variables(model, bias, 16)
    result = _robustness(model, variables, suite_config, mesh)

  assert result["imagenet_a"] == _expected(labels["imagenet_a"], bias, evaluate.IMAGENET_A_CLASSES)
  assert result["imagenet_r"] == _expected(labels["imagenet_r"], bias, evaluate.IMAGENET_R_CLASSES)
  assert result["imagenet_v2"] == _expected(labels["imagenet_v2"], bias)
  assert result["imagenet_a"]["top1"] > 0 and result["imagenet_r"]["top1"] > 0  # not vacuous
  assert result["imagenet_a"]["count"] == 40
  c_top1 = {f"{c}_{s}": _expected(c_label, bias)["top1"] for (c, s), c_label in c_labels.items()}
  assert result["imagenet_c"]["top1"] == c_top1
  assert "mce" not in result["imagenet_c"]
  by_corruption = {c: {s: c_top1[f"{c}_{s}"] for s in (1, 5)} for c in ("fog", "snow")}
  assert result["imagenet_c"]["mce_partial"] == pytest.approx(
    evaluate.mean_corruption_error(by_corruption)["mce_partial"]
  )


def test_evaluate_mode_adds_the_suites_to_eval_json(suite_config, tmp_path):
  suite_config.evaluate.update(suites="imagenet_a,imagenet_c", imagenet_c_corruptions="fog", imagenet_c_severities="3")
  mesh = sharding.create_mesh()
  model = trainer.build_model(suite_config)
  _, tx = trainer.build_optimizer(suite_config, 1, 1)
  state = train.create_train_state(model, tx, jax.random.key(0), 16, mesh=mesh)
  manager = checkpoint.create_manager(str(tmp_path / trainer.CHECKPOINT_DIR))
  checkpoint.save(manager, state, 0, force=True)
  manager.wait_until_finished()
  with tfds.testing.mock_data(num_examples=12):
    result = trainer.evaluate_checkpoint(suite_config, str(tmp_path))
    direct = _robustness(model, train.eval_variables(state), suite_config, mesh)
  assert result["robustness"] == direct
  assert set(direct) == {"imagenet_a", "imagenet_c"} and direct["imagenet_a"]["count"] == 12
  assert set(direct["imagenet_c"]) == {"ce_partial", "mce_partial", "top1"} and list(direct["imagenet_c"]["top1"]) == [
    "fog_3"
  ]
  saved = trainer.outputs.read_json(tmp_path / trainer.EVAL_FILE)
  assert saved["robustness"]["imagenet_a"] == pytest.approx(direct["imagenet_a"])


def test_suites_on_a_model_that_is_not_imagenet_fail_before_training(tmp_path):
  config = base_config()
  config.model.update(name="efficientnet-tiny", num_classes=10)
  config.evaluate.suites = "imagenet_a"
  with pytest.raises(ValueError, match="config.model.num_classes=10; set config.evaluate.suites=''"):
    trainer.train_and_evaluate(config, str(tmp_path))
  config.model.num_classes = 1000
  config.data.normalization = "svhn"
  with pytest.raises(ValueError, match="standardized with ImageNet's statistics, but config.data.normalization='svhn'"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_unknown_suite_or_corruption_is_an_error_naming_the_key(suite_config):
  model = trainer.build_model(suite_config)
  suite_config.evaluate.suites = "imagenet_a,imagenet_o"
  with pytest.raises(ValueError, match=r"config.evaluate.suites: unknown \['imagenet_o'\]"):
    _robustness(model, {}, suite_config, sharding.create_mesh())
  suite_config.evaluate.update(suites="imagenet_c", imagenet_c_corruptions="fog,rain")
  with pytest.raises(ValueError, match=r"config.evaluate.imagenet_c_corruptions: unknown \['rain'\]"):
    _robustness(model, {}, suite_config, sharding.create_mesh())
  suite_config.evaluate.update(imagenet_c_corruptions="", imagenet_c_severities="1,six")
  with pytest.raises(ValueError, match=r"config.evaluate.imagenet_c_severities: unknown \['six'\]"):
    _robustness(model, {}, suite_config, sharding.create_mesh())
