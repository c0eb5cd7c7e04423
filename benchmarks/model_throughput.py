"""EfficientNet train-step and inference throughput (img/s), per depthwise implementation.

    python benchmarks/model_throughput.py --model=efficientnet-b0 --batch=32 --resolution=224

Times one jitted train step (forward, backward, RMSProp update, batch-norm
update, donated state) and one jitted eval-mode forward pass on a fixed batch
already on the device, after compilation, for each `--impls` entry; beside the
forward pass, the labeling job's step, which runs the batch in micro-batches
(`label.make_infer_step`, alternated with the one-pass forward); prints
XLA's FLOP count per image beside the paper's multiply-add count, and which
allocator ran. Compare rows within one run: absolute numbers depend on the host.

Also times a large float32 matmul on all devices, the most this machine's
FLOPs can do for XLA, and prints each row's rate in the paper's FLOPs (a
train step counted as 3 forward passes) as a share of it: near 1, a faster
kernel cannot help, only fewer or cheaper (lower-precision) FLOPs.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from noisy_student.cpu import allocator  # noqa: E402

if __name__ == "__main__" and "--no_reexec" not in sys.argv:
  allocator.reexec_with_fast_allocator()  # before jax allocates anything
ALLOCATOR = allocator.describe()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks.timing import time_alternating  # noqa: E402
from noisy_student import sharding  # noqa: E402
from noisy_student.models import create_model  # noqa: E402

# Multiply-adds per image at the native resolution (EfficientNet paper, Table 2).
PAPER_MADDS = {
  "efficientnet-b0": 0.39e9,
  "efficientnet-b1": 0.70e9,
  "efficientnet-b2": 1.0e9,
  "efficientnet-b3": 1.8e9,
  "efficientnet-b4": 4.2e9,
  "efficientnet-b5": 9.9e9,
  "efficientnet-b6": 19e9,
  "efficientnet-b7": 37e9,
}
NATIVE_RESOLUTION = {
  "efficientnet-b0": 224,
  "efficientnet-b1": 240,
  "efficientnet-b2": 260,
  "efficientnet-b3": 300,
  "efficientnet-b4": 380,
  "efficientnet-b5": 456,
  "efficientnet-b6": 528,
  "efficientnet-b7": 600,
}


def build(model_name, impl, batch, resolution, num_classes, dtype=jnp.float32):
  """(model, jitted train step, jitted forward, train state, variables, images, labels); also used by
  gpu_throughput.py, which has no TensorFlow, so nothing here may import it.

  The batch is sharded over all devices (state replicated), as the trainer shards it: run with
  XLA_FLAGS=--xla_force_host_platform_device_count=N to time the CLI's one-device-per-core CPU split."""
  model = create_model(model_name, num_classes=num_classes, conv_impl=impl, dtype=dtype)
  mesh = sharding.create_mesh()
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  images = jax.device_put(jax.random.normal(jax.random.key(0), (batch, resolution, resolution, 3)), batch_sharding)
  labels = jax.device_put(jax.random.randint(jax.random.key(1), (batch,), 0, num_classes), batch_sharding)
  variables = jax.jit(lambda: model.init(jax.random.key(2), images[:1], train=False), out_shardings=replicated)()
  tx = optax.rmsprop(0.01, decay=0.9, eps=1e-3, momentum=0.9)
  state = (
    variables["params"],
    variables["batch_stats"],
    jax.jit(tx.init, out_shardings=replicated)(variables["params"]),
  )

  def train_step(state, images, labels, step):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      logits, new_vars = model.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.fold_in(jax.random.key(3), step)},
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, new_vars["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  def infer(variables, images):
    return model.apply(variables, images, train=False)

  train = jax.jit(train_step, donate_argnums=0)
  infer = jax.jit(infer)
  return model, train, infer, state, variables, images, labels


def flops(compiled):
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def matmul_ceiling_gflops(size=2048, steps=5):
  """GFLOP/s of a float32 [size, size] @ [size, size] matmul per device, all devices at once."""
  mesh = sharding.create_mesh()
  stacked = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
  count = jax.device_count()
  a = jax.device_put(jax.random.normal(jax.random.key(0), (count, size, size)), stacked)
  b = jax.device_put(jax.random.normal(jax.random.key(1), (count, size, size)), stacked)
  product = jax.jit(lambda a, b: jnp.einsum("dij,djk->dik", a, b)).lower(a, b).compile()
  seconds = time_alternating([lambda: product(a, b)], steps, warmup=1)[0]
  return 2 * count * size**3 / seconds / 1e9


def compile_train(train, state, images, labels):
  """(a call that runs the next step on its own carried state, compile seconds, XLA GFLOP per image)."""
  start = time.perf_counter()
  compiled = train.lower(state, images, labels, 0).compile()
  seconds = time.perf_counter() - start
  holder = {"state": state, "step": 0}

  def one_step():
    holder["state"], loss = compiled(holder["state"], images, labels, holder["step"])
    holder["step"] += 1
    return loss

  return one_step, seconds, flops(compiled) / images.shape[0] / 1e9


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="efficientnet-b0")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--impls", default="xla,shifted", help="comma-separated conv_impl values")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (median is reported)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument(
    "--micro_batch",
    type=int,
    default=0,
    help="images per pass for the micro-batched inference column (0: the labeling default)",
  )
  parser.add_argument("--skip", default="", help="'train' or 'infer' to skip one")
  parser.add_argument(
    "--no_reexec", action="store_true", help="run under the allocator and XLA_FLAGS of the calling environment"
  )
  args = parser.parse_args()
  from noisy_student import inference, label  # imports TensorFlow; only this script's micro-batched column needs it

  print(
    f"{args.model} batch {args.batch} at {args.resolution}px on {jax.devices()[0].platform} "
    f"({jax.device_count()} device(s)); allocator: {ALLOCATOR}; "
    f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  paper = PAPER_MADDS.get(args.model)
  mesh = sharding.create_mesh()
  rows = []
  for impl in args.impls.split(","):
    model, train, infer, state, variables, images, labels = build(
      args.model, impl, args.batch, args.resolution, args.num_classes
    )
    row = {"impl": impl}
    # Inference first: the train step donates (deletes) the initial state.
    if args.skip != "infer":
      start = time.perf_counter()
      compiled = infer.lower(variables, images).compile()
      row["infer_compile_s"] = time.perf_counter() - start
      row["infer_gflops_per_img"] = flops(compiled) / args.batch / 1e9
      # Beside one pass over the batch: the labeling job's step, which runs it in micro-batches.
      passes = label.make_infer_step(model, mesh, args.micro_batch)
      whole, micro = time_alternating(
        [lambda: compiled(variables, images), lambda: passes(variables, images)], args.steps, args.warmup
      )
      row["infer_img_s"], row["micro_img_s"] = args.batch / whole, args.batch / micro
    if args.skip != "train":
      one_step, row["train_compile_s"], row["train_gflops_per_img"] = compile_train(train, state, images, labels)
      row["train_img_s"] = args.batch / time_alternating([one_step], args.steps, args.warmup)[0]
    rows.append(row)

  micro_header = (
    f"infer, passes of {inference.micro_batch_size(args.batch, args.micro_batch, image_pixels=args.resolution**2)}"
  )
  header = (
    f"{'impl':>8} {'train img/s':>12} {'infer img/s':>12} {micro_header:>20} {'train GFLOP/img':>16} "
    f"{'infer GFLOP/img':>16}"
  )
  print(header)
  for r in rows:
    print(
      f"{r['impl']:>8} {r.get('train_img_s', float('nan')):12.1f} "
      f"{r.get('infer_img_s', float('nan')):12.1f} {r.get('micro_img_s', float('nan')):20.1f} "
      f"{r.get('train_gflops_per_img', float('nan')):16.2f} "
      f"{r.get('infer_gflops_per_img', float('nan')):16.2f}"
    )
  print(
    "compile seconds: "
    + ", ".join(
      f"{r['impl']} train {r.get('train_compile_s', float('nan')):.0f} / "
      f"infer {r.get('infer_compile_s', float('nan')):.0f}"
      for r in rows
    )
  )
  if paper:
    print(
      f"paper: {paper / 1e9:.2f} G multiply-adds per image = {2 * paper / 1e9:.2f} GFLOP "
      f"(forward, at the native resolution)"
    )
    if args.resolution == NATIVE_RESOLUTION[args.model]:
      ceiling = matmul_ceiling_gflops()
      print(
        f"ceiling: a float32 2048^3 matmul runs at {ceiling:.0f} GFLOP/s here, i.e. at most "
        f"{ceiling / (6 * paper / 1e9):.0f} train / {ceiling / (2 * paper / 1e9):.0f} infer img/s "
        f"at the paper's FLOPs (train = 3 forward passes); achieved share of it:"
      )
      for r in rows:
        shares = [
          f"{name} {r[key] * factor * paper / 1e9 / ceiling:.2f}"
          for name, key, factor in (
            ("train", "train_img_s", 6),
            ("infer", "infer_img_s", 2),
            ("passes", "micro_img_s", 2),
          )
          if key in r
        ]
        print(f"{r['impl']:>8} " + ", ".join(shares))


if __name__ == "__main__":
  main()
