"""python -m noisy_student --config=configs/cifar10.py --workdir=workdirs/cifar10  (teacher on 4,000 labels;
about 85% test top-1 expected for a WRN-sized model, not measured for EfficientNet-B0 here)

CIFAR-10 with 4,000 labels (train[:4000]); the other 46,000 training images are the unlabeled pool the
teacher labels (data.unlabeled_source), and a student reads them back as TFRecords (data.unlabeled, ratio).
32x32 inputs with the small-image network (stride 1 in stages 2 and 3) and reflect-pad-4 random crops, as
the official small-image path. Batch, lr and steps are our choice: the reference gives no CIFAR recipe.
The whole loop (teacher, labeling, selection, students at ratio 5): `configs/cifar10.py:student
--config.mode=iterate` (the students' RandAugment then also noises the teacher, as the paper's baselines;
without `:student` the students are noised by dropout and stochastic depth only).
"""

from noisy_student.config_defaults import base_config


def get_config(arg=None):
  c = base_config()
  c.model.update(name="efficientnet-b0", num_classes=10, image_size=32, small_image=True, bn_momentum=0.99)
  c.data.update(
    labeled="tfds:cifar10:train[:4000]",
    unlabeled_source="tfds:cifar10:train[4000:]",
    eval="tfds:cifar10:test",
    labeled_batch=128,
    eval_batch=1000,
    crop="pad_crop",
    eval_crop="resize",
    ratio=0,
    global_order=True,
  )  # small: same batches on any host count
  c.optimizer.update(warmup_epochs=5.0)
  c.num_epochs = 300.0
  c.iterate.ratio = 5  # the students of mode=iterate, as the `student` variant
  if arg == "student":
    c.data.ratio = 5
    c.data.randaugment_layers = 2
    c.data.randaugment_magnitude = 15.0
  elif arg:
    raise ValueError(f"Unknown cifar10.py variant {arg!r}; use 'student' or nothing.")
  return c
