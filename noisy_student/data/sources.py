"""Labeled, unlabeled and eval sources named by strings; each process reads only its own part.

Specs:
  "tfds:NAME:SPLIT"   any prepared tfds dataset and split expression ("train[:4000]", "train[:80%]+test").
  "tfds:NAME/CONFIG:SPLIT" works too; the dataset is read from `data_dir` (tfds' default when None).
  a TFRecord glob     pseudo-labeled shards in the schema of docs/design.md
                      (e.g. "WORKDIR/01_labels/labels-*.tfrecord").
                      Where the folder holds a finished manifest (`stats.json` of the labeling job), only the
                      shards it names are read, and a named shard that is missing is an error.

A `Source` holds this process's records in a fixed order with images still *encoded*: decoding happens later
in the pipeline, after shuffling and skipping, so a resumed run never decodes images it throws away.
Elements are dicts: 'image' (encoded bytes), 'label' (int64, labeled sources), 'probabilities' (float32
[num_classes], pseudo-labeled TFRecords) and 'key' (bytes, a stable per-example id) when asked for.
Nothing here downloads: an unprepared dataset is an error saying how to prepare it.
"""

import dataclasses
import os
from typing import Callable, Optional, Tuple

import jax
import tensorflow as tf
import tensorflow_datasets as tfds

from noisy_student import outputs
from noisy_student.data import digits

# Builders that need no download: prepared on first use (in seconds) instead of raising.
_OFFLINE_BUILDERS = {"digits": digits.prepare}


class DatasetNotPreparedError(FileNotFoundError):
  """A tfds dataset has not been built in the data directory (we never download)."""


class CorruptRecordError(ValueError):
  """A TFRecord file is truncated or not in the pseudo-label schema; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One process's part of a dataset, in a fixed order, images undecoded."""

  spec: str
  dataset: tf.data.Dataset
  num_examples: int  # in this process's part
  # The largest part over all processes, so every process runs the same number of eval batches;
  # None where it is unknown without reading other processes' files (the eval iterator then asks jax).
  max_process_examples: Optional[int]
  num_classes: Optional[int]
  process_index: int = 0
  process_count: int = 1


def parse_spec(spec: str):
  """'tfds:NAME:SPLIT' -> ('tfds', NAME, SPLIT); anything else is a TFRecord glob -> ('tfrecord', spec, None)."""
  if spec.startswith("tfds:"):
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
      raise ValueError(f"Bad source {spec!r}: expected 'tfds:NAME:SPLIT', e.g. 'tfds:digits:train[:100]'.")
    return "tfds", parts[1], parts[2]
  if not spec:
    raise ValueError("Empty source spec: expected 'tfds:NAME:SPLIT' or a TFRecord glob.")
  return "tfrecord", spec, None


# (label int64, confidence float32, key string) -> int64: how many times a pseudo-labeled record is read
# (0 drops it). The trainer builds one from pseudo_labels.copies_fn(selection, seed).
Copies = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]


def resolve_process(process_index: Optional[int], process_count: Optional[int]) -> Tuple[int, int]:
  """(index, count) of the process whose part a reader opens: jax's for what is not given, checked (every
  reader of a dataset in parts, tfds, TFRecords or videos, splits it the same way)."""
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count}).")
  return process_index, process_count


def open_source(
  spec: str,
  *,
  data_dir: Optional[str] = None,
  labeled: bool = True,
  with_key: bool = False,
  process_index: Optional[int] = None,
  process_count: Optional[int] = None,
  num_classes: Optional[int] = None,
  copies: Optional[Copies] = None,
) -> Source:
  """Opens this process's part of `spec`. `labeled=False` drops labels (an unlabeled source).

  `copies` (TFRecord sources only) filters and duplicates pseudo-labeled records: each record is read as many
  times as it returns for the record's label, confidence and key. The caller builds it (the paper's selection
  is pseudo_labels.copies_fn), so this layer knows nothing of how records are chosen.

  process_index / process_count default to jax's; pass them to read another process's part (tests, tools).
  `with_key` adds 'key': tfds' `tfds_id` (stable across runs and process counts) or the record's image/key.
  """
  process_index, process_count = resolve_process(process_index, process_count)
  kind, name, split = parse_spec(spec)
  if kind == "tfds":
    if copies is not None:
      raise ValueError(f"{spec}: a pseudo-label selection applies to TFRecord shards, not tfds datasets.")
    return _open_tfds(
      spec,
      name,
      split,
      data_dir=data_dir,
      labeled=labeled,
      with_key=with_key,
      process_index=process_index,
      process_count=process_count,
      num_classes=num_classes,
    )
  return _open_tfrecords(
    spec,
    labeled=labeled,
    with_key=with_key,
    process_index=process_index,
    process_count=process_count,
    num_classes=num_classes,
    copies=copies,
  )


# ---------------------------------------------------------------------------------------------- tfds


