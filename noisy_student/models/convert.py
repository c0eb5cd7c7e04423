"""Official TF EfficientNet checkpoints and Keras EfficientNets -> Flax variables.

Both converters work the same way: the variable tree our model expects is
built with `jax.eval_shape` (no memory, no compute), every expected variable
is looked up under its name in the source and changed to our layout, and any
variable that is missing, left over or of the wrong shape is reported, all at
once, in one ValueError that names each. Results are numpy float32 trees
`{'params': ..., 'batch_stats': ...}` that `module.apply` takes as they are.
"""

import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from noisy_student.models import efficientnet

# The default (ImageNet) normalization of our input pipeline: (x - mean * 255) / (std * 255), which Keras
# models carry as layers.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)

EMA_SUFFIX = "/ExponentialMovingAverage"

# Names of training state that is not part of the model.
_IGNORED_NAMES = frozenset({"global_step", "_CHECKPOINTABLE_OBJECT_GRAPH"})
# Optimizer slot variables are `<var>/<Slot>` or `<var>/<Slot>_1`.
_OPTIMIZER_SLOT = re.compile(r"^(RMSProp|Momentum|Adam|Adagrad|Ftrl|LARS|Lamb)(_\d+)?$")

_BN_TF = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}

Key = Tuple[str, ...]  # (collection, module, ..., leaf), as flax's flatten_dict
Variables = Dict[str, Any]


# ----------------------------------------------------------------------------
# Shared machinery.


def expected_shapes(model_name: str, num_classes: int = 1000) -> Dict[Key, jax.ShapeDtypeStruct]:
  """The flat variable tree of `create_model(model_name, num_classes)`, shapes only."""
  model = efficientnet.create_model(model_name, num_classes=num_classes)
  size = 32  # parameter shapes do not depend on the image size
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  return traverse_util.flatten_dict(dict(tree))


def _swap_last(shape: Tuple[int, ...]) -> Tuple[int, ...]:
  return tuple(shape[:-2]) + (shape[-1], shape[-2])


def _fmt(key: Key) -> str:
  return "/".join(key)


def _summarize(title: str, lines: List[str], limit: int = 25) -> str:
  shown = lines[:limit]
  more = f"\n    ... and {len(lines) - limit} more" if len(lines) > limit else ""
  return f"  {title} ({len(lines)}):\n" + "\n".join(f"    {line}" for line in shown) + more


def _assemble(
  expected: Mapping[Key, jax.ShapeDtypeStruct],
  source_name: Callable[[Key], Tuple[str, bool]],
  lookup: Callable[[str], Optional[Tuple[str, np.ndarray]]],
  leftover: Callable[[], List[Tuple[str, Tuple[int, ...]]]],
  origin: str,
  hint: str = "",
) -> Variables:
  """Fills `expected` from a source; one ValueError lists every problem.

  source_name(key) -> (name in the source, is_depthwise); lookup(name) ->
  (name actually read, array) or None; leftover() -> the source variables
  nobody read that are not training state, called after all lookups.
  """
  missing, misshaped, out = [], [], {}
  for key, spec in expected.items():
    name, depthwise = source_name(key)
    want = _swap_last(spec.shape) if depthwise else tuple(spec.shape)
    found = lookup(name)
    if found is None:
      missing.append(f"{name} (expected shape {list(want)}, for {_fmt(key)})")
      continue
    read_name, value = found
    if tuple(value.shape) != want:
      misshaped.append(f"{read_name}: expected shape {list(want)}, found {list(value.shape)} (for {_fmt(key)})")
      continue
    value = np.asarray(value)
    if depthwise:  # [k, k, C, 1] -> [k, k, 1, C]
      value = np.swapaxes(value, -1, -2)
    out[key] = np.ascontiguousarray(value, dtype=spec.dtype)
  extra = [f"{name} (shape {list(shape)})" for name, shape in leftover()]
  if missing or misshaped or extra:
    parts = [f"{origin} does not match the model:"]
    if missing:
      parts.append(_summarize("missing", missing))
    if misshaped:
      parts.append(_summarize("wrong shape", misshaped))
    if extra:
      parts.append(_summarize("unexpected (not used by the model)", extra))
    if hint:
      parts.append(hint)
    raise ValueError("\n".join(parts))
  return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------
# Official TF checkpoints.


