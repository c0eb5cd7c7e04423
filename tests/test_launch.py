"""launch/tpu_vm.sh: the gcloud commands it would run (--dry_run), with the job's flags through two shells."""

import os
import shlex
import subprocess

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "launch", "tpu_vm.sh")


def _launch(*args):
  return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, check=False)


def test_dry_run_creates_copies_and_starts_the_job_on_every_worker():
  job = ["--config=configs/imagenet.py:model=b7,stage=student", "--workdir=gs://bucket/b7 run",
         "--config.data.unlabeled=gs://bucket/labels/labels-*.tfrecord", "--config.seed=1"]
  out = _launch("--dry_run", "--name=ns", "--zone=us-central2-b", "--type=v4-32", "--create",
                "--python=python3.11", "--", *job)
  assert out.returncode == 0, out.stderr
  commands = [shlex.split(line) for line in out.stdout.splitlines() if line.startswith("gcloud")]
  create, scp, ssh = commands
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ns", "--zone=us-central2-b",
                    "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
  assert scp[4] == "scp" and "--worker=all" in scp and scp[6] == "ns:~/noisy_student.tar.gz"
  assert ssh[4:6] == ["ssh", "ns"] and "--worker=all" in ssh
  remote = next(a for a in ssh if a.startswith("--command="))[len("--command="):]
  # What the worker's shell runs: install with the tpu extra, then the job with exactly the flags given.
  steps = [shlex.split(step) for step in remote.split(" && ")]
  assert ["python3.11", "-m", "venv", ".venv"] in steps and ["pip", "install", "-q", "-e", ".[tpu]"] in steps
  start = steps[-1]
  assert start[:5] == ["nohup", "python", "-m", "noisy_student", "--distributed"]
  assert start[5:5 + len(job)] == job
  assert start[5 + len(job):] == ["<", "/dev/null", ">", "~/noisy_student.log", "2>&1", "&"]


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--", "--workdir=w"], "--name=TPU_NAME is required"),
    (["--name=n", "--", "--workdir=w"], "--zone=ZONE is required"),
    (["--name=n", "--zone=z"], "give the job's flags after --"),
    (["--name=n", "--zone=z", "--workdir=w"], "unknown option '--workdir=w' (job flags go after --)"),
])
def test_bad_arguments_are_named(args, message):
  out = _launch("--dry_run", *args)
  assert out.returncode == 2 and message in out.stderr
