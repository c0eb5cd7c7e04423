"""Train and eval iterators: labeled + pseudo-labeled batches at a ratio, as global jax.Arrays.

Determinism and resumption. Each source is an endless stream of epochs; epoch e is this process's records
shuffled with a seed derived from (seed, e), and every example's augmentation seed is derived from
(seed, stream, process, position in the stream). Starting at step k therefore means starting stream
position k * batch: the stream begins at epoch (k * batch) // n and skips the rest on *undecoded* records,
so a resumed run produces exactly the batches an uninterrupted one would, without decoding what it skips
(at most one epoch of raw records is read and dropped).

Batches are dicts of global arrays sharded over the mesh's ('data', 'fsdp') axes. Images are uint8 pixels:
the jitted steps standardize them on the device (normalization.normalize_pixels), which moves a quarter of
the bytes of float32 batches and saves the pipeline a pass over every pixel.
  train: image uint8 [B, S, S, 3], targets f32 [B, C] (one-hot for labeled rows: label
         smoothing belongs to the loss; the teacher's distribution for pseudo-labeled rows), is_labeled bool [B].
         Each process contributes labeled rows then pseudo-labeled rows.
  eval:  image, label int32 [B] (labeled sources), mask bool [B]: padding rows have mask False, so every
         example counts exactly once whatever the number of devices and processes.
"""

import dataclasses
import math
from typing import Iterator, Optional, Sequence, Tuple

import jax
import numpy as np
import tensorflow as tf
from jax.experimental import multihost_utils

from noisy_student import sharding
from noisy_student.data import preprocess
from noisy_student.data import randaugment as ra
from noisy_student.data.sources import Source

CACHE_MAX_EXAMPLES = 100_000  # sources this small (per process) keep their raw records in memory
SHUFFLE_BUFFER = 10_000


