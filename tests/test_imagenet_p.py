"""imagenet_p.py / data/videos.py: flip probability and top-5 distance as the benchmark defines them, the
video folder reader, and the suite end to end on videos written here (equal on 1 and 8 devices, and to a
plain per-frame loop)."""

import json
import os
import subprocess
import sys
import textwrap

import av
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from helpers import REPO, free_port, subprocess_env
from noisy_student import imagenet_p, sharding, trainer
from noisy_student.config_defaults import base_config
from noisy_student.data import preprocess, videos


def _write_video(path, frames):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(path, mode="w") as container:
    stream = container.add_stream("libx264", rate=10)
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    for image in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _perturbation_folder(root, perturbation, rng, counts=((7, 5), (6,))):
  """Videos of a random image under a growing perturbation: brightening, or fresh noise around it."""
  for c, lengths in enumerate(counts):
    for v, n in enumerate(lengths):
      base = rng.integers(40, 200, size=(32, 32, 3)).astype(np.float64)
      if "noise" in perturbation:
        frames = [base] + [base + rng.normal(0, 40, size=base.shape) for _ in range(n - 1)]
      else:
        frames = [base * (1 + 0.25 * j) for j in range(n)]
      frames = np.clip(np.stack(frames), 0, 255).astype(np.uint8)
      _write_video(os.path.join(root, perturbation, f"n{c:08d}", f"video_{v}.mp4"), frames)


# The benchmark's definitions, written out plainly: per video, walk the frames keeping the previous
# prediction (the first one for noise); the top-5 distance from full rankings of all 1000 classes.
def _reference_flip_probability(top1_by_video, noise, difficulty=1):
  step = 1 if noise else difficulty
  per_video = []
  for preds in top1_by_video:
    flips = []
    for start in range(step):
      previous = preds[start]
      for pred in preds[start::step][1:]:
        flips.append(int(previous != pred))
        if not noise:
          previous = pred
    per_video.append(np.mean(flips))
  return np.mean(per_video)


def _reference_top5_distance(logits_before, logits_after):
  """sum_i |cum(i) - cum(rank_after(class ranked i before) - 1)|, cum(k) = min(k, 5), over the top 5."""
  rank_after = np.empty(len(logits_after), int)
  rank_after[np.argsort(-logits_after, kind="stable")] = np.arange(1, len(logits_after) + 1)
  order_before = np.argsort(-logits_before, kind="stable")
  cum = lambda k: np.minimum(k, 5)
  return sum(abs(cum(i) - cum(rank_after[order_before[i]] - 1)) for i in range(5))


def test_top5_distance_matches_the_definition_over_full_rankings():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(400, 1000))
  logits[1::2] = logits[::2] + rng.normal(0, 0.05, size=(200, 1000))  # small moves: distances 0 .. 10
  top5 = np.argsort(-logits, axis=-1, kind="stable")[:, :5]
  got = imagenet_p.top5_distance(top5[::2], top5[1::2])
  want = [_reference_top5_distance(a, b) for a, b in zip(logits[::2], logits[1::2])]
  np.testing.assert_array_equal(got, want)
  assert len(set(want)) > 3  # not all zero or all 10
  # By hand: classes 1 and 2 swap places, 5 leaves the top 5.
  assert imagenet_p.top5_distance(np.array([[1, 2, 3, 4, 5]]), np.array([[2, 1, 3, 4, 9]])).tolist() == [3]


def test_flip_probability_by_hand():
  top5 = lambda top1: np.array([[c, 900, 901, 902, 903] for c in top1])
  moving = [top5([3, 3, 5, 5, 3]), top5([1, 1, 1])]
  stats = imagenet_p.perturbation_stability(moving, noise=False)
  assert stats["flip_probability"] == (2 / 4 + 0) / 2 and stats["videos"] == 2
  assert stats["top5_distance"] == (2 * 5 / 4 + 0) / 2  # a flip moves the old top class out: |0 - 5|
  # Noise: every frame against the first; difficulty 2: frames two apart.
  assert imagenet_p.perturbation_stability([top5([3, 5, 3, 3])], noise=True)["flip_probability"] == 1 / 3
  assert (
    imagenet_p.perturbation_stability([top5([3, 3, 5, 5, 3])], noise=False, difficulty=2)["flip_probability"] == 1.0
  )
  with pytest.raises(ValueError, match="Video 0 has 2 frame"):
    imagenet_p.perturbation_stability([top5([1, 2])], noise=False, difficulty=2)
  rng = np.random.default_rng(1)
  for noise in (False, True):
    for difficulty in (1, 2, 3):
      top1 = [rng.integers(0, 3, size=n) for n in (4, 7, 9)]
      got = imagenet_p.perturbation_stability([top5(t) for t in top1], noise, difficulty)["flip_probability"]
      assert got == pytest.approx(_reference_flip_probability(top1, noise, difficulty), abs=1e-15)


