"""mode='compile': the run's steps compiled ahead of time for a TPU topology this host does not have.

XLA's TPU compiler ships in the libtpu wheel; `jax.experimental.topologies` gives compile-only devices of any
slice shape, so a workstation can answer, in minutes and before a pod is allocated, whether a stage fits in
HBM with this code and settings, and how fast it could run. This job builds exactly the steps the run would
build (same model, dtype, mesh, shardings, global batch, donated state), compiles each for the topology and
reports, per device: argument / output / temporary bytes and the peak against the chip's HBM, FLOPs and bytes
accessed per step, and a roofline lower bound on the step time from the chip's peak FLOP/s and HBM bandwidth
(so an upper bound on img/s). The report goes to WORKDIR/compile.json and a printed table; a stage that does
not fit is an error that says by how much and which settings would help.
"""

import contextlib
import dataclasses
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import topologies
from jax.experimental.compilation_cache import compilation_cache

from noisy_student import data as data_lib
from noisy_student import evaluate, label, outputs, sharding, trainer
from noisy_student import train as train_lib

REPORT_FILE = "compile.json"
STAGES = ("train", "label", "eval")
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One JAX device of a TPU generation: a TensorCore on v2 / v3, a chip elsewhere (v4 and v5p as megacore).
  Peak FLOP/s are bf16 matrix-unit rates; float32 matmuls run at a fraction of them."""

  name: str
  hbm_bytes: int
  peak_flops: float
  hbm_bytes_per_s: float
  devices_per_chip: int = 1


# Public datasheet figures (cloud.google.com/tpu/docs/system-architecture), per JAX device.
CHIPS = {
  "v2": Chip("v2", 8 * GIB, 45e12 / 2, 700e9 / 2, devices_per_chip=2),
  "v3": Chip("v3", 16 * GIB, 123e12 / 2, 900e9 / 2, devices_per_chip=2),
  "v4": Chip("v4", 32 * GIB, 275e12, 1228e9),
  "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9),
  "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9),
  "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9),
}


class DoesNotFitError(ValueError):
  """A compiled step needs more memory per device than the chip has."""


# Cloud accelerator-type prefixes -> topology generations; v2-v5p types count TensorCores (two per chip).
_CLOUD_GENERATIONS = {"v2": "v2", "v3": "v3", "v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}
_CORES_PER_CHIP = {"v2": 2, "v3": 2, "v4": 2, "v5p": 2}
_THREE_D = ("v4", "v5p")


def resolve_topology(name: str, chip_config_name: str = "") -> Tuple[str, str]:
  """A topology ('v3:4x4') or a Cloud accelerator type ('v3-32', 'v4-32', 'v5litepod-16', 'v5p-128', 'v6e-256')
  -> (topology name, chip_config_name) for the compiler. A slice's chips are laid out as Cloud TPU lays them
  out: starting from one host's 2x2(x1), each doubling doubles the last of the smallest dimensions (v3-2048:
  32x32; v4-128: 4x4x4). v4 is compiled as megacore (one device per chip), as TPU VMs run it."""
  if ":" in name:
    generation = name.split(":", 1)[0].lower()
    return name, chip_config_name or ("megacore" if generation == "v4" else "")
  prefix, _, count = name.lower().rpartition("-")
  generation = _CLOUD_GENERATIONS.get(prefix)
  if generation is None or not count.isdigit():
    raise ValueError(
      f"config.compile.topology={name!r}: expected a topology (v3:4x4, v5p:4x4x4) or a Cloud accelerator type "
      f"({', '.join(f'{p}-N' for p in _CLOUD_GENERATIONS)})."
    )
  chips = int(count) // _CORES_PER_CHIP.get(generation, 1)
  dims = [2, 2, 1] if generation in _THREE_D else [2, 2]
  while int(np.prod(dims)) < chips:
    smallest = min(dims)
    dims[len(dims) - 1 - dims[::-1].index(smallest)] *= 2
  if int(np.prod(dims)) != chips:
    raise ValueError(f"config.compile.topology={name!r}: {chips} chips is not a slice shape this maps (4, 8, 16, ...).")
  return f"{generation}:{'x'.join(map(str, dims))}", chip_config_name or ("megacore" if generation == "v4" else "")


def chip_of(topology: str) -> Chip:
  """'v3:4x4' -> the v3 entry of CHIPS; errors name the known generations."""
  generation = topology.split(":", 1)[0].lower()
  if generation not in CHIPS:
    raise ValueError(
      f"config.compile.topology={topology!r}: unknown TPU generation {generation!r}; known: {sorted(CHIPS)}."
    )
  return CHIPS[generation]


def topology_devices(topology: str, chip_config_name: str = "") -> List[jax.Device]:
  """Compile-only devices of a TPU slice ('v3:32x32', 'v5e:2x2', 'v5p:4x4x4'; v4 needs chip_config_name
  'megacore'). Needs libtpu (`pip install -e '.[tpu]'`); no TPU is touched."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask off a TPU VM
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # else one process at a time may load libtpu
  kwargs = {"chip_config_name": chip_config_name} if chip_config_name else {}
  try:
    description = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  # libtpu missing or an unknown shape
    raise ValueError(
      f"config.compile.topology={topology!r}: no TPU compiler devices for it ({type(e).__name__}: {e}). "
      "Install libtpu (pip install -e '.[tpu]') and use a name like v3:4x4, v5e:2x2 or v5p:4x4x4."
    ) from None
  return list(description.devices)


