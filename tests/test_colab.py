"""launch/colab.ipynb runs top to bottom (its set-up cell aside: this is a checkout) on the embedded demo."""

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, subprocess_env

NOTEBOOK = os.path.join(REPO, "launch", "colab.ipynb")


def _code_cells():
  with open(NOTEBOOK) as f:
    notebook = json.load(f)
  return [
    (cell["metadata"].get("tags", []), "".join(cell["source"]))
    for cell in notebook["cells"]
    if cell["cell_type"] == "code"
  ]


def test_only_the_set_up_cell_uses_shell_magics():
  for tags, source in _code_cells():
    magic = any(line.lstrip().startswith(("!", "%")) for line in source.splitlines())
    assert magic == ("setup" in tags), source


@pytest.mark.slow
def test_notebook_runs_the_demo_and_predicts_with_the_final_student(tmp_path):
  script = "\n\n".join(source for tags, source in _code_cells() if "setup" not in tags)
  env = dict(
    subprocess_env(devices=1), WORKDIR=str(tmp_path / "workdir"), MPLBACKEND="Agg", TFDS_DATA_DIR=str(tmp_path / "tfds")
  )
  out = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False
  )
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((tmp_path / "workdir" / "summary.json").read_text())
  assert [s["name"] for s in summary["stages"]] == ["00_teacher", "01_student", "02_student"]
  student = summary["stages"][-1]
  line = next(row for row in out.stdout.splitlines() if row.startswith(f"{student['name']}: "))
  assert f"(the whole test split: {student['eval']['top1']:.3f})" in line
  # The 64 images go through the run's eval crop and normalization: their accuracy is the split's, give or
  # take a 64-image sample (binomial sd ~0.05 here).
  assert abs(float(line.split(": ")[1].split(" ")[0]) - student["eval"]["top1"]) < 0.2, line
  assert "images labeled; mean confidence" in out.stdout
