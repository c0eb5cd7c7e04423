"""python -m noisy_student --config=configs/imagenet.py:model=b7,stage=student --workdir=gs://BUCKET/b7 \
--config.data.unlabeled='gs://BUCKET/labels/labels-*.tfrecord'  (Noisy Student B7: 86.9% top-1)

Variants `model=b0..b7,l0,l1,l2` and `stage=teacher|student|finetune`. `stage=finetune` is the paper's last step
(FixRes-style): 1.5 epochs at the test resolution (L2: 800) on un-augmented labeled images with the shallow
layers fixed, from a finished run: `--config.init_from=gs://BUCKET/l2/export` (paper: L2 88.2 -> 88.4). Our
choices where the reference is silent: stem + stages 1-3 frozen, a tenth of the training lr without warmup,
the eval center crop without flips, dropout and stochastic depth kept. For b0-b7 the test resolution is the
training one, so there it only fine-tunes on un-augmented images. Numbers from docs/efficientnet.md
and the Noisy Student paper: RMSProp, lr 0.016 per 256 labeled images, labeled batch 2048, 5-epoch warmup,
x0.97 every 2.4 epochs, EMA 0.9999, label smoothing 0.1, dropout per model, stochastic depth 0.8;
unlabeled batch = ratio x labeled, ratio 1 for small models and 3 for B7/L0/L1/L2. Students get RandAugment
(2 layers, magnitude 27 as the paper; the teacher is trained un-noised by input here, our choice), the paper's
350 epochs for students larger than B4 and 700 for smaller ones; teachers 350 epochs (our choice where the
reference is silent). Released-checkpoint top-1: b0 78.8 b1 81.5 b2 82.4 b3 84.1 b4 85.3 b5 86.1 b6 86.4
b7 86.9, l2 88.4 (800px test). Robustness (`--config.evaluate.suites=imagenet_a,imagenet_c,imagenet_p`, with
`--config.evaluate.imagenet_p_dir` and `imagenet_p_baseline` for ImageNet-P), paper's L2 student: ImageNet-A
top-1 83.7, ImageNet-C mCE 28.3, ImageNet-P mFR 12.2.
"""

from noisy_student.config_defaults import base_config
from noisy_student.models.efficientnet import MODEL_SPECS, shallow_layers_pattern

# name: (train resolution, dropout, ratio)
MODELS = {
  "b0": (224, 0.2, 1),
  "b1": (240, 0.2, 1),
  "b2": (260, 0.3, 1),
  "b3": (300, 0.3, 1),
  "b4": (380, 0.4, 1),
  "b5": (456, 0.4, 1),
  "b6": (528, 0.5, 1),
  "b7": (600, 0.5, 3),
  "l0": (380, 0.5, 3),
  "l1": (380, 0.5, 3),
  "l2": (475, 0.5, 3),
}
SMALL_STUDENTS = ("b0", "b1", "b2", "b3", "b4")


def _parse(arg):
  opts = {"model": "b0", "stage": "teacher"}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in opts:
      raise ValueError(f"Unknown imagenet.py option {key!r} in {arg!r}; use model=..., stage=....")
    opts[key] = value
  if opts["model"] not in MODELS:
    raise ValueError(f"Unknown model {opts['model']!r}; use one of {', '.join(MODELS)}.")
  if opts["stage"] not in ("teacher", "student", "finetune"):
    raise ValueError(f"Unknown stage {opts['stage']!r}; use teacher, student or finetune.")
  return opts


def get_config(arg=None):
  opts = _parse(arg)
  size, dropout, ratio = MODELS[opts["model"]]
  c = base_config()
  c.model.name = f"efficientnet-{opts['model']}"
  c.model.dropout_rate = dropout
  c.model.image_size = size
  c.data.labeled = "tfds:imagenet2012:train"
  c.data.eval = "tfds:imagenet2012:validation"
  c.data.unlabeled_source = "tfds:jft:train"  # JFT is not public; point it at your unlabeled images
  if opts["model"] in ("l0", "l1", "l2"):
    c.mesh.update(fsdp=8, param_sharding="fsdp")  # shard L-sized parameters and optimizer state over 8 devices
  if opts["stage"] == "student":
    c.data.ratio = ratio
    c.data.randaugment_layers = 2
    c.data.randaugment_magnitude = 27.0
    c.num_epochs = 700.0 if opts["model"] in SMALL_STUDENTS else 350.0
  if opts["stage"] == "finetune":
    spec = MODEL_SPECS[c.model.name]
    c.model.image_size = spec.eval_resolution
    c.num_epochs = 1.5
    c.data.update(crop="center", flip=False)
    c.optimizer.update(base_lr=0.0016, warmup_epochs=0.0, frozen=shallow_layers_pattern(spec.depth, 3))
  return c
