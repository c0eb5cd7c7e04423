"""Training library: train state, the paper's loss and optimization recipe, the sharded train step.

One code path for every scale (docs/design.md, "Sharding"): `jax.jit` over a ('data', 'fsdp') mesh with
`NamedSharding`, the batch split over both axes, the state replicated and donated. Batch-norm statistics are
means over the global batch because jit sees the global array. Dropout / stochastic-depth keys are
`fold_in(state.rng, state.step)`, so a step computes the same numbers on 1 or 8 devices.

The recipe (Xie et al. 2020; the official EfficientNet TF code): RMSProp (decay 0.9, momentum 0.9, eps 1e-3
inside the square root, accumulator initialised to 1), lr 0.016 per 256 images with 5-epoch linear warmup and
x0.97 every 2.4 epochs, weight decay 1e-5 on non-batch-norm variables, EMA 0.9999 with TF's warm-up rule,
label smoothing 0.1 on labeled images and soft cross-entropy on pseudo-labeled ones, in one forward pass.

Only the step math lives here; trainer.py runs it over time (restore, checkpoints, writers, SIGTERM, eval).
"""

import functools
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from noisy_student import normalization as normalization_lib
from noisy_student import sharding

Array = jax.Array
Metrics = Dict[str, Array]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs. `rng` is raw uint32 key data (checkpointable by orbax)."""

  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  ema_batch_stats: Any
  rng: Array


# ----------------------------------------------------------------------------- schedules and optimizers


def scaled_learning_rate(base_lr: float, batch_size: int) -> float:
  """Linear scaling rule of the paper: `base_lr` is per 256 images."""
  return base_lr * batch_size / 256.0


def learning_rate_schedule(
  base_lr: float,
  batch_size: int,
  steps_per_epoch: int,
  total_steps: int,
  warmup_epochs: float = 5.0,
  schedule: str = "exponential",
  decay_epochs: float = 2.4,
  decay_factor: float = 0.97,
) -> optax.Schedule:
  """Linear warmup from 0, then staircase exponential decay or cosine, as the official TF code.

  As in TF (`efficientnet/utils.py: build_learning_rate`) the decay is a function of the *global* step; the
  warmup only replaces it for step < warmup_steps. So with 5 warmup epochs and decay every 2.4 epochs, the
  first post-warmup lr is peak * 0.97**2, and cosine reaches 0 at `total_steps`.
  """
  peak = scaled_learning_rate(base_lr, batch_size)
  if schedule == "exponential":
    decay = optax.exponential_decay(
      peak, transition_steps=max(1, int(decay_epochs * steps_per_epoch)), decay_rate=decay_factor, staircase=True
    )
  elif schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps=max(1, total_steps))
  else:
    raise ValueError(f"Unknown learning-rate schedule {schedule!r}; use 'exponential' or 'cosine'.")
  warmup_steps = int(warmup_epochs * steps_per_epoch)
  if warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  # join_schedules hands the second schedule `step - warmup_steps`; shift back to the global step.
  return optax.join_schedules([warmup, lambda s: decay(s + warmup_steps)], [warmup_steps])


def weight_decay_mask(params: Any) -> Any:
  """True for every parameter except batch-norm scale / bias (modules named '*_bn').

  As the official code (L2 on all trainable variables whose name lacks 'batch_normalization'), biases of
  the squeeze-excite convolutions and the classifier are decayed.
  """

  def decayed(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    return not any(n.endswith("_bn") for n in names)

  return jax.tree_util.tree_map_with_path(decayed, params)


def frozen_labels(pattern: str) -> Callable[[Any], Any]:
  """params -> 'frozen' where the regex `pattern` matches (re.search) the parameter's '/'-joined path
  ('blocks_3/expand_conv/kernel'), else 'train': optax.multi_transform's labels."""
  regex = re.compile(pattern)
  return lambda params: flax.traverse_util.path_aware_map(
    lambda path, _: "frozen" if regex.search("/".join(path)) else "train", params
  )


