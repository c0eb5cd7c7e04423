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


def test_the_peer_run_is_parsed_and_runs_without_this_process_allocator(tmp_path, monkeypatch):
  """label_throughput's peer (timm_throughput.py in another Python) gets tuned glibc, not our LD_PRELOAD or
  XLA settings, and its inference row is read back; a failed run is an error that shows its output."""
  label_throughput = pytest.importorskip("benchmarks.label_throughput")
  fake = tmp_path / "python"
  fake.write_text(
    '#!/bin/sh\necho "LD_PRELOAD=[$LD_PRELOAD] XLA_FLAGS=[$XLA_FLAGS] $GLIBC_TUNABLES $*"\n'
    "echo 'best infer: 64.8 img/s (channels_last)'\n"
    'echo \'result: {"channels_last": {"infer_img_s": 64.8, "infer_max_img_s": 73.8, '
    '"infer_sustained_img_s": 61.5}}\'\n'
  )
  fake.chmod(0o755)
  monkeypatch.setenv("LD_PRELOAD", "/somewhere/libmimalloc.so")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert label_throughput.peer_inference(str(fake), 32, 224, 48) == (64.8, 73.8, 61.5)
  broken = tmp_path / "broken"
  broken.write_text('#!/bin/sh\necho "LD_PRELOAD=[$LD_PRELOAD] XLA_FLAGS=[$XLA_FLAGS] $GLIBC_TUNABLES $*"\nexit 3\n')
  broken.chmod(0o755)
  with pytest.raises(
    RuntimeError,
    match=r"(?s)peer run .*LD_PRELOAD=\[\] XLA_FLAGS=\[\] "
    r"glibc.malloc.mmap_threshold=4294967296.* --batch=32 --resolution=224 .*--steps=48",
  ):
    label_throughput.peer_inference(str(broken), 32, 224, 48)