def _tf_module_names(block_has_expand: bool) -> Dict[str, str]:
  """Our block sub-module -> the official TF layer name (numbered in creation order)."""
  if block_has_expand:
    return {
      "expand_conv": "conv2d",
      "expand_bn": "tpu_batch_normalization",
      "depthwise_conv": "depthwise_conv2d",
      "depthwise_bn": "tpu_batch_normalization_1",
      "project_conv": "conv2d_1",
      "project_bn": "tpu_batch_normalization_2",
    }
  return {
    "depthwise_conv": "depthwise_conv2d",
    "depthwise_bn": "tpu_batch_normalization",
    "project_conv": "conv2d",
    "project_bn": "tpu_batch_normalization_1",
  }


def tf_name(key: Key, block_has_expand: bool = True) -> Tuple[str, bool]:
  """Our flat variable key -> (official TF name without model prefix, is_depthwise)."""
  _, module, *rest = key
  leaf = rest[-1]
  sub = rest[:-1]

  def bn(layer):
    return f"{layer}/{_BN_TF[leaf]}", False

  if module == "stem_conv":
    return "stem/conv2d/kernel", False
  if module == "stem_bn":
    return bn("stem/tpu_batch_normalization")
  if module == "head_conv":
    return "head/conv2d/kernel", False
  if module == "head_bn":
    return bn("head/tpu_batch_normalization")
  if module == "classifier":
    return f"head/dense/{leaf}", False
  if module.startswith("blocks_") and sub:
    if sub[0] == "se" and len(sub) == 2:
      layer = {"reduce": "conv2d", "expand": "conv2d_1"}[sub[1]]
      return f"{module}/se/{layer}/{leaf}", False
    layer = _tf_module_names(block_has_expand).get(sub[0])
    if layer is not None:
      if sub[0].endswith("_bn"):
        return bn(f"{module}/{layer}")
      if sub[0] == "depthwise_conv":
        return f"{module}/{layer}/depthwise_kernel", True
      return f"{module}/{layer}/kernel", False
  raise ValueError(f"No official TF name is known for model variable {_fmt(key)}")


def is_training_state(name: str) -> bool:
  """Optimizer slots and step counters: present in training checkpoints, not model variables."""
  if name in _IGNORED_NAMES or name.endswith("/global_step"):
    return True
  return any(_OPTIMIZER_SLOT.match(part) for part in name.split("/"))


def tf_variables_to_flax(
  variables: Mapping[str, np.ndarray], model_name: str, num_classes: Optional[int] = None
) -> Variables:
  """Official TF EfficientNet variables (name -> array) -> our Flax variables.

  Names carry the model prefix, e.g. `efficientnet-b0/blocks_3/conv2d/kernel`.
  Where `<name>/ExponentialMovingAverage` exists it is used instead of
  `<name>` (released checkpoints are evaluated with the EMA copies, batch norm
  moving statistics included). Optimizer slots and `global_step` are ignored;
  any other variable the model does not use, any missing one and any of the
  wrong shape is a ValueError naming it. `num_classes` defaults to the width
  of `head/dense/kernel`.
  """
  prefix = f"{model_name}/"
  if num_classes is None:
    dense = variables.get(f"{prefix}head/dense/kernel{EMA_SUFFIX}", variables.get(f"{prefix}head/dense/kernel"))
    num_classes = int(np.shape(dense)[-1]) if dense is not None else 1000
  expected = expected_shapes(model_name, num_classes)
  has_expand = {k[1] for k in expected if len(k) > 2 and k[2] == "expand_conv"}
  consumed = set()

  def source_name(key):
    name, depthwise = tf_name(key, key[1] in has_expand)
    return prefix + name, depthwise

  def lookup(name):
    for candidate in (name + EMA_SUFFIX, name):
      if candidate in variables:
        consumed.update((name, name + EMA_SUFFIX))
        return candidate, np.asarray(variables[candidate])
    return None

  def leftover():
    return [
      (n, tuple(np.shape(v))) for n, v in sorted(variables.items()) if n not in consumed and not is_training_state(n)
    ]

  prefixes = sorted({n.split("/")[0] for n in variables if "/" in n and n.startswith("efficientnet")})
  hint = ""
  if prefixes and prefixes != [model_name]:
    hint = (
      f"  note: asked for {model_name!r}; the checkpoint's variables are under {', '.join(p + '/' for p in prefixes)}"
    )
  return _assemble(expected, source_name, lookup, leftover, f"TF checkpoint variables for {model_name}", hint)


