"""Pseudo-label records, statistics and the paper's selection, checked against hand-computed examples and
read back through the student's source (`open_source(..., copies=pl.copies_fn(selection, seed))`)."""

import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from noisy_student import outputs
from noisy_student import pseudo_labels as pl
from noisy_student.data import sources

ONE = dict(process_index=0, process_count=1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _unit_hash(text):
  return int(tf.strings.to_hash_bucket_fast(text, 2**31 - 1)) / (2**31 - 1)


def _probs(label, confidence, num_classes=10):
  p = np.full(num_classes, (1 - confidence) / (num_classes - 1), np.float32)
  p[label] = confidence
  return p


def _write_labels(folder, items, num_shards=1, num_bins=10, num_classes=10, manifest=True):
  """items: [(key, label, confidence)] -> shards + sidecars + stats.json as the labeling job writes them."""
  folder = str(folder)
  os.makedirs(folder, exist_ok=True)
  parts, shards = [], []
  for s in range(num_shards):
    mine = items[s::num_shards]
    with tf.io.TFRecordWriter(os.path.join(folder, pl.shard_name(s, num_shards))) as w:
      for key, label, conf in mine:
        w.write(pl.make_example(b"not decoded here", key.encode(), _probs(label, conf, num_classes)))
    parts.append(
      pl.shard_stats(
        np.array([m[1] for m in mine], np.int64),
        np.array([_probs(m[1], m[2], num_classes)[m[1]] for m in mine]),
        num_classes,
        num_bins,
      )
    )
    shards.append({"file": pl.shard_name(s, num_shards), "examples": len(mine)})
  stats = pl.merge_stats(parts)
  stats["shards"] = shards
  if manifest:
    outputs.write_json(os.path.join(folder, "stats.json"), stats)
  return stats


# The hand-computed example: 10 bins, threshold 0.3 (bins >= 3), N = 6 per class.
#   class 0: 5 x 0.95 (bin 9), 3 x 0.55 (bin 5), 2 x 0.35 (bin 3), 1 x 0.15 (bin 1): 10 above the threshold
#            > 6, so bin 9 whole (5) + 1 of the 3 in bin 5 (cutoff bin 5, fraction 1/3); bins 3 and 1 dropped
#   class 1: 2 x 0.45 (bin 4) above, 4 x 0.25 (bin 2) below: each of the 2 repeated 3 times
#   class 2: 3 x 0.75: each twice;  class 3: 4 x 0.65: 1.5 copies each (4 + a hashed 0..4)
#   class 4: 1 x 0.2, below the threshold: nothing
HAND = (
  [(f"c0_hi{i}", 0, 0.95) for i in range(5)]
  + [(f"c0_mid{i}", 0, 0.55) for i in range(3)]
  + [(f"c0_low{i}", 0, 0.35) for i in range(2)]
  + [("c0_out", 0, 0.15)]
  + [(f"c1_in{i}", 1, 0.45) for i in range(2)]
  + [(f"c1_out{i}", 1, 0.25) for i in range(4)]
  + [(f"c2_{i}", 2, 0.75) for i in range(3)]
  + [(f"c3_{i}", 3, 0.65) for i in range(4)]
  + [("c4_out", 4, 0.2)]
)


def test_selection_matches_the_hand_computed_example(tmp_path):
  stats = _write_labels(tmp_path, HAND)
  assert stats["num_examples"] == len(HAND) and stats["class_counts"][:5] == [11, 6, 3, 4, 1]
  sel = pl.select(stats, threshold=0.3, per_class=6)
  c = sel["classes"]
  assert sel["first_bin"] == 3 and sel["per_class"] == 6
  assert (c[0]["cutoff_bin"], c[0]["available"], c[0]["copies"]) == (5, 10, 1.0)
  assert c[0]["cutoff_fraction"] == pytest.approx(1 / 3)
  assert (c[1]["available"], c[1]["copies"]) == (2, 3.0)
  assert (c[2]["available"], c[2]["copies"]) == (3, 2.0)
  assert (c[3]["available"], c[3]["copies"]) == (4, 1.5)
  assert c[4]["available"] == 0 and c[4]["expected"] == 0
  assert sel["expected_total"] == pytest.approx(24.0)
  # N derived from the data: the mean count above the threshold over classes that have any, (10+2+3+4)/4.
  assert pl.select(stats, threshold=0.3)["per_class"] == 5
  # Without balancing only the threshold applies: 10 + 2 + 3 + 4 images, once each.
  assert pl.select(stats, threshold=0.3, balance=False)["expected_total"] == 19

  src = sources.open_source(str(tmp_path / "labels-*.tfrecord"), with_key=True, copies=pl.copies_fn(sel, 0), **ONE)
  got = collections.Counter(ex["key"].decode() for ex in src.dataset.as_numpy_iterator())
  assert src.num_examples == sum(got.values())
  assert all(got[f"c0_hi{i}"] == 1 for i in range(5))
  # The cutoff bin keeps a key iff its hash of "seed:keep:key", as a fraction, is below 1/3 (the docstring's
  # rule, computed here with TensorFlow's fingerprint hash directly).
  assert [got[f"c0_mid{i}"] for i in range(3)] == [int(_unit_hash(f"0:keep:c0_mid{i}") < 1 / 3) for i in range(3)]
  assert not any(k.startswith(("c0_low", "c0_out", "c1_out", "c4")) for k in got)
  assert [got[f"c1_in{i}"] for i in range(2)] == [3, 3]
  assert [got[f"c2_{i}"] for i in range(3)] == [2, 2, 2]
  assert [got[f"c3_{i}"] for i in range(4)] == [1 + int(_unit_hash(f"0:copy:c3_{i}") < 0.5) for i in range(4)]
  # Deterministic: the same seed keeps the same records; another seed may choose others but as many whole.
  again = sources.open_source(str(tmp_path / "labels-*.tfrecord"), with_key=True, copies=pl.copies_fn(sel, 0), **ONE)
  assert collections.Counter(ex["key"].decode() for ex in again.dataset.as_numpy_iterator()) == got


def test_hashed_fractions_hit_n_in_expectation_and_processes_agree(tmp_path):
  # class 0: 3,000 images in one bin, N = 1,000: keep a third; class 1: 400 images, 2.5 copies each.
  items = [(f"a{i}", 0, 0.55) for i in range(3000)] + [(f"b{i}", 1, 0.85) for i in range(400)]
  rng = np.random.default_rng(0)
  items = [items[i] for i in rng.permutation(len(items))]
  stats = _write_labels(tmp_path, items, num_shards=4)
  sel = pl.select(stats, threshold=0.3, per_class=1000)
  assert sel["classes"][0]["cutoff_fraction"] == pytest.approx(1 / 3) and sel["classes"][1]["copies"] == 2.5
  spec = str(tmp_path / "labels-*.tfrecord")
  whole = collections.Counter(
    ex["key"].decode()
    for ex in sources.open_source(spec, with_key=True, copies=pl.copies_fn(sel, 7), **ONE).dataset.as_numpy_iterator()
  )
  n_a = sum(v for k, v in whole.items() if k.startswith("a"))
  n_b = sum(v for k, v in whole.items() if k.startswith("b"))
  # Binomial(3000, 1/3): sd 26; 400 + Binomial(400, 1/2): sd 10. Four sd either side.
  assert abs(n_a - 1000) < 104 and abs(n_b - 1000) < 40, (n_a, n_b)
  assert set(v for k, v in whole.items() if k.startswith("b")) == {2, 3}
  # Two processes, each reading its own shards, select exactly the records one process selects.
  parts = collections.Counter()
  for p in range(2):
    src = sources.open_source(spec, with_key=True, copies=pl.copies_fn(sel, 7), process_index=p, process_count=2)
    parts.update(ex["key"].decode() for ex in src.dataset.as_numpy_iterator())
  assert parts == whole


def test_records_soft_topk_hard_and_temperature(tmp_path):
  logits = np.array([[2.0, 1.0, 0.0, -1.0]], np.float32)
  p1, p_half = pl.soft_labels(logits, 1.0)[0], pl.soft_labels(logits, 0.5)[0]
  np.testing.assert_allclose(p1, np.exp(logits[0]) / np.exp(logits[0]).sum(), rtol=1e-6)
  np.testing.assert_allclose(p_half, np.exp(2 * logits[0]) / np.exp(2 * logits[0]).sum(), rtol=1e-6)
  assert p_half.max() > p1.max()  # T < 1 sharpens
  with pytest.raises(ValueError, match="temperature"):
    pl.soft_labels(logits, 0.0)

  png = tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy()
  for mode in ("dense", "topk", "hard"):
    folder = tmp_path / mode
    folder.mkdir()
    with tf.io.TFRecordWriter(str(folder / pl.shard_name(0, 1))) as w:
      w.write(pl.make_example(png, b"k0", p1, top_k=2 if mode == "topk" else 0, hard=mode == "hard"))
    src = sources.open_source(str(folder / "*.tfrecord"), with_key=True, num_classes=4, **ONE)
    ex = next(src.dataset.as_numpy_iterator())
    assert ex["key"] == b"k0"
    if mode == "dense":
      np.testing.assert_allclose(ex["probabilities"], p1, rtol=1e-6)
    elif mode == "topk":  # the two largest, renormalized, scattered back to 4 classes
      np.testing.assert_allclose(ex["probabilities"], np.r_[p1[:2] / p1[:2].sum(), 0, 0], rtol=1e-6)
    else:
      assert ex["label"] == 0 and "probabilities" not in ex
  raw = next(iter(tf.data.TFRecordDataset(str(tmp_path / "dense" / pl.shard_name(0, 1)))))
  feats = tf.train.Example.FromString(raw.numpy()).features.feature
  assert feats["label"].int64_list.value == [0]
  assert feats["confidence"].float_list.value[0] == pytest.approx(p1[0])


def test_manifest_names_the_shards_readers_trust(tmp_path):
  _write_labels(tmp_path, HAND, num_shards=2)
  # A leftover file matching the glob but absent from the manifest (an old run's shard) is ignored.
  with tf.io.TFRecordWriter(str(tmp_path / pl.shard_name(0, 9))) as w:
    w.write(pl.make_example(b"x", b"stray", _probs(0, 0.9)))
  src = sources.open_source(str(tmp_path / "labels-*.tfrecord"), with_key=True, **ONE)
  assert src.num_examples == len(HAND)
  os.remove(tmp_path / pl.shard_name(1, 2))
  with pytest.raises(FileNotFoundError, match=r"stats.json names shards that are missing: .*labels-00001"):
    sources.open_source(str(tmp_path / "labels-*.tfrecord"), **ONE)


def test_corrupt_tfrecord_is_an_error_naming_the_file(tmp_path):
  _write_labels(tmp_path, HAND, num_shards=2, manifest=False)
  victim = tmp_path / pl.shard_name(1, 2)
  data = victim.read_bytes()
  victim.write_bytes(data[:-7])  # a truncated copy, as from an interrupted upload
  with pytest.raises(sources.CorruptRecordError, match=f"{victim}: corrupt TFRecord"):
    sources.open_source(str(tmp_path / "labels-*.tfrecord"), **ONE)
  victim.write_bytes(b"\x00" * 5 + data[5:])  # damaged header of the first record
  with pytest.raises(sources.CorruptRecordError, match=str(victim)):
    sources.open_source(str(tmp_path / "labels-*.tfrecord"), **ONE)


def test_selection_plot_is_a_png(tmp_path):
  stats = _write_labels(tmp_path, HAND)
  pl.plot_histograms(stats, tmp_path / "stats.png", pl.select(stats, per_class=6))
  assert (tmp_path / "stats.png").read_bytes()[:8] == PNG_MAGIC
