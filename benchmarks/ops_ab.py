"""A/B of two versions of the CPU kernels (`noisy_student/models/ops.py`), alternated in one process.

    python benchmarks/ops_ab.py OLD_OPS.py [NEW_OPS.py] [--mode=train|infer|label] [--steps=8]

The machine's speed moves by up to 1.3x from one minute to the next, so two versions of the kernels are
only comparable timed step by step in the same process. Each file is a copy of ops.py (e.g.
`git show HEAD~1:noisy_student/models/ops.py > old_ops.py`); with one file it is compared against
the checked-out ops.py. For each file the model is built with that file's kernels swapped in, and the
compiled steps then run alternately (`timing.time_alternating`), twice. `--mode=train`: b0's train step as
in model_throughput.py; `infer`: one eval-mode pass; `label`: the labeling job's step
(`label.make_infer_step`) on one XLA:CPU device per core, as the CLI labels (XLA_FLAGS with a host device
count overrides).
"""

import argparse
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from noisy_student.cpu import allocator  # noqa: E402
from noisy_student.cpu import devices as host_devices  # noqa: E402

# The functions models/efficientnet.py calls through `ops.`; a file must define them all.
SWAPPED = ("conv2d", "depthwise_conv2d", "batch_norm_train", "batch_norm_inference", "swish", "global_avg_pool")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("ops_files", nargs="+", help="copies of ops.py to compare (one: against ops.py)")
  parser.add_argument("--mode", choices=("train", "infer", "label"), default="train")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--model", default="efficientnet-b0")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--no_reexec", action="store_true")
  return parser.parse_args(argv)


def load_ops(path):
  """The module in `path`, checked to define every function the model calls through `ops.`."""
  if not os.path.isfile(path):
    raise SystemExit(f"ops_ab: no such file {path!r} (expected a copy of noisy_student/models/ops.py)")
  spec = importlib.util.spec_from_file_location(f"ops_ab_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  missing = [name for name in SWAPPED if not hasattr(module, name)]
  if missing:
    raise SystemExit(f"ops_ab: {path} lacks {', '.join(missing)}: expected a copy of noisy_student/models/ops.py")
  return module


def main(argv):
  args = parse_args(argv)
  import jax  # noqa: E402  (after the allocator and device count are set)

  from benchmarks import model_throughput
  from benchmarks.timing import time_alternating
  from noisy_student.models import ops

  files = list(args.ops_files)
  if len(files) == 1:
    files.insert(0, ops.__file__)
  checked_out = {name: getattr(ops, name) for name in SWAPPED}
  steps = []
  for path in files:
    module = load_ops(path)
    for name in SWAPPED:
      setattr(ops, name, getattr(module, name))
    try:
      model, train, infer, state, variables, images, labels = model_throughput.build(
        args.model, "shifted", args.batch, args.resolution, 1000
      )
      start = time.perf_counter()
      if args.mode == "train":
        step, _, _ = model_throughput.compile_train(train, state, images, labels)
      else:
        if args.mode == "label":
          from noisy_student import label, sharding

          infer = label.make_infer_step(model, sharding.create_mesh())
        compiled = infer.lower(variables, images).compile()
        step = lambda compiled=compiled: compiled(variables, images)  # noqa: E731
      print(f"{path}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
    finally:
      for name in SWAPPED:
        setattr(ops, name, checked_out[name])
    steps.append(step)
  print(
    f"{args.model} {args.mode}, batch {args.batch} at {args.resolution}px, {jax.device_count()} device(s); "
    f"allocator: {allocator.describe()}"
  )
  for repeat in range(2):
    seconds = time_alternating(steps, args.steps, warmup=2)
    print(f"run {repeat + 1}: " + "  ".join(f"{args.batch / s:.1f}" for s in seconds) + " img/s, in file order")


if __name__ == "__main__":
  if "--no_reexec" not in sys.argv:
    allocator.reexec_with_fast_allocator()  # before jax allocates anything
  if parse_args(sys.argv[1:]).mode == "label":
    host_devices.split_per_core()  # as `python -m noisy_student` labels on a CPU
  main(sys.argv[1:])
