"""The README's demo table: the Noisy Student loop of configs/digits.py for several seeds, students noised
and not (the paper's ablation), each run timed as a user would (`python -m noisy_student`, wall clock).

  python benchmarks/demo.py --seeds=0,1,2 --workdir=workdirs/demo [--cold]

--cold starts from an empty XLA compilation cache (as a first run on a fresh machine); otherwise the CLI's
default cache is used, so compiled steps are reused across runs. The no-noise run of a seed reuses that
seed's teacher (the same stage, copied), so only the students differ.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(workdir, cache, *overrides):
  start = time.monotonic()
  cache_flag = [f"--compilation_cache={cache}"] if cache else []  # else the CLI's default cache
  subprocess.run(
    [
      sys.executable,
      "-m",
      "noisy_student",
      "--config=configs/digits.py",
      f"--workdir={workdir}",
      *cache_flag,
      *overrides,
    ],
    cwd=REPO,
    check=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  wall = time.monotonic() - start
  with open(os.path.join(workdir, "summary.json")) as f:
    return [100 * s["eval"]["top1"] for s in json.load(f)["stages"]], wall


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--workdir", default="workdirs/demo")
  parser.add_argument("--cold", action="store_true", help="empty the compilation cache before the first run")
  args = parser.parse_args()
  cache = os.path.join(args.workdir, "jax_cache") if args.cold else None
  shutil.rmtree(args.workdir, ignore_errors=True)
  os.makedirs(args.workdir)
  print("seed | teacher | student 1 | student 2 | gain | wall s || students without noise: 1 | 2 | gain | wall s")
  rows = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    noised = os.path.join(args.workdir, f"seed{seed}")
    acc, wall = run(noised, cache, f"--config.seed={seed}")
    quiet = os.path.join(args.workdir, f"seed{seed}_no_noise")
    shutil.copytree(os.path.join(noised, "00_teacher"), os.path.join(quiet, "00_teacher"))
    acc_q, wall_q = run(quiet, cache, f"--config.seed={seed}", "--config.iterate.student_noise=False")
    rows.append((acc, acc_q))
    print(
      f"{seed} | {acc[0]:.2f} | {acc[1]:.2f} | {acc[2]:.2f} | {acc[2] - acc[0]:+.2f} | {wall:.0f} || "
      f"{acc_q[1]:.2f} | {acc_q[2]:.2f} | {acc_q[2] - acc_q[0]:+.2f} | {wall_q:.0f}",
      flush=True,
    )
  mean = lambda xs: sum(xs) / len(xs)
  print(
    f"mean | {mean([r[0][0] for r in rows]):.2f} | {mean([r[0][1] for r in rows]):.2f} | "
    f"{mean([r[0][2] for r in rows]):.2f} | {mean([r[0][2] - r[0][0] for r in rows]):+.2f} | || "
    f"{mean([r[1][1] for r in rows]):.2f} | {mean([r[1][2] for r in rows]):.2f} | "
    f"{mean([r[1][2] - r[1][0] for r in rows]):+.2f} |"
  )


if __name__ == "__main__":
  main()
