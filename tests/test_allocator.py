"""The CPU entry points' allocator switch: a re-executed process really runs under mimalloc."""

import os
import subprocess
import sys

import pytest

from noisy_student import allocator

SCRIPT = """
import sys
from noisy_student import allocator
allocator.reexec_with_fast_allocator()
with open("/proc/self/maps") as f:
  mapped = sorted({line.split()[-1] for line in f if "malloc" in line.split()[-1]})
print(allocator.describe(), mapped, sys.argv[1:])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD re-exec is Linux-only")
def test_reexec_runs_under_mimalloc_with_the_same_arguments():
  library = allocator._find_mimalloc()  # pylint: disable=protected-access
  assert library and os.path.exists(library), "cmeel-mimalloc (a dependency) is not installed"
  env = {k: v for k, v in os.environ.items() if k not in ("NOISY_STUDENT_ALLOCATOR", "LD_PRELOAD")}
  out = subprocess.run([sys.executable, "-c", SCRIPT, "--flag=1", "x"], env=env, check=True,
                       capture_output=True, text=True).stdout.strip()
  assert out == f"mimalloc {[library]} ['--flag=1', 'x']"


def test_opt_out_keeps_the_system_allocator():
  env = dict(os.environ, NOISY_STUDENT_ALLOCATOR="system")
  env.pop("LD_PRELOAD", None)
  env.pop("GLIBC_TUNABLES", None)
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, check=True, capture_output=True,
                       text=True).stdout.strip()
  assert out.startswith("glibc, default") and "[]" in out
