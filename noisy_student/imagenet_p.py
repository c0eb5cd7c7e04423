"""ImageNet-P (Hendrycks & Dietterich, 2019): how stable a model's predictions are along perturbation videos.

Each video is one validation image under a slowly growing perturbation. Per perturbation the flip probability
(FP) is how often the top-1 prediction changes between compared frames -- consecutive frames, or each frame
against the first for the noise perturbations, whose frames are independent draws -- averaged per video,
then over videos; the top-5 distance (T5D) measures the same for the top-5 ranking. The benchmark's mFR /
mT5D divide both by AlexNet's and average over its 10 perturbations. Computed as the benchmark's own
evaluation code does (difficulty 1 by default). AlexNet's values are not shipped with this code (we found no
source to check them against), so rates are taken against a baseline file: AlexNet's values, or any model's
eval.json (e.g. the teacher's, to see what self-training changed). The videos are read by data/videos.py.
"""

import functools
import json
import os
from typing import Any, Callable, Dict, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from noisy_student import data as data_lib
from noisy_student import inference, sharding
from noisy_student.data import videos

Array = jax.Array

# The 10 benchmark perturbations (its test set), its validation perturbations, and the noise perturbations'
# harder sequences (difficulty 2 and 3), which are folders of their own.
PERTURBATIONS = (
  "gaussian_noise",
  "shot_noise",
  "motion_blur",
  "zoom_blur",
  "snow",
  "brightness",
  "translate",
  "rotate",
  "tilt",
  "scale",
)
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate") + tuple(
  f"{p}_{d}" for p in ("gaussian_noise", "shot_noise", "speckle_noise") for d in (2, 3)
)
METRICS = ("flip_probability", "top5_distance")


def top5_step(
  variables: Mapping[str, Any], batch: Mapping[str, Array], *, model, normalization: str = "imagenet"
) -> Dict[str, Array]:
  """Eval-mode top-5 classes of each frame (uint8 pixels, standardized here), with the frame's video, index
  and mask."""
  logits = inference.make_forward(model, normalization)(variables, batch["image"])
  return {"top5": jax.lax.top_k(logits, 5)[1], "video": batch["video"], "frame": batch["frame"], "mask": batch["mask"]}


def make_top5_step(model, mesh: Mesh, normalization: str = "imagenet") -> Callable:
  """`top5_step` jitted over `mesh`, its (small) results replicated so every process sees every frame's."""
  sharding.check_auto_axes(mesh)
  return jax.jit(
    functools.partial(top5_step, model=model, normalization=normalization),
    in_shardings=(None, sharding.batch_sharding(mesh)),
    out_shardings=NamedSharding(mesh, PartitionSpec()),
  )


def folder(perturbation: str, difficulty: int) -> str:
  """The folder a perturbation is read from: harder noise sequences are folders of their own
  (gaussian_noise_2), other perturbations are one folder compared at a stride."""
  if is_noise(perturbation) and difficulty > 1 and not perturbation.endswith(("_2", "_3")):
    return f"{perturbation}_{difficulty}"
  return perturbation


def is_noise(perturbation: str) -> bool:
  """Noise sequences are independent draws around one image: each frame is compared with the first."""
  return "noise" in perturbation


def frame_pairs(num_frames: int, noise: bool, difficulty: int = 1) -> np.ndarray:
  """[pairs, 2] (earlier, later) frame indices compared: (0, j) for noise, else frames `difficulty` apart."""
  if noise:
    return np.stack([np.zeros(num_frames - 1, int), np.arange(1, num_frames)], 1)
  later = np.arange(difficulty, num_frames)
  return np.stack([later - difficulty, later], 1)


def top5_distance(before: np.ndarray, after: np.ndarray) -> np.ndarray:
  """How far the top-5 ranking moved, per row of [n, 5] class lists: for the i-th class of `before`, |i -
  its place in `after`| (5 when it left the top 5), summed (the benchmark's top-5 distance)."""
  same = before[:, :, None] == after[:, None, :]
  place = np.where(same.any(-1), same.argmax(-1), 5)
  return np.abs(np.arange(5) - place).sum(-1)


def perturbation_stability(top5_by_video: Sequence[np.ndarray], noise: bool, difficulty: int = 1) -> Dict[str, float]:
  """Flip probability and top-5 distance over videos ([frames, 5] top-5 classes each): per video the mean
  over its frame pairs, then the mean over videos."""
  flips, distances = [], []
  for video, top5 in enumerate(top5_by_video):
    pairs = frame_pairs(len(top5), noise, difficulty)
    if not len(pairs):
      raise ValueError(f"Video {video} has {len(top5)} frame(s): no pair {difficulty} apart to compare.")
    before, after = top5[pairs[:, 0]], top5[pairs[:, 1]]
    flips.append(np.mean(before[:, 0] != after[:, 0]))
    distances.append(np.mean(top5_distance(before, after)))
  return {
    "flip_probability": float(np.mean(flips)),
    "top5_distance": float(np.mean(distances)),
    "videos": len(top5_by_video),
  }


