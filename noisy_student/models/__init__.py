"""EfficientNet family and conversion of official checkpoints."""

from noisy_student.models.efficientnet import MODEL_SPECS, EfficientNet, ModelSpec, create_model

__all__ = ["MODEL_SPECS", "EfficientNet", "ModelSpec", "create_model"]