def create_optimizer(
  name: str,
  schedule: optax.ScalarOrSchedule,
  weight_decay: float = 1e-5,
  *,
  momentum: float = 0.9,
  rmsprop_decay: float = 0.9,
  epsilon: float = 1e-3,
  nesterov: bool = False,
  frozen: str = "",
) -> optax.GradientTransformation:
  """'rmsprop' (TF-style), 'sgd' (momentum, optional Nesterov) or 'adamw'.

  For rmsprop and sgd the weight decay is `optax.add_decayed_weights` *before* the optimizer, i.e. the
  gradient of TF's `weight_decay * sum(v**2) / 2` loss term: the same update as the official code. For adamw
  it is AdamW's decoupled decay (scaled by the learning rate). Either way batch-norm parameters are exempt.
  `frozen`: a regex over parameter paths (see `frozen_labels`) whose parameters get no update at all (FixRes-
  style fine-tuning keeps the shallow layers fixed); their batch-norm statistics still follow the data.

  TF's RMSProp is `mom = m * mom + lr * g / sqrt(ms + eps)` with ms initialised to 1; optax's rmsprop with
  eps_in_sqrt and initial_scale=1 matches it except that lr multiplies after the momentum (identical for a
  constant lr, a tiny difference while the lr changes).
  """
  tx = _optimizer(name, schedule, weight_decay, momentum, rmsprop_decay, epsilon, nesterov)
  if not frozen:
    return tx
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, frozen_labels(frozen))


def _optimizer(name, schedule, weight_decay, momentum, rmsprop_decay, epsilon, nesterov):
  decay = optax.add_decayed_weights(weight_decay, mask=weight_decay_mask) if weight_decay else optax.identity()
  if name == "rmsprop":
    opt = optax.rmsprop(
      schedule,
      decay=rmsprop_decay,
      eps=epsilon,
      initial_scale=1.0,
      eps_in_sqrt=True,
      momentum=momentum,
      nesterov=nesterov,
    )
    return optax.chain(decay, opt)
  if name == "sgd":
    return optax.chain(decay, optax.sgd(schedule, momentum=momentum, nesterov=nesterov))
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=weight_decay, mask=weight_decay_mask, nesterov=nesterov)
  raise ValueError(f"Unknown optimizer {name!r}; use 'rmsprop', 'sgd' or 'adamw'.")


# ----------------------------------------------------------------------------- EMA


def ema_decay_at(step: Array, decay: float) -> Array:
  """TF's ExponentialMovingAverage(num_updates=step): min(decay, (1 + step) / (10 + step)).

  Early on the average follows the weights closely, so EMA weights are usable from the first epochs.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, new: Any, decay: Array) -> Any:
  """decay * ema + (1 - decay) * new, leaf-wise."""
  return optax.incremental_update(new, ema, step_size=1.0 - decay)


# ----------------------------------------------------------------------------- state


def _key_data(rng: Array) -> Array:
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return jnp.asarray(rng, jnp.uint32)


def _initial_state(model: nn.Module, tx: optax.GradientTransformation, image_size: int, rng: Array) -> TrainState:
  init_rng, train_rng = jax.random.split(rng)
  # Parameters drawn with XLA's RngBitGenerator ('rbg'), seeded from the threefry key: one op per draw
  # compiles about twice as fast on CPU as threefry's unrolled rounds (init otherwise dominates start-up).
  init_rng = jax.random.wrap_key_data(jax.random.bits(init_rng, (4,), jnp.uint32), impl="rbg")
  variables = model.init(init_rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  # EMA copies are distinct arrays (x + 0 is not aliased), so the donated state never repeats a buffer.
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=tx.init(params),
    ema_params=jax.tree.map(jnp.copy, params),
    ema_batch_stats=jax.tree.map(jnp.copy, batch_stats),
    rng=train_rng,
  )


def create_train_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  rng: Array,
  image_size: int,
  mesh: Optional[Mesh] = None,
  param_sharding: str = "replicate",
) -> TrainState:
  """Initialises variables under jit (eager init of EfficientNet is far slower on CPU).

  With `mesh`, the state is created on it directly, replicated or sharded by `param_sharding` ('replicate' or
  'fsdp', see sharding.state_shardings); every process computes the same values from the same key, the
  multi-host way. Without, it lands on the default device (`replicate` moves it).
  """
  init = functools.partial(_initial_state, model, tx, image_size)
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  out_shardings = None
  if mesh is not None:
    out_shardings = sharding.state_shardings(jax.eval_shape(init, rng), mesh, param_sharding)
  state = jax.jit(init, out_shardings=out_shardings)(rng)
  return state.replace(rng=_key_data(state.rng))


def abstract_train_state(
  model: nn.Module, tx: optax.GradientTransformation, image_size: int, mesh: Mesh, param_sharding: str = "replicate"
) -> TrainState:
  """The train state as ShapeDtypeStructs with the shardings `create_train_state` gives it on `mesh`, computing
  nothing: what compiling the step ahead of time, for devices this host does not have, needs."""

  def initial_state():
    state = _initial_state(model, tx, image_size, jax.random.key(0))
    return state.replace(rng=_key_data(state.rng))

  shapes = jax.eval_shape(initial_state)
  shardings = sharding.state_shardings(shapes, mesh, param_sharding)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def replicate(state: TrainState, mesh: Mesh) -> TrainState:
  """Places a single-host state on every device of `mesh` (fresh buffers: safe to donate)."""
  host = jax.device_get(state)
  return jax.device_put(host, NamedSharding(mesh, PartitionSpec()))


def eval_variables(state: TrainState) -> Dict[str, Any]:
  """The EMA weights: what evaluation, labeling and released checkpoints use."""
  return {"params": state.ema_params, "batch_stats": state.ema_batch_stats}


# ----------------------------------------------------------------------------- loss


def smooth_labels(one_hot: Array, label_smoothing: float) -> Array:
  """t * (1 - ls) + ls / C, as tf.losses.softmax_cross_entropy(label_smoothing=ls)."""
  num_classes = one_hot.shape[-1]
  return one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes


def cross_entropy(logits: Array, targets: Array) -> Array:
  """Per-row soft cross-entropy -sum(t * log_softmax(z))."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def mixed_targets(targets: Array, is_labeled: Array, label_smoothing: float) -> Array:
  """Labeled rows get label smoothing; pseudo-labeled rows keep the teacher's distribution."""
  return jnp.where(is_labeled[:, None], smooth_labels(targets, label_smoothing), targets)


