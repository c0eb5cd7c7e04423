"""The paper's stages compiled for their TPU slices from this machine (mode=compile), as one markdown table.

    python benchmarks/tpu_compile.py [--rows=b0,b7,l2_14,l2_28,label_l2,finetune_l2] [--topology=v3:32x32]

Each row is `python -m noisy_student --config.mode=compile` in a child process (so one row's failure, e.g.
a stage that does not fit, leaves the others), at the paper's global batch: labeled 2048, plus ratio x 2048
pseudo-labeled images for a student. Prints per row the settings, peak HBM per device against the chip's,
GFLOP per image, the roofline bound on img/s per chip and compile seconds, or why it does not fit. Needs
libtpu (`pip install -e '.[tpu]'`); compiling an L2 step takes many minutes on a small host.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (config, overrides, stages)
ROWS = {
  "b0": ("configs/imagenet.py:model=b0", [], "train"),
  "b7": ("configs/imagenet.py:model=b7", ["--config.model.dtype=bfloat16"], "train"),
  "l2_14": (
    "configs/imagenet.py:model=l2,stage=student",
    ["--config.data.ratio=14", "--config.model.dtype=bfloat16", "--config.model.remat=True"],
    "train",
  ),
  "l2_28": (
    "configs/imagenet.py:model=l2,stage=student",
    ["--config.data.ratio=28", "--config.model.dtype=bfloat16", "--config.model.remat=True"],
    "train",
  ),
  "label_l2": (
    "configs/imagenet.py:model=l2",
    ["--config.model.image_size=800", "--config.model.dtype=bfloat16", "--config.label.batch=2048"],
    "label",
  ),
  "finetune_l2": (
    "configs/imagenet.py:model=l2,stage=finetune",
    ["--config.model.dtype=bfloat16", "--config.model.remat=True"],
    "train",
  ),
}


def run_row(name, topology, workdir):
  config, overrides, stages = ROWS[name]
  command = [
    sys.executable,
    "-m",
    "noisy_student",
    f"--config={config}",
    f"--workdir={workdir}",
    "--config.mode=compile",
    f"--config.compile.topology={topology}",
    f"--config.compile.stages={stages}",
    *overrides,
  ]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  last_line = ((done.stdout + done.stderr).strip().splitlines() or ["no output"])[-1]
  error = None if done.returncode == 0 else last_line  # e.g. the DoesNotFitError line
  report = os.path.join(workdir, "compile.json")
  if not os.path.exists(report):  # failed before compiling (libtpu missing, a bad flag)
    return None, last_line
  with open(report) as f:
    return json.load(f), error


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
  parser.add_argument("--topology", default="v3:32x32", help="a TPU slice, e.g. v3:32x32, v5p:8x8x16")
  args = parser.parse_args()
  print(
    "| row | model, px | settings | img/step | peak / HBM GiB per device | GFLOP/img "
    "| img/s per chip <= | compile s | note |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for name in args.rows.split(","):
    with tempfile.TemporaryDirectory() as workdir:
      result, error = run_row(name, args.topology, workdir)
    if result is None:
      print(f"| {name} | | | | | | | | {error} |")
      continue
    mesh = result["mesh"]
    settings = f"{result['dtype']}, remat {result['remat']}, fsdp {mesh['fsdp']} ({mesh['param_sharding']})"
    for r in result["stages"]:
      print(
        f"| {name} {r['stage']} | {result['model']}, {result['image_size']} | {settings} | {r['images_per_step']} "
        f"| {r['peak_bytes'] / 2**30:.2f} / {r['hbm_bytes'] / 2**30:.1f} | {r['gflop_per_image']:.2f} "
        f"| {r['images_per_second_per_chip_upper_bound']:.0f} | {r['compile_seconds']:.0f} "
        f"| {'fits' if r['fits'] else error} |"
      )


if __name__ == "__main__":
  main()
