"""Perturbation videos (ImageNet-P) as a frame source: every frame of every video, tagged with its video.

ImageNet-P (Hendrycks & Dietterich, 2019) ships each perturbation as a folder of `WNID/NAME.mp4` videos, one
per validation image, whose frames are that image under a slowly growing perturbation. tfds has no builder
for it, so this reads the folder directly: videos in sorted path order (a video's index is its place in that
order, the same on any process count), each process decoding every `process_count`-th video with PyAV
(`pip install -e '.[video]'`). Elements: 'image' (uint8 [h, w, 3], already decoded: the eval pipeline
resizes it), 'video' and 'frame' (int32).
"""

import glob
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from noisy_student.data.sources import Source, resolve_process

DECODE_PARALLELISM = max(1, min(8, os.cpu_count() or 1))  # videos decoded at once


def require_av():
  """PyAV, or an ImportError saying how to install it (checked before training when a suite needs it)."""
  try:
    import av  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Reading ImageNet-P videos needs PyAV: pip install -e '.[video]'.") from e
  return av


def list_videos(folder: str) -> List[str]:
  """The folder's `*/*.mp4` (class folders of videos) in sorted order; an error when it has none."""
  paths = sorted(glob.glob(os.path.join(folder, "*", "*.mp4")))
  if not paths:
    raise FileNotFoundError(f"No videos (*/*.mp4, one folder per class) in {folder}.")
  return paths


def probe(path: str) -> Tuple[int, int, int]:
  """(frames, height, width) of the video: the container's frame count, else its packets counted (no
  decoding)."""
  av = require_av()
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise ValueError(f"{path}: no video stream in it.")
      stream = container.streams.video[0]
      frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
      height, width = stream.codec_context.height, stream.codec_context.width
  except av.error.FFmpegError as e:
    raise ValueError(f"{path}: not a readable video ({e}).") from e
  return frames, height, width


def read_frames(path: str, expected: Optional[int] = None) -> Iterator[np.ndarray]:
  """The video's frames as uint8 RGB [h, w, 3]; with `expected`, a different count is an error naming it."""
  av = require_av()
  count = 0
  try:
    with av.open(path) as container:
      for frame in container.decode(video=0):
        count += 1
        yield frame.to_ndarray(format="rgb24")
  except av.error.FFmpegError as e:
    raise ValueError(f"{path}: video unreadable after {count} frames ({e}).") from e
  if expected is not None and count != expected:
    raise ValueError(f"{path}: decoded {count} frames, its container says {expected}.")


def open_video_folder(
  folder: str, *, process_index: Optional[int] = None, process_count: Optional[int] = None
) -> Source:
  """This process's videos of `folder` as a Source of frames (see the module docstring)."""
  process_index, process_count = resolve_process(process_index, process_count)
  paths = list_videos(folder)
  mine = list(range(process_index, len(paths), process_count))
  _, height, width = probe(paths[0])  # every process gives its frames the same shape
  counts = [probe(paths[v])[0] for v in mine]

  def frames(position):
    video, count = mine[position], counts[position]
    for index, image in enumerate(read_frames(paths[video], expected=count)):
      if image.shape != (height, width, 3):
        raise ValueError(
          f"{paths[video]}: frame {index} is {image.shape[:2]}, the folder's first video's "
          f"frames are {(height, width)}."
        )
      yield {"image": image, "video": np.int32(video), "frame": np.int32(index)}

  signature = {
    "image": tf.TensorSpec([height, width, 3], tf.uint8),
    "video": tf.TensorSpec([], tf.int32),
    "frame": tf.TensorSpec([], tf.int32),
  }
  # Several videos decode at once (224 px libx264 videos on 2 cores: 187 - 360 frames/s one at a time, 369 -
  # 435 two at a time); the order is fixed, and which frame of which video a row holds travels with it.
  dataset = tf.data.Dataset.range(len(mine)).interleave(
    lambda position: tf.data.Dataset.from_generator(frames, args=(position,), output_signature=signature),
    cycle_length=DECODE_PARALLELISM,
    num_parallel_calls=DECODE_PARALLELISM,
    deterministic=True,
  )
  return Source(
    spec=folder,
    dataset=dataset,
    num_examples=sum(counts),
    max_process_examples=None,
    num_classes=None,
    process_index=process_index,
    process_count=process_count,
  )


def group_by_video(video: Sequence[int], frame: Sequence[int], values: np.ndarray) -> List[np.ndarray]:
  """Per-example values (any order, e.g. batches of several processes) -> one array per video, in frame
  order, videos in index order. A video with a missing or repeated frame is an error."""
  video, frame, values = np.asarray(video), np.asarray(frame), np.asarray(values)
  order = np.lexsort((frame, video))
  video, frame, values = video[order], frame[order], values[order]
  starts = np.flatnonzero(np.r_[True, video[1:] != video[:-1]])
  groups = []
  for start, end in zip(starts, np.r_[starts[1:], len(video)]):
    if not np.array_equal(frame[start:end], np.arange(end - start)):
      raise ValueError(f"Video {video[start]}: frames {frame[start:end].tolist()} are not 0..{end - start - 1}.")
    groups.append(values[start:end])
  return groups
