"""tfds builder for scikit-learn's handwritten digits: the embedded default dataset.

1,797 real 8x8 grayscale digits ship inside scikit-learn, so this dataset is prepared offline in seconds and
`tfds:digits:train[:N]` works like any tfds dataset. Pixel values 0..16 are scaled to uint8 by
round(v * 255 / 16). Images are stored with one channel; the input pipeline converts them to RGB for the
3-channel model. The train/test split is fixed (stratified by class, seed 0): 1,300 train, 497 test.

The train split is stored class-interleaved (0, 1, ..., 9, 0, 1, ...; each class in a seeded random order) and
read in that order, so `train[:10*k]` is exactly k labeled images per class and `train[10*k:]` the rest:
the semi-supervised demo's labeled / unlabeled split.
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_TRAIN = 1300
NUM_TEST = 497
SPLIT_SEED = 0


def digits_arrays():
  """(images uint8 [1797, 8, 8, 1], labels int64 [1797]) from scikit-learn."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  raw = datasets.load_digits()
  images = np.round(raw.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, raw.target.astype(np.int64)


def split_indices():
  """Fixed stratified split: {'train': indices, 'test': indices} into the scikit-learn order."""
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

  _, labels = digits_arrays()
  train, test = train_test_split(np.arange(len(labels)), test_size=NUM_TEST, stratify=labels, random_state=SPLIT_SEED)
  return {"train": interleave_classes(train, labels[train]), "test": np.sort(test)}


def interleave_classes(indices: np.ndarray, labels: np.ndarray, seed: int = SPLIT_SEED) -> np.ndarray:
  """`indices` reordered round-robin over classes, each class in a seeded random order."""
  rng = np.random.default_rng(seed)
  per_class = [rng.permutation(indices[labels == c]) for c in np.unique(labels)]
  order = []
  for r in range(max(len(p) for p in per_class)):
    order.extend(int(p[r]) for p in per_class if r < len(p))
  return np.asarray(order, np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits (UCI optdigits test set), 8x8, 10 classes."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release: 1,300 train / 497 test, stratified, seed 0.",
    "1.1.0": "Train split stored class-interleaved, read unshuffled: train[:10*k] has k per class.",
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
          "label": tfds.features.ClassLabel(num_classes=10),
          "id": np.int64,  # index into sklearn.datasets.load_digits()
        }
      ),
      supervised_keys=("image", "label"),
      disable_shuffling=True,  # keep the class-interleaved order
      homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

  def _generate_examples(self, indices):
    images, labels = digits_arrays()
    for position, i in enumerate(indices):  # keyed by position: the stored order is the split's order
      yield position, {"image": images[i], "label": int(labels[i]), "id": int(i)}


def prepare(data_dir=None) -> tfds.core.DatasetBuilder:
  """Builds the digits dataset under `data_dir` (tfds' default when None) if needed; offline, seconds."""
  builder = Digits(data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder
