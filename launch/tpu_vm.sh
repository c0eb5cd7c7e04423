#!/usr/bin/env bash
# Runs `python -m noisy_student` on every worker of a Cloud TPU VM (one host or a pod slice), from this checkout.
#
#   launch/tpu_vm.sh --name=ns-v4 --zone=us-central2-b [--type=v4-32 --create] -- \
#       --config=configs/imagenet.py:model=b7,stage=student --workdir=gs://BUCKET/b7
#
# Steps: compile the job's steps for the slice here first (--config.mode=compile with --type as the topology:
# libtpu's compiler, no TPU needed), so a job that does not fit in HBM stops before any capacity is asked for
# (--skip_preflight skips it; --local_python=PY is the Python with this package and libtpu); (--create) make
# the TPU VM; copy this checkout's tracked files (uncommitted edits included) to every worker; install it there with the `tpu` extra (jax[tpu]); start the job on all workers at once with
# --distributed (jax finds the pod's coordinator itself), detached under nohup, logging to ~/noisy_student.log on
# each worker. Rerunning the same command after a preemption resumes (workdirs on gs:// keep the checkpoints).
# --dry_run prints the gcloud commands instead of running them. Needs gcloud with a project set, and a Python
# on the VM that the pinned jax supports (--python=python3.11 where the image's python3 is older).
set -euo pipefail

name="" zone="" type="v4-8" version="tpu-ubuntu2204-base" create=0 dry_run=0 project="" python="python3"
preflight=1 local_python="python3"
usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while (($#)); do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --type=*) type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --local_python=*) local_python="${1#*=}" ;;
    --skip_preflight) preflight=0 ;;
    --create) create=1 ;;
    --dry_run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option '$1' (job flags go after --)" >&2; usage ;;
  esac
  shift
done
[[ -n "$name" ]] || { echo "tpu_vm.sh: --name=TPU_NAME is required" >&2; usage; }
[[ -n "$zone" ]] || { echo "tpu_vm.sh: --zone=ZONE is required" >&2; usage; }
(($#)) || { echo "tpu_vm.sh: give the job's flags after -- (at least --config=... --workdir=...)" >&2; usage; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
job="$(printf ' %q' "$@")"
tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -z "$project" ]] || where+=(--project="$project")

run() {
  if ((dry_run)); then printf '%q ' "$@"; echo; else "$@"; fi
}

if ((preflight)); then
  check=(env -C "$repo" "$local_python" -m noisy_student "$@" --workdir="$repo/workdirs/preflight-$name"
         --config.mode=compile --config.compile.topology="$type")
  if ! run "${check[@]}"; then
    echo "tpu_vm.sh: the preflight compile for $type failed (its error is above): change the job's settings," \
         "install this package with libtpu here (pip install -e '.[tpu]', or --local_python=PY), or pass" \
         "--skip_preflight to launch anyway" >&2
    exit 1
  fi
fi

if ((create)); then
  run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --version="$version"
fi

if ((dry_run)); then
  archive="ARCHIVE.tar.gz"
  echo "# $archive: the $(git -C "$repo" ls-files | wc -l | tr -d ' ') tracked files of $repo"
else
  staging="$(mktemp -d)"
  trap 'rm -rf "$staging"' EXIT
  archive="$staging/noisy_student.tar.gz"
  git -C "$repo" ls-files -z | tar -C "$repo" --null -T - -czf "$archive"
fi
run "${tpu[@]}" scp "$archive" "$name:~/noisy_student.tar.gz" "${where[@]}" --worker=all

# Set-up steps in the foreground (set -e stops at the first failure, and ssh reports it); only the job goes to
# the background, with every stream redirected, so ssh returns as soon as it has started.
remote="set -e; rm -rf ~/noisy_student; mkdir -p ~/noisy_student; tar -xzf ~/noisy_student.tar.gz -C ~/noisy_student"
remote+="; cd ~/noisy_student; $python -m venv .venv; . .venv/bin/activate; pip install -q -e '.[tpu]'"
remote+="; nohup python -m noisy_student --distributed${job} < /dev/null > ~/noisy_student.log 2>&1 &"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$remote"
if ((!dry_run)); then
  echo "Started on every worker of $name. Follow it with:"
  printf '  %q ' "${tpu[@]}" ssh "$name" "${where[@]}" --worker=0 --command="tail -f ~/noisy_student.log"
  echo
fi
