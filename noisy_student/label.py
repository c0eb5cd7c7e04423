"""label(config, workdir): the teacher, without noise, over unlabeled images -> pseudo-label TFRecord shards.

A separate job from training (it imports no trainer): it loads a finished teacher's exported EMA variables
(`config.label.teacher_workdir`/export), runs them in eval mode (no dropout, no stochastic depth, moving
batch-norm statistics) with eval preprocessing at `config.model.image_size`, and writes, per process, its own
shards of the records in the schema of docs/design.md.

Distribution and resumption. The global batch is sharded over every device of every process; each process
keeps only its own rows (nothing is gathered to one host) and writes shards
`labels-{p * K + j}-of-{P * K}`, j < K, each covering a fixed range of its batches. The input starts
decoding when the job starts (read_ahead.ReadAhead), while the teacher loads and its step compiles; the
teacher is loaded only when some shard is left to write. A shard is written under a
temporary name, its statistics sidecar is written, and only then is it renamed: a shard under its final name
is complete. A rerun starts at the first batch some process has not finished, rewrites only incomplete
shards, and produces byte-identical files. When every process is done, process 0 merges the sidecars into
`stats.json` (the finished manifest readers trust) and plots them.
"""

import bisect
import dataclasses
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from noisy_student import checkpoint, config_defaults, inference, outputs, pseudo_labels, sharding
from noisy_student import data as data_lib
from noisy_student import normalization as normalization_lib
from noisy_student.data import pipeline
from noisy_student.models import create_model
from noisy_student.read_ahead import ReadAhead

STATS_FILE = "stats.json"
PLOT_FILE = "stats.png"


def load_teacher(teacher_workdir: str, model, image_size: int, mesh) -> Dict[str, Any]:
  """The teacher's exported EMA variables, replicated over `mesh`; errors name the folder."""
  if not teacher_workdir:
    raise ValueError("config.label.teacher_workdir is empty: name the teacher's training workdir.")
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
  replicated = NamedSharding(mesh, PartitionSpec())
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)
  return checkpoint.load_inference_variables(str(epath.Path(teacher_workdir) / checkpoint.EXPORT_DIR), dict(template))


