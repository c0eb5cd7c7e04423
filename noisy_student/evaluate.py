"""Evaluation: top-1 / top-5 over an eval source, and the robustness suites the paper reports.

Noisy Student's robustness results (Xie et al., 2020, section 4) are ImageNet-A top-1, ImageNet-C mCE and
ImageNet-P mFR. ImageNet-A and ImageNet-R hold 200 of ImageNet's 1,000 classes; as their authors evaluate,
the 1000-way logits are restricted to those classes before ranking. ImageNet-C's mean corruption error (mCE,
Hendrycks & Dietterich, 2019) divides each corruption's top-1 error, summed over severities 1-5, by
AlexNet's, and averages over the 15 benchmark corruptions. ImageNet-P's mean flip rate (mFR,
same paper) is computed in imagenet_p.py; this module runs it as one more suite.
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from noisy_student import data as data_lib
from noisy_student import imagenet_p, inference, sharding
from noisy_student import normalization as normalization_lib

Array = jax.Array

# ImageNet class indices of ImageNet-A's and ImageNet-R's 200 classes (their labels in tfds are these indices).
IMAGENET_A_CLASSES = (
  6,
  11,
  13,
  15,
  17,
  22,
  23,
  27,
  30,
  37,
  39,
  42,
  47,
  50,
  57,
  70,
  71,
  76,
  79,
  89,
  90,
  94,
  96,
  97,
  99,
  105,
  107,
  108,
  110,
  113,
  124,
  125,
  130,
  132,
  143,
  144,
  150,
  151,
  207,
  234,
  235,
  254,
  277,
  283,
  287,
  291,
  295,
  298,
  301,
  306,
  307,
  308,
  309,
  310,
  311,
  313,
  314,
  315,
  317,
  319,
  323,
  324,
  326,
  327,
  330,
  334,
  335,
  336,
  347,
  361,
  363,
  372,
  378,
  386,
  397,
  400,
  401,
  402,
  404,
  407,
  411,
  416,
  417,
  420,
  425,
  428,
  430,
  437,
  438,
  445,
  456,
  457,
  461,
  462,
  470,
  472,
  483,
  486,
  488,
  492,
  496,
  514,
  516,
  528,
  530,
  539,
  542,
  543,
  549,
  552,
  557,
  561,
  562,
  569,
  572,
  573,
  575,
  579,
  589,
  606,
  607,
  609,
  614,
  626,
  627,
  640,
  641,
  642,
  643,
  658,
  668,
  677,
  682,
  684,
  687,
  701,
  704,
  719,
  736,
  746,
  749,
  752,
  758,
  763,
  765,
  768,
  773,
  774,
  776,
  779,
  780,
  786,
  792,
  797,
  802,
  803,
  804,
  813,
  815,
  820,
  823,
  831,
  833,
  835,
  839,
  845,
  847,
  850,
  859,
  862,
  870,
  879,
  880,
  888,
  890,
  897,
  900,
  907,
  913,
  924,
  932,
  933,
  934,
  937,
  943,
  945,
  947,
  951,
  954,
  956,
  957,
  959,
  971,
  972,
  980,
  981,
  984,
  986,
  987,
  988,
)
IMAGENET_R_CLASSES = (
  1,
  2,
  4,
  6,
  8,
  9,
  11,
  13,
  22,
  23,
  26,
  29,
  31,
  39,
  47,
  63,
  71,
  76,
  79,
  84,
  90,
  94,
  96,
  97,
  99,
  100,
  105,
  107,
  113,
  122,
  125,
  130,
  132,
  144,
  145,
  147,
  148,
  150,
  151,
  155,
  160,
  161,
  162,
  163,
  171,
  172,
  178,
  187,
  195,
  199,
  203,
  207,
  208,
  219,
  231,
  232,
  234,
  235,
  242,
  245,
  247,
  250,
  251,
  254,
  259,
  260,
  263,
  265,
  267,
  269,
  276,
  277,
  281,
  288,
  289,
  291,
  292,
  293,
  296,
  299,
  301,
  308,
  309,
  310,
  311,
  314,
  315,
  319,
  323,
  327,
  330,
  334,
  335,
  337,
  338,
  340,
  341,
  344,
  347,
  353,
  355,
  361,
  362,
  365,
  366,
  367,
  368,
  372,
  388,
  390,
  393,
  397,
  401,
  407,
  413,
  414,
  425,
  428,
  430,
  435,
  437,
  441,
  447,
  448,
  457,
  462,
  463,
  469,
  470,
  471,
  472,
  476,
  483,
  487,
  515,
  546,
  555,
  558,
  570,
  579,
  583,
  587,
  593,
  594,
  596,
  609,
  613,
  617,
  621,
  629,
  637,
  657,
  658,
  701,
  717,
  724,
  763,
  768,
  774,
  776,
  779,
  780,
  787,
  805,
  812,
  815,
  820,
  824,
  833,
  847,
  852,
  866,
  875,
  883,
  889,
  895,
  907,
  928,
  931,
  932,
  933,
  934,
  936,
  937,
  943,
  945,
  947,
  948,
  949,
  951,
  953,
  954,
  957,
  963,
  965,
  967,
  980,
  981,
  983,
  988,
)

# AlexNet's top-1 error on each ImageNet-C benchmark corruption, averaged over severities 1-5 (the mCE
# denominators published with the benchmark).
ALEXNET_CORRUPTION_ERROR = {
  "gaussian_noise": 0.886428,
  "shot_noise": 0.894468,
  "impulse_noise": 0.922640,
  "defocus_blur": 0.819880,
  "glass_blur": 0.826268,
  "motion_blur": 0.785948,
  "zoom_blur": 0.798360,
  "snow": 0.866816,
  "frost": 0.826572,
  "fog": 0.819324,
  "brightness": 0.564592,
  "contrast": 0.853204,
  "elastic_transform": 0.646056,
  "pixelate": 0.717840,
  "jpeg_compression": 0.606500,
}
IMAGENET_C_CORRUPTIONS = tuple(ALEXNET_CORRUPTION_ERROR)
IMAGENET_C_SEVERITIES = (1, 2, 3, 4, 5)

# Suite name -> (tfds source, class subset of the 1000-way logits, eval crop). ImageNet-C's images and
# ImageNet-P's frames are already 224x224 crops, so they are resized whole to the model's size rather than
# center-cropped again (the paper evaluates L2 there at its training size, not the fine-tuned 800).
# ImageNet-P's source is its folder, config.evaluate.imagenet_p_dir.
SUITES = {
  "imagenet_a": ("tfds:imagenet_a:test", IMAGENET_A_CLASSES, "center"),
  "imagenet_r": ("tfds:imagenet_r:test", IMAGENET_R_CLASSES, "center"),
  "imagenet_v2": ("tfds:imagenet_v2:test", None, "center"),
  "imagenet_c": ("tfds:imagenet2012_corrupted/{corruption}_{severity}:validation", None, "resize"),
  "imagenet_p": (None, None, "resize"),
}


def topk_counts(
  logits: Array, labels: Array, mask: Array, class_subset: Optional[Sequence[int]] = None
) -> Dict[str, Array]:
  """Correct top-1 / top-5 counts and the example count over real (mask=1) rows.

  With `class_subset`, only those logits compete and a prediction is the class index it stands for
  (labels stay in the full label space).
  """
  labels = labels.astype(jnp.int32)
  mask = mask.astype(jnp.float32)
  classes = None
  if class_subset is not None:
    classes = jnp.asarray(class_subset, jnp.int32)
    logits = logits[:, classes]
  k = min(5, logits.shape[-1])
  _, ranked = jax.lax.top_k(logits, k)
  if classes is not None:
    ranked = classes[ranked]
  top1 = (ranked[:, 0] == labels).astype(jnp.float32)
  top5 = jnp.any(ranked == labels[:, None], axis=-1).astype(jnp.float32)
  return {"top1_correct": jnp.sum(top1 * mask), "top5_correct": jnp.sum(top5 * mask), "count": jnp.sum(mask)}


def eval_step(
  variables: Mapping[str, Any],
  batch: Mapping[str, Array],
  *,
  model,
  class_subset: Optional[Sequence[int]] = None,
  normalization: str = "imagenet",
) -> Dict[str, Array]:
  """Eval-mode (noise off) top-1 / top-5 counts of one batch of uint8 pixels (standardized here)."""
  logits = inference.make_forward(model, normalization)(variables, batch["image"])
  return topk_counts(logits, batch["label"], batch["mask"], class_subset)


def make_eval_step(
  model, mesh: Mesh, class_subset: Optional[Sequence[int]] = None, normalization: str = "imagenet"
) -> Callable:
  """`eval_step(variables, batch)` jitted over `mesh`; pass `train.eval_variables(state)` for the EMA weights.
  `normalization` names the input statistics the step standardizes the pixels with (config.data.normalization)."""
  sharding.check_auto_axes(mesh)
  normalization_lib.check_normalization(normalization)
  if class_subset is not None and max(class_subset) >= model.num_classes:
    raise ValueError(
      f"The class subset reaches class {max(class_subset)}, but the model has "
      f"{model.num_classes} classes (suites with 200-class subsets need an ImageNet model)."
    )
  replicated = NamedSharding(mesh, PartitionSpec())
  # Variables keep whatever sharding they have (replicated, or fsdp-sharded EMA weights).
  return jax.jit(
    functools.partial(eval_step, model=model, class_subset=class_subset, normalization=normalization),
    in_shardings=(None, sharding.batch_sharding(mesh)),
    out_shardings=replicated,
  )


def accumulate(totals: Optional[Dict[str, float]], counts: Mapping[str, Array]) -> Dict[str, float]:
  """Adds one batch's counts on the host (float64, so exact for any split size)."""
  counts = {k: float(v) for k, v in jax.device_get(counts).items()}
  if totals is None:
    return counts
  return {k: totals[k] + counts[k] for k in totals}