@contextlib.contextmanager
def without_persistent_cache():
  """Compile-only executables cannot be loaded back: keep them out of the persistent compilation cache."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # jax decides once per process whether to use the cache: decide again
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def analyze(compiled, *, stage: str, chip: Chip, images_per_step: int, num_devices: int, compile_s: float) -> Dict:
  """One compiled step's report: memory per device, FLOPs and bytes per step, the roofline bound."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  arguments, outputs_, temp = memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.temp_size_in_bytes
  aliased = memory.alias_size_in_bytes  # donated inputs reused as outputs count once
  peak = arguments + outputs_ - aliased + temp
  flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  step_s = max(flops / chip.peak_flops, accessed / chip.hbm_bytes_per_s)
  per_device = images_per_step / num_devices
  return {
    "stage": stage,
    "images_per_step": images_per_step,
    "images_per_device": per_device,
    "argument_bytes": int(arguments),
    "output_bytes": int(outputs_),
    "alias_bytes": int(aliased),
    "temp_bytes": int(temp),
    "peak_bytes": int(peak),
    "hbm_bytes": chip.hbm_bytes,
    "fits": bool(peak <= chip.hbm_bytes),
    "flops_per_device": flops,
    "bytes_accessed_per_device": accessed,
    "gflop_per_image": flops / per_device / 1e9 if per_device else 0.0,
    "step_seconds_lower_bound": step_s,
    "images_per_second_per_chip_upper_bound": per_device * chip.devices_per_chip / step_s if step_s else 0.0,
    "compile_seconds": compile_s,
  }


def _compile(step, *args):
  start = time.monotonic()
  compiled = step.lower(*args).compile()
  return compiled, time.monotonic() - start


def _train_stage(config, model, mesh, chip, num_devices):
  # A student's step sees labeled + ratio x pseudo-labeled images; the pseudo-labels need not exist yet.
  global_batch = config.data.labeled_batch * (1 + config.data.ratio)
  _, tx = trainer.build_optimizer(config, 1000, 10000)  # the schedule's numbers do not change the program
  state = train_lib.abstract_train_state(
    model, tx, config.model.image_size, mesh, param_sharding=config.mesh.param_sharding
  )
  step = trainer.build_train_step(config, model, tx, mesh, state=state)
  batch = data_lib.train_batch_spec(global_batch, config.model.image_size, config.model.num_classes, mesh)
  compiled, seconds = _compile(step, state, batch)
  return compiled, analyze(
    compiled, stage="train", chip=chip, images_per_step=global_batch, num_devices=num_devices, compile_s=seconds
  )


def _eval_variables(model, image_size, mesh, param_sharding):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, image_size, image_size, 3)), train=False))
  shardings = sharding.state_shardings(shapes, mesh, param_sharding)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _images(global_batch, image_size, mesh):
  return jax.ShapeDtypeStruct(
    (global_batch, image_size, image_size, 3), np.uint8, sharding=sharding.batch_sharding(mesh)
  )


def _label_stage(config, model, mesh, chip, num_devices):
  """The labeling job's step: replicated teacher variables (as label.load_teacher places them)."""
  global_batch = config.label.batch or config.data.eval_batch
  size = config.model.image_size
  step = label.make_infer_step(model, mesh, config.label.micro_batch, config.data.normalization)
  variables = _eval_variables(model, size, mesh, "replicate")
  compiled, seconds = _compile(step, variables, _images(global_batch, size, mesh))
  return compiled, analyze(
    compiled, stage="label", chip=chip, images_per_step=global_batch, num_devices=num_devices, compile_s=seconds
  )


def _eval_stage(config, model, mesh, chip, num_devices):
  """Evaluation of the EMA weights, sharded as the train state keeps them."""
  global_batch = config.data.eval_batch
  size = config.model.image_size
  step = evaluate.make_eval_step(model, mesh, normalization=config.data.normalization)
  variables = _eval_variables(model, size, mesh, config.mesh.param_sharding)
  rows = sharding.batch_sharding(mesh)
  batch = {
    "image": _images(global_batch, size, mesh),
    "label": jax.ShapeDtypeStruct((global_batch,), np.int32, sharding=rows),
    "mask": jax.ShapeDtypeStruct((global_batch,), np.bool_, sharding=rows),
  }
  compiled, seconds = _compile(step, variables, batch)
  return compiled, analyze(
    compiled, stage="eval", chip=chip, images_per_step=global_batch, num_devices=num_devices, compile_s=seconds
  )