def _builder(name: str, data_dir: Optional[str]):
  base = name.split("/")[0]
  if base in _OFFLINE_BUILDERS:
    if not tfds.builder(name, data_dir=data_dir).is_prepared():
      _OFFLINE_BUILDERS[base](data_dir)
    return tfds.builder(name, data_dir=data_dir)  # fresh: the old one's metadata predates preparation
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotPreparedError(
      f"Unknown tfds dataset {name!r} (data_dir={data_dir!r}): {str(e).splitlines()[0]}"
    ) from e


def _not_prepared(name, builder, data_dir):
  return DatasetNotPreparedError(
    f"tfds dataset {name!r} is not prepared in {builder.data_dir!r}. noisy_student never downloads; "
    f"prepare it first with `tfds build {name} --data_dir={data_dir or '~/tensorflow_datasets'}` "
    "(for datasets with manual downloads such as imagenet2012, put the archives in "
    "DATA_DIR/downloads/manual first), or pass the data_dir where it is prepared."
  )


def _split_sizes(builder, split, process_count):
  """Examples per process from metadata alone (no reading), or None where the split is unknown."""
  try:
    return [builder.info.splits[s].num_examples for s in tfds.even_splits(split, n=process_count)]
  except (KeyError, ValueError, AssertionError, TypeError):
    return None


def _open_tfds(spec, name, split, *, data_dir, labeled, with_key, process_index, process_count, num_classes):
  builder = _builder(name, data_dir)
  features = builder.info.features
  if "image" not in features:
    raise ValueError(f"{spec}: tfds dataset {name!r} has no 'image' feature (features: {list(features)}).")
  if labeled and "label" not in features:
    raise ValueError(f"{spec}: tfds dataset {name!r} has no 'label' feature; open it with labeled=False.")
  if labeled:
    found = features["label"].num_classes
    if num_classes is not None and num_classes != found:
      raise ValueError(f"{spec}: expected {num_classes} classes, dataset has {found}.")
    num_classes = found
  subsplit = tfds.even_splits(split, n=process_count)[process_index]
  read_config = tfds.ReadConfig(add_tfds_id=with_key)
  try:
    ds = builder.as_dataset(
      split=subsplit, shuffle_files=False, read_config=read_config, decoders={"image": tfds.decode.SkipDecoding()}
    )
  except AssertionError as e:  # tfds' "could not find data" error
    if "could not find data" in str(e) or "download_and_prepare" in str(e):
      raise _not_prepared(name, builder, data_dir) from e
    raise

  def select(ex):
    out = {"image": ex["image"]}
    if labeled:
      out["label"] = tf.cast(ex["label"], tf.int64)
    if with_key:
      out["key"] = ex["tfds_id"]
    return out

  ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)
  n = int(ds.cardinality())
  if n < 0:
    n = int(ds.reduce(0, lambda c, _: c + 1))
  sizes = _split_sizes(builder, split, process_count)
  if sizes is None or sizes[process_index] != n:  # mocked data, or metadata disagreeing with the data
    sizes = [n] if process_count == 1 else None
  return Source(spec, ds, n, max(sizes) if sizes else None, num_classes, process_index, process_count)


# -------------------------------------------------------------------------------- TFRecord shards


def _inspect_record(path):
  """Which schema the shards use, checked on the first record of the first file."""
  try:
    for raw in tf.data.TFRecordDataset(path).take(1):
      ex = tf.train.Example.FromString(raw.numpy())
      return {k: ex.features.feature[k] for k in ex.features.feature}
  except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
    raise CorruptRecordError(f"{path}: corrupt TFRecord file ({e.message.splitlines()[0]}).") from e
  except Exception as e:  # protobuf's DecodeError
    if type(e).__name__ == "DecodeError":
      raise CorruptRecordError(f"{path}: record is not a tf.train.Example ({e}).") from e
    raise
  raise ValueError(f"{path}: empty TFRecord file (expected at least one tf.train.Example).")


def _count_records(files, ds):
  """Records in `ds` (read from `files`); a corrupt file is an error that names it."""
  try:
    return int(ds.reduce(tf.constant(0, tf.int64), lambda c, _: c + 1))
  except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
    for path in files:  # find the culprit: TensorFlow's message does not name the file
      try:
        tf.data.TFRecordDataset(path).reduce(0, lambda c, _: c + 1)
      except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as inner:
        raise CorruptRecordError(f"{path}: corrupt TFRecord file ({inner.message.splitlines()[0]}).") from e
    raise


def _check_feature(path, feats, key, kind):
  if key not in feats:
    raise ValueError(f"{path}: record lacks feature {key!r} (pseudo-label schema needs it; found {sorted(feats)}).")
  found = feats[key].WhichOneof("kind")
  if found != kind:
    raise ValueError(f"{path}: feature {key!r} is {found}, expected {kind}.")


MANIFEST = "stats.json"


