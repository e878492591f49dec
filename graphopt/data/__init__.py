"""Real datasets available offline (see ``fashion_mnist`` for where the files come from)."""
from .fashion_mnist import (
    CLASSES, DEFAULT_DIR, ENV_VAR, MEAN, STD, DatasetCorruptError, DatasetError,
    DatasetMissingError, calibration_batches, dataset_dir, fashion_mnist_batches,
    load_fashion_mnist, normalize,
)

__all__ = [
    "CLASSES", "DEFAULT_DIR", "ENV_VAR", "MEAN", "STD", "DatasetCorruptError", "DatasetError",
    "DatasetMissingError", "calibration_batches", "dataset_dir", "fashion_mnist_batches",
    "load_fashion_mnist", "normalize",
]
