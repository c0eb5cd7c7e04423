"""The Noisy Student loop: the stage plan, and a SIGKILL during a student stage that the same command
resumes from the student's last checkpoint, ending with exactly the uninterrupted run's results."""

import json
import os
import re
import signal

import pytest

from helpers import digits_config, load_config, run_cli, start_cli
from noisy_student import iterate


def test_plan_derives_every_stage_from_the_config():
  c = load_config("digits")
  stages = iterate.plan(c)
  assert [s.name for s in stages] == ["00_teacher", "01_labels", "01_student", "02_labels", "02_student"]
  teacher, student = stages[0].config, stages[2].config
  assert teacher.mode == "train" and teacher.data.ratio == 0 and teacher.data.unlabeled == ""
  # The teacher is noised like the students (the paper's baselines use the same noise).
  assert teacher.data.randaugment_layers == student.data.randaugment_layers == 2
  assert student.data.ratio == c.iterate.ratio == 3 and student.model.dropout_rate == c.model.dropout_rate
  assert stages[1].config.mode == "label" and stages[1].config.model.name == teacher.model.name

  c.iterate.student_noise = False
  c.iterate.student_models = "efficientnet-tiny,efficientnet-small"
  c.iterate.student_image_sizes = ",32"
  stages = iterate.plan(c)
  quiet = stages[2].config
  assert (quiet.data.randaugment_layers, quiet.model.dropout_rate, quiet.model.survival_prob) == (0, 0.0, 1.0)
  assert stages[0].config.data.randaugment_layers == 2  # the teacher keeps its noise
  assert stages[4].config.model.name == "efficientnet-small" and stages[4].config.model.image_size == 32
  assert stages[3].config.model.name == "efficientnet-tiny"  # labels come from the previous student
  c.iterate.student_models = "efficientnet-b0"
  with pytest.raises(ValueError, match="student_models has 1 entries, expected one per iteration"):
    iterate.plan(c)


# One teacher of 30 steps and one student of 40, checkpointed every 10, on small splits.
SHORT = (
  "--config.num_train_steps=30",
  "--config.iterate.num_iterations=1",
  "--config.iterate.student_num_train_steps=40",
  "--config.checkpoint_every_steps=10",
  "--config.log_every_steps=10",
  "--config.data.unlabeled_source=tfds:digits:train[50:370]",
  "--config.data.eval=tfds:digits:test[:200]",
  "--config.select.threshold=0.0",
)


@pytest.mark.slow
def test_sigkill_during_student_resumes_from_its_checkpoint(tmp_path):
  whole = tmp_path / "whole"
  done = run_cli(whole, *SHORT, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  expected = json.loads((whole / "summary.json").read_text())
  assert [s["name"] for s in expected["stages"]] == ["00_teacher", "01_student"]
  assert "00_teacher" in done.stdout and "01_student" in done.stdout  # the printed table
  assert (whole / "accuracy.png").read_bytes()[:4] == b"\x89PNG"

  killed = tmp_path / "killed"
  proc = start_cli(killed, *SHORT)
  in_student, checkpoints = False, killed / "01_student" / "checkpoints"
  for line in proc.stdout:  # kill as soon as the student has a finished checkpoint (orbax saves async)
    in_student = in_student or "Stage 01_student" in line
    if in_student and checkpoints.exists() and any(p.isdigit() for p in os.listdir(checkpoints)):
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait()
  assert in_student, "the run ended before its student stage"
  assert (killed / "00_teacher" / "DONE").exists() and (killed / "01_labels" / "DONE").exists()
  assert not (killed / "01_student" / "DONE").exists()
  saved = sorted(int(p) for p in os.listdir(killed / "01_student" / "checkpoints") if p.isdigit())
  assert saved and saved[-1] < 40

  # Resuming the unfinished student under a different recipe is refused, naming the keys.
  changed = run_cli(killed, *SHORT, "--config.iterate.ratio=2", timeout=300)
  assert changed.returncode == 1
  last = changed.stderr.strip().splitlines()[-1]
  assert (
    last.startswith("error: StageConfigMismatchError")
    and "01_student was run with another config (data.ratio: 3 -> 2; iterate.ratio: 3 -> 2)" in last
  ), last

  rerun = run_cli(killed, *SHORT, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "Stage 00_teacher already done" in rerun.stderr and "Stage 01_labels already done" in rerun.stderr
  restored = re.search(r"Restored the train state from step (\d+)", rerun.stderr)
  assert restored and int(restored.group(1)) == saved[-1], rerun.stderr[-3000:]
  assert json.loads((killed / "summary.json").read_text()) == expected


def test_first_teacher_from_an_official_checkpoint(tmp_path):
  """config.iterate.teacher_checkpoint: the TF checkpoint's EMA variables become the teacher's export (what
  the first labeling job loads) and are evaluated, instead of training a teacher."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  from noisy_student import checkpoint  # pylint: disable=g-import-not-at-top
  from test_convert import tiny_reference, write_checkpoint  # pylint: disable=g-import-not-at-top

  reference, ema, raw = tiny_reference(num_classes=10)
  tensors = dict(raw, **{f"{name}/ExponentialMovingAverage": value for name, value in ema.items()})
  prefix = write_checkpoint(str(tmp_path), tensors)
  c = digits_config()
  c.iterate.teacher_checkpoint = prefix
  teacher = iterate.plan(c)[0]
  folder = tmp_path / "00_teacher"
  result = iterate._run_stage(teacher, teacher.config, folder)  # pylint: disable=protected-access
  assert result["count"] == 497 and 0 <= result["top1"] <= result["top5"] <= 1
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), reference)
  exported = checkpoint.load_inference_variables(str(folder / checkpoint.EXPORT_DIR), template)
  want, got = traverse_util.flatten_dict(reference), traverse_util.flatten_dict(exported)
  assert set(want) == set(got)
  for key in want:  # the EMA copies, not the raw variables
    np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=str(key))


def test_table_adds_robustness_headlines_where_evaluated():
  summary = {
    "stages": [
      {"name": "00_teacher", "model": "efficientnet-b0", "eval": {"top1": 0.5, "top5": 0.8}},
      {
        "name": "01_student",
        "model": "efficientnet-b0",
        "eval": {
          "top1": 0.6,
          "top5": 0.9,
          "robustness": {
            "imagenet_a": {"top1": 0.125, "count": 8.0},
            "imagenet_c": {"mce": 0.7, "ce": {}},
            "imagenet_p": {"mfr_partial": 0.25, "stability": {}},
          },
        },
      },
    ]
  }
  lines = iterate.format_table(summary).splitlines()
  assert lines[0].split() == [
    "stage",
    "model",
    "top-1",
    "top-5",
    "imagenet_a",
    "top-1",
    "imagenet_c",
    "mce",
    "imagenet_p",
    "mfr_partial",
  ]
  assert lines[1].split() == ["00_teacher", "efficientnet-b0", "50.00", "80.00", "-", "-", "-"]
  assert lines[2].split() == ["01_student", "efficientnet-b0", "60.00", "90.00", "12.50", "70.00", "25.00"]
