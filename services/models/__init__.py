"""Model families served by the engine and the loader that builds them from a checkpoint directory."""

from services.models.config import ModelConfig, ModelConfigError
from services.models.loading.loader import MODEL_CLASSES, load_model

__all__ = ["MODEL_CLASSES", "ModelConfig", "ModelConfigError", "load_model"]
