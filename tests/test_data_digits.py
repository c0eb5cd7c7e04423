"""The embedded digits dataset: built offline by tfds with the documented sizes and a fixed split."""

import numpy as np
import tensorflow_datasets as tfds
from sklearn import datasets as skdatasets

from noisy_student.data import digits, sources


def _load(split, data_dir):
  ds = tfds.load("digits", split=split, data_dir=data_dir, download=False)
  return list(tfds.as_numpy(ds))


def test_documented_sizes_and_features(data_dir):
  builder = tfds.builder("digits", data_dir=data_dir)  # registered by importing noisy_student.data
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 1300 == digits.NUM_TRAIN
  assert builder.info.splits["test"].num_examples == 497 == digits.NUM_TEST
  assert builder.info.features["label"].num_classes == 10
  assert builder.info.features["image"].shape == (8, 8, 1)


def test_split_is_fixed_stratified_and_disjoint(data_dir):
  train, test = _load("train", data_dir), _load("test", data_dir)
  train_ids = {int(e["id"]) for e in train}
  test_ids = {int(e["id"]) for e in test}
  assert len(train_ids) == 1300 and len(test_ids) == 497
  assert not train_ids & test_ids and train_ids | test_ids == set(range(1797))
  counts = np.bincount([e["label"] for e in test], minlength=10)
  assert counts.min() >= 48 and counts.max() <= 51  # stratified: ~49.7 per class
  again = digits.split_indices()
  assert set(again["test"].tolist()) == test_ids  # the split does not depend on the run


def test_pixels_match_scikit_learn(data_dir):
  raw = skdatasets.load_digits()
  for e in _load("test[:50]", data_dir):
    i = int(e["id"])
    assert e["image"].dtype == np.uint8 and e["image"].shape == (8, 8, 1)
    np.testing.assert_array_equal(e["image"][..., 0], np.round(raw.images[i] * 255 / 16).astype(np.uint8))
    assert e["label"] == raw.target[i]
  all_pixels = np.stack([e["image"] for e in _load("train", data_dir)])
  assert all_pixels.min() == 0 and all_pixels.max() == 255


def test_split_expressions_work_like_any_dataset(data_dir):
  src = sources.open_source("tfds:digits:train[:100]", data_dir=data_dir, process_index=0, process_count=1)
  assert src.num_examples == 100 and src.num_classes == 10
  src = sources.open_source("tfds:digits:train[:10%]+test[:7]", data_dir=data_dir, process_index=0, process_count=1)
  assert src.num_examples == 137


def test_prepared_on_first_use(tmp_path):
  src = sources.open_source("tfds:digits:test", data_dir=str(tmp_path), process_index=0, process_count=1)
  assert src.num_examples == 497
  assert (tmp_path / "digits" / "1.1.0" / "dataset_info.json").exists()