def summary(totals: Mapping[str, float]) -> Dict[str, float]:
  n = max(totals["count"], 1.0)
  return {"top1": totals["top1_correct"] / n, "top5": totals["top5_correct"] / n, "count": totals["count"]}


def evaluate(
  step: Callable, variables: Any, source: data_lib.Source, *, global_batch: int, image_size: int, crop: str, mesh: Mesh
) -> Dict[str, float]:
  """Top-1 / top-5 of `variables` over the whole source: every example counted once on any device count.
  `step` (make_eval_step) standardizes the batches' uint8 pixels with its normalization."""
  totals = None
  for batch in data_lib.eval_iterator(source, global_batch=global_batch, image_size=image_size, crop=crop, mesh=mesh):
    totals = accumulate(totals, step(variables, batch))
  return summary(totals)


def mean_corruption_error(top1: Mapping[str, Mapping[int, float]]) -> Dict[str, Any]:
  """ImageNet-C's corruption errors from top-1 accuracies {corruption: {severity: top1}}.

  Returns each corruption's CE (its errors summed over severities / AlexNet's) as 'ce', and 'mce', their mean
  over the 15 benchmark corruptions, when all of them were evaluated at all five severities (fractions: the
  paper's 28.3 is 0.283). A partial run gets 'ce_partial' / 'mce_partial' (its mean error over the severities
  it has, over AlexNet's over all five), so the two are never confused.
  """
  errors = {}
  for corruption, by_severity in top1.items():
    if corruption not in ALEXNET_CORRUPTION_ERROR:
      raise ValueError(f"Unknown ImageNet-C corruption {corruption!r}; known: {IMAGENET_C_CORRUPTIONS}.")
    mean_error = np.mean([1.0 - acc for acc in by_severity.values()])
    errors[corruption] = float(mean_error / ALEXNET_CORRUPTION_ERROR[corruption])
  complete = set(top1) == set(IMAGENET_C_CORRUPTIONS) and all(
    set(s) == set(IMAGENET_C_SEVERITIES) for s in top1.values()
  )
  suffix = "" if complete else "_partial"
  return {f"ce{suffix}": errors, f"mce{suffix}": float(np.mean(list(errors.values())))}


