"""python -m noisy_student --config=configs/digits.py --workdir=/tmp/digits  (test top-1 0.94-0.95)

The CPU demo: EfficientNet-tiny on the embedded scikit-learn digits (8x8 grayscale, upscaled to 16x16 RGB),
labeled data only, 300 steps of 64 images (about 15 epochs of the 1,300 training images), well under a minute
of training on 2 CPU cores after compilation. Batch-norm momentum 0.9: with the official 0.99 the moving
statistics have not converged after a few hundred steps and eval accuracy lags training badly. EMA 0.99 for
the same reason (0.9999 averages over far more steps than the run has). No horizontal flips (they change
digits).
"""

from noisy_student.config_defaults import base_config


def get_config(arg=None):
  del arg  # no variants
  c = base_config()
  c.model.update(name="efficientnet-tiny", num_classes=10, dropout_rate=0.1, survival_prob=1.0,
                 bn_momentum=0.9, image_size=16)
  c.data.update(labeled="tfds:digits:train", eval="tfds:digits:test", labeled_batch=64, eval_batch=128,
                crop="resize", eval_crop="resize", flip=False)
  c.optimizer.update(name="adamw", base_lr=0.02, weight_decay=1e-4, warmup_epochs=1.0, schedule="cosine",
                     ema_decay=0.99)
  c.num_train_steps = 300
  c.num_epochs = 0.0  # used when num_train_steps <= 0
  c.log_every_steps = 50
  c.checkpoint_every_steps = 100
  c.keep_checkpoints = 2
  return c
