"""PyTorch + timm EfficientNet train-step and inference throughput (img/s), the peer baseline.

    ~/timmvenv/bin/python benchmarks/timm_throughput.py --batch=32 --resolution=224 [--bf16]

Runs in its own virtual environment, not this project's requirements: `python3 -m venv ~/timmvenv`,
`pip install torch==2.13.0`, then `pip install --no-deps timm huggingface_hub pyyaml safetensors pillow`
(timm's torchvision requirement would pull a torch 2.14 build, and torchvision 0.28 fails to import against
torch 2.13 here; the measured runs used a minimal local `torchvision` stub providing
`ops.misc.FrozenBatchNorm2d` and `transforms.InterpolationMode`, all that timm's EfficientNet needs).
Mirrors `benchmarks/model_throughput.py`: timm's model with random init and the JAX model's noise
(dropout 0.2 before the classifier, stochastic depth 0.2 at the last block), a fixed random batch,
one train step (train-mode forward, cross-entropy, backward, RMSprop lr 0.01 / alpha 0.9 /
eps 1e-3 / momentum 0.9) and one eval-mode forward under torch.inference_mode(); the median of
`--steps` timed steps after `--warmup`, with the fastest step beside it (and, in the JSON result line, inference's
sustained rate over all timed steps), for each memory format in
`--formats`. `--bf16` runs both under CPU autocast to bfloat16. The allocator is whatever the
calling environment set (LD_PRELOAD, GLIBC_TUNABLES); this script does not re-execute itself.
Last, the rate of a float32 2048^3 matmul under torch, the ceiling to compare the model's FLOP rate with
(`model_throughput.py` prints XLA's and the JAX model's share of it).
"""

import argparse
import contextlib
import json
import os
import statistics
import time

import timm
import torch
import torch.nn.functional as F


def describe_allocator():
  preload = os.environ.get("LD_PRELOAD", "")
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  name = "tcmalloc" if "tcmalloc" in preload else "glibc, tuned" if "mmap_threshold" in tunables else "glibc, default"
  return f"{name} (LD_PRELOAD={preload!r}, GLIBC_TUNABLES={tunables!r})"


RESULT_PREFIX = "result: "


def step_seconds(fn, steps, warmup):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), min(times), sum(times)


def timm_steps(
  model_name,
  batch,
  resolution,
  num_classes,
  drop_rate,
  drop_path_rate,
  memory_format,
  device="cpu",
  autocast_dtype=None,
  compile_model=False,
):
  """(model, infer, train_step) on a fixed random batch; also used by gpu_throughput.py on a GPU."""
  torch.manual_seed(0)
  model = timm.create_model(
    model_name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate
  )
  images = torch.randn(batch, 3, resolution, resolution)
  labels = torch.randint(0, num_classes, (batch,))
  model = model.to(device=device, memory_format=memory_format)
  images = images.to(device).contiguous(memory_format=memory_format)
  labels = labels.to(device)
  optimizer = torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9)
  if compile_model:
    model = torch.compile(model)

  def autocast():
    if autocast_dtype is not None:
      return torch.autocast(torch.device(device).type, dtype=autocast_dtype)
    return contextlib.nullcontext()

  def infer():
    with torch.inference_mode(), autocast():
      return model(images)

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss

  return model, infer, train_step


def matmul_ceiling_gflops(size=2048, steps=5):
  """GFLOP/s of a float32 [size, size] @ [size, size] matmul, median of `steps` after one warm-up."""
  a, b = torch.randn(size, size), torch.randn(size, size)
  return 2 * size**3 / step_seconds(lambda: a @ b, steps, warmup=1)[0] / 1e9


def add_run_arguments(parser, batch):
  """The batch, shape and noise arguments every timm comparison takes (timm_steps' inputs)."""
  parser.add_argument("--batch", type=int, default=batch)
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--drop_rate", type=float, default=0.2, help="dropout before the classifier")
  parser.add_argument("--drop_path_rate", type=float, default=0.2, help="stochastic depth at the last block")


def measure(args, memory_format):
  model, infer, train_step = timm_steps(
    args.model,
    args.batch,
    args.resolution,
    args.num_classes,
    args.drop_rate,
    args.drop_path_rate,
    memory_format,
    autocast_dtype=torch.bfloat16 if args.bf16 else None,
  )

  row = {}
  # Inference first, as in model_throughput.py.
  if args.skip != "infer":
    model.eval()
    median, fastest, total = step_seconds(infer, args.steps, args.warmup)
    row["infer_img_s"], row["infer_max_img_s"] = args.batch / median, args.batch / fastest
    row["infer_sustained_img_s"] = args.batch * args.steps / total  # all timed batches, as a job runs
  if args.skip != "train":
    model.train()
    median, fastest, _ = step_seconds(train_step, args.steps, args.warmup)
    row["train_img_s"], row["train_max_img_s"] = args.batch / median, args.batch / fastest
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="efficientnet_b0")
  add_run_arguments(parser, batch=32)
  parser.add_argument(
    "--formats", default="channels_last,contiguous", help="comma-separated memory formats: channels_last, contiguous"
  )
  parser.add_argument("--bf16", action="store_true", help="torch.autocast('cpu', dtype=bfloat16)")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--steps", type=int, default=8, help="timed steps (median is reported)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--skip", default="", help="'train' or 'infer' to skip one")
  args = parser.parse_args()

  torch.set_num_threads(args.threads)
  formats = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
  precision = "bf16 autocast" if args.bf16 else "fp32"
  print(
    f"{args.model} batch {args.batch} at {args.resolution}px, {precision}, "
    f"torch {torch.__version__} ({torch.get_num_threads()} threads, "
    f"{torch.backends.cpu.get_cpu_capability()}), timm {timm.__version__}; "
    f"allocator: {describe_allocator()}"
  )
  rows = {name: measure(args, formats[name]) for name in args.formats.split(",")}

  # Median step, and the fastest step in brackets: a wide gap means the host was busy.
  print(f"{'format':>14} {'train img/s (fastest)':>24} {'infer img/s (fastest)':>24}")
  nan = float("nan")
  for name, r in rows.items():
    print(
      f"{name:>14} {r.get('train_img_s', nan):14.1f} ({r.get('train_max_img_s', nan):6.1f}) "
      f"{r.get('infer_img_s', nan):14.1f} ({r.get('infer_max_img_s', nan):6.1f})"
    )
  for key, label in (("train_img_s", "train"), ("infer_img_s", "infer")):
    measured = {name: r[key] for name, r in rows.items() if key in r}
    if measured:
      best = max(measured, key=measured.get)
      print(f"best {label}: {measured[best]:.1f} img/s ({best})")
  # What other scripts read (label_throughput.py's peer run): every row's rates, as JSON, on one line.
  print(RESULT_PREFIX + json.dumps(rows))
  print(f"ceiling: a float32 2048^3 matmul runs at {matmul_ceiling_gflops():.0f} GFLOP/s under torch here")


if __name__ == "__main__":
  main()
