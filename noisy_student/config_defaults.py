"""The key layout every config shares (the jobs — trainer, label, iterate — and __main__ read exactly these keys).

In the package, not in configs/, because config files are loaded by path and cannot import each other.
"""

from typing import Any, Dict

import ml_collections

MODES = ("train", "evaluate", "label", "iterate", "compile")


def base_config() -> ml_collections.ConfigDict:
  """Defaults of the paper's ImageNet recipe; task configs override what differs."""
  c = ml_collections.ConfigDict()
  c.mode = "train"
  c.seed = 0
  # dtype: of activations ('bfloat16' on TPUs for L-sized models; parameters stay float32); remat: recompute
  # each block's activations in the backward pass; conv_impl: 'auto' picks by the devices' platform.
  c.model = dict(
    name="efficientnet-b0",
    num_classes=1000,
    dropout_rate=0.2,
    survival_prob=0.8,
    bn_momentum=0.99,
    image_size=224,
    small_image=False,
    dtype="float32",
    remat=False,
    conv_impl="auto",
  )
  # unlabeled: pseudo-labeled TFRecord glob (a student); unlabeled_source: raw images the teacher labels.
  # global_order: every process reads the train sources whole, so batches are the same on any number of
  # processes (for datasets small enough to cache); False: each process reads only its own part.
  # normalization: the input mean/std, 'imagenet' or 'svhn' (normalization.NORMALIZATIONS, the official code's).
  c.data = dict(
    labeled="",
    unlabeled="",
    unlabeled_source="",
    eval="",
    ratio=0,
    labeled_batch=2048,
    eval_batch=1024,
    randaugment_layers=0,
    randaugment_magnitude=0.0,
    crop="inception",
    eval_crop="center",
    flip=True,
    data_dir="",
    global_order=False,
    normalization="imagenet",
  )
  # frozen: regex over parameter paths ('blocks_3/expand_conv/kernel') that get no updates (fine-tuning).
  c.optimizer = dict(
    name="rmsprop",
    base_lr=0.016,
    weight_decay=1e-5,
    warmup_epochs=5.0,
    schedule="exponential",
    ema_decay=0.9999,
    label_smoothing=0.1,
    frozen="",
  )
  # init_from: an exported model (WORKDIR/export of a finished run) whose weights a fresh run starts from.
  c.init_from = ""
  c.num_train_steps = 0  # > 0 overrides num_epochs
  c.num_epochs = 350.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = 0
  # fsdp: devices per model replica on the mesh's 'fsdp' axis; param_sharding 'fsdp' shards large arrays over
  # it (L0-L2), 'replicate' keeps a full copy per device.
  c.mesh = dict(fsdp=1, param_sharding="replicate")
  # Robustness suites evaluated after training and in mode='evaluate' (evaluate.SUITES: imagenet_a,
  # imagenet_r, imagenet_v2, imagenet_c, imagenet_p); ImageNet-C corruptions / severities: comma lists,
  # '' = all. imagenet_p reads the videos of imagenet_p_dir/PERTURBATION/WNID/*.mp4 (perturbations: a comma
  # list, '' = the 10 benchmark ones); difficulty 2 or 3 compares non-noise frames that far apart (harder
  # noise sequences are their own folders, e.g. gaussian_noise_2). imagenet_p_baseline: a JSON of another
  # model's flip probabilities / top-5 distances (AlexNet's for the benchmark's mFR, or an eval.json).
  c.evaluate = dict(
    suites="",
    imagenet_c_corruptions="",
    imagenet_c_severities="",
    imagenet_p_dir="",
    imagenet_p_perturbations="",
    imagenet_p_difficulty=1,
    imagenet_p_baseline="",
  )
  # mode='label': the teacher (config.model) from teacher_workdir/export over data.unlabeled_source.
  # micro_batch: images per forward pass within a device's rows (0: ~8 at 224 px on CPU, all elsewhere).
  # read_ahead_batches: batches the input decodes ahead of the model, from the job's start, while the teacher
  # loads and compiles; they wait on the devices (0: as many as fit 256 MiB of uint8 pixels, at least 1).
  c.label = dict(
    teacher_workdir="",
    temperature=1.0,
    hard=False,
    top_k=0,
    batch=0,
    micro_batch=0,
    read_ahead_batches=0,
    shards_per_process=4,
    num_bins=100,
    log_every_batches=50,
    log_every_secs=60.0,
  )
  # mode='compile': the steps of config.compile.stages (train, label, eval) compiled ahead of time for a TPU
  # slice (topology 'v3:32x32', 'v5p:4x4x4', ...; v4 needs chip_config_name='megacore'), reported per device.
  c.compile = dict(topology="", stages="train,label,eval", chip_config_name="")
  # Which pseudo-labels a student trains on (computed from the labels' stats.json); enabled=False uses all.
  c.select = dict(enabled=True, threshold=0.3, per_class=0, balance=True)
  # mode='iterate': teacher -> (label -> select -> student) x num_iterations, one stage folder each.
  # student_models / student_image_sizes: comma lists, one entry per iteration ('' = the teacher's).
  c.iterate = dict(
    num_iterations=2,
    ratio=3,
    student_models="",
    student_image_sizes="",
    student_noise=True,
    student_num_train_steps=0,
    teacher_checkpoint="",
  )
  return c


def selection_arguments(select: ml_collections.ConfigDict) -> Dict[str, Any]:
  """`pseudo_labels.select`'s arguments from a config's `select` block."""
  return dict(threshold=select.threshold, per_class=select.per_class, balance=select.balance)


def model_arguments(model: ml_collections.ConfigDict) -> Dict[str, Any]:
  """`models.create_model`'s arguments from a config's `model` block: the EfficientNet it names with its
  noise knobs (dropout, stochastic depth, BN momentum) and compute settings. Training runs it noised,
  labeling with train=False."""
  return dict(
    name=model.name,
    num_classes=model.num_classes,
    dropout_rate=model.dropout_rate,
    survival_prob=model.survival_prob,
    bn_momentum=model.bn_momentum,
    small_image=model.small_image,
    dtype=model.dtype,
    remat=model.remat,
    conv_impl=model.conv_impl,
  )