_BUILDERS = {"train": _train_stage, "label": _label_stage, "eval": _eval_stage}


def parse_stages(value: str) -> List[str]:
  stages = [s.strip() for s in value.split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise ValueError(f"config.compile.stages={value!r}: expected a comma list of {', '.join(STAGES)}.")
  return stages


def shortfall_advice(report: Dict, config: ml_collections.ConfigDict, num_devices: int) -> str:
  """What would make a step that does not fit fit, from the settings it was compiled with."""
  over = (report["peak_bytes"] - report["hbm_bytes"]) / GIB
  hints = []
  if config.mesh.param_sharding != "fsdp" or config.mesh.fsdp < num_devices:
    hints.append(
      f"shard parameters over more devices (config.mesh.fsdp={config.mesh.fsdp}, param_sharding="
      f"{config.mesh.param_sharding!r})"
    )
  if not config.model.remat and report["stage"] == "train":
    hints.append("recompute activations (config.model.remat=True)")
  if config.model.dtype != "bfloat16":
    hints.append("bfloat16 activations (config.model.dtype='bfloat16')")
  if report["images_per_device"] > 1:
    hints.append(f"fewer images per device ({report['images_per_device']:g} now)")
  return (
    f"the {report['stage']} step needs {report['peak_bytes'] / GIB:.2f} GiB per device "
    f"({report['temp_bytes'] / GIB:.2f} GiB of temporaries, {report['argument_bytes'] / GIB:.2f} GiB of "
    f"arguments), {over:.2f} GiB more than the {report['hbm_bytes'] / GIB:.1f} GiB a device has"
    + (": try " + "; ".join(hints) if hints else "")
  )


def format_table(topology: str, reports: Sequence[Dict]) -> str:
  header = (
    f"{'stage':<6} {'img/step':>9} {'img/dev':>8} {'args GiB':>9} {'temp GiB':>9} {'peak GiB':>9} {'HBM GiB':>8} "
    f"{'GFLOP/img':>10} {'step ms >=':>11} {'img/s/chip <=':>14} {'compile s':>10}"
  )
  rows = [f"compiled for {topology}", header]
  for r in reports:
    rows.append(
      f"{r['stage']:<6} {r['images_per_step']:>9} {r['images_per_device']:>8g} {r['argument_bytes'] / GIB:>9.2f} "
      f"{r['temp_bytes'] / GIB:>9.2f} {r['peak_bytes'] / GIB:>9.2f} {r['hbm_bytes'] / GIB:>8.1f} "
      f"{r['gflop_per_image']:>10.2f} {r['step_seconds_lower_bound'] * 1e3:>11.1f} "
      f"{r['images_per_second_per_chip_upper_bound']:>14.0f} {r['compile_seconds']:>10.1f}"
      + ("" if r["fits"] else "  DOES NOT FIT")
    )
  return "\n".join(rows)


def compile_report(config: ml_collections.ConfigDict, workdir: Optional[str] = None) -> Dict[str, Any]:
  """mode='compile': compiles config.compile.stages for config.compile.topology; returns (and writes to
  WORKDIR/compile.json) the report. Raises DoesNotFitError after writing it when a stage does not fit."""
  cc = config.compile
  if not cc.topology:
    raise ValueError("config.compile.topology is empty: name a TPU slice, e.g. v3:4x4 or v5p:4x4x4.")
  stages = parse_stages(cc.stages)
  topology, chip_config_name = resolve_topology(cc.topology, cc.chip_config_name)
  chip = chip_of(topology)
  devices = topology_devices(topology, chip_config_name)
  mesh = sharding.create_mesh(fsdp=config.mesh.fsdp, devices=devices)
  model = trainer.build_model(config, mesh)
  reports = []
  with without_persistent_cache():
    for stage in stages:
      logging.info("Compiling the %s step for %s (%d devices)...", stage, topology, len(devices))
      _, report = _BUILDERS[stage](config, model, mesh, chip, len(devices))
      reports.append(report)
  result = {
    "topology": topology,
    "devices": len(devices),
    "device_kind": devices[0].device_kind,
    "chip": dataclasses.asdict(chip),
    "model": config.model.name,
    "image_size": config.model.image_size,
    "dtype": config.model.dtype,
    "remat": bool(config.model.remat),
    "conv_impl": model.conv_impl,
    "mesh": {"data": mesh.shape["data"], "fsdp": mesh.shape["fsdp"], "param_sharding": config.mesh.param_sharding},
    "stages": reports,
  }
  if workdir:
    folder = epath.Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    outputs.write_json(folder / REPORT_FILE, result)
  print(format_table(topology, reports))
  too_big = [r for r in reports if not r["fits"]]
  if too_big:
    raise DoesNotFitError("; ".join(shortfall_advice(r, config, len(devices)) for r in too_big) + ".")
  return result
