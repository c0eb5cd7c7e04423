"""Pseudo-label records, their statistics, and the paper's selection (confidence filter + class balance).

Records (one tf.train.Example each, schema in docs/design.md): `image/encoded`, `image/key`, `label`
(the teacher's argmax), `confidence` (its probability) and the soft label, as `probabilities` (the whole
distribution) or `topk/indices` + `topk/probabilities` (renormalized; for many classes). Hard-label runs
write `label` and `confidence` without a distribution.

Statistics. Every shard has a JSON sidecar with per-class counts and per-class confidence histograms;
`stats.json` (the finished manifest) is their sum plus the list of shard files. Confidence bins are
`floor(confidence * num_bins)`, computed identically in numpy (writer) and TensorFlow (reader).

Selection (Xie et al. 2020, sec. 3): drop images whose confidence is below a threshold; per predicted class keep
the most confident N and duplicate the images of classes with fewer until they reach N. Decided from the
histograms alone, so every process agrees without a second pass over the images:
  * the threshold applies at the histogram's resolution (to bin edges: 0.3 with 100 bins is exact);
  * a class with more than N images keeps all bins above a cutoff bin and, in the cutoff bin, the fraction
    that brings it to N, chosen by a hash of (seed, key);
  * a class with k < N images repeats each image floor(N / k) times, plus once more for a hashed fraction.
Counts are therefore exact except for the hashed fractions (N in expectation per class).
"""

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from noisy_student import outputs

DEFAULT_NUM_BINS = 100
_HASH_BUCKETS = 2**31 - 1


# ------------------------------------------------------------------------------------- records


def soft_labels(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  """The teacher's distribution softmax(logits / T) in float64 then float32 (T < 1 sharpens)."""
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  z = np.asarray(logits, np.float64) / temperature
  z -= z.max(axis=-1, keepdims=True)
  p = np.exp(z)
  return (p / p.sum(axis=-1, keepdims=True)).astype(np.float32)


def make_example(encoded: bytes, key: bytes, probabilities: np.ndarray, *, top_k: int = 0, hard: bool = False) -> bytes:
  """One serialized record. `top_k` > 0 stores the k largest probabilities renormalized; `hard` only `label`."""
  p = np.asarray(probabilities, np.float32)
  label = int(np.argmax(p))
  feature = {
    "image/encoded": _bytes(encoded),
    "image/key": _bytes(key),
    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    "confidence": _floats([p[label]]),
  }
  if not hard:
    if top_k and top_k < p.shape[-1]:
      idx = np.argsort(-p, kind="stable")[:top_k]
      top = p[idx].astype(np.float64)
      feature["topk/indices"] = tf.train.Feature(int64_list=tf.train.Int64List(value=idx.tolist()))
      feature["topk/probabilities"] = _floats((top / top.sum()).astype(np.float32))
    else:
      feature["probabilities"] = _floats(p)
  # deterministic: map fields in key order, so a rerun (another process, another hash seed) writes the same bytes
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def _bytes(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(value)]))


def _floats(values) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(values, np.float32).tolist()))


def shard_name(index: int, count: int) -> str:
  return f"labels-{index:05d}-of-{count:05d}.tfrecord"


def sidecar_name(index: int, count: int) -> str:
  return f"labels-{index:05d}-of-{count:05d}.json"


# ------------------------------------------------------------------------------------- statistics


def confidence_bins(confidence: np.ndarray, num_bins: int) -> np.ndarray:
  """Histogram bin per confidence; the TF reader computes the same float32 products."""
  c = np.asarray(confidence, np.float32)
  return np.clip(np.floor(c * np.float32(num_bins)).astype(np.int64), 0, num_bins - 1)


def _tf_confidence_bins(confidence: tf.Tensor, num_bins: int) -> tf.Tensor:
  b = tf.cast(tf.floor(tf.cast(confidence, tf.float32) * tf.constant(num_bins, tf.float32)), tf.int64)
  return tf.clip_by_value(b, 0, num_bins - 1)