@dataclasses.dataclass(frozen=True)
class Noise:
  """Input noise for one training run (the teacher's labeling pass uses none).

  RandAugment's translate/cutout sizes are the official pixel constants at 224px and are scaled down
  proportionally for smaller images (so a 32px image is not translated entirely out of view). The
  small-image crop (crop='pad_crop': CIFAR, SVHN) follows the official small-image recipe instead:
  RandAugment with translate and cutout constants of image_size // 8 pixels, then a Cutout of side
  image_size // 2, then the reflect-pad crop and flip (`_small_image_noise`).
  """

  randaugment_layers: int = 0  # N; 0 disables RandAugment
  randaugment_magnitude: float = 0.0  # M on the official 0..10 scale (larger is allowed)

  def geometry_scale(self, image_size: int) -> float:
    return min(1.0, image_size / 224.0)


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Deterministic order; tf.data's autotuning model thread off.

  With autotune on, destroying an iterator waits for that thread's next wake-up, and while jax computes
  beside it (2-core CPU, labeling 768 images) half the teardowns took 8-9 s: a labeling job or an evaluation
  ran at half speed. AUTOTUNE values still resolve without it: map parallelism to the core count, prefetch
  buffers by tf.data's own heuristic.
  """
  opts = tf.data.Options()
  opts.deterministic = True
  opts.autotune.enabled = False
  opts.experimental_optimization.map_parallelization = True
  return ds.with_options(opts)


def _epoch_seed(seed: int, stream: int, epoch):
  """An int64 shuffle seed for one epoch of one stream (a tensor inside flat_map)."""
  return (tf.constant(seed * 7919 + stream * 104729, tf.int64) * 1_000_003 + epoch) % (2**62)


def example_seed(seed: int, stream: int, process_index: int, position) -> tf.Tensor:
  """Stateless [2] seed for the example at `position` of a stream (resumable augmentation)."""
  base = tf.constant([seed, stream * 65_537 + process_index], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, tf.cast(position, tf.int64))


def stream(
  source: Source,
  *,
  start: int,
  seed: int,
  stream_id: int,
  cache: Optional[bool] = None,
  shuffle_buffer: int = SHUFFLE_BUFFER,
) -> tf.data.Dataset:
  """Endless (position, raw example) from stream position `start`; epochs reshuffled per (seed, epoch)."""
  n = source.num_examples
  if n <= 0:
    raise ValueError(f"Source {source.spec!r} has no examples for process {source.process_index}.")
  records = source.dataset
  if cache if cache is not None else n <= CACHE_MAX_EXAMPLES:
    records = records.cache()
  buffer = max(1, min(n, shuffle_buffer))
  epoch0, offset = divmod(start, n)

  def one_epoch(epoch):
    return records.shuffle(buffer, seed=_epoch_seed(seed, stream_id, epoch), reshuffle_each_iteration=False)

  ds = tf.data.Dataset.range(epoch0, 2**62).flat_map(one_epoch).skip(offset)
  return ds.enumerate(start=start)


def _targets(ex, num_classes):
  if "probabilities" in ex:
    return tf.cast(ex["probabilities"], tf.float32)
  if "label" in ex:
    return tf.one_hot(ex["label"], num_classes, dtype=tf.float32)
  raise ValueError("A training source needs labels or soft labels; it was opened with labeled=False.")


def _small_image_noise(images, draws, cutout_centers, pad_crop, noise: Noise, pad: int, size: int):
  """The official small-image training noise on a uint8 [b, size, size, 3] batch: RandAugment with
  translate and cutout constants of size // 8 pixels, a Cutout of side size // 2 (fill 128), then the
  reflect-pad crop and flip."""
  images = ra.randaugment_batch(
    images, draws, noise.randaugment_magnitude, translate_const=size // 8, cutout_const=size // 8
  )
  images = ra.cutout_at(images, size // 4, cutout_centers)
  return preprocess.pad_crop_batch(images, pad_crop["offset"], pad_crop["flip"], pad)


def _batched_train(
  source,
  *,
  batch,
  start_step,
  image_size,
  num_classes,
  seed,
  stream_id,
  crop,
  flip,
  pad,
  noise,
  cache,
  shuffle_buffer,
  is_labeled,
  rows=(0, 1),
):
  scale = noise.geometry_scale(image_size)
  row, of = rows  # this process's share of every global batch of a source read whole (global order)
  small = crop == "pad_crop" and noise.randaugment_layers > 0  # crops after RandAugment: see Noise

  def prepare(position, ex):
    s = tf.random.experimental.stateless_split(example_seed(seed, stream_id, source.process_index, position), 2)
    if small:
      image = preprocess.to_size(preprocess.decode(ex["image"]), image_size)
    else:
      image = preprocess.train_image(ex["image"], image_size, s[0], crop=crop, flip=flip, pad=pad)
    out = {
      "image": tf.ensure_shape(image, [image_size, image_size, 3]),
      "targets": _targets(ex, num_classes),
      "is_labeled": tf.constant(is_labeled),
    }
    if noise.randaugment_layers:  # drawn per example (resumable), applied per batch (fast)
      out["randaugment"] = ra.sample_layers(s[1], noise.randaugment_layers)
    if small:
      out["pad_crop"] = preprocess.pad_crop_draw(s[0], pad, flip)
      cutout_seed = tf.random.experimental.stateless_fold_in(s[1], tf.constant(1, tf.int64))
      out["cutout"] = ra.sample_layers(cutout_seed, 1)["center"][0]
    return out

  def finish(batch_):
    images = batch_.pop("image")
    draws = batch_.pop("randaugment", None)
    if small:
      images = _small_image_noise(images, draws, batch_.pop("cutout"), batch_.pop("pad_crop"), noise, pad, image_size)
    elif draws is not None:
      images = ra.randaugment_batch(
        images,
        draws,
        noise.randaugment_magnitude,
        translate_const=ra.TRANSLATE_CONST * scale,
        cutout_const=ra.CUTOUT_CONST * scale,
      )
    return dict(batch_, image=images)

  global_batch = batch * of
  ds = stream(
    source, start=start_step * global_batch, seed=seed, stream_id=stream_id, cache=cache, shuffle_buffer=shuffle_buffer
  )
  if of > 1:  # keep this process's rows of each global batch, before decoding anything
    ds = ds.filter(lambda position, ex: (position % global_batch) // batch == row)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch, drop_remainder=True)
  return ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def train_dataset(
  labeled: Source,
  *,
  batch_size: int,
  image_size: int,
  seed: int,
  start_step: int = 0,
  unlabeled: Optional[Source] = None,
  unlabeled_batch_size: int = 0,
  num_classes: Optional[int] = None,
  crop: str = "inception",
  flip: bool = True,
  pad: int = 4,
  noise: Noise = Noise(),
  cache: Optional[bool] = None,
  shuffle_buffer: int = SHUFFLE_BUFFER,
  global_rows: Tuple[int, int] = (0, 1),
) -> tf.data.Dataset:
  """This process's endless train batches (numpy via tf.data), from step `start_step`.

  batch_size / unlabeled_batch_size are per process. Each element holds batch_size labeled rows followed
  by unlabeled_batch_size pseudo-labeled rows. global_rows=(p, P) reads sources opened whole (every
  process sees all records) in one global order and keeps process p's rows of each global batch: the
  batches, augmentations included, are then the same for any number of processes.
  """
  num_classes = num_classes or labeled.num_classes
  if not num_classes:
    raise ValueError(f"{labeled.spec}: num_classes unknown; pass it explicitly.")
  for src in (labeled, unlabeled):
    if src is not None and src.num_classes and src.num_classes != num_classes:
      raise ValueError(f"{src.spec}: has {src.num_classes} classes, expected {num_classes}.")
  kw = dict(
    start_step=start_step,
    image_size=image_size,
    num_classes=num_classes,
    seed=seed,
    crop=crop,
    flip=flip,
    pad=pad,
    noise=noise,
    cache=cache,
    shuffle_buffer=shuffle_buffer,
    rows=global_rows,
  )
  ds = _batched_train(labeled, batch=batch_size, stream_id=0, is_labeled=True, **kw)
  if unlabeled is not None and unlabeled_batch_size > 0:
    pseudo = _batched_train(unlabeled, batch=unlabeled_batch_size, stream_id=1, is_labeled=False, **kw)
    ds = tf.data.Dataset.zip(ds, pseudo).map(lambda a, b: {k: tf.concat([a[k], b[k]], 0) for k in a})
  return _options(ds.prefetch(tf.data.AUTOTUNE))


def local_batch(global_batch: int, what: str, mesh, process_count: int) -> int:
  """This process's share of a global batch; an error naming `what` unless it splits evenly."""
  devices = sharding.batch_devices(mesh)
  if global_batch % devices or global_batch % process_count:
    hint = ""
    if mesh.devices.flat[0].platform == "cpu":  # the count the command line chose from the cores
      hint = (
        " On a CPU, `python -m noisy_student` makes one device per core: pass --nocpu_device_per_core "
        "or XLA_FLAGS=--xla_force_host_platform_device_count=N for another count."
      )
    raise ValueError(
      f"{what}={global_batch} must be a multiple of the {devices} batch devices "
      f"and of the {process_count} processes.{hint}"
    )
  return global_batch // process_count