def loss_fn(
  params: Any,
  batch_stats: Any,
  batch: Mapping[str, Array],
  rng: Array,
  *,
  model: nn.Module,
  label_smoothing: float = 0.1,
  normalization: str = "imagenet",
) -> Tuple[Array, Tuple[Any, Metrics]]:
  """Mean loss over the concatenated labeled + pseudo-labeled batch (one forward pass, shared BN stats).

  uint8 pixels are standardized here, on the device (a quarter of the bytes a float32 batch moves); a float
  batch is taken as standardized already.
  """
  images = normalization_lib.model_input(batch["image"], normalization)
  logits, new_vars = model.apply(
    {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"], rngs={"dropout": rng}
  )
  is_labeled = batch["is_labeled"].astype(bool)
  per_row = cross_entropy(logits, mixed_targets(batch["targets"], is_labeled, label_smoothing))
  loss = jnp.mean(per_row)
  labeled = is_labeled.astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == jnp.argmax(batch["targets"], -1)).astype(jnp.float32)
  n_labeled = jnp.sum(labeled)
  metrics = {
    "loss": loss,
    "labeled_loss": jnp.sum(per_row * labeled) / jnp.maximum(n_labeled, 1.0),
    "unlabeled_loss": jnp.sum(per_row * (1 - labeled)) / jnp.maximum(jnp.sum(1 - labeled), 1.0),
    "accuracy": jnp.sum(correct * labeled) / jnp.maximum(n_labeled, 1.0),
  }
  return loss, (new_vars["batch_stats"], metrics)


# ----------------------------------------------------------------------------- steps


def train_step(
  state: TrainState,
  batch: Mapping[str, Array],
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  label_smoothing: float = 0.1,
  ema_decay: float = 0.9999,
  schedule: Optional[optax.Schedule] = None,
  normalization: str = "imagenet",
) -> Tuple[TrainState, Metrics]:
  """One optimizer step plus the EMA update. Pure; `make_train_step` compiles it over a mesh. uint8 images
  are standardized with `normalization` (config.data.normalization) first."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  grad_fn = jax.value_and_grad(
    functools.partial(loss_fn, model=model, label_smoothing=label_smoothing, normalization=normalization), has_aux=True
  )
  (_, (batch_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, batch, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, ema_decay)
  metrics = dict(metrics, grad_norm=optax.global_norm(grads), ema_decay=decay)
  if schedule is not None:
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    batch_stats=batch_stats,
    opt_state=opt_state,
    ema_params=ema_update(state.ema_params, params, decay),
    ema_batch_stats=ema_update(state.ema_batch_stats, batch_stats, decay),
  )
  return new_state, metrics


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  *,
  label_smoothing: float = 0.1,
  ema_decay: float = 0.9999,
  schedule: Optional[optax.Schedule] = None,
  state_shardings: Any = None,
  normalization: str = "imagenet",
) -> Callable:
  """`train_step` jitted over `mesh`: batch sharded over ('data', 'fsdp'), state donated and kept in
  `state_shardings` (a pytree of shardings like the state's, e.g. `jax.tree.map(lambda x: x.sharding,
  state)` of an fsdp state; default: replicated)."""
  sharding.check_auto_axes(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  state_sharding = replicated if state_shardings is None else state_shardings
  step = functools.partial(
    train_step,
    model=model,
    tx=tx,
    label_smoothing=label_smoothing,
    ema_decay=ema_decay,
    schedule=schedule,
    normalization=normalization,
  )
  return jax.jit(
    step,
    in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
    out_shardings=(state_sharding, replicated),
    donate_argnums=(0,),
  )