def make_infer_step(model, mesh, micro_batch: int = 0, normalization: str = "imagenet"):
  """The job's step: uint8 pixels (or standardized floats) in, eval-mode float32 logits out, batch-sharded in
  and out, each device's rows in passes of micro_batch_size(...) images (inference.make_forward)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  batch = sharding.batch_sharding(mesh)
  forward = inference.make_forward(model, normalization, mesh=mesh, micro_batch=micro_batch)
  return jax.jit(forward, in_shardings=(replicated, batch), out_shardings=batch)


READ_AHEAD_BYTES = 256 * 2**20


def read_ahead_batches(configured: int, local_batch: int, image_size: int) -> int:
  """Batches decoded ahead of the model: `configured`, or for 0 as many uint8 batches as fit READ_AHEAD_BYTES
  (at least 1): 55 of 32 images at 224 px, about the images one core decodes while b0's job starts. They
  wait as the step's inputs, i.e. on the devices (host memory on a CPU)."""
  if configured > 0:
    return configured
  return max(1, READ_AHEAD_BYTES // (local_batch * image_size * image_size * 3))


def shard_bounds(num_batches: int, shards: int) -> List[int]:
  """Batch index where each of this process's shards starts, and the end: shards cover batches evenly."""
  return [j * num_batches // shards for j in range(shards + 1)]


def _fingerprint(config: ml_collections.ConfigDict, num_batches: int, global_batch: int, mesh) -> Dict[str, Any]:
  """What a shard's bytes depend on: a shard written under other settings is not reused."""
  lc, m = config.label, config.model
  per_device = global_batch // sharding.batch_devices(mesh)
  return {
    "teacher": str(lc.teacher_workdir),
    "model": m.name,
    "num_classes": m.num_classes,
    "image_size": m.image_size,
    "source": config.data.unlabeled_source,
    "eval_crop": config.data.eval_crop,
    "normalization": config.data.normalization,
    "batch": global_batch,
    "num_batches": num_batches,
    "temperature": lc.temperature,
    "top_k": lc.top_k,
    "hard": bool(lc.hard),
    "num_bins": lc.num_bins,
    "micro_batch": inference.micro_batch_size(
      per_device, lc.micro_batch, sharding.platform(mesh), image_pixels=m.image_size**2
    ),
  }


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  """This process's part of the job: its shard j covers batches [bounds[j], bounds[j + 1]) and is shard
  first + j of count; done[j] marks a shard already complete under the same fingerprint (kept, not
  rewritten). The batches start at bounds[start_shard], the first shard some process has left to write."""

  folder: epath.Path
  num_batches: int
  bounds: Tuple[int, ...]
  done: Tuple[bool, ...]
  start_shard: int
  first: int
  count: int
  num_classes: int
  fingerprint: Mapping[str, Any]
  process_count: int


@dataclasses.dataclass(frozen=True)
class RecordOptions:
  """How logits become records (config.label): soft labels at `temperature`, all classes or the top_k,
  or hard labels; `num_bins` confidence bins in the statistics."""

  temperature: float = 1.0
  top_k: int = 0
  hard: bool = False
  num_bins: int = pseudo_labels.DEFAULT_NUM_BINS


def _complete(folder: epath.Path, index: int, count: int, fingerprint: Dict[str, Any]) -> bool:
  """A shard is complete when it exists under its final name with a sidecar of the same settings."""
  sidecar = folder / pseudo_labels.sidecar_name(index, count)
  if not ((folder / pseudo_labels.shard_name(index, count)).exists() and sidecar.exists()):
    return False
  try:
    return outputs.read_json(sidecar).get("fingerprint") == fingerprint
  except ValueError:  # a damaged sidecar: redo the shard
    return False


class _ShardWriter:
  """Streams one shard's records to a temporary file; `finish` writes the sidecar, then renames."""

  def __init__(
    self, folder: epath.Path, index: int, count: int, num_classes: int, num_bins: int, fingerprint: Dict[str, Any]
  ):
    self.fingerprint = fingerprint
    self.final = folder / pseudo_labels.shard_name(index, count)
    self.sidecar = folder / pseudo_labels.sidecar_name(index, count)
    self.tmp = str(self.final) + ".tmp"
    self.num_classes, self.num_bins = num_classes, num_bins
    self.writer = tf.io.TFRecordWriter(self.tmp)
    self.labels, self.confidence = [], []

  def write(self, record: bytes, label: int, confidence: float) -> None:
    self.writer.write(record)
    self.labels.append(label)
    self.confidence.append(confidence)

  def finish(self) -> None:
    self.writer.close()
    stats = pseudo_labels.shard_stats(
      np.asarray(self.labels, np.int64), np.asarray(self.confidence, np.float32), self.num_classes, self.num_bins
    )
    stats["fingerprint"] = self.fingerprint
    outputs.write_json(self.sidecar, stats)
    tf.io.gfile.rename(self.tmp, str(self.final), overwrite=True)


def _all_max(value: int) -> int:
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.int64(value))))


def _all_min(value: int) -> int:
  if jax.process_count() == 1:
    return value
  return int(np.min(multihost_utils.process_allgather(np.int64(value))))