def mesh_process_count(mesh) -> int:
  return len({d.process_index for d in mesh.devices.flat})


def train_iterator(
  labeled: Source,
  *,
  labeled_batch: int,
  image_size: int,
  seed: int,
  start_step: int = 0,
  unlabeled: Optional[Source] = None,
  ratio: int = 0,
  mesh=None,
  **kwargs,
) -> Iterator[dict]:
  """Global train batches from `start_step` on: labeled_batch labeled + ratio x labeled_batch pseudo-labeled.

  Sources opened per process (the default) each feed their process's rows. Sources opened whole
  (process_count=1) while jax runs several processes are read in global order (see train_dataset's
  global_rows): the same batches as a one-process run, at the cost of every process reading every raw
  record; meant for datasets small enough to cache.
  Other keyword arguments (crop, flip, pad, noise, num_classes, cache, shuffle_buffer) go to train_dataset.
  """
  mesh = mesh if mesh is not None else sharding.create_mesh()
  procs = labeled.process_count
  if unlabeled is not None and unlabeled.process_count != procs:
    raise ValueError(
      f"{labeled.spec} is split over {procs} processes but {unlabeled.spec} over "
      f"{unlabeled.process_count}; open both per process or both whole."
    )
  if procs == 1 and mesh_process_count(mesh) > 1:
    kwargs["global_rows"] = (jax.process_index(), jax.process_count())
    procs = jax.process_count()
  local = local_batch(labeled_batch, "labeled_batch", mesh, procs)
  local_u = 0
  if unlabeled is not None and ratio:
    local_u = local_batch(labeled_batch * ratio, "ratio x labeled_batch", mesh, procs)
  elif ratio and unlabeled is None:
    raise ValueError(f"ratio={ratio} but no unlabeled (pseudo-labeled) source was given.")
  ds = train_dataset(
    labeled,
    batch_size=local,
    image_size=image_size,
    seed=seed,
    start_step=start_step,
    unlabeled=unlabeled,
    unlabeled_batch_size=local_u,
    **kwargs,
  )
  for batch in ds.as_numpy_iterator():
    yield sharding.host_to_global(batch, mesh)