def read_baseline(path: str, difficulty: int = 1) -> Dict[str, Dict[str, float]]:
  """A baseline's {perturbation: {'flip_probability', 'top5_distance'}}: that mapping as JSON, or an eval.json
  of this code (its robustness.imagenet_p.stability, at the same difficulty). An error names the file and
  what is wrong."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(
      f"ImageNet-P baseline {path}: not a readable JSON file ({e}); expected {{perturbation: "
      "{flip_probability, top5_distance}}} or an eval.json with robustness.imagenet_p."
    ) from e
  if isinstance(data, dict) and "robustness" in data:
    suite = data["robustness"].get("imagenet_p", {})
    if "stability" not in suite:
      raise ValueError(f"{path}: an eval.json without robustness.imagenet_p.stability.")
    if suite.get("difficulty", 1) != difficulty:
      raise ValueError(
        f"{path}: evaluated at ImageNet-P difficulty {suite.get('difficulty', 1)}, this run "
        f"at {difficulty} (config.evaluate.imagenet_p_difficulty)."
      )
    data = suite["stability"]
  if not isinstance(data, dict):
    raise ValueError(
      f"{path}: expected {{perturbation: {{flip_probability, top5_distance}}}}, found a {type(data).__name__}."
    )
  for perturbation, values in data.items():
    missing = set(METRICS) - set(values)
    if missing:
      raise ValueError(f"{path}: {perturbation!r} lacks {sorted(missing)}.")
    if not all(isinstance(values[m], (int, float)) and values[m] > 0 for m in METRICS):
      raise ValueError(
        f"{path}: {perturbation!r} has {dict((m, values[m]) for m in METRICS)}; rates divide "
        "by them, so both must be positive numbers."
      )
  return data


def mean_flip_rate(
  stability: Mapping[str, Mapping[str, float]], baseline: Mapping[str, Mapping[str, float]], difficulty: int = 1
) -> Dict[str, Any]:
  """Flip rates (FP / the baseline's FP) and top-5 distances relative to the baseline's per perturbation both
  have, and 'mfr' / 'mt5d', their means over the 10 benchmark perturbations when all were evaluated at
  difficulty 1: the benchmark's mFR and mT5D when the baseline is AlexNet's (fractions: the paper's 12.2 is
  0.122). Otherwise 'mfr_partial' / 'mt5d_partial' over those rated, never confused with the benchmark's."""
  rated = [p for p in stability if p in baseline]
  if not rated:
    return {}
  fr = {p: stability[p]["flip_probability"] / baseline[p]["flip_probability"] for p in rated}
  t5d = {p: stability[p]["top5_distance"] / baseline[p]["top5_distance"] for p in rated}
  complete = difficulty == 1 and set(PERTURBATIONS) <= set(rated)
  suffix, over = ("", PERTURBATIONS) if complete else ("_partial", rated)
  return {
    f"fr{suffix}": fr,
    f"mfr{suffix}": float(np.mean([fr[p] for p in over])),
    f"t5d{suffix}": t5d,
    f"mt5d{suffix}": float(np.mean([t5d[p] for p in over])),
  }


def check_inputs(root: str, perturbations: Sequence[str], difficulty: int, baseline: str) -> None:
  """What would otherwise fail after training: PyAV, every perturbation's folder, the baseline file."""
  if not os.path.isdir(root):
    raise FileNotFoundError(
      f"config.evaluate.imagenet_p_dir={root!r} is not a folder: the imagenet_p suite "
      "reads ImageNet-P's videos from there (PERTURBATION/WNID/*.mp4)."
    )
  videos.require_av()
  missing = [f for f in (folder(p, difficulty) for p in perturbations) if not os.path.isdir(os.path.join(root, f))]
  if missing:
    raise FileNotFoundError(
      f"config.evaluate.imagenet_p_dir={root!r} has no folder {missing} "
      "(config.evaluate.imagenet_p_perturbations / imagenet_p_difficulty)."
    )
  if baseline:
    read_baseline(baseline, difficulty)


def evaluate(
  model,
  variables: Any,
  mesh: Mesh,
  root: str,
  perturbations: Sequence[str],
  *,
  global_batch: int,
  image_size: int,
  difficulty: int = 1,
  baseline: str = "",
  normalization: str = "imagenet",
) -> Dict[str, Any]:
  """Flip probability and top-5 distance over each perturbation's folder under `root` (frames resized whole to
  image_size, standardized with `normalization`); with a `baseline` file, the flip rates and mFR / mT5D
  against it."""
  step = make_top5_step(model, mesh, normalization)
  stability = {}
  for name in [folder(p, difficulty) for p in perturbations]:
    source = videos.open_video_folder(os.path.join(root, name))
    rows = []
    for batch in data_lib.eval_iterator(
      source, global_batch=global_batch, image_size=image_size, mesh=mesh, crop="resize", keep=("video", "frame")
    ):
      out = jax.device_get(step(variables, batch))
      rows.append({k: v[out["mask"]] for k, v in out.items()})
    rows = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    top5 = videos.group_by_video(rows["video"], rows["frame"], rows["top5"])
    stability[name] = perturbation_stability(top5, is_noise(name), difficulty)
  if not baseline:
    return {"stability": stability, "difficulty": difficulty}
  return dict(
    mean_flip_rate(stability, read_baseline(baseline, difficulty), difficulty),
    stability=stability,
    difficulty=difficulty,
    baseline=baseline,
  )