def _names(value: str, known: Sequence[Any], key: str, cast=str, default: Optional[Sequence[Any]] = None) -> tuple:
  """A comma list from the config, checked against the known names; '' means `default` (all of them)."""
  given = [v.strip() for v in str(value).split(",") if v.strip()]
  unknown = [v for v in given if v not in map(str, known)]
  if unknown:
    raise ValueError(f"config.evaluate.{key}: unknown {unknown}; known: {', '.join(map(str, known))}.")
  return tuple(cast(v) for v in given) or tuple(known if default is None else default)


@dataclasses.dataclass(frozen=True)
class Suites:
  """The robustness suites to run and what they read: config.evaluate, checked by parse_suites."""

  suites: Tuple[str, ...] = ()
  corruptions: Tuple[str, ...] = IMAGENET_C_CORRUPTIONS
  severities: Tuple[int, ...] = IMAGENET_C_SEVERITIES
  perturbations: Tuple[str, ...] = imagenet_p.PERTURBATIONS
  imagenet_p_dir: str = ""
  imagenet_p_difficulty: int = 1
  imagenet_p_baseline: str = ""


def parse_suites(
  suites: str = "",
  *,
  imagenet_c_corruptions: str = "",
  imagenet_c_severities: str = "",
  imagenet_p_dir: str = "",
  imagenet_p_perturbations: str = "",
  imagenet_p_difficulty: int = 1,
  imagenet_p_baseline: str = "",
  num_classes: int,
  normalization: str,
) -> Suites:
  """config.evaluate's values (its keys are these keywords: `parse_suites(**config.evaluate, ...)`), checked
  against the model's num_classes and the input normalization: errors name the config key, so a typo fails
  before training rather than after it."""
  names = _names(suites, tuple(SUITES), "suites") if suites.strip() else ()
  if names and num_classes != 1000:
    raise ValueError(
      f"config.evaluate.suites={suites!r} are ImageNet test sets (1,000 classes), but "
      f"config.model.num_classes={num_classes}; set config.evaluate.suites=''."
    )
  if names and normalization != "imagenet":
    raise ValueError(
      f"config.evaluate.suites={suites!r} are ImageNet test sets, standardized with "
      f"ImageNet's statistics, but config.data.normalization={normalization!r}."
    )
  if imagenet_p_difficulty not in (1, 2, 3):
    raise ValueError(f"config.evaluate.imagenet_p_difficulty={imagenet_p_difficulty}: expected 1, 2 or 3.")
  perturbations = _names(
    imagenet_p_perturbations,
    imagenet_p.PERTURBATIONS + imagenet_p.EXTRA,
    "imagenet_p_perturbations",
    default=imagenet_p.PERTURBATIONS,
  )
  if "imagenet_p" in names:  # what would fail after training fails now
    imagenet_p.check_inputs(imagenet_p_dir, perturbations, imagenet_p_difficulty, imagenet_p_baseline)
  return Suites(
    suites=names,
    corruptions=_names(imagenet_c_corruptions, IMAGENET_C_CORRUPTIONS, "imagenet_c_corruptions"),
    severities=_names(imagenet_c_severities, IMAGENET_C_SEVERITIES, "imagenet_c_severities", int),
    perturbations=perturbations,
    imagenet_p_dir=imagenet_p_dir,
    imagenet_p_difficulty=imagenet_p_difficulty,
    imagenet_p_baseline=imagenet_p_baseline,
  )