def test_mean_flip_rate_against_a_baseline(tmp_path):
  names = imagenet_p.PERTURBATIONS
  baseline = {p: {"flip_probability": 0.1 * (i + 1), "top5_distance": 1.0 + i} for i, p in enumerate(names)}
  baseline["speckle_noise"] = {"flip_probability": 0.5, "top5_distance": 2.0}
  stability = {p: {"flip_probability": 0.05, "top5_distance": 0.5} for p in names + ("speckle_noise",)}
  result = imagenet_p.mean_flip_rate(stability, baseline)
  assert result["fr"]["rotate"] == pytest.approx(0.05 / 0.8)
  assert result["mfr"] == pytest.approx(np.mean([0.05 / (0.1 * (i + 1)) for i in range(10)]))  # the 10 only
  assert result["mt5d"] == pytest.approx(np.mean([0.5 / (1.0 + i) for i in range(10)]))
  partial = imagenet_p.mean_flip_rate({"rotate": stability["rotate"], "tilt": stability["tilt"]}, baseline)
  assert "mfr" not in partial and partial["mfr_partial"] == pytest.approx((0.05 / 0.8 + 0.05 / 0.9) / 2)
  assert "mfr" not in imagenet_p.mean_flip_rate(stability, baseline, difficulty=2)
  # A baseline file: the mapping itself, or an eval.json of this code.
  (tmp_path / "alexnet.json").write_text(json.dumps(baseline))
  (tmp_path / "eval.json").write_text(json.dumps({"top1": 0.5, "robustness": {"imagenet_p": {"stability": baseline}}}))
  assert imagenet_p.read_baseline(str(tmp_path / "alexnet.json")) == baseline
  assert imagenet_p.read_baseline(str(tmp_path / "eval.json")) == baseline
  with pytest.raises(ValueError, match=r"eval.json: evaluated at ImageNet-P difficulty 1, this run at 2"):
    imagenet_p.read_baseline(str(tmp_path / "eval.json"), difficulty=2)
  (tmp_path / "bad.json").write_text(json.dumps({"rotate": {"flip_probability": 0.1}}))
  with pytest.raises(ValueError, match=r"bad.json: 'rotate' lacks \['top5_distance'\]"):
    imagenet_p.read_baseline(str(tmp_path / "bad.json"))
  (tmp_path / "zero.json").write_text(json.dumps({"rotate": {"flip_probability": 0, "top5_distance": 1}}))
  with pytest.raises(ValueError, match=r"zero.json: 'rotate' has .* both must be positive numbers"):
    imagenet_p.read_baseline(str(tmp_path / "zero.json"))
  (tmp_path / "cut.json").write_text('{"rotate": {"flip_prob')
  with pytest.raises(ValueError, match=r"ImageNet-P baseline .*cut.json: not a readable JSON file"):
    imagenet_p.read_baseline(str(tmp_path / "cut.json"))


def test_video_folder_parts_cover_every_frame_once(tmp_path):
  _perturbation_folder(str(tmp_path), "tilt", np.random.default_rng(2), counts=((3, 4), (5,), (2,)))
  folder = str(tmp_path / "tilt")
  parts = [videos.open_video_folder(folder, process_index=i, process_count=2) for i in range(2)]
  seen = [(int(ex["video"]), int(ex["frame"])) for part in parts for ex in part.dataset.as_numpy_iterator()]
  assert sorted(seen) == [(v, f) for v, n in enumerate((3, 4, 5, 2)) for f in range(n)]
  assert [p.num_examples for p in parts] == [3 + 5, 4 + 2]
  paths = videos.list_videos(folder)
  first = next(parts[0].dataset.as_numpy_iterator())["image"]
  np.testing.assert_array_equal(first, next(videos.read_frames(paths[0])))
  assert first.shape == (32, 32, 3)


def test_unreadable_videos_are_errors_naming_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="No videos .* in .*empty"):
    videos.list_videos(str(tmp_path / "empty"))
  bad = tmp_path / "rotate" / "n00000000" / "broken.mp4"
  bad.parent.mkdir(parents=True)
  bad.write_bytes(b"not a video at all" * 100)
  with pytest.raises(ValueError, match="broken.mp4: not a readable video"):
    videos.open_video_folder(str(tmp_path / "rotate"), process_index=0, process_count=1)
  with av.open(str(tmp_path / "streamless.mp4"), mode="w") as container:  # a header and nothing else
    stream = container.add_stream("libx264", rate=10)
    stream.width, stream.height = 32, 32
    container.start_encoding()
  with pytest.raises(ValueError, match="streamless.mp4: no video stream in it"):
    videos.probe(str(tmp_path / "streamless.mp4"))
  with pytest.raises(ValueError, match=r"Video 3: frames \[0, 2\] are not 0..1"):
    videos.group_by_video([3, 3], [0, 2], np.zeros((2, 5)))
  config = base_config()
  config.model.update(num_classes=1000)
  config.evaluate.update(suites="imagenet_p", imagenet_p_dir=str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="config.evaluate.imagenet_p_dir=.*missing.* is not a folder"):
    trainer.robustness_suites(config)
  config.evaluate.update(imagenet_p_dir=str(tmp_path), imagenet_p_perturbations="rotate,wobble")
  with pytest.raises(ValueError, match=r"config.evaluate.imagenet_p_perturbations: unknown \['wobble'\]"):
    trainer.robustness_suites(config)
  # Harder noise sequences are folders of their own; other perturbations stride through one folder.
  (tmp_path / "gaussian_noise").mkdir()
  config.evaluate.update(imagenet_p_perturbations="rotate,gaussian_noise", imagenet_p_difficulty=2)
  with pytest.raises(FileNotFoundError, match=r"has no folder \['gaussian_noise_2'\]"):
    trainer.robustness_suites(config)
  assert [
    imagenet_p.folder(p, d) for p, d in [("gaussian_noise", 1), ("shot_noise", 3), ("tilt", 3), ("speckle_noise_2", 2)]
  ] == ["gaussian_noise", "shot_noise_3", "tilt", "speckle_noise_2"]


