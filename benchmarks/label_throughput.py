"""Labeling throughput end to end: JPEG decode + eval preprocessing + teacher inference + TFRecord writing.

    python benchmarks/label_throughput.py [--model efficientnet-b0] [--images 512] [--batch 32]

Writes mock 500x375 JPEGs (benchmarks/input_pipeline.make_jpegs) as an unlabeled TFRecord source, exports a
randomly initialised teacher, and runs `label.label` twice: the first run compiles (kept in a persistent
compilation cache), the second is timed as the job (on one XLA:CPU device per core, up to 8, as the CLI runs
mode=label; XLA_FLAGS with a host device count overrides), and its labeling loop alone (what a long job's img/s
tends to: start-up and the manifest are fixed costs). Then times each part alone on the same data: the input
pipeline (decode, center crop, resize, batching; uint8 out, as the job's: the model normalizes), the model on
the same batches (in the job's micro-batches, config.label.micro_batch, and in one pass per batch), and
building + writing the records.
The parts overlap in the job (tf.data runs ahead on its own threads), so the job is faster than their sum
when the CPU has room.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from noisy_student import allocator, cpu_devices  # noqa: E402

if __name__ == "__main__" and "--no_reexec" not in sys.argv:
  allocator.reexec_with_fast_allocator()  # before jax allocates anything
  cpu_devices.split_per_core()  # as `python -m noisy_student` does on a CPU

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.input_pipeline import make_jpegs  # noqa: E402
from benchmarks.timing import time_alternating  # noqa: E402
from noisy_student import checkpoint, label, pseudo_labels, sharding  # noqa: E402
from noisy_student import data as data_lib  # noqa: E402
from noisy_student.config_defaults import base_config  # noqa: E402
from noisy_student.models import model_from_config  # noqa: E402


def _time_calls(module, name):
  """Wraps module.name so that its calls' seconds add up in the returned one-element list."""
  total, inner = [0.0], getattr(module, name)

  def timed(*args, **kwargs):
    start = time.perf_counter()
    try:
      return inner(*args, **kwargs)
    finally:
      total[0] += time.perf_counter() - start
  setattr(module, name, timed)
  return total


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="efficientnet-b0")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--no_reexec", action="store_true")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    jax.config.update("jax_compilation_cache_dir", os.path.join(tmp, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    src_path = os.path.join(tmp, "jpegs-00000-of-00001.tfrecord")
    make_jpegs(src_path, args.images)
    c = base_config()
    c.model.update(name=args.model, num_classes=1000, image_size=args.size)
    c.data.update(unlabeled_source=src_path, eval_crop="center")
    c.label.update(teacher_workdir=os.path.join(tmp, "teacher"), batch=args.batch, shards_per_process=4,
                   top_k=0, log_every_batches=10**9)
    model = model_from_config(c.model)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, args.size, args.size, 3)), train=False))(
        jax.random.key(0, impl="rbg"))
    checkpoint.save_inference_variables(os.path.join(tmp, "teacher", checkpoint.EXPORT_DIR), variables)

    label.label(c, os.path.join(tmp, "warmup"))
    loop = _time_calls(label, "_run")  # the labeling loop inside the job, apart from start-up and manifest
    start = time.perf_counter()
    summary = label.label(c, os.path.join(tmp, "timed"))
    job = time.perf_counter() - start
    assert summary["examples"] == args.images

    mesh = sharding.create_mesh()
    source = data_lib.open_source(src_path, labeled=False, with_key=True)
    start = time.perf_counter()
    batches = [b for b in data_lib.eval_iterator(source, global_batch=args.batch, image_size=args.size,
                                                 mesh=mesh, with_raw=True, normalize=False)]
    t_input = time.perf_counter() - start

    replicated = jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    per_device = args.batch // sharding.batch_devices(mesh)
    micro = label.micro_batch_size(per_device, c.label.micro_batch, image_pixels=args.size**2)
    # The job's micro-batches, and one pass per batch beside them, alternated (median of two rounds) so a
    # shared machine's drift does not favour either.
    infers = {k: label.make_infer_step(model, mesh, k) for k in sorted({micro, per_device})}
    for infer in infers.values():
      jax.block_until_ready(infer(replicated, batches[0]["image"]))
    seconds = time_alternating(
        [lambda infer=infer: [infer(replicated, b["image"]) for b in batches] for infer in infers.values()],
        steps=2)
    t_model = dict(zip(infers, seconds))

    probs = pseudo_labels.soft_labels(np.random.default_rng(0).normal(size=(args.batch, 1000)))
    start = time.perf_counter()
    with tf.io.TFRecordWriter(os.path.join(tmp, "write_only.tfrecord")) as w:
      for b in batches:
        raw = b["local"]
        for i in np.nonzero(raw["mask"])[0]:
          w.write(pseudo_labels.make_example(raw["encoded"][i], raw["key"][i], probs[i]))
    t_write = time.perf_counter() - start

  n = args.images
  print(f"{args.model} at {args.size}, batch {args.batch}, {n} JPEGs (500x375), {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s); allocator: {allocator.describe()}")
  print("| part | seconds | img/s |\n|---|---|---|")
  models = [(f"model alone, passes of {k} images" + (" (the job's)" if k == micro else ""), t)
            for k, t in t_model.items()]
  for name, t in [("labeling job end to end (label.label)", job),
                  ("its labeling loop (without start-up: teacher load, compile-cache load; manifest)", loop[0]),
                  ("input alone", t_input), *models, ("records alone", t_write)]:
    print(f"| {name} | {t:.2f} | {n / t:.1f} |")
  # How much of the model's own speed the whole job keeps: the machine-independent part of the result.
  print(f"job / model alone (the job's passes): {t_model[micro] / job:.2f}")


if __name__ == "__main__":
  main()