def empty_stats(num_classes: int, num_bins: int = DEFAULT_NUM_BINS) -> Dict[str, Any]:
  return {
    "num_classes": num_classes,
    "num_bins": num_bins,
    "num_examples": 0,
    "class_counts": [0] * num_classes,
    "histogram": [[0] * num_bins for _ in range(num_classes)],
  }


def shard_stats(
  labels: np.ndarray, confidence: np.ndarray, num_classes: int, num_bins: int = DEFAULT_NUM_BINS
) -> Dict[str, Any]:
  """Per-class counts and [class, bin] confidence histogram of one shard's records."""
  labels = np.asarray(labels, np.int64)
  hist = np.zeros((num_classes, num_bins), np.int64)
  np.add.at(hist, (labels, confidence_bins(confidence, num_bins)), 1)
  return {
    "num_classes": num_classes,
    "num_bins": num_bins,
    "num_examples": int(labels.size),
    "class_counts": hist.sum(1).tolist(),
    "histogram": hist.tolist(),
  }


def merge_stats(parts: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
  """Sum of shard statistics (all with the same classes and bins)."""
  if not parts:
    raise ValueError("No shard statistics to merge.")
  c, b = parts[0]["num_classes"], parts[0]["num_bins"]
  out = empty_stats(c, b)
  hist = np.zeros((c, b), np.int64)
  for p in parts:
    if (p["num_classes"], p["num_bins"]) != (c, b):
      raise ValueError(f"Shard statistics disagree: {p['num_classes']} classes / {p['num_bins']} bins vs {c} / {b}.")
    hist += np.asarray(p["histogram"], np.int64)
  out.update(num_examples=int(hist.sum()), class_counts=hist.sum(1).tolist(), histogram=hist.tolist())
  return out


# ------------------------------------------------------------------------------------- selection


@dataclasses.dataclass(frozen=True)
class ClassSelection:
  """What one predicted class keeps: bins >= cutoff_bin, a fraction of cutoff_bin, repeated `copies` times."""

  cutoff_bin: int  # bins above it are kept whole
  cutoff_fraction: float  # fraction of the cutoff bin kept (1.0: all of it)
  copies: float  # each kept image appears floor(copies) times, +1 for a hashed fraction
  available: int  # images at or above the threshold
  expected: float  # images after selection (N in expectation, or 0)


def select(
  stats: Mapping[str, Any], *, threshold: float = 0.3, per_class: int = 0, balance: bool = True
) -> Dict[str, Any]:
  """The paper's filtering and balancing, from statistics alone (see the module docstring).

  per_class = N; 0 derives it from the data as the mean count per class after the threshold (the total
  stays about the same, spread evenly). balance=False only applies the threshold.
  """
  num_bins = int(stats["num_bins"])
  hist = np.asarray(stats["histogram"], np.int64)
  first_bin = int(np.ceil(threshold * num_bins - 1e-9))
  if not 0 <= first_bin <= num_bins:
    raise ValueError(f"threshold={threshold} must be in [0, 1].")
  above = hist[:, first_bin:].sum(1)
  if per_class <= 0:
    populated = above[above > 0]
    per_class = int(round(populated.mean())) if populated.size else 0
  classes: List[ClassSelection] = []
  for c in range(hist.shape[0]):
    k = int(above[c])
    if k == 0:
      classes.append(ClassSelection(num_bins, 0.0, 0.0, 0, 0.0))
    elif not balance or k <= per_class:
      copies = per_class / k if balance else 1.0
      classes.append(ClassSelection(first_bin, 1.0, copies, k, k * copies))
    else:  # keep the most confident per_class: whole bins from the top, a fraction of the cutoff bin
      tail = np.cumsum(hist[c, ::-1])[::-1]  # tail[b] = images in bins >= b
      cutoff = int(np.max(np.nonzero(tail >= per_class)[0]))  # >= first_bin, since tail[first_bin] = k > N
      above_cutoff = int(tail[cutoff + 1]) if cutoff + 1 < num_bins else 0
      fraction = (per_class - above_cutoff) / hist[c, cutoff]
      classes.append(ClassSelection(cutoff, float(fraction), 1.0, k, float(per_class)))
  return {
    "threshold": threshold,
    "first_bin": first_bin,
    "num_bins": num_bins,
    "per_class": per_class,
    "balance": balance,
    "classes": [dataclasses.asdict(c) for c in classes],
    "expected_total": float(sum(c.expected for c in classes)),
  }


def _unit_hash(key: tf.Tensor, seed: int, salt: str) -> tf.Tensor:
  """A deterministic uniform [0, 1) number per (seed, salt, key), identical on every process and run."""
  bucket = tf.strings.to_hash_bucket_fast(tf.strings.join([f"{seed}:{salt}:", key]), _HASH_BUCKETS)
  return tf.cast(bucket, tf.float64) / float(_HASH_BUCKETS)


def copies_fn(selection: Mapping[str, Any], seed: int):
  """A tf function (label, confidence, key) -> int64 copies of that record the selection keeps: the `copies`
  a student's pseudo-labeled source is opened with (data.open_source)."""
  classes = selection["classes"]
  cutoff = tf.constant([c["cutoff_bin"] for c in classes], tf.int64)
  fraction = tf.constant([c["cutoff_fraction"] for c in classes], tf.float64)
  copies = tf.constant([c["copies"] for c in classes], tf.float64)
  num_bins, first_bin = int(selection["num_bins"]), int(selection["first_bin"])
  num_classes = len(classes)

  def fn(label, confidence, key):
    label = tf.cast(label, tf.int64)
    tf.debugging.assert_less(
      label, tf.constant(num_classes, tf.int64), message=f"pseudo-label outside the selection's {num_classes} classes"
    )
    b = _tf_confidence_bins(confidence, num_bins)
    c_bin, c_frac, c_copies = tf.gather(cutoff, label), tf.gather(fraction, label), tf.gather(copies, label)
    kept = (b >= first_bin) & ((b > c_bin) | ((b == c_bin) & (_unit_hash(key, seed, "keep") < c_frac)))
    whole = tf.floor(c_copies)
    extra = tf.cast(_unit_hash(key, seed, "copy") < c_copies - whole, tf.float64)
    return tf.where(kept, tf.cast(whole + extra, tf.int64), tf.constant(0, tf.int64))

  return fn


def selected_counts(selection: Mapping[str, Any]) -> np.ndarray:
  """Expected images per class after selection (for plots and logs)."""
  return np.asarray([c["expected"] for c in selection["classes"]])


def plot_histograms(stats: Mapping[str, Any], path, selection: Optional[Mapping[str, Any]] = None) -> None:
  """PNG: the confidence histogram over all images, and per-class counts before (and after) selection."""
  hist = np.asarray(stats["histogram"], np.int64)
  edges = np.linspace(0, 1, hist.shape[1] + 1)
  fig, (ax1, ax2) = outputs.new_figure(ncols=2, figsize=(11, 3.8))
  # Steps, not bars, here too: each bar is a patch whose limits matplotlib works out through Bezier curves.
  ax1.stairs(hist.sum(0), edges, fill=True)
  if selection is not None:
    ax1.axvline(selection["threshold"], color="red", linestyle="--", label="threshold")
    ax1.legend()
  ax1.set(xlabel="teacher confidence", ylabel="images", title=f"{stats['num_examples']} pseudo-labels")
  # Steps, not bars: 1,000 classes as bars are 2,000 patches and seconds of a labeling job's end.
  class_edges = np.arange(hist.shape[0] + 1) - 0.5
  ax2.stairs(hist.sum(1), class_edges, fill=True, alpha=0.6, label="before")
  if selection is not None:
    ax2.stairs(selected_counts(selection), class_edges, color="C1", linewidth=1.5, label="after selection")
  ax2.set(xlabel="predicted class", ylabel="images", title="per-class counts")
  ax2.legend()
  outputs.save_figure(fig, path)
