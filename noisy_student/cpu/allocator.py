"""Runs the process under an allocator that keeps XLA:CPU's buffers mapped.

glibc serves every allocation over its mmap threshold (at most 32 MB by
default) from a fresh mmap and unmaps it on free, so each CPU train step
page-faults its whole working set again: that alone costs about 1.5x in
training speed here. mimalloc (installed with this package, from the
`cmeel-mimalloc` wheel) does not, and it also compiles XLA programs about 1.5x
faster than glibc; tcmalloc is the next choice; glibc tuned via GLIBC_TUNABLES
(one arena, never trim, mmap nothing below 4 GB) the last: its single arena
keeps large buffers mapped but serialises every thread's allocations, which
after a big compile slows small models' steps by up to 3x. The allocator must
be in place before the process starts, so the command-line entry point and the
benchmarks re-execute themselves once with the right environment.

mimalloc itself returns to the OS every block over 2 GiB on free, and XLA:CPU
puts all of a program's temporaries in one block (3.3 GB for b0's train step
at batch 32), so on a CPU-only install XLA is also told to split them into
heaps of at most 1 GiB, and mimalloc never to return freed memory: without
both, each step zero-fills fresh huge pages in the kernel (a fifth of the
step's CPU time here).
"""

import ctypes.util
import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

_MARK = "NOISY_STUDENT_ALLOCATOR"
_GLIBC_TUNABLES = (
  "glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=4294967295:glibc.malloc.mmap_threshold=4294967295"
)
_CPU_XLA_FLAGS = "--xla_cpu_prefer_vector_width=512"
# Temporaries in heaps of at most 1 GiB, below the 2 GiB over which mimalloc unmaps a block on free
# (b0's train step at batch 32: 3.294 GB of temporaries either way).
_CPU_HEAP_FLAG = "--xla_multiheap_size_constraint_per_heap=1073741824"
_MIMALLOC_KEEP_FREED = {"MIMALLOC_PURGE_DELAY": "-1"}


def _find_mimalloc():
  """libmimalloc.so from the cmeel-mimalloc wheel (a dependency on Linux), if installed."""
  try:
    files = importlib.metadata.files("cmeel-mimalloc") or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for path in sorted(str(f.locate()) for f in files if f.name.startswith("libmimalloc.so")):
    if os.path.exists(path):
      return path
  return None


def _find_tcmalloc():
  name = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
  if name and os.path.isabs(name):
    return name
  for pattern in ("/usr/lib/*/libtcmalloc_minimal.so.4", "/usr/lib/*/libtcmalloc.so.4", "/usr/lib/libtcmalloc*.so.4"):
    found = sorted(glob.glob(pattern))
    if found:
      return found[0]
  return None


def cpu_only(environ=None) -> bool:
  """Whether jax can only run on the CPU here: JAX_PLATFORMS says so, or no TPU/GPU plugin is installed."""
  environ = os.environ if environ is None else environ
  platforms = [p for p in environ.get("JAX_PLATFORMS", "").split(",") if p]
  if platforms:
    return all(p == "cpu" for p in platforms)
  if importlib.util.find_spec("libtpu") is not None:
    return False
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  plugins = importlib.util.find_spec("jax_plugins")
  return plugins is None or not any(pkgutil.iter_modules(plugins.submodule_search_locations or []))


def describe() -> str:
  """Which allocator this process runs with."""
  preload = os.environ.get("LD_PRELOAD", "")
  if "mimalloc" in preload:
    return "mimalloc"
  if "tcmalloc" in preload:
    return "tcmalloc"
  if "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
    return "glibc, tuned (GLIBC_TUNABLES)"
  return "glibc, default (page-faults large buffers every step)"


def will_reexec(environ=None) -> bool:
  """Whether reexec_with_fast_allocator would re-execute this process (Linux, not yet done, no opt-out)."""
  environ = os.environ if environ is None else environ
  return _MARK not in environ and sys.platform.startswith("linux")


def reexec_with_fast_allocator(environ=None) -> None:
  """Re-executes this very command once under mimalloc, tcmalloc or tuned glibc (Linux only).

  Set NOISY_STUDENT_ALLOCATOR=system to opt out. Also turns on 512-bit
  vectors for XLA:CPU unless XLA_FLAGS already chooses, and on a CPU-only
  install keeps large temporaries mapped (see the module docstring); a
  setting already in the environment wins.
  """
  environ = os.environ if environ is None else environ
  if not will_reexec(environ):
    return
  env = dict(environ)
  env[_MARK] = "set"
  library = _find_mimalloc() or _find_tcmalloc()
  if library:
    env["LD_PRELOAD"] = ":".join(p for p in (env.get("LD_PRELOAD"), library) if p)
  else:
    env["GLIBC_TUNABLES"] = ":".join(p for p in (env.get("GLIBC_TUNABLES"), _GLIBC_TUNABLES) if p)
  flags = [env.get("XLA_FLAGS")]
  if "xla_cpu_prefer_vector_width" not in env.get("XLA_FLAGS", ""):
    flags.append(_CPU_XLA_FLAGS)
  if cpu_only(env):
    if "mimalloc" in (library or ""):
      env.update({k: v for k, v in _MIMALLOC_KEEP_FREED.items() if k not in env})
    if "xla_multiheap_size_constraint_per_heap" not in env.get("XLA_FLAGS", ""):
      flags.append(_CPU_HEAP_FLAG)
  env["XLA_FLAGS"] = " ".join(p for p in flags if p)
  argv = list(getattr(sys, "orig_argv", [sys.executable] + sys.argv))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + argv[1:], env)