def load_tf_checkpoint(path: str, model_name: str, num_classes: Optional[int] = None) -> Variables:
  """Reads an official TF checkpoint (a directory or a prefix; gs:// works) into Flax variables.

  See tf_variables_to_flax for the name mapping and the checks.
  """
  import tensorflow as tf  # heavy; only needed here

  try:
    tf.config.set_visible_devices([], "GPU")  # TF must never take an accelerator
  except RuntimeError:  # TF already initialized its devices; whoever did chose them
    pass
  try:
    reader = tf.train.load_checkpoint(path)
  except (ValueError, tf.errors.OpError) as e:
    raise ValueError(f"No TF checkpoint could be read at {path}: {e}") from e
  names = reader.get_variable_to_shape_map()
  wanted = {n for n in names if n not in _IGNORED_NAMES and not is_training_state(n)}
  variables = {n: reader.get_tensor(n) for n in sorted(wanted)}
  try:
    return tf_variables_to_flax(variables, model_name, num_classes)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


# ----------------------------------------------------------------------------
# Keras applications EfficientNetB0..B7.

_KERAS_BLOCK_LAYERS = {
  "expand_conv": "expand_conv",
  "expand_bn": "expand_bn",
  "depthwise_conv": "dwconv",
  "depthwise_bn": "bn",
  "project_conv": "project_conv",
  "project_bn": "project_bn",
}
_KERAS_TOP_LAYERS = {
  "stem_conv": "stem_conv",
  "stem_bn": "stem_bn",
  "head_conv": "top_conv",
  "head_bn": "top_bn",
  "classifier": "predictions",
}
_KERAS_INPUT_LAYERS = ("InputLayer", "Rescaling", "Normalization")


def keras_block_names(model_name: str) -> List[str]:
  """Keras's block names in our flat order: block1a, block2a, block2b, ..."""
  spec = efficientnet.MODEL_SPECS[model_name]
  names = []
  for stage, args in enumerate(efficientnet.B0_BLOCKS):
    for r in range(efficientnet.round_repeats(args.repeats, spec.depth)):
      names.append(f"block{stage + 1}{chr(ord('a') + r)}")
  return names


def _keras_model_name(layers: Mapping[str, Any]) -> str:
  """Our model name with the Keras model's stem width and block count."""
  try:
    stem = int(layers["stem_conv"].kernel.shape[-1])
  except KeyError:
    raise ValueError("Not a Keras EfficientNet: it has no layer named 'stem_conv'") from None
  blocks = {m.group(1) for n in layers if (m := re.match(r"^(block\d+[a-z])_", n))}
  matches = [
    name
    for name, spec in efficientnet.MODEL_SPECS.items()
    if efficientnet.round_filters(efficientnet.STEM_FILTERS, spec.width) == stem
    and len(keras_block_names(name)) == len(blocks)
  ]
  if len(matches) != 1:
    raise ValueError(
      f"Cannot tell which EfficientNet this Keras model is (stem width {stem}, "
      f"{len(blocks)} blocks; candidates {matches}); pass model_name"
    )
  return matches[0]


def keras_input_transform(keras_model) -> Tuple[np.ndarray, np.ndarray]:
  """Per-channel (scale, offset): the Keras stem sees `pixels * scale + offset`.

  Composes the Rescaling and Normalization layers between the Keras input and
  `stem_conv_pad`, with the values the layers actually compute with
  (Normalization divides by max(sqrt(variance), keras epsilon)). Our model
  takes that stem input directly, so feeding ours `pixels * scale + offset`
  and Keras `pixels` gives the same logits.
  """
  import keras  # only a Keras model can get here

  scale, offset = np.ones(3), np.zeros(3)
  for layer in keras_model.layers:
    if layer.name in ("stem_conv_pad", "stem_conv"):
      return scale, offset
    kind = type(layer).__name__
    if kind == "InputLayer":
      continue
    if kind == "Rescaling":
      a = np.broadcast_to(np.asarray(layer.scale, np.float64), (3,))
      b = np.broadcast_to(np.asarray(layer.offset, np.float64), (3,))
    elif kind == "Normalization":
      if getattr(layer, "invert", False):
        raise ValueError(f"Keras input layer {layer.name} is an inverted Normalization")
      mean = np.asarray(keras.ops.convert_to_numpy(layer.mean), np.float64).reshape(-1)
      var = np.asarray(keras.ops.convert_to_numpy(layer.variance), np.float64).reshape(-1)
      std = np.maximum(np.sqrt(np.broadcast_to(var, (3,))), keras.config.epsilon())
      a, b = 1.0 / std, -np.broadcast_to(mean, (3,)) / std
    else:
      raise ValueError(
        f"Keras input layer {layer.name} ({kind}) is not one of {_KERAS_INPUT_LAYERS}; cannot tell what the stem sees"
      )
    scale, offset = scale * a, offset * a + b
  raise ValueError("Not a Keras EfficientNet: no 'stem_conv_pad' / 'stem_conv' layer")


