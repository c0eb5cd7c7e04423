"""Input pipeline throughput: img/s of the train pipeline at 224, with RandAugment (N=2, M=15) and without.

    python benchmarks/input_pipeline.py [--images 256] [--steps 20] [--batch 32]

Writes a mock ImageNet-like TFRecord set (500x375 JPEGs made from upscaled, tinted scikit-learn digits
with noise, so the JPEGs have realistic sizes) to a temporary folder and times the same tf.data pipeline the
trainer uses (official inception crop with decode_and_crop_jpeg, bicubic resize, flip, RandAugment,
batching; uint8 out, standardized later by the step on the device), after a warm-up batch. Also times the
eval pipeline (center crop). Prints a table; compare it with benchmarks/train_step's img/s on the same
machine.
"""

import argparse
import io
import os
import tempfile
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from noisy_student.data import digits, pipeline, sources


def make_jpegs(path, count, seed=0):
  """count 500x375 JPEG records in the pseudo-label schema (hard labels) at `path`."""
  rng = np.random.default_rng(seed)
  images, labels = digits.digits_arrays()
  with tf.io.TFRecordWriter(path) as w:
    for i in range(count):
      d = tf.image.resize(images[i % len(images)].astype(np.float32), [375, 500], method="bicubic").numpy()[..., 0]
      tint = rng.uniform(0.3, 1.0, size=3)
      img = d[..., None] * tint + rng.normal(0, 12, size=(375, 500, 3)) + np.linspace(0, 60, 500)[None, :, None]
      buf = io.BytesIO()
      Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
      feat = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buf.getvalue()])),
        "image/key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(i).encode()])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(labels[i % len(labels)])])),
      }
      w.write(tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString())


def time_batches(ds, steps, batch):
  it = ds.as_numpy_iterator()
  next(it)  # warm-up: tracing and the first fills
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--size", type=int, default=224)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "labels-00000-of-00001.tfrecord")
    make_jpegs(path, args.images)
    src = sources.open_source(path, num_classes=10, process_index=0, process_count=1)
    rows = []
    for name, noise in [
      ("train, no RandAugment", pipeline.Noise()),
      ("train, RandAugment N=2 M=15", pipeline.Noise(2, 15)),
    ]:
      ds = pipeline.train_dataset(src, batch_size=args.batch, image_size=args.size, seed=0, noise=noise)
      rows.append((name, time_batches(ds, args.steps, args.batch)))
    ds = pipeline.eval_dataset(
      src, batch_size=args.batch, num_batches=args.images // args.batch, image_size=args.size
    ).repeat()
    rows.append(("eval (center crop)", time_batches(ds, args.steps, args.batch)))
  cores = os.cpu_count()
  print(
    f"\ninput pipeline at {args.size}px, batch {args.batch}, {cores} CPU cores (500x375 JPEGs, tf {tf.__version__})"
  )
  print(f"{'pipeline':<30} {'img/s':>9} {'img/s/core':>11}")
  for name, ips in rows:
    print(f"{name:<30} {ips:>9.1f} {ips / cores:>11.1f}")


if __name__ == "__main__":
  main()