def train_batch_spec(global_batch: int, image_size: int, num_classes: int, mesh=None) -> dict:
  """The abstract global train batch train_iterator yields (jax.ShapeDtypeStruct, batch-sharded): enough to
  compile a train step before the pipeline exists (a test holds it to the pipeline's element_spec)."""
  mesh = mesh if mesh is not None else sharding.create_mesh()
  batch_sharding = sharding.batch_sharding(mesh)
  shapes = {
    "image": ((global_batch, image_size, image_size, 3), np.uint8),
    "targets": ((global_batch, num_classes), np.float32),
    "is_labeled": ((global_batch,), np.bool_),
  }
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding) for k, (shape, dtype) in shapes.items()}


def eval_dataset(
  source: Source,
  *,
  batch_size: int,
  num_batches: int,
  image_size: int,
  crop: str = "center",
  with_raw: bool = False,
  start_batch: int = 0,
  keep: Sequence[str] = (),
) -> tf.data.Dataset:
  """This process's `num_batches` eval batches of batch_size, zero-padded with mask False.

  keep: further numeric features of the source's elements that go into the batches as they are (e.g. a
  video frame's 'video' and 'frame'). with_raw keeps the encoded image bytes ('encoded') and the key ('key',
  when the source has it), for the labeling job. start_batch skips whole batches before decoding (a resumed
  labeling job).
  """
  if source.num_examples > num_batches * batch_size:
    raise ValueError(f"{source.spec}: {source.num_examples} examples do not fit {num_batches} batches of {batch_size}.")

  def prepare(ex):
    image = preprocess.eval_image(ex["image"], image_size, crop=crop)
    out = {"image": tf.ensure_shape(image, [image_size, image_size, 3]), "mask": tf.constant(True)}
    if "label" in ex:
      out["label"] = tf.cast(ex["label"], tf.int32)
    if "probabilities" in ex:
      out["targets"] = ex["probabilities"]
    out.update({k: ex[k] for k in keep})
    if with_raw:
      out["encoded"] = ex["image"]
      if "key" in ex:
        out["key"] = ex["key"]
    return out

  skipped = start_batch * batch_size  # raw records dropped undecoded
  ds = source.dataset.skip(skipped).map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors(tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec))
  ds = ds.concatenate(padding.repeat(num_batches * batch_size - max(source.num_examples, skipped)))
  ds = ds.batch(batch_size, drop_remainder=True)
  return _options(ds.prefetch(tf.data.AUTOTUNE))


def eval_num_batches(source: Source, per_process_batch: int) -> int:
  """Batches every process runs: enough for the largest process part (asks jax when not in metadata)."""
  largest = source.max_process_examples
  if largest is None:
    counts = multihost_utils.process_allgather(np.int64(source.num_examples))
    largest = int(np.max(counts))
  return max(1, math.ceil(largest / per_process_batch))


def eval_iterator(
  source: Source,
  *,
  global_batch: int,
  image_size: int,
  crop: str = "center",
  mesh=None,
  with_raw: bool = False,
  start_batch: int = 0,
  keep: Sequence[str] = (),
) -> Iterator[dict]:
  """Global eval batches covering every example of the source exactly once (mask marks padding).

  With with_raw, each batch also has 'local': this process's rows as numpy ('encoded', 'key', 'mask').
  keep (features passed through) as in eval_dataset. The set-up runs in the call, on the caller's thread (for
  a source without per-process counts it is a collective: every process agrees on the batch count); only the
  batches come lazily, so the iterator may be consumed by another thread (read_ahead.ReadAhead) without a
  collective there racing the caller's.
  """
  mesh = mesh if mesh is not None else sharding.create_mesh()
  local = local_batch(global_batch, "global_batch", mesh, source.process_count)
  ds = eval_dataset(
    source,
    batch_size=local,
    num_batches=eval_num_batches(source, local),
    image_size=image_size,
    crop=crop,
    with_raw=with_raw,
    start_batch=start_batch,
    keep=keep,
  )
  return _global_batches(ds, mesh, with_raw)


def _global_batches(ds: tf.data.Dataset, mesh, with_raw: bool) -> Iterator[dict]:
  for batch in ds.as_numpy_iterator():
    raw = {k: batch.pop(k) for k in ("encoded", "key") if k in batch}
    out = sharding.host_to_global(batch, mesh)
    if with_raw:
      out["local"] = dict(raw, mask=batch["mask"])
    yield out
