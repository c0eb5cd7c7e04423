"""The labeling job: un-noised teacher inference written as pseudo-label shards, distributed over processes,
resumable after SIGKILL with byte-identical output, and clear errors for a bad teacher.

The teacher is an untrained efficientnet-tiny exported once per module (what it predicts does not matter
here, only that every image is labeled exactly once with the teacher's eval-mode distribution).
"""

import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from helpers import digits_data_dir, free_port, process_flags, run_cli, start_cli, subprocess_env
from noisy_student import checkpoint, inference, label, outputs, pseudo_labels
from noisy_student.config_defaults import base_config, model_arguments
from noisy_student.cpu import devices as host_devices
from noisy_student.data import preprocess
from noisy_student.models import create_model

UNLABELED = "tfds:digits:train[:600]"


def _config(teacher_dir, **label_overrides):
  c = base_config()
  c.mode = "label"
  c.model.update(name="efficientnet-tiny", num_classes=10, image_size=16, bn_momentum=0.9)
  c.data.update(unlabeled_source=UNLABELED, data_dir=digits_data_dir(), eval_crop="resize", eval_batch=64)
  c.label.update(teacher_workdir=str(teacher_dir), shards_per_process=3, **label_overrides)
  return c


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A teacher workdir with exported variables (random weights, batch-norm statistics made non-trivial)."""
  folder = tmp_path_factory.mktemp("teacher")
  c = _config(folder)
  model = create_model(**model_arguments(c.model))
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 16, 16, 3)), train=False))(jax.random.key(0))
  variables = jax.tree.map(np.asarray, variables)
  variables["batch_stats"] = jax.tree.map(lambda v: v + 0.05, variables["batch_stats"])
  checkpoint.save_inference_variables(str(folder / checkpoint.EXPORT_DIR), variables)
  return folder, variables


@pytest.fixture(scope="module")
def one_process_labels(teacher, tmp_path_factory):
  out = tmp_path_factory.mktemp("labels_one")
  summary = label.label(_config(teacher[0]), str(out))
  return out, summary


def _records(folder):
  """{key: (label, confidence, probabilities, encoded)} of every finished shard named in stats.json."""
  stats = outputs.read_json(os.path.join(folder, "stats.json"))
  out = {}
  for shard in stats["shards"]:
    for raw in tf.data.TFRecordDataset(os.path.join(folder, shard["file"])):
      f = tf.train.Example.FromString(raw.numpy()).features.feature
      key = f["image/key"].bytes_list.value[0]
      assert key not in out, f"{key} labeled twice"
      out[key] = (
        f["label"].int64_list.value[0],
        f["confidence"].float_list.value[0],
        np.array(f["probabilities"].float_list.value, np.float32),
        f["image/encoded"].bytes_list.value[0],
      )
  return stats, out


def _originals(spec):
  """{key: encoded image} of every example of a digits source."""
  from noisy_student.data import sources  # pylint: disable=g-import-not-at-top

  src = sources.open_source(
    spec, data_dir=digits_data_dir(), labeled=False, with_key=True, process_index=0, process_count=1
  )
  return {ex["key"]: ex["image"] for ex in src.dataset.as_numpy_iterator()}


def test_labels_every_image_once_with_the_eval_mode_teacher(teacher, one_process_labels):
  folder, variables = teacher
  out, summary = one_process_labels
  stats, records = _records(out)
  assert summary["examples"] == stats["num_examples"] == len(records) == 600
  assert summary["shards"] == 3 and [s["file"] for s in stats["shards"]] == [
    pseudo_labels.shard_name(i, 3) for i in range(3)
  ]
  assert sum(s["examples"] for s in stats["shards"]) == 600
  # Every source image, by its tfds id, with its original encoded bytes.
  originals = _originals(UNLABELED)
  assert set(records) == set(originals)
  assert all(records[k][3] == originals[k] for k in originals)
  # The distribution is the eval-mode teacher's softmax on eval preprocessing: recompute a few directly.
  from noisy_student.data import preprocess  # pylint: disable=g-import-not-at-top

  model = create_model(**model_arguments(_config(folder).model))
  keys = sorted(originals)[:16]
  images = np.stack(
    [preprocess.normalize(preprocess.eval_image(originals[k], 16, crop="resize")).numpy() for k in keys]
  )
  expected = jax.nn.softmax(model.apply(variables, images, train=False))
  for k, p in zip(keys, np.asarray(expected)):
    lab, conf, probs, _ = records[k]
    np.testing.assert_allclose(probs, p, atol=2e-5)
    assert lab == int(np.argmax(probs)) and conf == pytest.approx(float(probs.max()))
  # stats.json agrees with the records.
  labels = np.array([r[0] for r in records.values()])
  assert stats["class_counts"] == np.bincount(labels, minlength=10).tolist()
  assert np.asarray(stats["histogram"]).sum() == 600
  assert (out / "stats.png").read_bytes()[:4] == b"\x89PNG"


def test_micro_batch_size_is_the_largest_divisor_within_the_limit():
  assert [inference.micro_batch_size(n, 8, "cpu") for n in (32, 12, 7, 5, 3)] == [8, 6, 7, 5, 3]
  # Automatic: on CPU passes of about 8 images of 224 px (all 256 of a 16 px batch), the whole share off CPU.
  assert inference.micro_batch_size(32, 0, "cpu", 224 * 224) == 8
  assert inference.micro_batch_size(32, 0, "cpu", 448 * 448) == 2
  assert inference.micro_batch_size(256, 0, "cpu", 16 * 16) == 256
  assert inference.micro_batch_size(32, 0, "tpu", 224 * 224) == 32
  assert inference.micro_batch_size(32, 100, "cpu") == 32


def test_read_ahead_depth_fits_the_pixel_budget():
  assert label.read_ahead_batches(0, 32, 224) == 55  # 256 MiB of uint8 batches of 32 images at 224 px
  assert label.read_ahead_batches(0, 128, 800) == 1  # never fewer than 1
  assert label.read_ahead_batches(0, 8, 16) == 256 * 2**20 // (8 * 16 * 16 * 3)
  assert label.read_ahead_batches(7, 32, 224) == 7


def test_micro_batched_inference_gives_the_whole_batch_logits(teacher):
  """Each device's rows in passes of 1, 3 or 6 images (a loop in the step) == one pass == model.apply."""
  from noisy_student import sharding  # pylint: disable=g-import-not-at-top

  folder, variables = teacher
  model = create_model(**model_arguments(_config(folder).model))
  mesh = sharding.create_mesh()
  images = np.asarray(jax.random.normal(jax.random.key(1), (6 * jax.device_count(), 16, 16, 3)))
  expected = np.asarray(model.apply(variables, images, train=False))
  batch = jax.device_put(images, sharding.batch_sharding(mesh))
  for micro_batch in (1, 3, 6):
    logits = label.make_infer_step(model, mesh, micro_batch)(variables, batch)
    assert logits.sharding == sharding.batch_sharding(mesh)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5, err_msg=str(micro_batch))