def _manifest_files(spec, files):
  """The matched files a finished manifest beside them names (with examples); all files without one."""
  folder = os.path.dirname(spec)
  if any(c in folder for c in "*?["):
    raise ValueError(
      f"{spec!r}: wildcards only in the file name, not the folder (each labeling job's "
      "folder has its own stats.json manifest)."
    )
  manifest = os.path.join(folder, MANIFEST)
  if not tf.io.gfile.exists(manifest):
    return files
  shards = outputs.read_json(manifest).get("shards")
  if not isinstance(shards, list):
    raise ValueError(f"{manifest}: not a pseudo-label manifest (no 'shards' list); was it written by the labeling job?")
  named = {os.path.join(folder, s["file"]): s["examples"] for s in shards}
  missing = sorted(set(named) - set(tf.io.gfile.glob(os.path.join(folder, "*"))))
  if missing:
    raise FileNotFoundError(
      f"{manifest} names shards that are missing: {missing[:3]}{' ...' if len(missing) > 3 else ''}."
    )
  return [f for f in files if named.get(f, 0) > 0]


def _open_tfrecords(spec, *, labeled, with_key, process_index, process_count, num_classes, copies):
  files = sorted(tf.io.gfile.glob(spec))
  if not files:
    raise FileNotFoundError(f"No TFRecord files match {spec!r}.")
  files = _manifest_files(spec, files)
  if not files:
    raise ValueError(f"{spec}: the manifest beside these files names no shard with examples.")
  feats = _inspect_record(files[0])
  for other in files[1:]:  # every file in the same schema (an old run's shard may not be)
    found = _inspect_record(other)
    if set(found) != set(feats):
      raise ValueError(
        f"{other}: features {sorted(found)} differ from {files[0]}'s {sorted(feats)} "
        "(shards of different labeling runs mixed in one glob?)."
      )
  _check_feature(files[0], feats, "image/encoded", "bytes_list")
  schema = {"image/encoded": tf.io.FixedLenFeature([], tf.string)}
  if with_key:
    _check_feature(files[0], feats, "image/key", "bytes_list")
    schema["image/key"] = tf.io.FixedLenFeature([], tf.string)
  soft = None
  if labeled:
    if "probabilities" in feats:
      _check_feature(files[0], feats, "probabilities", "float_list")
      found = len(feats["probabilities"].float_list.value)
      if num_classes is not None and num_classes != found:
        raise ValueError(f"{files[0]}: 'probabilities' has {found} classes, expected {num_classes}.")
      num_classes, soft = found, "dense"
      schema["probabilities"] = tf.io.FixedLenFeature([num_classes], tf.float32)
    elif "topk/indices" in feats:
      _check_feature(files[0], feats, "topk/indices", "int64_list")
      _check_feature(files[0], feats, "topk/probabilities", "float_list")
      if num_classes is None:
        raise ValueError(f"{files[0]}: top-k soft labels need num_classes to be given.")
      soft = "topk"
      schema["topk/indices"] = tf.io.VarLenFeature(tf.int64)
      schema["topk/probabilities"] = tf.io.VarLenFeature(tf.float32)
    else:
      _check_feature(files[0], feats, "label", "int64_list")
      if num_classes is None:
        raise ValueError(f"{files[0]}: hard labels only; num_classes must be given.")
      schema["label"] = tf.io.FixedLenFeature([], tf.int64)

  if copies is not None:
    for key, kind in (("label", "int64_list"), ("confidence", "float_list"), ("image/key", "bytes_list")):
      _check_feature(files[0], feats, key, kind)
      schema[key] = tf.io.FixedLenFeature(
        [], {"label": tf.int64, "confidence": tf.float32, "image/key": tf.string}[key]
      )

  # Own file shards when there are enough files; otherwise every process reads all and keeps every k-th.
  if len(files) >= process_count:
    ds = tf.data.TFRecordDataset(files[process_index::process_count])
  else:
    ds = tf.data.TFRecordDataset(files).shard(process_count, process_index)

  def parse(raw):
    ex = tf.io.parse_single_example(raw, schema)
    out = {"image": ex["image/encoded"]}
    if with_key:
      out["key"] = ex["image/key"]
    if soft == "dense":
      out["probabilities"] = ex["probabilities"]
    elif soft == "topk":
      idx = tf.sparse.to_dense(ex["topk/indices"])
      p = tf.sparse.to_dense(ex["topk/probabilities"])
      out["probabilities"] = tf.scatter_nd(idx[:, None], p, [num_classes])
    elif labeled:
      out["label"] = ex["label"]
    return out

  if copies is not None:
    sel_schema = {k: schema[k] for k in ("label", "confidence", "image/key")}

    def repeat(raw):
      ex = tf.io.parse_single_example(raw, sel_schema)
      return tf.data.Dataset.from_tensors(raw).repeat(copies(ex["label"], ex["confidence"], ex["image/key"]))

    ds = ds.flat_map(repeat)
  n = _count_records(files, ds)  # raw records (after selection), no image parsing
  ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.apply(tf.data.experimental.assert_cardinality(n))
  return Source(spec, ds, n, n if process_count == 1 else None, num_classes, process_index, process_count)
