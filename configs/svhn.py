"""python -m noisy_student --config=configs/svhn.py --workdir=workdirs/svhn (teacher 97.9%, student 98.6%)

The official Noisy Student SVHN recipe: EfficientNet-B0 on 32x32 images with the small-image network,
labeled batch 128, train split labeled, `extra` (531,131 images) as the unlabeled pool, soft pseudo-labels at
temperature 1; the student (`:student`) with unlabeled ratio 5, RandAugment N=2 M=5 and weight decay 1e-4
as the official svhn_offline.sh (its `final_base_lr=0.0002` is not mirrored: the decay schedule stays
ours). No flips (digits). SVHN's own input mean/std (`normalization='svhn'`), as the official code and its
released teacher. The step count is our choice (the official script sets none in its flags): 100 epochs of
the labeled set.
The whole loop (teacher, labeling, selection, students at ratio 5): `configs/svhn.py:student
--config.mode=iterate` (the students' RandAugment then also noises the teacher, as the paper's baselines;
without `:student` the students are noised by dropout and stochastic depth only).
"""

from noisy_student.config_defaults import base_config


def get_config(arg=None):
  c = base_config()
  c.model.update(name="efficientnet-b0", num_classes=10, image_size=32, small_image=True)
  c.data.update(
    labeled="tfds:svhn_cropped:train",
    unlabeled_source="tfds:svhn_cropped:extra",
    eval="tfds:svhn_cropped:test",
    labeled_batch=128,
    eval_batch=1000,
    crop="pad_crop",
    eval_crop="resize",
    flip=False,
    ratio=0,
    normalization="svhn",
  )
  c.num_epochs = 100.0
  c.iterate.ratio = 5  # the students of mode=iterate, as the official svhn_offline.sh
  if arg == "student":  # the official local_scripts/svhn/svhn_offline.sh
    c.data.ratio = 5
    c.data.randaugment_layers = 2
    c.data.randaugment_magnitude = 5.0
    c.optimizer.weight_decay = 1e-4
  elif arg:
    raise ValueError(f"Unknown svhn.py variant {arg!r}; use 'student' or nothing.")
  return c