def test_imagenet_p_suite_end_to_end(tmp_path):
  """Videos written with libx264 through the reader, the eval pipeline and the sharded step, on 8 devices and
  on 1, against decoding each video here and running the model frame by frame."""
  rng = np.random.default_rng(3)
  root = str(tmp_path / "imagenet_p")
  for perturbation in ("brightness", "gaussian_noise"):
    _perturbation_folder(root, perturbation, rng)
  config = base_config()
  config.model.update(name="efficientnet-tiny", num_classes=1000, image_size=16)
  config.data.update(eval_batch=8)
  config.evaluate.update(suites="imagenet_p", imagenet_p_dir=root, imagenet_p_perturbations="brightness,gaussian_noise")
  model = trainer.build_model(config)
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))()
  # A baseline: the numbers of a model that flips on every pair, for the rates.
  baseline = {p: {"flip_probability": 1.0, "top5_distance": 10.0} for p in ("brightness", "gaussian_noise")}
  (tmp_path / "baseline.json").write_text(json.dumps(baseline))
  config.evaluate.imagenet_p_baseline = str(tmp_path / "baseline.json")

  results = [
    trainer.robustness(model, variables, config, mesh)["robustness"]["imagenet_p"]
    for mesh in (sharding.create_mesh(), sharding.create_mesh(devices=jax.devices()[:1]))
  ]
  assert results[0] == results[1]

  apply = jax.jit(lambda images: model.apply(variables, images, train=False))
  expected = {}
  for perturbation in ("brightness", "gaussian_noise"):
    noise = perturbation == "gaussian_noise"
    top1, distances = [], []
    for path in videos.list_videos(os.path.join(root, perturbation)):
      frames = [f.to_ndarray(format="rgb24") for f in av.open(path).decode(video=0)]
      images = np.stack([preprocess.normalize(preprocess.resize(tf.constant(f), 16)).numpy() for f in frames])
      logits = np.asarray(apply(images))
      top1.append(np.argmax(logits, axis=-1))
      distances.append(
        np.mean([_reference_top5_distance(logits[0 if noise else j - 1], logits[j]) for j in range(1, len(logits))])
      )
    fp = _reference_flip_probability(top1, noise)
    expected[perturbation] = fp
    got = results[0]["stability"][perturbation]
    assert got["videos"] == 3
    assert got["flip_probability"] == pytest.approx(fp, abs=1e-12)
    assert got["top5_distance"] == pytest.approx(np.mean(distances), abs=1e-12)
  assert all(0 < fp < 1 for fp in expected.values())  # some frames flip, some do not: not vacuous
  assert results[0]["mfr_partial"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)
  assert "mfr" not in results[0]


TWO_PROCESSES = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    root, index, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index)
    sys.path.insert(0, "tests")
    from test_imagenet_p import tilt_suite
    print(json.dumps({"result": tilt_suite(root), "processes": jax.process_count()}))
""")


def tilt_suite(root):
  """The imagenet_p suite on `root`'s tilt videos for efficientnet-tiny (1000 classes, 16 px, init seed 0)."""
  config = base_config()
  config.model.update(name="efficientnet-tiny", num_classes=1000, image_size=16)
  config.data.update(eval_batch=8)
  config.evaluate.update(suites="imagenet_p", imagenet_p_dir=root, imagenet_p_perturbations="tilt")
  model = trainer.build_model(config)
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))()
  return trainer.robustness(model, variables, config, sharding.create_mesh())["robustness"]


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(tmp_path):
  """Over jax.distributed (2 processes x 2 devices, gloo): each process decodes its own videos (process 0
  videos 0 and 2, 11 frames; process 1 video 1, 9 frames, then padding) and both report what one process
  reports."""
  root = str(tmp_path / "imagenet_p")
  _perturbation_folder(root, "tilt", np.random.default_rng(4), counts=((5, 9), (6,)))
  port = str(free_port())
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", TWO_PROCESSES, root, str(i), port],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=subprocess_env(2),
      cwd=REPO,
    )
    for i in range(2)
  ]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  alone = tilt_suite(root)
  assert [o["processes"] for o in outs] == [2, 2]
  assert outs[0]["result"] == outs[1]["result"] == json.loads(json.dumps(alone))
  assert alone["imagenet_p"]["stability"]["tilt"]["videos"] == 3
