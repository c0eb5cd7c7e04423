"""Small result files (JSON, PNG plots) written atomically to local or gs:// paths.

Readers of a workdir (a rerun, another process, a person) trust a file only once it exists under its final
name, so every write goes to a temporary name first and is renamed (on GCS the rename is a copy, still
all-or-nothing for the reader).
"""

import json
from typing import Any

import tensorflow as tf


def write_json(path, obj: Any) -> None:
  path = str(path)
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
  tf.io.gfile.rename(tmp, path, overwrite=True)


def read_json(path) -> Any:
  """The parsed file; a missing or damaged file is an error naming it."""
  path = str(path)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{path} does not exist.")
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}).") from e


def new_figure(**kwargs):
  """(figure, axes) from matplotlib's headless backend (imported only when a plot is made)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt.subplots(**kwargs)


def save_figure(fig, path) -> None:
  """Writes `fig` as a PNG through a temporary name and closes it."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig.tight_layout()
  tmp = str(path) + ".tmp"
  with tf.io.gfile.GFile(tmp, "wb") as f:
    fig.savefig(f, format="png", dpi=80)
  tf.io.gfile.rename(tmp, str(path), overwrite=True)
  plt.close(fig)
