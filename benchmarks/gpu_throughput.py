"""EfficientNet on one GPU: this code's train step and inference beside PyTorch + timm's, in one process.

    python benchmarks/gpu_throughput.py --batch=256 --resolution=224 [--dtypes=float32,bfloat16] \
        [--timm_compile_dtypes=bfloat16]

For each compute dtype, builds `model_throughput.build`'s train step (train-mode forward with dropout and
stochastic depth, cross-entropy, backward, RMSProp, batch-norm update, donated state) and eval-mode forward
with `conv_impl='auto'` (XLA's native convolutions on a GPU), and timm's same model, noise and optimizer
(`timm_throughput.timm_steps`: channels-last, bf16 as `torch.autocast`, optionally `torch.compile`d),
on fixed random batches already on the GPU. The two frameworks' steps are timed alternately (median of
`--steps` after `--warmup`), so clock and thermal drift hit both alike; prints img/s, the ratio, XLA's
FLOP count per image, compile seconds and each framework's peak GPU memory over the run. Needs jax with
CUDA and torch + timm in one environment (no TensorFlow). JAX's memory preallocation is turned off so both
frameworks fit.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch allocates beside jax
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from benchmarks.model_throughput import PAPER_MADDS, build, compile_train, flops  # noqa: E402
from benchmarks.timing import time_alternating  # noqa: E402
from benchmarks.timm_throughput import add_run_arguments, timm_steps  # noqa: E402

DTYPES = {"float32": (jnp.float32, None), "bfloat16": (jnp.bfloat16, torch.bfloat16)}


def peak_gib(device):
  stats = device.memory_stats() or {}
  return stats.get("peak_bytes_in_use", float("nan")) / 2**30


def torch_peak_gib():
  return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def synced(fn, device):
  """fn, then wait for the GPU: torch launches asynchronously."""

  def call():
    fn()
    if device == "cuda":
      torch.cuda.synchronize()

  return call


def measure_jax(args, dtype):
  model, train, infer, state, variables, images, labels = build(
    args.model, "auto", args.batch, args.resolution, args.num_classes, dtype
  )
  row = {"impl": model.conv_impl}
  start = time.perf_counter()
  infer_compiled = infer.lower(variables, images).compile()
  row["infer_compile_s"] = time.perf_counter() - start
  row["infer_gflops"] = flops(infer_compiled) / args.batch / 1e9
  train_step, row["train_compile_s"], row["train_gflops"] = compile_train(train, state, images, labels)
  return row, (lambda: infer_compiled(variables, images)), train_step


def measure_torch(args, autocast_dtype, compile_model):
  model, infer, train_step = timm_steps(
    args.timm_model,
    args.batch,
    args.resolution,
    args.num_classes,
    args.drop_rate,
    args.drop_path_rate,
    torch.channels_last,
    device=args.torch_device,
    autocast_dtype=autocast_dtype,
    compile_model=compile_model,
  )

  def eval_mode_infer():
    model.eval()
    infer()

  def train_mode_step():
    model.train()
    train_step()

  # Compile (torch.compile traces on first call) outside the timed steps, as for jax.
  start = time.perf_counter()
  synced(eval_mode_infer, args.torch_device)()
  infer_s = time.perf_counter() - start
  start = time.perf_counter()
  synced(train_mode_step, args.torch_device)()
  return (
    {"infer_compile_s": infer_s, "train_compile_s": time.perf_counter() - start},
    synced(eval_mode_infer, args.torch_device),
    synced(train_mode_step, args.torch_device),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="efficientnet-b0")
  parser.add_argument("--timm_model", default="efficientnet_b0")
  add_run_arguments(parser, batch=256)
  parser.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated: {', '.join(DTYPES)}")
  parser.add_argument(
    "--timm_compile_dtypes", default="", help="comma-separated dtypes for which timm is also timed under torch.compile"
  )
  parser.add_argument("--steps", type=int, default=20, help="timed steps (median is reported)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--torch_device", default="cuda", help="'cpu' to try the script out without a GPU")
  args = parser.parse_args()
  for option, names in (("--dtypes", args.dtypes), ("--timm_compile_dtypes", args.timm_compile_dtypes)):
    unknown = set(filter(None, names.split(","))) - set(DTYPES)
    if unknown:
      parser.error(f"{option}: unknown dtype(s) {sorted(unknown)}; expected a comma-separated list of {list(DTYPES)}")

  device = jax.devices()[0]
  print(
    f"{args.model} batch {args.batch} at {args.resolution}px on {device.device_kind} "
    f"({device.platform}); jax {jax.__version__} (default matmul precision "
    f"{jax.config.jax_default_matmul_precision}), torch {torch.__version__} "
    f"(cudnn tf32 {torch.backends.cudnn.allow_tf32}, matmul tf32 {torch.backends.cuda.matmul.allow_tf32})",
    flush=True,
  )
  rows = []
  for dtype_name in args.dtypes.split(","):
    jax_dtype, autocast_dtype = DTYPES[dtype_name]
    jax_row, jax_infer, jax_train = measure_jax(args, jax_dtype)
    peers = {"timm": measure_torch(args, autocast_dtype, False)}
    if dtype_name in args.timm_compile_dtypes.split(","):
      peers["timm, torch.compile"] = measure_torch(args, autocast_dtype, True)
    infer_fns = [jax_infer] + [p[1] for p in peers.values()]
    train_fns = [jax_train] + [p[2] for p in peers.values()]
    infer_s = time_alternating(infer_fns, args.steps, args.warmup)
    train_s = time_alternating(train_fns, args.steps, args.warmup)
    names = [f"this code ({jax_row['impl']})"] + list(peers)
    extra = [jax_row] + [p[0] for p in peers.values()]
    for name, row, inf, trn in zip(names, extra, infer_s, train_s):
      rows.append(dict(row, name=name, dtype=dtype_name, infer=args.batch / inf, train=args.batch / trn))
    print(
      f"{dtype_name}: "
      + "; ".join(f"{r['name']} train {r['train']:.0f} / infer {r['infer']:.0f} img/s" for r in rows[-len(names) :]),
      flush=True,
    )

  print(
    f"\n{'dtype':>9} {'implementation':>22} {'train img/s':>12} {'infer img/s':>12} "
    f"{'compile s (train/infer)':>24} {'GFLOP/img (train/infer)':>24}"
  )
  for r in rows:
    gflops = f"{r['train_gflops']:.2f} / {r['infer_gflops']:.2f}" if "train_gflops" in r else ""
    print(
      f"{r['dtype']:>9} {r['name']:>22} {r['train']:12.0f} {r['infer']:12.0f} "
      f"{r['train_compile_s']:11.0f} / {r['infer_compile_s']:<10.0f} {gflops:>24}"
    )
  for dtype_name in args.dtypes.split(","):
    ours, *peers = [r for r in rows if r["dtype"] == dtype_name]
    for peer in peers:
      print(
        f"{dtype_name}: this code / {peer['name']}: train {ours['train'] / peer['train']:.2f}x, "
        f"infer {ours['infer'] / peer['infer']:.2f}x"
      )
  # Peaks over the whole run (every dtype): jax's cannot be reset between rows.
  print(f"peak GPU memory: jax {peak_gib(device):.1f} GiB, torch {torch_peak_gib():.1f} GiB")
  paper = PAPER_MADDS.get(args.model)
  if paper:
    print(f"paper: {paper / 1e9:.2f} G multiply-adds per image = {2 * paper / 1e9:.2f} GFLOP (forward)")


if __name__ == "__main__":
  main()