def robustness(
  model,
  variables: Any,
  suites: Suites,
  mesh: Mesh,
  *,
  data_dir: Optional[str],
  image_size: int,
  global_batch: int,
  normalization: str = "imagenet",
) -> Dict[str, Any]:
  """The suites of `suites` (parse_suites) for eval-mode `variables`, at the eval batch and image size.

  Each suite's tfds dataset must be prepared (`tfds build`), as for any source; results are keyed by suite.
  """
  results = {}
  for suite in suites.suites:
    spec, classes, crop = SUITES[suite]
    if suite == "imagenet_p":
      results[suite] = imagenet_p.evaluate(
        model,
        variables,
        mesh,
        suites.imagenet_p_dir,
        suites.perturbations,
        global_batch=global_batch,
        image_size=image_size,
        difficulty=suites.imagenet_p_difficulty,
        baseline=suites.imagenet_p_baseline,
        normalization=normalization,
      )
      continue
    step = make_eval_step(model, mesh, classes, normalization)
    run = lambda spec: evaluate(
      step,
      variables,
      data_lib.open_source(spec, data_dir=data_dir),
      mesh=mesh,
      global_batch=global_batch,
      image_size=image_size,
      crop=crop,
    )
    if suite != "imagenet_c":
      results[suite] = run(spec)
      continue
    top1 = {
      c: {s: run(spec.format(corruption=c, severity=s))["top1"] for s in suites.severities} for c in suites.corruptions
    }
    results[suite] = dict(
      mean_corruption_error(top1), top1={f"{c}_{s}": v for c, by_s in top1.items() for s, v in by_s.items()}
    )
  return results
