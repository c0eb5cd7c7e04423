"""Labeling throughput end to end: JPEG decode + eval preprocessing + teacher inference + TFRecord writing.

    python benchmarks/label_throughput.py [--model efficientnet-b0] [--images 512] [--batch 32]
        [--rounds 1] [--peer_python PYTHON_WITH_TIMM]

Writes mock 500x375 JPEGs (benchmarks/input_pipeline.make_jpegs) as an unlabeled TFRecord source, exports a
randomly initialised teacher, and runs `label.label` 1 + `--rounds` times: the first run compiles (kept in a
persistent compilation cache), the others are timed as the job (on one XLA:CPU device per core, up to 8, as
the CLI runs mode=label; XLA_FLAGS with a host device count overrides; the median round is reported), with
its labeling loop alone (`label._run`, from the step's trace and compile-cache load to the last record; the
teacher load before it and the manifest after it are fixed costs; the input has decoded ahead during the
load, so on a short run the loop is faster than a long job's steady rate). Then times each part alone on the
same data: the input pipeline (decode, center crop, resize, batching; uint8 out: the step standardizes), the
model on the same batches (in the job's micro-batches, config.label.micro_batch, and in one pass per batch),
and building + writing the records.
The parts overlap in the job (tf.data runs ahead on its own threads), so the job is faster than their sum
when the CPU has room.

The peer, beside the job: with `--peer_python=TIMM_VENV/bin/python` (a Python with torch and timm, set up
as benchmarks/timm_throughput.py's docstring says; a torchvision stand-in goes in PYTHONPATH), each of
`--rounds` rounds times the job, then PyTorch + timm's b0 inference alone (channels-last, eval mode, the same
batch and as many batches as the job has, in a child process under tuned glibc, without this process's
allocator or XLA settings), so both see the same minutes of a machine whose speed drifts. timm's rate is
printed three ways: sustained (all its timed batches over their total time, comparable with the job's end to
end rate), its median batch, and its fastest batch (an extreme of many batches: with 192 batches it ran
1.4x the median here).
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from noisy_student.cpu import allocator  # noqa: E402
from noisy_student.cpu import devices as host_devices  # noqa: E402

if __name__ == "__main__" and "--no_reexec" not in sys.argv:
  allocator.reexec_with_fast_allocator()  # before jax allocates anything
  host_devices.split_per_core()  # as `python -m noisy_student` does on a CPU

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.input_pipeline import make_jpegs  # noqa: E402
from benchmarks.timing import time_alternating  # noqa: E402
from noisy_student import checkpoint, inference, label, pseudo_labels, sharding  # noqa: E402
from noisy_student import data as data_lib  # noqa: E402
from noisy_student.config_defaults import base_config, model_arguments  # noqa: E402
from noisy_student.models import create_model  # noqa: E402


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


PEER_GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"


def peer_inference(python: str, batch: int, size: int, batches: int):
  """(median batch, fastest batch, sustained) img/s of PyTorch + timm's efficientnet_b0 inference over
  `batches` batches (sustained: all of them over their total time, as a job's rate), run by
  timm_throughput.py in a child process with this process's allocator and XLA settings removed."""
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("LD_PRELOAD", "XLA_FLAGS") and not k.startswith("MIMALLOC_") and not k.startswith("NOISY_STUDENT_")
  }
  env["GLIBC_TUNABLES"] = PEER_GLIBC_TUNABLES
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "timm_throughput.py")
  out = subprocess.run(
    [
      python,
      script,
      f"--batch={batch}",
      f"--resolution={size}",
      "--formats=channels_last",
      "--skip=train",
      f"--steps={batches}",
      "--warmup=2",
    ],
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  # timm_throughput.py prints one line "result: " + JSON of its rows (not imported here: it needs torch).
  lines = [line for line in out.stdout.splitlines() if line.startswith("result: ")]
  if out.returncode or not lines:
    raise RuntimeError(f"The peer run ({python} {script}) failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
  row = json.loads(lines[-1][len("result: ") :])["channels_last"]
  return row["infer_img_s"], row["infer_max_img_s"], row["infer_sustained_img_s"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="efficientnet-b0")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--no_reexec", action="store_true")
  parser.add_argument(
    "--peer_python", default="", help="a Python with torch + timm: time their inference beside the job"
  )
  parser.add_argument("--rounds", type=int, default=1, help="timed jobs (each followed by the peer's run)")
  args = parser.parse_args()
  if args.rounds < 1:
    parser.error(f"--rounds={args.rounds} must be >= 1")
  with tempfile.TemporaryDirectory() as tmp:
    jax.config.update("jax_compilation_cache_dir", os.path.join(tmp, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    src_path = os.path.join(tmp, "jpegs-00000-of-00001.tfrecord")
    make_jpegs(src_path, args.images)
    c = base_config()
    c.model.update(name=args.model, num_classes=1000, image_size=args.size)
    c.data.update(unlabeled_source=src_path, eval_crop="center")
    c.label.update(
      teacher_workdir=os.path.join(tmp, "teacher"),
      batch=args.batch,
      shards_per_process=4,
      top_k=0,
      log_every_batches=10**9,
    )
    model = create_model(**model_arguments(c.model))
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, args.size, args.size, 3)), train=False))(
      jax.random.key(0, impl="rbg")
    )
    checkpoint.save_inference_variables(os.path.join(tmp, "teacher", checkpoint.EXPORT_DIR), variables)

    label.label(c, os.path.join(tmp, "warmup"))
    loop = _time_calls(label, "_run")  # the labeling loop inside the job, apart from start-up and manifest
    jobs, peers = [], []
    for r in range(args.rounds):
      loop[0] = 0.0
      start = time.perf_counter()
      summary = label.label(c, os.path.join(tmp, f"timed{r}"))
      jobs.append((time.perf_counter() - start, loop[0]))
      assert summary["examples"] == args.images
      if args.peer_python:
        peers.append(peer_inference(args.peer_python, args.batch, args.size, -(-args.images // args.batch)))
    job, loop[0] = sorted(jobs)[(len(jobs) - 1) // 2]  # the median round (the faster middle one if even)

    mesh = sharding.create_mesh()
    source = data_lib.open_source(src_path, labeled=False, with_key=True)
    start = time.perf_counter()
    batches = [
      b for b in data_lib.eval_iterator(source, global_batch=args.batch, image_size=args.size, mesh=mesh, with_raw=True)
    ]
    t_input = time.perf_counter() - start

    replicated = jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    per_device = args.batch // sharding.batch_devices(mesh)
    micro = inference.micro_batch_size(per_device, c.label.micro_batch, image_pixels=args.size**2)
    # The job's micro-batches, and one pass per batch beside them, alternated (median of two rounds) so a
    # shared machine's drift does not favour either.
    infers = {k: label.make_infer_step(model, mesh, k) for k in sorted({micro, per_device})}
    for infer in infers.values():
      jax.block_until_ready(infer(replicated, batches[0]["image"]))
    seconds = time_alternating(
      [lambda infer=infer: [infer(replicated, b["image"]) for b in batches] for infer in infers.values()], steps=2
    )
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
  print(
    f"{args.model} at {args.size}, batch {args.batch}, {n} JPEGs (500x375), {jax.device_count()} "
    f"{jax.devices()[0].platform} device(s); allocator: {allocator.describe()}"
  )
  print("| part | seconds | img/s |\n|---|---|---|")
  models = [
    (f"model alone, passes of {k} images" + (" (the job's)" if k == micro else ""), t) for k, t in t_model.items()
  ]
  for name, t in [
    ("labeling job end to end (label.label)", job),
    ("its labeling loop (without the teacher load and the manifest; input decoded during the load)", loop[0]),
    ("input alone", t_input),
    *models,
    ("records alone", t_write),
  ]:
    print(f"| {name} | {t:.2f} | {n / t:.1f} |")
  # How much of the model's own speed the whole job keeps: the machine-independent part of the result.
  print(f"job / model alone (the job's passes): {t_model[micro] / job:.2f}")
  if len(jobs) > 1 or peers:
    print(
      "\n| round | job img/s | its loop img/s |"
      + (
        " timm inference img/s: sustained, median batch (fastest batch) | job / timm sustained, median (fastest) |"
        if peers
        else ""
      )
      + "\n|---|---|---|"
      + ("---|---|" if peers else "")
    )
    for r, (t_job, t_loop) in enumerate(jobs):
      row = f"| {r} | {n / t_job:.1f} | {n / t_loop:.1f} |"
      if peers:
        median, fastest, sustained = peers[r]
        rate = n / t_job
        row += (
          f" {sustained:.1f}, {median:.1f} ({fastest:.1f}) | {rate / sustained:.2f}, {rate / median:.2f} "
          f"({rate / fastest:.2f}) |"
        )
      print(row)


if __name__ == "__main__":
  main()