def test_infer_step_normalizes_uint8_pixels_itself(teacher):
  """The job feeds uint8 pixels: the step's logits equal the model's on tf-normalized float images."""
  from noisy_student import sharding  # pylint: disable=g-import-not-at-top

  folder, variables = teacher
  model = create_model(**model_arguments(_config(folder).model))
  mesh = sharding.create_mesh()
  pixels = np.asarray(jax.random.randint(jax.random.key(2), (2 * jax.device_count(), 16, 16, 3), 0, 256), np.uint8)
  expected = np.asarray(model.apply(variables, preprocess.normalize(tf.constant(pixels)).numpy(), train=False))
  logits = label.make_infer_step(model, mesh, 1)(variables, jax.device_put(pixels, sharding.batch_sharding(mesh)))
  np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5)

  class ChannelMeans:  # a "model" whose logits are its inputs' channel means: they show the normalization
    num_classes = 3

    def apply(self, variables, images, train):
      del variables, train
      return images.mean(axis=(1, 2))

  for normalization in ("imagenet", "svhn"):
    means = label.make_infer_step(ChannelMeans(), mesh, 1, normalization)(
      {}, jax.device_put(pixels, sharding.batch_sharding(mesh))
    )
    np.testing.assert_allclose(
      np.asarray(means),
      preprocess.normalize(tf.constant(pixels), normalization).numpy().mean(axis=(1, 2)),
      rtol=1e-5,
      atol=1e-5,
    )


