"""iterate(config, workdir): the whole Noisy Student loop, one resumable stage folder per step.

  00_teacher   train config.model on config.data.labeled (with the config's noise), or, with
               config.iterate.teacher_checkpoint, convert an official TF checkpoint and evaluate it
  0i_labels    the previous stage's model, un-noised, labels config.data.unlabeled_source (label.py)
  0i_student   a student (config.iterate.student_models[i-1], equal or larger) on labeled + selected
               pseudo-labeled images at config.iterate.ratio, noised (RandAugment, dropout, stochastic
               depth) unless config.iterate.student_noise is False; it is the next teacher

A stage is finished when its DONE file (JSON: the stage's result, written last and atomically) exists; a
rerun of the same command skips finished stages and resumes the rest (a student from its last checkpoint).
Process 0 writes summary.json, prints a table of every stage's eval top-1 / top-5, and plots accuracy per
iteration (accuracy.png).
"""

import dataclasses
import json
from typing import Any, Dict, List, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from noisy_student import checkpoint, outputs, sharding, trainer
from noisy_student import label as label_lib
from noisy_student.config_defaults import base_config
from noisy_student.models import convert

DONE = "DONE"
STAGE_CONFIG = "stage_config.json"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "accuracy.png"


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str  # folder under the workdir
  kind: str  # 'teacher', 'labels' or 'student'
  iteration: int
  config: ml_collections.ConfigDict


def _per_iteration(value: str, n: int, what: str) -> List[str]:
  items = [v.strip() for v in value.split(",")] if value else []
  if len(items) not in (0, n):
    raise ValueError(f"config.iterate.{what} has {len(items)} entries, expected one per iteration ({n}) or none.")
  return items or [""] * n


def plan(config: ml_collections.ConfigDict) -> List[Stage]:
  """Every stage of the loop with its own config (derived from `config`; nothing else is read)."""
  it = config.iterate
  if config.init_from or config.optimizer.frozen:
    raise ValueError(
      "config.init_from / config.optimizer.frozen are for fine-tuning one model "
      "(mode=train); the loop trains every stage from scratch (its first teacher may start from "
      "an official checkpoint: config.iterate.teacher_checkpoint)."
    )
  models = _per_iteration(it.student_models, it.num_iterations, "student_models")
  sizes = _per_iteration(it.student_image_sizes, it.num_iterations, "student_image_sizes")
  teacher = _copy(config)
  teacher.mode = "train"
  teacher.data.ratio = 0
  teacher.data.unlabeled = ""
  stages = [Stage("00_teacher", "teacher", 0, teacher)]
  previous = stages[0]
  for i in range(1, it.num_iterations + 1):
    labels = _copy(previous.config)
    labels.mode = "label"
    labels.label.teacher_workdir = ""  # filled in with the workdir at run time
    labels_stage = Stage(f"{i:02d}_labels", "labels", i, labels)
    student = _copy(config)
    student.mode = "train"
    if models[i - 1]:
      student.model.name = models[i - 1]
    if sizes[i - 1]:
      student.model.image_size = int(sizes[i - 1])
    student.data.ratio = it.ratio
    if it.student_num_train_steps > 0:
      student.num_train_steps = it.student_num_train_steps
    if not it.student_noise:  # the paper's ablation: a student without noise
      student.data.randaugment_layers = 0
      student.model.dropout_rate = 0.0
      student.model.survival_prob = 1.0
    student_stage = Stage(f"{i:02d}_student", "student", i, student)
    stages += [labels_stage, student_stage]
    previous = student_stage
  return stages


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.lock()
  return c


def _stage_config(stage: Stage, workdir: epath.Path, previous: Optional[Stage]) -> ml_collections.ConfigDict:
  c = _copy(stage.config)
  if stage.kind == "labels":
    c.label.teacher_workdir = str(workdir / previous.name)
  elif stage.kind == "student":
    c.data.unlabeled = str(workdir / previous.name / "labels-*.tfrecord")
  return c


class StageConfigMismatchError(ValueError):
  """A rerun's config differs from the one a stage folder was started with."""


# Keys that change how a run reports, not what it computes: a rerun may change them.
# Paths derived from the workdir may differ (a relative --workdir, a copied workdir), and num_iterations may
# grow to extend a finished loop. evaluate.* (which robustness suites are reported) may change too.
_RERUN_MAY_CHANGE = {
  "log_every_steps",
  "eval_every_steps",
  "keep_checkpoints",
  "label.log_every_batches",
  "label.log_every_secs",
  "label.teacher_workdir",
  "label.read_ahead_batches",
  "data.unlabeled",
  "iterate.num_iterations",
}


def _check_same_config(folder: epath.Path, config: ml_collections.ConfigDict) -> None:
  """Resuming an unfinished stage under another config is an error naming the keys: it would mix two
  experiments in one result. (Finished stages are reused as they are, like any resumed run.)"""
  path = folder / STAGE_CONFIG
  if not path.exists():
    return
  before = traverse_util.flatten_dict(outputs.read_json(path), sep=".")
  now = traverse_util.flatten_dict(json.loads(config.to_json()), sep=".")
  # A key the saved config lacks (added to the code since) had its default value then.
  defaults = traverse_util.flatten_dict(json.loads(base_config().to_json()), sep=".")
  changed = sorted(
    k
    for k in set(before) | set(now)
    if before.get(k, defaults.get(k)) != now.get(k) and k not in _RERUN_MAY_CHANGE and not k.startswith("evaluate.")
  )
  if changed:
    details = "; ".join(f"{k}: {before.get(k, defaults.get(k))!r} -> {now.get(k)!r}" for k in changed[:5])
    raise StageConfigMismatchError(
      f"{folder} was run with another config ({details}). Resume with the same config, or use a new workdir."
    )


