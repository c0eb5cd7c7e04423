"""The host loop around the compiled steps of train.py: train_and_evaluate and evaluate_checkpoint.

Kept apart from train.py so the step math stays readable: this module owns what a run does over time —
restore, the data iterator at the restored step, periodic checkpoints (never of a non-finite loss), scalars
through clu writers (process 0 only), EMA evaluation, SIGTERM -> checkpoint and a clean return, eval.json.
Every path goes through etils.epath, so WORKDIR may be a gs:// bucket. Imports run one way: this module
imports train.py, never the reverse.
"""

import concurrent.futures
import itertools
import signal
import threading
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from noisy_student import checkpoint, config_defaults, outputs, pseudo_labels, sharding
from noisy_student import data as data_lib
from noisy_student import evaluate as evaluate_lib
from noisy_student import train as train_lib
from noisy_student.models import create_model

CHECKPOINT_DIR = "checkpoints"
EVAL_FILE = "eval.json"


def _opt(value):
  """'' / None in configs mean "not set"."""
  return value or None


def build_model(config: ml_collections.ConfigDict, mesh=None):
  """The EfficientNet of config.model with its noise knobs (dropout, stochastic depth, BN momentum), its
  implementation chosen for the mesh's devices (the default backend's without a mesh)."""
  platform = sharding.platform(mesh) if mesh is not None else None
  return create_model(**config_defaults.model_arguments(config.model), platform=platform)


def build_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
  """(schedule, optax transformation) of config.optimizer; the lr is scaled by the labeled batch, as the
  official code scales by train_batch_size."""
  opt = config.optimizer
  schedule = train_lib.learning_rate_schedule(
    opt.base_lr,
    config.data.labeled_batch,
    steps_per_epoch,
    total_steps,
    warmup_epochs=opt.warmup_epochs,
    schedule=opt.schedule,
  )
  return schedule, train_lib.create_optimizer(opt.name, schedule, opt.weight_decay, frozen=opt.frozen)


def build_train_step(config: ml_collections.ConfigDict, model, tx, mesh, schedule=None, state=None):
  """The compiled-on-first-call train step of config's recipe over `mesh`; the state keeps the shardings
  `state` has (an array or ShapeDtypeStruct tree; default replicated). mode=compile builds the same step."""
  shardings = None if state is None else jax.tree.map(lambda x: x.sharding, state)
  return train_lib.make_train_step(
    model,
    tx,
    mesh,
    label_smoothing=config.optimizer.label_smoothing,
    ema_decay=config.optimizer.ema_decay,
    schedule=schedule,
    state_shardings=shardings,
    normalization=config.data.normalization,
  )


def _fresh_state(config: ml_collections.ConfigDict, model, tx, mesh):
  """The seed's initial train state on `mesh`, replicated or fsdp-sharded as config.mesh says."""
  return train_lib.create_train_state(
    model,
    tx,
    jax.random.key(config.seed),
    config.model.image_size,
    mesh=mesh,
    param_sharding=config.mesh.param_sharding,
  )


def check_frozen(pattern: str, params) -> None:
  """config.optimizer.frozen must name some parameters (a typo would silently train everything) but not
  all of them."""
  if not pattern:
    return
  labels = jax.tree.leaves(train_lib.frozen_labels(pattern)(params))
  if "frozen" not in labels or "train" not in labels:
    names = list(traverse_util.flatten_dict(params, sep="/"))
    raise ValueError(
      f"config.optimizer.frozen={pattern!r} matches {labels.count('frozen')} of {len(names)} "
      f"parameters; it must match some but not all (names look like {names[0]!r}, "
      f"{names[len(names) // 2]!r})."
    )


def initialize_from(state, directory: str):
  """A fresh train state whose weights (and EMA copies) are an exported model's (WORKDIR/export of a
  finished run or stage): fine-tuning, e.g. at a larger resolution. Shardings stay the state's."""
  template = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    {"params": state.params, "batch_stats": state.batch_stats},
  )
  variables = checkpoint.load_inference_variables(directory, template)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # distinct buffers: the state is donated
  return state.replace(
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    ema_params=copy(variables["params"]),
    ema_batch_stats=copy(variables["batch_stats"]),
  )


