"""Input pipelines (tf.data on the host CPU): sources, preprocessing, RandAugment, batches.

Importing this package hides accelerators from TensorFlow (JAX owns them) and registers the embedded
`digits` tfds builder, so "tfds:digits:train[:N]" works like any dataset.
"""

import tensorflow as tf

tf.config.set_visible_devices([], "GPU")

# After hiding the GPUs: these import TensorFlow's data stack.
from noisy_student.data import digits  # noqa: E402  (registers 'digits')
from noisy_student.data.pipeline import Noise, eval_iterator, train_batch_spec, train_iterator  # noqa: E402
from noisy_student.data.sources import DatasetNotPreparedError, Source, open_source  # noqa: E402

__all__ = [
  "Noise",
  "Source",
  "DatasetNotPreparedError",
  "digits",
  "eval_iterator",
  "open_source",
  "train_batch_spec",
  "train_iterator",
]
