"""Two local processes read disjoint parts of a split whose union is the whole split.

Each worker is a real subprocess. The fast test passes process_index / process_count explicitly; the slow
one runs jax.distributed on 127.0.0.1 (gloo) and builds global eval and train batches across both processes.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO, free_port, subprocess_env
from noisy_student.data import sources

READ_PART = textwrap.dedent("""
    import json, sys
    from noisy_student.data import sources
    data_dir, index, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    src = sources.open_source("tfds:digits:train", data_dir=data_dir, with_key=True,
                              process_index=index, process_count=count)
    keys = [e["key"].decode() for e in src.dataset.as_numpy_iterator()]
    print(json.dumps({"keys": keys, "n": src.num_examples}))
""")

DISTRIBUTED = textwrap.dedent("""
    import json, os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    data_dir, index, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index)
    import numpy as np
    from jax.experimental import multihost_utils
    from noisy_student import sharding
    from noisy_student.data import pipeline, sources
    mesh = sharding.create_mesh()
    src = sources.open_source("tfds:digits:test", data_dir=data_dir, with_key=True)
    masks, keys = 0, []
    for b in pipeline.eval_iterator(src, global_batch=32, image_size=8, crop="resize", mesh=mesh,
                                    with_raw=True):
      masks += int(multihost_utils.process_allgather(b["mask"], tiled=True).sum())
      keys += [k.decode() for k, m in zip(b["local"]["key"], b["local"]["mask"]) if m]
    train = sources.open_source("tfds:digits:train[:200]", data_dir=data_dir)
    batch = next(pipeline.train_iterator(train, labeled_batch=16, image_size=8, seed=0, mesh=mesh,
                                         crop="resize", flip=False))
    print(json.dumps({"keys": keys, "masks": masks, "shape": list(batch["image"].shape),
                      "devices": jax.device_count(), "processes": jax.process_count()}))
""")


def _run_all(scripts_args):
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", script, *args],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=subprocess_env(2),
      cwd=REPO,
    )
    for script, args in scripts_args
  ]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  return outs


def test_two_processes_read_disjoint_parts_covering_the_split(data_dir):
  parts = _run_all([(READ_PART, [data_dir, str(i), "2"]) for i in range(2)])
  whole = sources.open_source("tfds:digits:train", data_dir=data_dir, with_key=True, process_index=0, process_count=1)
  whole_keys = [e["key"].decode() for e in whole.dataset.as_numpy_iterator()]
  a, b = set(parts[0]["keys"]), set(parts[1]["keys"])
  assert [p["n"] for p in parts] == [650, 650]
  assert len(a) == 650 and len(b) == 650 and not a & b
  assert a | b == set(whole_keys) and len(whole_keys) == 1300


@pytest.mark.slow
def test_jax_distributed_eval_and_train_batches(data_dir):
  port = str(free_port())
  outs = _run_all([(DISTRIBUTED, [data_dir, str(i), port]) for i in range(2)])
  for o in outs:
    assert o["processes"] == 2 and o["devices"] == 4
    assert o["masks"] == 497  # every test example counted once over both processes
    assert o["shape"] == [16, 8, 8, 3]  # global batch from two processes' 8 rows each
  a, b = set(outs[0]["keys"]), set(outs[1]["keys"])
  assert not a & b and len(a | b) == 497 and len(a) == 249 and len(b) == 248