def _label_job(teacher_dir, *extra):
  """Command-line overrides of a labeling job of UNLABELED with the teacher in `teacher_dir`, then `extra`."""
  return (
    "--config.mode=label",
    f"--config.label.teacher_workdir={teacher_dir}",
    f"--config.data.unlabeled_source={UNLABELED}",
    *extra,
  )


@pytest.mark.slow
def test_two_processes_write_disjoint_shards_equal_to_one(teacher, one_process_labels, tmp_path):
  """2 processes x 2 devices (gloo): each writes its own shards; their union is the one-process output."""
  out, port = tmp_path / "two", free_port()
  procs = [
    start_cli(
      out,
      *_label_job(
        teacher[0], *process_flags(port, i), "--config.label.batch=64", "--config.label.shards_per_process=3"
      ),
      devices=2,
    )
    for i in range(2)
  ]
  logs = [p.communicate(timeout=400)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  stats, two = _records(out)
  assert len(stats["shards"]) == 6
  _, one = _records(one_process_labels[0])
  assert set(two) == set(one) and len(two) == 600
  for k in one:
    assert two[k][0] == one[k][0] and two[k][3] == one[k][3]
    np.testing.assert_allclose(two[k][2], one[k][2], atol=1e-5)
  # Disjoint by construction of _records (a key in two shards fails there); each process wrote 3 shards of
  # its own half of the split: shards 0-2 hold process 0's images, 3-5 process 1's.
  first_half = set()
  for shard in stats["shards"][:3]:
    for raw in tf.data.TFRecordDataset(str(out / shard["file"])):
      first_half.add(tf.train.Example.FromString(raw.numpy()).features.feature["image/key"].bytes_list.value[0])
  assert len(first_half) == 300


def test_cli_labels_on_one_cpu_device_per_core_with_the_same_results(teacher, one_process_labels, tmp_path):
  """mode=label without a host device count in XLA_FLAGS: the CLI splits the CPU into one device per core
  (cpu/devices.py); the records are the one-device ones."""
  env = subprocess_env(1)
  env["XLA_FLAGS"] = "--xla_cpu_prefer_vector_width=512"  # no device count: the CLI chooses
  out = tmp_path / "split"
  done = run_cli(out, *_label_job(teacher[0], "--config.label.batch=64"), env=env, timeout=400)
  assert done.returncode == 0, done.stderr[-3000:]
  devices = host_devices.device_count_for()
  assert f"on 1 processes ({devices} devices)" in done.stderr
  _, split = _records(out)
  _, one = _records(one_process_labels[0])
  assert set(split) == set(one)
  for k in one:
    assert split[k][0] == one[k][0] and split[k][3] == one[k][3]
    np.testing.assert_allclose(split[k][2], one[k][2], atol=1e-5)


@pytest.mark.slow
def test_sigkill_then_rerun_gives_byte_identical_shards(teacher, tmp_path):
  """A real SIGKILL after the first shard is final: no partial file under a final name; the rerun skips
  finished shards and the result is byte-identical to an uninterrupted run."""
  # 1,300 images in 163 batches of 8 and 20 shards: most of the job is still ahead when shard 0 lands.
  extra = (
    "--config.label.batch=8",
    "--config.label.shards_per_process=20",
    "--config.data.unlabeled_source=tfds:digits:train",
  )
  whole = tmp_path / "whole"
  done = run_cli(whole, *_label_job(teacher[0], *extra), timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]

  killed = tmp_path / "killed"
  proc = start_cli(killed, *_label_job(teacher[0], *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = killed / pseudo_labels.shard_name(0, 20)
  deadline = time.monotonic() + 240
  while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert first.exists(), "the job ended or timed out before its first shard"
  finals = sorted(p.name for p in killed.iterdir() if p.name.endswith(".tfrecord"))
  assert len(finals) < 20, "the job finished before the kill; make it longer"
  assert not (killed / "stats.json").exists()
  for name in finals:  # every file under a final name is complete: identical to the finished run's
    assert (killed / name).read_bytes() == (whole / name).read_bytes()

  rerun = run_cli(killed, *_label_job(teacher[0], *extra), timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resuming at shard" in rerun.stderr
  names = sorted(p.name for p in whole.iterdir() if p.name.startswith("labels-"))
  assert names == sorted(p.name for p in killed.iterdir() if p.name.startswith("labels-"))
  for name in names + ["stats.json"]:
    assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
  assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]


def test_missing_teacher_and_wrong_class_count_are_clear_errors(teacher, tmp_path):
  with pytest.raises(FileNotFoundError, match=f"No exported teacher variables in {tmp_path / 'nobody'}"):
    label.label(_config(tmp_path / "nobody"), str(tmp_path / "out"))
  c = _config(teacher[0])
  c.model.num_classes = 100
  with pytest.raises(
    checkpoint.CheckpointMismatchError,
    match=r"exported variables in .*export does not match the model.*classifier/kernel",
  ):
    label.label(c, str(tmp_path / "out2"))
  c = _config(teacher[0])
  c.label.read_ahead_batches = -2
  with pytest.raises(ValueError, match=r"config.label.read_ahead_batches=-2 must be >= 0"):
    label.label(c, str(tmp_path / "out4"))
  c = _config(teacher[0])
  c.label.micro_batch = -1
  with pytest.raises(ValueError, match=r"config.label.micro_batch=-1 must be >= 0"):
    label.label(c, str(tmp_path / "out3"))


def test_rerun_with_other_settings_rewrites_every_shard(teacher, one_process_labels, tmp_path):
  """Shards of another run (here temperature 1 vs 2) in the folder are not reused: every shard is rewritten
  with the new teacher distribution softmax(logits / 2), i.e. p ** (1/2) renormalized."""
  import shutil  # pylint: disable=g-import-not-at-top

  out = tmp_path / "relabel"
  shutil.copytree(one_process_labels[0], out)
  label.label(_config(teacher[0], temperature=2.0), str(out))
  stats, hot = _records(out)
  _, cold = _records(one_process_labels[0])
  assert stats["temperature"] == 2.0 and set(hot) == set(cold)
  for k in list(cold)[:50]:
    p = cold[k][2].astype(np.float64) ** 0.5
    np.testing.assert_allclose(hot[k][2], p / p.sum(), atol=2e-5)


def test_the_configured_normalization_reaches_the_teacher(teacher, tmp_path, monkeypatch):
  """config.data.normalization='svhn' (the official SVHN runs): the job's probabilities are the teacher's on
  SVHN-standardized pixels, the shards' fingerprint says so, and an unknown name fails before any work."""
  folder, variables = teacher
  c = _config(folder)
  c.label.shards_per_process = 1
  c.data.update(unlabeled_source="tfds:digits:train[:64]", normalization="svhn")
  asked, build = [], label.make_infer_step

  def spy(model, mesh, micro_batch=0, normalization="imagenet"):
    asked.append(normalization)
    return build(model, mesh, micro_batch, normalization)

  monkeypatch.setattr(label, "make_infer_step", spy)
  label.label(c, str(tmp_path / "svhn"))
  stats, records = _records(tmp_path / "svhn")
  assert (
    outputs.read_json(tmp_path / "svhn" / pseudo_labels.sidecar_name(0, 1))["fingerprint"]["normalization"] == "svhn"
  )
  originals = _originals("tfds:digits:train[:64]")
  keys = sorted(originals)[:8]
  model = create_model(**model_arguments(c.model))
  pixels = [preprocess.eval_image(originals[k], 16, crop="resize") for k in keys]
  images = np.stack([preprocess.normalize(p, "svhn").numpy() for p in pixels])
  expected = np.asarray(jax.nn.softmax(model.apply(variables, images, train=False)))
  np.testing.assert_allclose(np.stack([records[k][2] for k in keys]), expected, atol=2e-5)
  assert asked == ["svhn"]  # the job's step was built for SVHN's statistics (the step itself: test above)
  c.data.normalization = "cifar"
  with pytest.raises(ValueError, match="config.data.normalization='cifar'"):
    label.label(c, str(tmp_path / "bad"))
  assert not (tmp_path / "bad" / pseudo_labels.shard_name(0, 1)).exists()
