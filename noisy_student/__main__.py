"""python -m noisy_student --config=configs/FILE.py[:ARGS] --workdir=DIR [--config.key=value ...]

The only module that reads flags. Configs are locked, so a mistyped `--config.key` is an error naming the key.
Without --config it runs configs/digits.py (the CPU demo: the whole Noisy Student loop) in
~/noisy_student_workdirs/digits. Multi-host: --coordinator_address, --num_processes
and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed alone on
TPU VM pods where jax finds the cluster itself.
"""

import os
import sys

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from noisy_student import config_defaults
from noisy_student.cpu import allocator
from noisy_student.cpu import devices as host_devices

_REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_DEFAULT_CONFIG = os.path.join(_REPO_CONFIGS, "digits.py")


def _exit_unknown_key(error: Exception, argv) -> None:
  """config_flags' error for `--config.no.such.key=...` (a KeyError / AttributeError) as one clear line."""
  lines = str(error.args[0] if error.args else error).strip("'\"").replace("\\n", "\n").splitlines()
  key = lines[0].strip("'\"\\ ") if lines else "?"
  culprit = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and key in a), key)
  hint = " ".join(line.strip() for line in lines[1:])
  sys.exit(f"error: unknown config key {culprit!r} (configs are locked). {hint}".rstrip())


try:  # config_flags applies `--config.key=value` overrides to the default config as it is defined
  _CONFIG = config_flags.DEFINE_config_file(
    "config",
    _DEFAULT_CONFIG if os.path.exists(_DEFAULT_CONFIG) else None,
    "ml_collections config file (optionally FILE.py:ARGS); defaults to configs/digits.py.",
    lock_config=True,
  )
except (AttributeError, KeyError) as e:
  _exit_unknown_key(e, sys.argv)

_DEFAULT_WORKDIR = os.path.join(os.path.expanduser("~"), "noisy_student_workdirs", "digits")
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Where checkpoints, summaries, config.json and eval.json go "
  f"(local path or gs://); without --config, defaults to {_DEFAULT_WORKDIR}.",
)
_COMPILATION_CACHE = flags.DEFINE_string(
  "compilation_cache",
  os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "noisy_student", "jax")),
  "Persistent XLA compilation cache (stages of one loop and reruns reuse compiled steps); '' disables.",
)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() even without an "
  "explicit coordinator (TPU VM pods, SLURM: jax detects the cluster).",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"), "host:port of process 0, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_DEVICE_PER_CORE = flags.DEFINE_bool(
  "cpu_device_per_core",
  True,
  "In a single-process run, one XLA:CPU device per core (a power of two, up to "
  "8) unless XLA_FLAGS sets a host device count: b0 labels ~1.2x and trains ~1.5x faster on 2 cores that "
  "way (cpu/devices.py). Harmless on an accelerator (it only adds host devices).",
)
_CPU_COLLECTIVES = flags.DEFINE_string("cpu_collectives", "gloo", "Collectives for multi-process CPU runs.")


def _env(name):
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def _initialize_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top

  num_processes = _NUM_PROCESSES.value if _NUM_PROCESSES.value is not None else _env("JAX_NUM_PROCESSES")
  process_id = _PROCESS_ID.value if _PROCESS_ID.value is not None else _env("JAX_PROCESS_ID")
  if _COORDINATOR.value:
    if num_processes is None or process_id is None:
      raise app.UsageError(
        "--coordinator_address needs --num_processes and --process_id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID)."
      )
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
    jax.distributed.initialize(_COORDINATOR.value, num_processes=num_processes, process_id=process_id)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  else:
    return
  logging.info(
    "jax.distributed: process %d of %d, %d devices in all.",
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
  )


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError(f"No --config given and no default at {_DEFAULT_CONFIG}.")
  workdir = _WORKDIR.value
  if not workdir:
    if flags.FLAGS["config"].present:
      raise app.UsageError("--workdir is required with --config.")
    workdir = _DEFAULT_WORKDIR
  if config.mode == "compile":
    # Compile-only TPU devices come from libtpu's compiler; the process itself runs on the CPU, and off a
    # TPU VM there is no metadata server to ask.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  single_process = not (_COORDINATOR.value or _DISTRIBUTED.value)  # several processes would share the cores
  if single_process and _CPU_DEVICE_PER_CORE.value:
    host_devices.split_per_core()  # before jax starts its backends; see cpu/devices.py
  _initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top

  if _COMPILATION_CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  # Deferred on purpose, not a cycle: these modules import jax, which must come after XLA_FLAGS (the host
  # device count) and jax.distributed are set up above.
  from noisy_student import compile_only, iterate, label, trainer  # pylint: disable=g-import-not-at-top

  logging.info(
    "%d %s device(s) in this process, %d in all.", jax.local_device_count(), jax.default_backend(), jax.device_count()
  )

  workdir = epath.Path(workdir)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  logging.info("Config:\n%s", config)

  try:
    if config.mode == "train":
      result = trainer.train_and_evaluate(config, str(workdir))
    elif config.mode == "evaluate":
      result = trainer.evaluate_checkpoint(config, str(workdir))
    elif config.mode == "label":
      result = label.label(config, str(workdir))
    elif config.mode == "iterate":
      result = iterate.iterate(config, str(workdir))
    elif config.mode == "compile":
      result = compile_only.compile_report(config, str(workdir))
    else:
      raise app.UsageError(f"Unknown config.mode {config.mode!r}; use one of {', '.join(config_defaults.MODES)}.")
  except (
    FileNotFoundError,
    ValueError,
  ) as e:  # incl. checkpoint / record / stage-config mismatches, unprepared datasets
    # Errors a user fixes from the command line: one clear line, not a traceback.
    logging.debug("Traceback of the error below:", exc_info=True)  # --verbosity=1 shows it
    logging.error("%s: %s", type(e).__name__, e)
    sys.exit(f"error: {type(e).__name__}: {e}")
  logging.info("Result: %s", result)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    _exit_unknown_key(e, argv)


def run() -> None:
  """Console-script entry point: re-executes under a fast allocator before jax is imported, then runs."""
  allocator.reexec_with_fast_allocator()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