def _run_stage(stage: Stage, config, folder: epath.Path) -> Optional[Dict[str, Any]]:
  """Runs one stage; returns its result, or None when it was preempted (SIGTERM)."""
  if stage.kind == "labels":
    return label_lib.label(config, str(folder))
  if stage.kind == "teacher" and config.iterate.teacher_checkpoint:
    return _teacher_from_checkpoint(config, folder)
  result = trainer.train_and_evaluate(config, str(folder))
  return None if result.get("preempted") else result


def _teacher_from_checkpoint(config, folder: epath.Path) -> Dict[str, Any]:
  """An official TF checkpoint as the first teacher: converted, exported and evaluated."""
  variables = convert.load_tf_checkpoint(config.iterate.teacher_checkpoint, config.model.name)
  checkpoint.save_inference_variables(str(folder / checkpoint.EXPORT_DIR), variables)
  mesh = sharding.create_mesh(fsdp=config.mesh.fsdp)
  return trainer.evaluate_variables(config, trainer.build_model(config, mesh), variables, mesh)


def iterate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """mode='iterate': runs (or resumes) every stage; returns the summary ({'stages': [...]})."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  stages = plan(config)
  rows, previous = [], None
  for stage in stages:
    folder = workdir / stage.name
    done = folder / DONE
    stage_config = _stage_config(stage, workdir, previous)
    if done.exists():
      result = outputs.read_json(done)
      logging.info("Stage %s already done: %s", stage.name, result)
    else:
      _check_same_config(folder, stage_config)  # finished stages are reused as they are
      logging.info("Stage %s: %s (%s)", stage.name, stage.kind, stage_config.model.name)
      folder.mkdir(parents=True, exist_ok=True)
      if jax.process_index() == 0:
        outputs.write_json(folder / STAGE_CONFIG, stage_config.to_dict())
      result = _run_stage(stage, stage_config, folder)
      if result is None:
        logging.warning("Stopped during %s; rerun the same command to resume.", stage.name)
        return {"preempted": True, "stage": stage.name}
      result = _plain(result)
      multihost_utils.sync_global_devices(f"iterate: {stage.name} finished")
      if jax.process_index() == 0:
        outputs.write_json(done, result)
      multihost_utils.sync_global_devices(f"iterate: {stage.name} DONE")
    rows.append(
      {
        "name": stage.name,
        "kind": stage.kind,
        "iteration": stage.iteration,
        "model": stage_config.model.name,
        "result": result,
      }
    )
    previous = stage
  summary = {
    "stages": [
      {
        "name": r["name"],
        "model": r["model"],
        "iteration": r["iteration"],
        "eval": {k: r["result"][k] for k in ("top1", "top5", "robustness") if k in r["result"]},
      }
      for r in rows
      if r["kind"] != "labels"
    ],
    "labels": [{"name": r["name"], **r["result"]} for r in rows if r["kind"] == "labels"],
  }
  if jax.process_index() == 0:
    outputs.write_json(workdir / SUMMARY_FILE, summary)
    plot_accuracy(summary, workdir / PLOT_FILE)
    print(format_table(summary), flush=True)
  return summary


def _plain(result: Dict[str, Any]) -> Dict[str, Any]:
  return {
    k: (float(v) if isinstance(v, (np.floating, np.integer, float, int)) and not isinstance(v, bool) else v)
    for k, v in result.items()
  }


def _robustness_columns(evaluation: Dict[str, Any]) -> Dict[str, float]:
  """One headline number (percent) per robustness suite: top-1, ImageNet-C's (partial) mCE, or ImageNet-P's
  (partial) mFR where a baseline was given."""
  columns = {}
  for suite, result in evaluation.get("robustness", {}).items():
    key = next((k for k in ("mce", "mce_partial", "mfr", "mfr_partial", "top1") if k in result), None)
    if key is not None:
      columns[f"{suite} {key.replace('top1', 'top-1')}"] = 100 * result[key]
  return columns


def format_table(summary: Dict[str, Any]) -> str:
  """Each stage's test top-1 / top-5 (percent), and its robustness suites' headline numbers if evaluated."""
  extra = list(dict.fromkeys(k for s in summary["stages"] for k in _robustness_columns(s["eval"])))
  lines = [f"{'stage':<12} {'model':<22} {'top-1':>7} {'top-5':>7}" + "".join(f" {k:>20}" for k in extra)]
  for s in summary["stages"]:
    columns = _robustness_columns(s["eval"])
    lines.append(
      f"{s['name']:<12} {s['model']:<22} {100 * s['eval']['top1']:>7.2f} "
      f"{100 * s['eval']['top5']:>7.2f}"
      + "".join(f" {columns[k]:>20.2f}" if k in columns else f" {'-':>20}" for k in extra)
    )
  return "\n".join(lines)


def plot_accuracy(summary: Dict[str, Any], path) -> None:
  """PNG: eval top-1 per iteration (0 is the teacher)."""
  its = [s["iteration"] for s in summary["stages"]]
  top1 = [100 * s["eval"]["top1"] for s in summary["stages"]]
  fig, ax = outputs.new_figure(figsize=(5, 3.5))
  ax.plot(its, top1, marker="o")
  for x, y, s in zip(its, top1, summary["stages"]):
    ax.annotate(
      s["model"].replace("efficientnet-", ""),
      (x, y),
      textcoords="offset points",
      xytext=(0, 6),
      ha="center",
      fontsize=8,
    )
  ax.set(
    xlabel="iteration (0 = teacher)", ylabel="eval top-1 (%)", xticks=its, title="Noisy Student: accuracy per iteration"
  )
  ax.grid(alpha=0.3)
  outputs.save_figure(fig, path)