def _train_steps(config, num_examples: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  if config.num_epochs > 0:
    return max(1, int(config.num_epochs * num_examples / config.data.labeled_batch))
  raise ValueError("Set config.num_train_steps (> 0) or config.num_epochs (> 0).")


def open_pseudo_labels(config: ml_collections.ConfigDict, workdir: epath.Path):
  """config.data.unlabeled, filtered and balanced by config.select from the manifest beside the shards.

  The selection is a pure function of stats.json and the config, so every process computes the same one;
  process 0 records it (selection.json, selection.png) in the workdir.
  """
  selection = None
  if config.select.enabled:
    manifest = epath.Path(config.data.unlabeled).parent / "stats.json"
    if not manifest.exists():
      raise FileNotFoundError(
        f"Selecting pseudo-labels needs the labeling job's {manifest} beside {config.data.unlabeled!r}; "
        "set config.select.enabled=False to train on every record as is."
      )
    stats = outputs.read_json(manifest)
    s = config.select
    selection = pseudo_labels.select(stats, **config_defaults.selection_arguments(s))
    if selection["expected_total"] == 0:
      raise ValueError(
        f"{manifest}: no pseudo-label of {stats['num_examples']} reaches the confidence "
        f"threshold config.select.threshold={s.threshold}; lower it, or train the teacher "
        "longer."
      )
    if jax.process_index() == 0:
      outputs.write_json(workdir / "selection.json", selection)
      pseudo_labels.plot_histograms(stats, workdir / "selection.png", selection)
    logging.info(
      "Pseudo-label selection: threshold %.2f, %d per class, %.0f of %d records expected.",
      s.threshold,
      selection["per_class"],
      selection["expected_total"],
      stats["num_examples"],
    )
  copies = None if selection is None else pseudo_labels.copies_fn(selection, config.seed)
  return data_lib.open_source(
    config.data.unlabeled,
    data_dir=_opt(config.data.data_dir),
    num_classes=config.model.num_classes,
    copies=copies,
    **_whole(config),
  )


def _require_examples_everywhere(source) -> None:
  """Every process must have train examples; else all raise together (one alone would leave the others
  waiting in the first train step's collectives)."""
  counts = [source.num_examples]
  if jax.process_count() > 1:
    counts = [int(c) for c in multihost_utils.process_allgather(np.int64(source.num_examples))]
  empty = [i for i, c in enumerate(counts) if c == 0]
  if empty:
    raise ValueError(
      f"{source.spec}: process(es) {empty} have no training examples (per-process counts "
      f"{counts}); write more shards, use fewer processes, or set config.data.global_order=True."
    )


def _whole(config: ml_collections.ConfigDict) -> Dict[str, int]:
  """config.data.global_order: every process opens the train sources whole and keeps its rows of each global
  batch, so batches do not depend on the process count (small datasets); else each reads its own part."""
  return dict(process_index=0, process_count=1) if config.data.global_order else {}


def evaluate(eval_step, variables, source, config, mesh) -> Dict[str, float]:
  """Top-1 / top-5 of `variables` over the whole eval source, at config's eval batch, size and crop."""
  return evaluate_lib.evaluate(
    eval_step,
    variables,
    source,
    global_batch=config.data.eval_batch,
    image_size=config.model.image_size,
    crop=config.data.eval_crop,
    mesh=mesh,
  )


def robustness_suites(config: ml_collections.ConfigDict) -> evaluate_lib.Suites:
  """config.evaluate's robustness suites, checked against the model and its input statistics."""
  return evaluate_lib.parse_suites(
    **config.evaluate, num_classes=config.model.num_classes, normalization=config.data.normalization
  )


def robustness(model, variables, config, mesh) -> Dict[str, Any]:
  """{'robustness': per-suite results} for config.evaluate.suites (evaluate.py), or {} when none are set."""
  if not config.evaluate.suites:
    return {}
  return {
    "robustness": evaluate_lib.robustness(
      model,
      variables,
      robustness_suites(config),
      mesh,
      data_dir=_opt(config.data.data_dir),
      image_size=config.model.image_size,
      global_batch=config.data.eval_batch,
      normalization=config.data.normalization,
    )
  }


def _eval_scalars(result: Dict[str, Any]) -> Dict[str, float]:
  """eval/top1, eval/robustness/imagenet_c/mce, ...: every number of an eval result, for the writers."""
  flat = traverse_util.flatten_dict(result, sep="/")
  return {f"eval/{k}": float(v) for k, v in flat.items() if isinstance(v, (int, float))}


class _Preemption:
  """Records SIGTERM while installed; the loop polls it and saves (a signal handler must not do I/O)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):  # pylint: disable=unused-argument
      logging.warning("SIGTERM received: saving a checkpoint and stopping.")
      self.requested = True

    if threading.current_thread() is threading.main_thread():  # signal.signal works only there
      self._previous = signal.signal(signal.SIGTERM, handler)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    """True when any process was asked to stop (all processes must stop at the same step)."""
    if jax.process_count() == 1:
      return self.requested
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


def _write_json(path: epath.Path, obj: Any) -> None:
  if jax.process_index() == 0:
    outputs.write_json(path, obj)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains (resuming from WORKDIR/checkpoints if present), evaluates the EMA weights, returns eval metrics.

  The EMA weights of the finished run are exported to WORKDIR/export (what a labeling job loads).
  The returned dict holds 'top1', 'top5', 'count' and 'step'; it is also written to WORKDIR/eval.json. A
  SIGTERM saves a checkpoint at the current step and returns {'preempted': True, 'step': step} instead.
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  robustness_suites(config)  # a typo in config.evaluate fails now, not after training
  data_dir = _opt(config.data.data_dir)
  mesh = sharding.create_mesh(fsdp=config.mesh.fsdp)

  whole = _whole(config)
  labeled = data_lib.open_source(config.data.labeled, data_dir=data_dir, num_classes=config.model.num_classes, **whole)
  unlabeled = None
  if config.data.ratio and not _opt(config.data.unlabeled):
    raise ValueError(
      f"config.data.ratio={config.data.ratio} needs pseudo-labeled TFRecords in "
      "config.data.unlabeled (a glob); set ratio=0 to train on labeled data only."
    )
  if _opt(config.data.unlabeled) and not config.data.ratio:
    logging.warning("config.data.unlabeled=%r is ignored because config.data.ratio is 0.", config.data.unlabeled)
  if _opt(config.data.unlabeled) and config.data.ratio:
    unlabeled = open_pseudo_labels(config, workdir)
  for source in (labeled, unlabeled):
    if source is not None:
      _require_examples_everywhere(source)
  eval_source = data_lib.open_source(config.data.eval, data_dir=data_dir, num_classes=config.model.num_classes)

  num_classes = config.model.num_classes
  total_labeled = labeled.num_examples * labeled.process_count
  steps_per_epoch = max(1, total_labeled // config.data.labeled_batch)
  total_steps = _train_steps(config, total_labeled)
  opt = config.optimizer
  schedule, tx = build_optimizer(config, steps_per_epoch, total_steps)
  model = build_model(config, mesh)

  state = _fresh_state(config, model, tx, mesh)
  manager = checkpoint.create_manager(str(workdir / CHECKPOINT_DIR), max_to_keep=config.keep_checkpoints)
  check_frozen(opt.frozen, state.params)
  restored = checkpoint.restore_latest(manager, state)
  if restored is not None:
    state = restored
    logging.info(
      "Restored the train state from step %d in %s%s.",
      int(state.step),
      manager.directory,
      f" (config.init_from={config.init_from!r} applies to fresh runs only)" if config.init_from else "",
    )
  elif config.init_from:
    state = initialize_from(state, config.init_from)
    logging.info("Initialized the weights from %s.", config.init_from)
  elif opt.frozen:
    raise ValueError(
      f"config.optimizer.frozen={opt.frozen!r} without config.init_from would freeze randomly "
      "initialized layers: set config.init_from to a finished run's export/."
    )
  start_step = int(jax.device_get(state.step))

  writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
  if start_step == 0:
    parameter_overview.log_parameter_overview(state.params, msg="Model parameters", jax_logging_process=0)
    writer.write_hparams(traverse_util.flatten_dict(config.to_dict(), sep="."))

  train_step = build_train_step(config, model, tx, mesh, schedule, state)
  eval_step = evaluate_lib.make_eval_step(model, mesh, normalization=config.data.normalization)
  global_batch = config.data.labeled_batch * (1 + (config.data.ratio if unlabeled is not None else 0))
  batches = data_lib.train_iterator(
    labeled,
    labeled_batch=config.data.labeled_batch,
    image_size=config.model.image_size,
    seed=config.seed,
    start_step=start_step,
    unlabeled=unlabeled,
    ratio=config.data.ratio if unlabeled is not None else 0,
    mesh=mesh,
    num_classes=num_classes,
    crop=config.data.crop,
    flip=config.data.flip,
    noise=data_lib.Noise(config.data.randaugment_layers, config.data.randaugment_magnitude),
  )
  if start_step < total_steps:
    batch_spec = data_lib.train_batch_spec(global_batch, config.model.image_size, num_classes, mesh)
    train_step, batches = _compile_while_first_batch(train_step, state, batch_spec, batches)

  hooks = []
  if jax.process_index() == 0:
    hooks.append(
      periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps, every_secs=None
      )
    )
  log_every = max(1, config.log_every_steps)
  pending, last_loss = [], None
  interval_start, interval_step = time.monotonic(), start_step

  def save(step, force=False):
    if last_loss is not None:
      check_finite(last_loss, step)
    checkpoint.save(manager, state, step, force=force)

  step = start_step
  try:
    with _Preemption() as preemption:
      while step < total_steps:
        state, metrics = train_step(state, next(batches))
        step += 1
        last_loss = metrics["loss"]
        pending.append(metrics)
        if step == start_step + 1:  # the first step compiled: leave it out of img/s
          interval_start, interval_step = time.monotonic(), step
        for hook in hooks:
          hook(step)
        if step % log_every == 0 or step == total_steps:
          scalars = _mean(pending)
          pending = []
          check_finite(scalars["loss"], step)
          elapsed = time.monotonic() - interval_start
          scalars["img_per_sec"] = (step - interval_step) * global_batch / max(elapsed, 1e-9)
          interval_start, interval_step = time.monotonic(), step
          writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
        if step % config.checkpoint_every_steps == 0 and step < total_steps:
          save(step)
        if config.eval_every_steps > 0 and step % config.eval_every_steps == 0 and step < total_steps:
          result = evaluate(eval_step, train_lib.eval_variables(state), eval_source, config, mesh)
          writer.write_scalars(step, _eval_scalars(result))
        # Multi-host: poll (a collective) only at log steps, so all processes stop at the same step.
        if (jax.process_count() == 1 or step % log_every == 0) and preemption.agreed():
          if manager.latest_step() != step:  # unless the periodic save just wrote this step
            save(step, force=True)
          manager.wait_until_finished()
          writer.flush()
          logging.warning("Stopped at step %d after SIGTERM; rerun the same command to resume.", step)
          return {"preempted": True, "step": step}
    if manager.latest_step() != step:
      save(step, force=True)
    result = evaluate(eval_step, train_lib.eval_variables(state), eval_source, config, mesh)
    result = dict(result, step=step)
    # The export and eval.json first: a robustness suite that fails (say, an unprepared dataset) leaves the
    # trained model usable, and a rerun (restoring the final step) only evaluates again.
    checkpoint.save_inference_variables(str(workdir / checkpoint.EXPORT_DIR), train_lib.eval_variables(state))
    _write_json(workdir / EVAL_FILE, result)
    suites = robustness(model, train_lib.eval_variables(state), config, mesh)
    if suites:
      result = dict(result, **suites)
      _write_json(workdir / EVAL_FILE, result)
    writer.write_scalars(step, _eval_scalars(result))
    logging.info("Final eval at step %d: %s", step, result)
    return result
  finally:
    manager.wait_until_finished()
    writer.flush()


def _compile_while_first_batch(step_fn, state, batch_spec, batches):
  """(compiled step, the same batches): XLA compiles the step in a thread while this one builds the input
  pipeline and reads its first batch (building a pipeline is mostly Python, compiling is not: the two
  overlap even on 2 cores)."""
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile") as pool:
    compiled = pool.submit(lambda: step_fn.lower(state, batch_spec).compile())
    first = next(batches)
    return compiled.result(), itertools.chain([first], batches)


def check_finite(loss: Any, step: int) -> None:
  """Raises before anything is saved, so the last good checkpoint is the one a restart resumes from."""
  value = float(np.asarray(jax.device_get(loss)))
  if not np.isfinite(value):
    raise FloatingPointError(
      f"Non-finite loss {value} at step {int(step)}; stopping without saving "
      f"(the latest checkpoint is from before this step)."
    )


def _mean(metrics_list) -> Dict[str, float]:
  host = jax.device_get(metrics_list)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """mode='evaluate': the latest checkpoint's EMA weights on config.data.eval and the robustness suites of
  config.evaluate.suites, written to eval.json."""
  workdir = epath.Path(workdir)
  robustness_suites(config)
  mesh = sharding.create_mesh(fsdp=config.mesh.fsdp)
  model = build_model(config, mesh)
  _, tx = build_optimizer(config, 1, 1)  # only the state's structure matters for restoring
  template = _fresh_state(config, model, tx, mesh)
  manager = checkpoint.create_manager(str(workdir / CHECKPOINT_DIR), max_to_keep=None)
  state = checkpoint.restore_latest(manager, template)
  if state is None:
    raise FileNotFoundError(f"No checkpoint in {workdir / CHECKPOINT_DIR} to evaluate.")
  result = dict(
    evaluate_variables(config, model, train_lib.eval_variables(state), mesh), step=int(jax.device_get(state.step))
  )
  _write_json(workdir / EVAL_FILE, result)
  return result


def evaluate_variables(config: ml_collections.ConfigDict, model, variables, mesh) -> Dict[str, Any]:
  """Eval-mode `variables` on config.data.eval, plus the robustness suites of config.evaluate.suites: what
  mode='evaluate' and a loop started from an official checkpoint report."""
  source = data_lib.open_source(
    config.data.eval, data_dir=_opt(config.data.data_dir), num_classes=config.model.num_classes
  )
  step = evaluate_lib.make_eval_step(model, mesh, normalization=config.data.normalization)
  return dict(evaluate(step, variables, source, config, mesh), **robustness(model, variables, config, mesh))
