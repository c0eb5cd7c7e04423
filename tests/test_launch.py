"""launch/tpu_vm.sh: the gcloud commands it would run (--dry_run), and what a worker's shell does with them."""

import os
import shlex
import subprocess
import tarfile
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "launch", "tpu_vm.sh")
JOB = [
  "--config=configs/imagenet.py:model=b7,stage=student",
  "--workdir=gs://bucket/b7 run",
  "--config.data.unlabeled=gs://bucket/labels/labels-*.tfrecord",
  "--config.seed=1",
]


def _launch(*args):
  return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, check=False)


def _dry_run():
  out = _launch(
    "--dry_run", "--name=ns", "--zone=us-central2-b", "--type=v4-32", "--create", "--python=python3.11", "--", *JOB
  )
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.splitlines() if line.startswith("gcloud")]


def test_dry_run_creates_copies_and_starts_on_every_worker():
  create, scp, ssh = _dry_run()
  assert create == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    "ns",
    "--zone=us-central2-b",
    "--accelerator-type=v4-32",
    "--version=tpu-ubuntu2204-base",
  ]
  assert scp[4] == "scp" and "--worker=all" in scp and scp[6] == "ns:~/noisy_student.tar.gz"
  assert ssh[4:6] == ["ssh", "ns"] and "--worker=all" in ssh


def _fake_worker(tmp_path, pip_exit):
  """A worker's home: the copied archive, and fakes for the interpreter, pip and the job that record calls."""
  home, bin_dir, venv_bin = tmp_path / "home", tmp_path / "bin", tmp_path / "venv_bin"
  for d in (home, bin_dir, venv_bin):
    d.mkdir()
  (tmp_path / "setup.py").write_text("# the repository\n")
  with tarfile.open(home / "noisy_student.tar.gz", "w:gz") as tar:
    tar.add(tmp_path / "setup.py", arcname="setup.py")
  scripts = {
    bin_dir / "python3.11": f'[ "$*" = "-m venv .venv" ] && mkdir -p .venv/bin && '
    f'echo "PATH={venv_bin}:\\$PATH" > .venv/bin/activate',
    venv_bin / "pip": f'printf "%s\\n" "$@" > "$HOME/pip.args"; exit {pip_exit}',
    venv_bin / "python": 'printf "%s\\n" "$@" > "$HOME/job.tmp"; mv "$HOME/job.tmp" "$HOME/job.args"',
  }
  for path, body in scripts.items():
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)
  env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  return home, env


@pytest.mark.parametrize("pip_exit", [0, 1])
def test_the_worker_installs_then_starts_the_job_in_the_background(tmp_path, pip_exit):
  ssh = _dry_run()[2]
  remote = next(a for a in ssh if a.startswith("--command="))[len("--command=") :]
  home, env = _fake_worker(tmp_path, pip_exit)
  start = time.monotonic()
  out = subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True, timeout=60, check=False)
  if pip_exit:  # a failed install stops there, reported by the shell's exit status; no job starts
    assert out.returncode == 1 and not (home / "job.args").exists()
    return
  assert out.returncode == 0, out.stderr
  assert (home / "noisy_student" / "setup.py").exists()
  assert (home / "pip.args").read_text().split() == ["install", "-q", "-e", ".[tpu]"]
  while not (home / "job.args").exists() and time.monotonic() - start < 30:
    time.sleep(0.05)
  # The job's flags arrive exactly as given, through the local shell, gcloud's --command and the worker's shell.
  assert (home / "job.args").read_text().splitlines() == ["-m", "noisy_student", "--distributed", *JOB]


def test_the_preflight_compiles_the_job_for_the_slice_before_asking_for_it():
  out = _launch("--dry_run", "--name=ns", "--zone=z", "--type=v4-32", "--create", "--local_python=py3", "--", *JOB)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  check = shlex.split(lines[0])
  repo = os.path.realpath(os.path.join(os.path.dirname(SCRIPT), ".."))
  assert check[:6] == ["env", "-C", repo, "py3", "-m", "noisy_student"]
  # The job's own flags, then a local workdir (absl keeps the last) and the compile mode for this slice.
  assert check[6:] == [
    *JOB,
    f"--workdir={repo}/workdirs/preflight-ns",
    "--config.mode=compile",
    "--config.compile.topology=v4-32",
  ]
  assert shlex.split(lines[1])[4] == "create"  # only then is capacity asked for
  skipped = _launch("--dry_run", "--skip_preflight", "--name=ns", "--zone=z", "--", *JOB)
  assert not any("noisy_student" in line and "compile" in line for line in skipped.stdout.splitlines())


def test_a_failed_preflight_stops_before_any_gcloud_call(tmp_path):
  fake = tmp_path / "py"
  fake.write_text('#!/usr/bin/env bash\necho "error: DoesNotFitError: the train step needs 22.4 GiB" >&2; exit 1\n')
  fake.chmod(0o755)
  gcloud = tmp_path / "gcloud"
  gcloud.write_text(f'#!/usr/bin/env bash\ntouch "{tmp_path}/gcloud.called"\n')
  gcloud.chmod(0o755)
  env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
  out = subprocess.run(
    ["bash", SCRIPT, "--name=ns", "--zone=z", "--create", f"--local_python={fake}", "--", *JOB],
    capture_output=True,
    text=True,
    env=env,
    check=False,
  )
  assert out.returncode == 1
  assert "DoesNotFitError" in out.stderr and "pass --skip_preflight to launch anyway" in out.stderr
  assert not (tmp_path / "gcloud.called").exists()


@pytest.mark.parametrize(
  "args, message",
  [
    (["--zone=z", "--", "--workdir=w"], "--name=TPU_NAME is required"),
    (["--name=n", "--", "--workdir=w"], "--zone=ZONE is required"),
    (["--name=n", "--zone=z"], "give the job's flags after --"),
    (["--name=n", "--zone=z", "--workdir=w"], "unknown option '--workdir=w' (job flags go after --)"),
  ],
)
def test_bad_arguments_are_named(args, message):
  out = _launch("--dry_run", *args)
  assert out.returncode == 2 and message in out.stderr