def label(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """mode='label': pseudo-labels config.data.unlabeled_source with the teacher in config.label.teacher_workdir.

  config.model describes the teacher. Returns a short summary (examples, shards, mean confidence); the
  full statistics are in WORKDIR/stats.json.
  """
  lc = config.label
  folder = epath.Path(workdir)
  folder.mkdir(parents=True, exist_ok=True)
  if not config.data.unlabeled_source:
    raise ValueError("config.data.unlabeled_source is empty: name the images to label (e.g. 'tfds:digits:train[50:]').")
  normalization_lib.check_normalization(config.data.normalization)  # before any work starts
  mesh = sharding.create_mesh(fsdp=config.mesh.fsdp)
  model = create_model(**config_defaults.model_arguments(config.model), platform=sharding.platform(mesh))
  num_classes = config.model.num_classes
  source = data_lib.open_source(
    config.data.unlabeled_source, data_dir=config.data.data_dir or None, labeled=False, with_key=True
  )
  global_batch = lc.batch or config.data.eval_batch
  local = pipeline.local_batch(global_batch, "config.label.batch", mesh, source.process_count)
  num_batches = pipeline.eval_num_batches(source, local)
  if lc.shards_per_process < 1:
    raise ValueError(f"config.label.shards_per_process={lc.shards_per_process} must be >= 1.")
  if lc.micro_batch < 0:
    raise ValueError(
      f"config.label.micro_batch={lc.micro_batch} must be >= 0 (images per forward pass "
      f"within a device's rows; 0 picks automatically)."
    )
  if lc.read_ahead_batches < 0:
    raise ValueError(
      f"config.label.read_ahead_batches={lc.read_ahead_batches} must be >= 0 (batches the "
      f"input decodes ahead of the model; 0 picks automatically)."
    )
  per_process = min(lc.shards_per_process, num_batches)
  count = per_process * source.process_count
  first = source.process_index * per_process
  bounds = shard_bounds(num_batches, per_process)
  fingerprint = _fingerprint(config, num_batches, global_batch, mesh)
  done = [_complete(folder, first + j, count, fingerprint) for j in range(per_process)]
  start_shard = _all_min(done.index(False) if False in done else per_process)
  if start_shard < per_process and jax.process_index() == 0 and (folder / STATS_FILE).exists():
    (folder / STATS_FILE).unlink()  # an older manifest must not vouch for shards being rewritten

  if start_shard < per_process:
    logging.info(
      "Labeling %s: %d batches of %d on %d processes (%d devices), %d shards, forward passes of %d images per device.",
      source.spec,
      num_batches,
      global_batch,
      source.process_count,
      jax.device_count(),
      count,
      fingerprint["micro_batch"],
    )
    if start_shard:
      logging.info("Shards before %d of each process are complete: resuming at shard %d.", start_shard, start_shard)
    # The input starts decoding now, while the teacher loads and its step compiles (about 2 s for b0, in
    # which a core would otherwise idle), up to read_ahead_batches batches ahead of the model.
    batches = ReadAhead(
      data_lib.eval_iterator(
        source,
        global_batch=global_batch,
        image_size=config.model.image_size,
        crop=config.data.eval_crop,
        mesh=mesh,
        with_raw=True,
        start_batch=bounds[start_shard],
      ),
      depth=read_ahead_batches(lc.read_ahead_batches, local, config.model.image_size),
    )
    plan = ShardPlan(
      folder=folder,
      num_batches=num_batches,
      bounds=tuple(bounds),
      done=tuple(done),
      start_shard=start_shard,
      first=first,
      count=count,
      num_classes=num_classes,
      fingerprint=fingerprint,
      process_count=source.process_count,
    )
    records = RecordOptions(temperature=lc.temperature, top_k=lc.top_k, hard=bool(lc.hard), num_bins=lc.num_bins)
    with batches:
      variables = load_teacher(lc.teacher_workdir, model, config.model.image_size, mesh)
      infer = make_infer_step(model, mesh, lc.micro_batch, config.data.normalization)
      _run(
        plan,
        records,
        infer,
        variables,
        batches,
        mesh,
        log_every_batches=lc.log_every_batches,
        log_every_secs=lc.log_every_secs,
      )
  multihost_utils.sync_global_devices("labels: shards written")
  failure = None
  if jax.process_index() == 0:
    try:
      _write_manifest(config, folder, count, num_classes)
    except Exception as e:  # pylint: disable=broad-except
      failure = e
  # Every process learns whether process 0 wrote the manifest, so none waits for one that will not come.
  failed = _all_max(int(failure is not None))
  if failure is not None:
    raise failure
  if failed:
    raise RuntimeError(f"Process 0 failed to write {folder / STATS_FILE}; see its log.")
  stats = outputs.read_json(folder / STATS_FILE)
  hist = np.asarray(stats["histogram"])
  centers = (np.arange(hist.shape[1]) + 0.5) / hist.shape[1]
  mean_conf = float((hist.sum(0) * centers).sum() / max(1, hist.sum()))
  return {"examples": stats["num_examples"], "shards": count, "mean_confidence": mean_conf}


def _run(
  plan: ShardPlan,
  records: RecordOptions,
  infer: Callable,
  variables: Any,
  batches: Iterable[dict],
  mesh,
  *,
  log_every_batches: int,
  log_every_secs: float,
) -> None:
  """Labels `batches` (from bounds[start_shard] on) with `infer`, writing the plan's shards that are not done."""
  bounds, num_batches = plan.bounds, plan.num_batches
  batch_spec = PartitionSpec(sharding.BATCH_AXES)
  writer = metric_writers.create_default_writer(just_logging=True)
  progress = periodic_actions.ReportProgress(num_train_steps=num_batches, writer=writer, every_secs=log_every_secs)
  shard_writer, images, t0 = None, 0, time.monotonic()

  def write(b, logits, raw):
    """Batch b's records into its shard, which is finished at its last batch; nothing for a complete shard."""
    nonlocal shard_writer, images
    j = bisect.bisect_right(bounds, b) - 1
    if plan.done[j]:
      return  # another process is behind: this one kept it company in the collective, rewrites nothing
    if shard_writer is None:
      shard_writer = _ShardWriter(
        plan.folder, plan.first + j, plan.count, plan.num_classes, records.num_bins, plan.fingerprint
      )
    local = np.asarray(multihost_utils.global_array_to_host_local_array(logits, mesh, batch_spec))
    probs = pseudo_labels.soft_labels(local, records.temperature)
    tops = np.argmax(probs, axis=-1)  # the records' label / confidence, for the shard's statistics
    confidences = np.take_along_axis(probs, tops[:, None], axis=-1)[:, 0]
    for i in np.nonzero(raw["mask"])[0]:
      record = pseudo_labels.make_example(
        raw["encoded"][i], raw["key"][i], probs[i], top_k=records.top_k, hard=records.hard
      )
      shard_writer.write(record, int(tops[i]), float(confidences[i]))
    images += int(raw["mask"].sum())
    if b + 1 == bounds[j + 1]:
      shard_writer.finish()
      shard_writer = None
    progress(b + 1)
    if (b + 1) % max(1, log_every_batches) == 0:
      rate = images * plan.process_count / max(time.monotonic() - t0, 1e-9)
      logging.info("labeled %d / %d batches, %.1f img/s", b + 1, num_batches, rate)

  # One batch in flight: batch b+1 is dispatched before batch b's records are built and written, so the
  # device computes while the host writes.
  pending = None
  for b, batch in enumerate(batches, start=bounds[plan.start_shard]):
    logits = infer(variables, batch["image"])
    if pending is not None:
      write(*pending)
    pending = (b, logits, batch["local"])
  if pending is not None:
    write(*pending)


def _write_manifest(config, folder: epath.Path, count: int, num_classes: int) -> Dict[str, Any]:
  """Process 0: stats.json = the shards' summed statistics + the list of shards; and the plot."""
  parts, shards = [], []
  for index in range(count):
    part = outputs.read_json(folder / pseudo_labels.sidecar_name(index, count))
    part.pop("fingerprint", None)
    if part["num_classes"] != num_classes:
      raise ValueError(
        f"{folder / pseudo_labels.sidecar_name(index, count)}: {part['num_classes']} "
        f"classes, expected {num_classes} (a stale shard of another teacher?)."
      )
    parts.append(part)
    shards.append({"file": pseudo_labels.shard_name(index, count), "examples": part["num_examples"]})
  stats = pseudo_labels.merge_stats(parts)
  lc = config.label
  stats.update(
    shards=shards,
    source=config.data.unlabeled_source,
    teacher=lc.teacher_workdir,
    model=config.model.name,
    temperature=lc.temperature,
    hard=bool(lc.hard),
    top_k=lc.top_k,
  )
  selection = pseudo_labels.select(stats, **config_defaults.selection_arguments(config.select))
  outputs.write_json(folder / STATS_FILE, stats)  # the manifest marks the labels complete
  try:
    pseudo_labels.plot_histograms(stats, folder / PLOT_FILE, selection)
  except Exception as e:  # pylint: disable=broad-except  # a plot is not worth failing the job for
    logging.warning("Could not plot %s: %s", folder / PLOT_FILE, e)
  logging.info(
    "Wrote %d pseudo-labels in %d shards to %s; selection keeps %.0f.",
    stats["num_examples"],
    count,
    folder,
    selection["expected_total"],
  )
  return stats
