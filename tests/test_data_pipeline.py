"""Sources and batches: mocked tfds datasets, pseudo-label TFRecords, mixed batches, resume, exact eval."""

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from noisy_student import normalization as normalization_lib
from noisy_student import sharding
from noisy_student.data import pipeline, preprocess, sources

ONE = dict(process_index=0, process_count=1)


def _example(encoded, key, probs=None, topk=None, label=None):
  f = {
    "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
    "image/key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key])),
  }
  if probs is not None:
    f["probabilities"] = tf.train.Feature(float_list=tf.train.FloatList(value=probs))
    f["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(np.argmax(probs))]))
    f["confidence"] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(np.max(probs))]))
  if topk is not None:
    f["topk/indices"] = tf.train.Feature(int64_list=tf.train.Int64List(value=topk[0]))
    f["topk/probabilities"] = tf.train.Feature(float_list=tf.train.FloatList(value=topk[1]))
  if label is not None:
    f["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
  return tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString()


def write_pseudo_labels(data_dir, out_dir, num_shards=3, split="train[1000:1090]", mode="dense"):
  """Pseudo-label shards in DESIGN.md's schema from digits images; returns {key: probabilities}."""
  src = sources.open_source(f"tfds:digits:{split}", data_dir=data_dir, with_key=True, **ONE)
  rng = np.random.default_rng(0)
  expected, records = {}, []
  for ex in src.dataset.as_numpy_iterator():
    p = rng.dirichlet(np.ones(10)).astype(np.float32)
    if mode == "dense":
      records.append(_example(ex["image"], ex["key"], probs=p))
    elif mode == "topk":
      idx = np.argsort(-p)[:3]
      p = np.zeros(10, np.float32) + np.bincount(idx, p[idx] / p[idx].sum(), minlength=10)
      records.append(_example(ex["image"], ex["key"], topk=(idx, p[idx])))
    else:
      records.append(_example(ex["image"], ex["key"], label=int(ex["label"])))
      p = np.eye(10, dtype=np.float32)[ex["label"]]
    expected[ex["key"]] = p
  for s in range(num_shards):
    with tf.io.TFRecordWriter(f"{out_dir}/labels-{s:05d}-of-{num_shards:05d}.tfrecord") as w:
      for r in records[s::num_shards]:
        w.write(r)
  return expected


# ------------------------------------------------------------------------------------------ sources


def test_not_prepared_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(sources.DatasetNotPreparedError, match=r"tfds build mnist --data_dir=") as e:
    sources.open_source("tfds:mnist:train", data_dir=str(tmp_path), **ONE)
  assert "never downloads" in str(e.value)
  with pytest.raises(sources.DatasetNotPreparedError, match="Unknown tfds dataset 'no_such_set'"):
    sources.open_source("tfds:no_such_set:train", data_dir=str(tmp_path), **ONE)
  with pytest.raises(ValueError, match="tfds:NAME:SPLIT"):
    sources.open_source("tfds:digits", data_dir=str(tmp_path), **ONE)
  with pytest.raises(FileNotFoundError, match="No TFRecord files match"):
    sources.open_source(str(tmp_path / "labels-*.tfrecord"), **ONE)


def test_unlabeled_source_drops_labels_and_keys_are_stable(data_dir):
  src = sources.open_source("tfds:digits:train[:20]", data_dir=data_dir, labeled=False, with_key=True, **ONE)
  ex = next(src.dataset.as_numpy_iterator())
  assert set(ex) == {"image", "key"} and ex["image"][:4] == b"\x89PNG"
  keys1 = [e["key"] for e in src.dataset.as_numpy_iterator()]
  keys2 = [
    e["key"]
    for e in sources.open_source(
      "tfds:digits:train[:20]", data_dir=data_dir, with_key=True, **ONE
    ).dataset.as_numpy_iterator()
  ]
  assert keys1 == keys2 and len(set(keys1)) == 20


@pytest.mark.parametrize("mode", ["dense", "topk", "hard"])
def test_pseudo_label_tfrecords(data_dir, tmp_path, mode):
  expected = write_pseudo_labels(data_dir, tmp_path, mode=mode)
  src = sources.open_source(str(tmp_path / "labels-*.tfrecord"), with_key=True, num_classes=10, **ONE)
  assert src.num_examples == 90 and src.num_classes == 10
  got = list(src.dataset.as_numpy_iterator())
  assert {e["key"] for e in got} == set(expected)
  for e in got:
    target = e["probabilities"] if "probabilities" in e else np.eye(10)[e["label"]]
    np.testing.assert_allclose(target, expected[e["key"]], rtol=1e-6)
  # Two processes read disjoint file shards covering everything.
  parts = [
    sources.open_source(
      str(tmp_path / "labels-*.tfrecord"), with_key=True, num_classes=10, process_index=i, process_count=2
    )
    for i in range(2)
  ]
  keys = [{e["key"] for e in p.dataset.as_numpy_iterator()} for p in parts]
  assert not keys[0] & keys[1] and keys[0] | keys[1] == set(expected)
  assert [p.num_examples for p in parts] == [60, 30]


def test_bad_pseudo_label_records_name_file_and_key(data_dir, tmp_path):
  path = tmp_path / "labels-00000-of-00001.tfrecord"
  with tf.io.TFRecordWriter(str(path)) as w:
    w.write(
      tf.train.Example(
        features=tf.train.Features(feature={"image/key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"k"]))})
      ).SerializeToString()
    )
  with pytest.raises(ValueError, match=r"labels-00000-of-00001.tfrecord.*'image/encoded'"):
    sources.open_source(str(path), **ONE)
  write_pseudo_labels(data_dir, tmp_path, num_shards=1)
  with pytest.raises(ValueError, match=r"'probabilities' has 10 classes, expected 1000"):
    sources.open_source(str(path), num_classes=1000, **ONE)


# ------------------------------------------------------------------------------------------- train


@pytest.mark.parametrize(
  "name,size,crop,eval_crop,classes",
  [
    ("imagenet2012", 224, "inception", "center", 1000),
    ("cifar10", 32, "pad_crop", "resize", 10),
    ("svhn_cropped", 32, "pad_crop", "resize", 10),
  ],
)
def test_mocked_tfds_datasets_through_train_and_eval(name, size, crop, eval_crop, classes):
  mesh = sharding.create_mesh()
  with tfds.testing.mock_data(num_examples=12):
    src = sources.open_source(f"tfds:{name}:train", **ONE)
    it = pipeline.train_iterator(
      src, labeled_batch=8, image_size=size, seed=0, mesh=mesh, crop=crop, noise=pipeline.Noise(2, 15)
    )
    batch = next(it)
    assert batch["image"].shape == (8, size, size, 3) and batch["image"].dtype == np.uint8
    assert batch["targets"].shape == (8, classes)
    np.testing.assert_array_equal(np.asarray(batch["targets"]).sum(1), np.ones(8))
    assert np.asarray(batch["is_labeled"]).all()
    assert batch["image"].sharding == sharding.batch_sharding(mesh)
    assert len(batch["image"].addressable_shards) == 8
    eval_src = sources.open_source(f"tfds:{name}:test", **ONE)
    batches = list(pipeline.eval_iterator(eval_src, global_batch=8, image_size=size, crop=eval_crop, mesh=mesh))
  assert [b["image"].shape for b in batches] == [(8, size, size, 3)] * 2
  assert sum(int(np.asarray(b["mask"]).sum()) for b in batches) == 12
  assert all(0 <= int(label) < classes for b in batches for label in np.asarray(b["label"]))


def _small_train(data_dir, tmp_path, start_step, steps, **kw):
  write_pseudo_labels(data_dir, tmp_path)
  labeled = sources.open_source("tfds:digits:train[:50]", data_dir=data_dir, **ONE)
  pseudo = sources.open_source(str(tmp_path / "labels-*.tfrecord"), num_classes=10, **ONE)
  kw = dict(dict(batch_size=16, unlabeled_batch_size=32), **kw)
  ds = pipeline.train_dataset(
    labeled,
    image_size=16,
    seed=42,
    start_step=start_step,
    unlabeled=pseudo,
    crop="pad_crop",
    pad=2,
    flip=False,
    noise=pipeline.Noise(2, 9),
    **kw,
  )
  return list(ds.take(steps).as_numpy_iterator())


def test_global_order_gives_each_process_its_rows_of_the_one_process_batches(data_dir, tmp_path):
  """global_rows=(p, 2): two processes reading the sources whole produce exactly the halves of the
  one-process batches (augmentations included), from step 0 and after a resume at step 4."""
  for start in (0, 4):
    whole = _small_train(data_dir, tmp_path, start, 3)
    halves = [
      _small_train(data_dir, tmp_path, start, 3, global_rows=(p, 2), batch_size=8, unlabeled_batch_size=16)
      for p in range(2)
    ]
    for step, batch in enumerate(whole):
      for k in batch:
        lab = np.concatenate([halves[0][step][k][:8], halves[1][step][k][:8]])
        pseudo = np.concatenate([halves[0][step][k][8:], halves[1][step][k][8:]])
        np.testing.assert_array_equal(np.concatenate([lab, pseudo]), batch[k], err_msg=f"{start} {step} {k}")


def test_mixed_batches_layout(data_dir, tmp_path):
  (batch,) = _small_train(data_dir, tmp_path, 0, 1)
  assert batch["image"].shape == (48, 16, 16, 3) and batch["targets"].shape == (48, 10)
  np.testing.assert_array_equal(batch["is_labeled"], [True] * 16 + [False] * 32)
  labeled_t, pseudo_t = batch["targets"][:16], batch["targets"][16:]
  assert set(np.unique(labeled_t)) == {0.0, 1.0}  # one-hot (smoothing is the loss's job)
  np.testing.assert_allclose(pseudo_t.sum(1), 1.0, rtol=1e-5)
  assert (pseudo_t.max(1) < 1.0).all()  # soft teacher distributions


def test_train_batch_spec_is_what_the_iterator_yields(data_dir, tmp_path):
  """The abstract batch a train step is compiled for before the pipeline exists (trainer.py) must be
  exactly the batches that then arrive: shapes, dtypes and shardings."""
  write_pseudo_labels(data_dir, tmp_path)
  mesh = sharding.create_mesh()
  labeled = sources.open_source("tfds:digits:train[:50]", data_dir=data_dir, **ONE)
  pseudo = sources.open_source(str(tmp_path / "labels-*.tfrecord"), num_classes=10, **ONE)
  batch = next(
    pipeline.train_iterator(
      labeled,
      labeled_batch=8,
      image_size=16,
      seed=0,
      unlabeled=pseudo,
      ratio=3,
      mesh=mesh,
      crop="resize",
      noise=pipeline.Noise(2, 5),
    )
  )
  spec = pipeline.train_batch_spec(32, 16, 10, mesh)
  assert set(spec) == set(batch)
  for k, array in batch.items():
    assert (array.shape, array.dtype, array.sharding) == (spec[k].shape, spec[k].dtype, spec[k].sharding), k


@pytest.mark.parametrize("cache", [True, False])
def test_resume_gives_the_same_batches(data_dir, tmp_path, cache):
  # 50 labeled examples, 16 per step: epochs end mid-batch at steps 3, 6, ...; 90 pseudo, 32 per step.
  full = _small_train(data_dir, tmp_path, 0, 9, cache=cache)
  resumed = _small_train(data_dir, tmp_path, 5, 4, cache=cache)
  for a, b in zip(full[5:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(full[0]["image"], full[1]["image"])


def test_every_epoch_is_a_new_permutation(data_dir):
  src = sources.open_source("tfds:digits:train[:40]", data_dir=data_dir, with_key=True, **ONE)
  keys = [e[1]["key"] for e in pipeline.stream(src, start=0, seed=1, stream_id=0).take(120).as_numpy_iterator()]
  epochs = [keys[i * 40 : (i + 1) * 40] for i in range(3)]
  all_keys = {e["key"] for e in src.dataset.as_numpy_iterator()}
  for ep in epochs:
    assert set(ep) == all_keys and len(ep) == 40
  assert epochs[0] != epochs[1] != epochs[2]
  positions = [int(p) for p, _ in pipeline.stream(src, start=77, seed=1, stream_id=0).take(3).as_numpy_iterator()]
  later = [e[1]["key"] for e in pipeline.stream(src, start=77, seed=1, stream_id=0).take(3).as_numpy_iterator()]
  assert positions == [77, 78, 79] and later == keys[77:80]


def test_batch_must_divide_devices(data_dir):
  src = sources.open_source("tfds:digits:train[:50]", data_dir=data_dir, **ONE)
  with pytest.raises(ValueError, match="multiple of the 8 batch devices") as error:
    next(pipeline.train_iterator(src, labeled_batch=12, image_size=8, seed=0, mesh=sharding.create_mesh()))
  assert "--nocpu_device_per_core" in str(error.value)  # how to choose another count on a CPU


# -------------------------------------------------------------------------------------------- eval


def test_eval_iterator_sets_up_in_the_call(data_dir, monkeypatch):
  """The batch count (a collective across processes when a source lacks per-process counts) is agreed in
  the call, on the caller's thread: a read_ahead.ReadAhead thread that consumes the batches runs no
  collective."""
  src = sources.open_source("tfds:digits:test[:20]", data_dir=data_dir, **ONE)
  calls, count = [], pipeline.eval_num_batches
  monkeypatch.setattr(pipeline, "eval_num_batches", lambda *a: calls.append(a) or count(*a))
  batches = pipeline.eval_iterator(src, global_batch=8, image_size=8, mesh=sharding.create_mesh())
  assert len(calls) == 1
  with pytest.raises(ValueError, match="multiple of the 8 batch devices"):
    pipeline.eval_iterator(src, global_batch=12, image_size=8, mesh=sharding.create_mesh())
  assert [int(b["mask"].sum()) for b in batches] == [8, 8, 4]


@pytest.mark.parametrize("devices", [1, 8])
def test_eval_counts_every_example_once(data_dir, devices):
  mesh = sharding.create_mesh(devices=jax.devices()[:devices])
  src = sources.open_source("tfds:digits:test", data_dir=data_dir, with_key=True, **ONE)
  batches = list(pipeline.eval_iterator(src, global_batch=64, image_size=8, crop="resize", mesh=mesh, with_raw=True))
  assert len(batches) == 8  # ceil(497 / 64)
  masks = np.concatenate([np.asarray(b["mask"]) for b in batches])
  labels = np.concatenate([np.asarray(b["label"]) for b in batches])
  assert masks.sum() == 497 and not masks[497:].any()
  keys = [k for b in batches for k, m in zip(b["local"]["key"], b["local"]["mask"]) if m]
  assert len(set(keys)) == 497
  truth = [e["label"] for e in src.dataset.as_numpy_iterator()]
  np.testing.assert_array_equal(np.bincount(labels[masks], minlength=10), np.bincount(truth, minlength=10))


def test_eval_batches_are_uint8_pixels_that_standardize_to_the_tf_floats(data_dir):
  """Eval batches carry the eval crop's uint8 pixels (padding rows zeros) with their keys; a step's
  normalize_pixels of them is the tf standardization of the same crops, bit for bit, for each normalization."""
  src = sources.open_source("tfds:digits:test[:40]", data_dir=data_dir, with_key=True, **ONE)
  pixels = list(
    pipeline.eval_dataset(
      src, batch_size=16, num_batches=3, image_size=8, crop="resize", with_raw=True
    ).as_numpy_iterator()
  )
  examples = list(src.dataset.as_numpy_iterator())
  crops = np.stack([preprocess.eval_image(ex["image"], 8, crop="resize").numpy() for ex in examples])
  assert len(pixels) == 3
  images = np.concatenate([u["image"] for u in pixels])
  real = np.concatenate([u["mask"] for u in pixels])
  assert images.dtype == np.uint8 and real.sum() == 40 and not real[40:].any()
  np.testing.assert_array_equal(images[:40], crops)
  assert not images[40:].any()  # padding rows are zeros
  np.testing.assert_array_equal(np.concatenate([u["key"] for u in pixels])[:40], [ex["key"] for ex in examples])
  for normalization in ("imagenet", "svhn"):
    floats = np.stack([preprocess.normalize(c, normalization).numpy() for c in crops])
    np.testing.assert_array_equal(normalization_lib.normalize_pixels(images[:40], normalization), floats)


def test_pipelines_run_without_the_autotune_thread(data_dir):
  """tf.data's autotuning thread made iterator teardown wait up to ~9 s beside jax (see _options)."""
  src = sources.open_source("tfds:digits:test[:40]", data_dir=data_dir, with_key=True, **ONE)
  train = sources.open_source("tfds:digits:train[:40]", data_dir=data_dir, **ONE)
  for ds in (
    pipeline.eval_dataset(src, batch_size=16, num_batches=3, image_size=8, crop="resize"),
    pipeline.train_dataset(train, batch_size=8, image_size=8, seed=0, crop="resize"),
  ):
    assert ds.options().autotune.enabled is False


def test_eval_parts_of_three_processes_cover_the_split(data_dir):
  """Each of 3 processes runs the same number of padded batches; masks count every example once."""
  keys, nums = [], set()
  for i in range(3):
    src = sources.open_source("tfds:digits:test", data_dir=data_dir, with_key=True, process_index=i, process_count=3)
    assert src.max_process_examples == 166  # 497 = 166 + 166 + 165
    n = pipeline.eval_num_batches(src, 16)
    nums.add(n)
    for b in pipeline.eval_dataset(
      src, batch_size=16, num_batches=n, image_size=8, crop="resize", with_raw=True
    ).as_numpy_iterator():
      keys += [k for k, m in zip(b["key"], b["mask"]) if m]
  assert nums == {11} and len(keys) == len(set(keys)) == 497


def test_eval_start_batch_equals_the_tail_of_a_full_pass(data_dir):
  """A resumed labeling job starts at a batch: the same batches as the full pass from there, padding
  included, even when only padding is left (5 real batches, 7 in all)."""
  src = sources.open_source("tfds:digits:test[:37]", data_dir=data_dir, with_key=True, **ONE)
  full = list(
    pipeline.eval_dataset(
      src, batch_size=8, num_batches=7, image_size=8, crop="resize", with_raw=True
    ).as_numpy_iterator()
  )
  for start in (0, 2, 4, 5, 6):
    tail = list(
      pipeline.eval_dataset(
        src, batch_size=8, num_batches=7, image_size=8, crop="resize", with_raw=True, start_batch=start
      ).as_numpy_iterator()
    )
    assert len(tail) == 7 - start
    for a, b in zip(full[start:], tail):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
  assert [int(b["mask"].sum()) for b in full] == [8, 8, 8, 8, 5, 0, 0]


def test_small_image_noise_is_the_official_order_and_sizes():
  """crop='pad_crop' with RandAugment (CIFAR/SVHN): RandAugment with 4 px translate/cutout constants at
  32 px, then a 16x16 Cutout of 128s, then the reflect-pad crop and flip - checked in numpy on draws chosen
  by hand (TranslateX at M = 10 moves 32 // 8 = 4 px; the Cutout square is cropped and mirrored with the
  image)."""
  from noisy_student.data import randaugment as ra

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  translate = ra.OPS.index("TranslateX")
  draws = {
    "op": tf.constant([[translate, ra.OPS.index("Invert")]] * 3, tf.int32),
    "negate": tf.constant([[False, False], [True, False], [False, False]]),
    "center": tf.zeros([3, 2, 2], tf.int32),
  }
  centers = np.array([[10, 20], [0, 0], [31, 5]], np.int32)
  crops = {"offset": tf.constant([[0, 8], [4, 4], [8, 0]], tf.int32), "flip": tf.constant([False, True, True])}
  out = pipeline._small_image_noise(
    tf.constant(images), draws, tf.constant(centers), crops, pipeline.Noise(2, 10.0), pad=4, size=32
  ).numpy()
  for i, image in enumerate(images):
    shifted = np.full_like(image, 128)
    if draws["negate"][i, 0]:
      shifted[:, :-4] = image[:, 4:]  # content moves left by 4
    else:
      shifted[:, 4:] = image[:, :-4]  # right by 4
    expected = 255 - shifted
    cy, cx = centers[i]
    expected[max(cy - 8, 0) : cy + 8, max(cx - 8, 0) : cx + 8] = 128
    padded = np.pad(expected, [[4, 4], [4, 4], [0, 0]], mode="reflect")
    y, x = np.asarray(crops["offset"][i])
    window = padded[y : y + 32, x : x + 32]
    np.testing.assert_array_equal(out[i], window[:, ::-1] if crops["flip"][i] else window, err_msg=str(i))


def test_pad_crop_batch_equals_per_image_pad_crop():
  """Each image's window of its reflect-padded self (numpy) at its drawn offset, mirrored when drawn; one
  image at a time (`pad_crop`) gives the same."""
  images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  seeds = [tf.constant([s, 7], tf.int64) for s in range(8)]
  draws = [preprocess.pad_crop_draw(s, 2, flip=True) for s in seeds]
  batch = preprocess.pad_crop_batch(
    tf.constant(images), tf.stack([d["offset"] for d in draws]), tf.stack([d["flip"] for d in draws]), 2
  ).numpy()
  for i, (s, d) in enumerate(zip(seeds, draws)):
    y, x = np.asarray(d["offset"])
    window = np.pad(images[i], [[2, 2], [2, 2], [0, 0]], mode="reflect")[y : y + 16, x : x + 16]
    np.testing.assert_array_equal(batch[i], window[:, ::-1] if bool(d["flip"]) else window, err_msg=str(i))
    np.testing.assert_array_equal(batch[i], preprocess.pad_crop(images[i], 16, s, pad=2, flip=True).numpy())
  flips = [bool(preprocess.pad_crop_draw(tf.constant([s, 1], tf.int64), 2, flip=True)["flip"]) for s in range(40)]
  assert 10 < sum(flips) < 30
  assert not any(bool(preprocess.pad_crop_draw(tf.constant([s, 1], tf.int64), 2)["flip"]) for s in range(40))


def test_train_batches_are_uint8_for_any_normalization(data_dir, tmp_path):
  """Train batches are the augmented uint8 pixels; the step standardizes them with the configured statistics
  (SVHN's instead of ImageNet's): the same pixels either way, other floats, and an unknown name is an error."""
  (batch,) = _small_train(data_dir, tmp_path, 0, 1)
  assert batch["image"].dtype == np.uint8
  standardized = {name: normalization_lib.normalize_pixels(batch["image"], name) for name in ("imagenet", "svhn")}
  pixels = {}
  for name, images in standardized.items():
    mean, std = (np.asarray(v, np.float64) for v in normalization_lib.NORMALIZATIONS[name])
    pixels[name] = images * std + mean
  np.testing.assert_allclose(pixels["svhn"], pixels["imagenet"], atol=1e-3)
  np.testing.assert_allclose(pixels["imagenet"], batch["image"], atol=1e-3)
  assert np.abs(standardized["svhn"] - standardized["imagenet"]).max() > 0.1
  with pytest.raises(ValueError, match="config.data.normalization='cifar'"):
    normalization_lib.normalize_pixels(batch["image"], "cifar")
