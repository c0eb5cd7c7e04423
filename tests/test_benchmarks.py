"""The A/B benchmark's loading of ops.py copies: what it swaps and how it refuses a wrong file."""

import pytest

from benchmarks import ops_ab
from noisy_student.models import ops


def test_a_copy_of_ops_loads_with_every_swapped_function(tmp_path):
  copy = tmp_path / "old_ops.py"
  copy.write_text(open(ops.__file__).read())
  module = ops_ab.load_ops(str(copy))
  assert module is not ops
  for name in ops_ab.SWAPPED:
    assert getattr(module, name) is not getattr(ops, name)
    assert getattr(module, name).__name__ == getattr(ops, name).__name__


def test_a_missing_file_or_function_is_named(tmp_path):
  with pytest.raises(SystemExit, match="no such file .*absent.py"):
    ops_ab.load_ops(str(tmp_path / "absent.py"))
  partial = tmp_path / "partial.py"
  partial.write_text("def conv2d(x, kernel, stride, impl):\n  return x\n")
  with pytest.raises(SystemExit, match=r"partial.py lacks depthwise_conv2d, batch_norm_train"):
    ops_ab.load_ops(str(partial))
