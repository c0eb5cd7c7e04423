"""Full train-step throughput (input pipeline included) for a config, and XLA's FLOPs per step.

    python benchmarks/train_step.py --config=configs/digits.py
    python benchmarks/train_step.py --config=configs/imagenet.py:model=b0 --batch=32

Builds exactly what `python -m noisy_student` trains (model, optimizer, sharded jitted step, train
iterator) and times `steps` calls of `next(batches)` + the step after compilation. ImageNet-style configs
run on `tfds.testing.mock_data` (random images of the real feature spec), so nothing is downloaded. FLOPs per
step come from XLA's cost analysis of the compiled step: divide by the step time and the chip's peak to read
MFU on a TPU.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from noisy_student.cpu import allocator  # noqa: E402
from noisy_student.cpu import devices as host_devices  # noqa: E402

if __name__ == "__main__" and "--no_reexec" not in sys.argv:
  allocator.reexec_with_fast_allocator()  # before jax allocates anything
  host_devices.split_per_core()  # as `python -m noisy_student` does on a CPU

import contextlib  # noqa: E402
import importlib.util  # noqa: E402

import jax  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from noisy_student import data as data_lib  # noqa: E402
from noisy_student import sharding, train, trainer  # noqa: E402


def load_config(spec: str):
  """A config file spec ('configs/imagenet.py:model=b0') -> its ConfigDict, as the CLI loads it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def flops_per_step(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def measure(config, steps: int, warmup: int):
  mesh = sharding.create_mesh(fsdp=config.mesh.fsdp)
  labeled = data_lib.open_source(
    config.data.labeled, data_dir=config.data.data_dir or None, num_classes=config.model.num_classes
  )
  model = trainer.build_model(config, mesh)
  schedule, tx = trainer.build_optimizer(config, steps_per_epoch=100, total_steps=10_000)
  state = train.create_train_state(model, tx, jax.random.key(0), config.model.image_size, mesh=mesh)
  step_fn = trainer.build_train_step(config, model, tx, mesh, schedule)
  batches = data_lib.train_iterator(
    labeled,
    labeled_batch=config.data.labeled_batch,
    image_size=config.model.image_size,
    seed=0,
    mesh=mesh,
    num_classes=config.model.num_classes,
    crop=config.data.crop,
    flip=config.data.flip,
    noise=data_lib.Noise(config.data.randaugment_layers, config.data.randaugment_magnitude),
  )
  batch = next(batches)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, metrics = compiled(state, next(batches))
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, next(batches))
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  return dict(
    batch=config.data.labeled_batch,
    step_s=seconds,
    img_s=config.data.labeled_batch / seconds,
    gflop_per_step=flops_per_step(compiled) / 1e9,
    compile_s=compile_s,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", action="append", help="config spec(s); default: digits and imagenet b0 (mock data)")
  parser.add_argument(
    "--batch",
    type=int,
    default=0,
    help="override data.labeled_batch (default: the config's for digits, 32 otherwise; the paper's 2048 needs a pod)",
  )
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--mock_examples", type=int, default=256)
  parser.add_argument("--no_reexec", action="store_true")
  args = parser.parse_args()
  specs = args.config or ["configs/digits.py", "configs/imagenet.py:model=b0"]
  print(f"{jax.device_count()} {jax.devices()[0].platform} device(s); allocator: {allocator.describe()}")
  print(f"{'config':36} {'batch':>6} {'img/s':>8} {'s/step':>8} {'GFLOP/step':>11} {'compile s':>10}")
  for spec in specs:
    config = load_config(spec)
    config.data.ratio = 0  # labeled batches only: pseudo-labels need a labeling run first
    mock = contextlib.nullcontext()
    if not spec.startswith("configs/digits"):
      mock = tfds.testing.mock_data(num_examples=args.mock_examples)
      config.data.labeled_batch = args.batch or 32
    elif args.batch:
      config.data.labeled_batch = args.batch
    with mock:
      r = measure(config, args.steps, args.warmup)
    print(
      f"{spec:36} {r['batch']:6d} {r['img_s']:8.1f} {r['step_s']:8.3f} {r['gflop_per_step']:11.1f} "
      f"{r['compile_s']:10.0f}"
    )


if __name__ == "__main__":
  main()
