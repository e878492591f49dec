"""Bundled models: the default FashionCNN with committed weights (see docs/default_model.md)."""
from .fashion_cnn import (
    INFO_PATH, WEIGHTS_PATH, FashionCNN, default_example_inputs, default_model_info,
    evaluate_accuracy, load_default_model,
)

__all__ = [
    "INFO_PATH", "WEIGHTS_PATH", "FashionCNN", "default_example_inputs", "default_model_info",
    "evaluate_accuracy", "load_default_model",
]