def imagenet_input_transform() -> Tuple[np.ndarray, np.ndarray]:
  """(scale, offset) of our input normalization: (x - mean * 255) / (std * 255)."""
  std = np.asarray(IMAGENET_STDDEV_RGB) * 255.0
  return 1.0 / std, -np.asarray(IMAGENET_MEAN_RGB) * 255.0 / std


def from_keras(keras_model, model_name: Optional[str] = None, check_input_normalization: bool = True) -> Variables:
  """A Keras 3 `keras.applications.EfficientNetB0..B7` -> our Flax variables.

  Keras's own input layers (Rescaling 1/255, Normalization, and for
  weights='imagenet' one more Rescaling) turn raw pixels into the stem input;
  our model takes the stem input directly. By default the Keras input
  transform must equal our ImageNet normalization (it does for
  weights='imagenet'), so Keras on raw pixels and ours on normalized pixels
  give the same logits; otherwise this is a ValueError. With
  `check_input_normalization=False` any transform is accepted and ours must be
  fed `keras_input_transform(keras_model)` applied to the pixels instead.

  Keras pads stride-2 layers for the input size it was built with (for an
  unknown size, as for even sizes), TF 'SAME' for that size; ours pads for the
  actual size. Outputs agree at the size the Keras model was built for.
  """
  layers = {layer.name: layer for layer in keras_model.layers}
  model_name = model_name or _keras_model_name(layers)
  if "predictions" not in layers:
    raise ValueError(
      "The Keras model has no 'predictions' layer (include_top=False); our model always has a classifier"
    )
  num_classes = int(layers["predictions"].kernel.shape[-1])

  if check_input_normalization:
    found = keras_input_transform(keras_model)
    want = imagenet_input_transform()
    if not all(np.allclose(f, w, rtol=1e-5, atol=1e-7) for f, w in zip(found, want)):
      raise ValueError(
        "The Keras model's input layers map pixels x to x * scale + offset with "
        f"scale={found[0].tolist()}, offset={found[1].tolist()}; our model expects the "
        f"ImageNet normalization scale={want[0].tolist()}, offset={want[1].tolist()}. "
        "Pass check_input_normalization=False and feed our model "
        "keras_input_transform(keras_model) of the pixels instead."
      )

  weights = {}  # 'layer/weight' -> keras variable
  for layer in keras_model.layers:
    if type(layer).__name__ in _KERAS_INPUT_LAYERS:
      continue  # accounted for by keras_input_transform
    for w in layer.weights:
      weights[f"{layer.name}/{w.name.split('/')[-1]}"] = w

  blocks = keras_block_names(model_name)
  consumed = set()

  def source_name(key):
    _, module, *rest = key
    leaf = rest[-1]
    if module.startswith("blocks_"):
      prefix = blocks[int(module.split("_")[1])] + "_"
      sub = rest[:-1]
      layer = prefix + ("se_" + sub[1] if sub[0] == "se" else _KERAS_BLOCK_LAYERS[sub[0]])
    else:
      layer = _KERAS_TOP_LAYERS[module]
    owner = rest[-2] if len(rest) > 1 else module  # our module holding the variable
    if owner.endswith("_bn"):
      leaf = _BN_TF[leaf]
    return f"{layer}/{leaf}", layer.endswith("_dwconv")

  def lookup(name):
    candidates = [name]
    if name.endswith("_dwconv/kernel"):  # older Keras names it depthwise_kernel
      candidates.append(name[: -len("kernel")] + "depthwise_kernel")
    for candidate in candidates:
      if candidate in weights:
        consumed.add(candidate)
        return candidate, np.asarray(weights[candidate].numpy())
    return None

  def leftover():
    return [(n, tuple(w.shape)) for n, w in weights.items() if n not in consumed]

  return _assemble(
    expected_shapes(model_name, num_classes),
    source_name,
    lookup,
    leftover,
    f"Keras model {keras_model.name!r} as {model_name}",
  )
