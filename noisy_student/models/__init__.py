"""EfficientNet family and conversion of official checkpoints."""

from noisy_student.models.efficientnet import (MODEL_SPECS, EfficientNet, ModelSpec,
                                               create_model)

__all__ = ["MODEL_SPECS", "EfficientNet", "ModelSpec", "create_model", "model_from_config"]


def model_from_config(model_config, num_classes=None) -> EfficientNet:
  """The EfficientNet a config's `model` block names, with its noise knobs (dropout, stochastic depth, BN
  momentum); shared by training and the labeling job (which runs it with train=False: noise off)."""
  m = model_config
  overrides = dict(dropout_rate=m.dropout_rate, survival_prob=m.survival_prob, bn_momentum=m.bn_momentum)
  if m.get("small_image"):
    overrides["small_image"] = True
  return create_model(m.name, num_classes or m.num_classes, **overrides)
