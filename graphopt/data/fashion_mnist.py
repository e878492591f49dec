"""Real Fashion-MNIST, offline, from Debian's ``dataset-fashion-mnist`` package.

The package installs the four gzipped IDX files of the original release (60,000 training and
10,000 test images, 28x28 grey levels, 10 classes) in ``/usr/share/datasets/fashion-mnist/``.
Nothing is downloaded: when the files are absent, :class:`DatasetMissingError` says how to get
them.

Images come back as float32 ``N x 1 x 28 x 28`` tensors, scaled to [0, 1] and then normalized
with the training split's mean and standard deviation (:data:`MEAN`, :data:`STD`), which is what
the bundled :class:`graphopt.models.FashionCNN` was trained on. Labels are int64 in ``0..9``
(:data:`CLASSES` names them).

Example:
    >>> from graphopt.data import load_fashion_mnist
    >>> images, labels = load_fashion_mnist("test")  # doctest: +SKIP
    >>> images.shape, images.dtype, labels.dtype  # doctest: +SKIP
    (torch.Size([10000, 1, 28, 28]), torch.float32, torch.int64)
"""
from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import GraphoptError

__all__ = [
    "CLASSES", "DEFAULT_DIR", "ENV_VAR", "MEAN", "STD",
    "DatasetCorruptError", "DatasetError", "DatasetMissingError",
    "calibration_batches", "dataset_dir", "fashion_mnist_batches", "load_fashion_mnist",
    "normalize",
]

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "GRAPHOPT_FASHION_MNIST_DIR"

# Mean and standard deviation of the 60,000 training images' pixels scaled to [0, 1]
# (computed in float64 over the whole train split: 0.286041, 0.353024).
MEAN = 0.2860
STD = 0.3530

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_SPLIT_SIZES = {"train": 60_000, "test": 10_000}
_INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` "
    f"(it puts the files in {DEFAULT_DIR}), or set {ENV_VAR} to a directory holding "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
    "and t10k-labels-idx1-ubyte.gz"
)
# IDX type byte -> numpy dtype (IDX stores multi-byte values big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


class DatasetError(GraphoptError, ValueError):
    """A dataset request graphopt cannot serve: unknown split, bad batch size, bad file."""


class DatasetCorruptError(DatasetError):
    """A dataset file exists but is not a valid (gzipped) IDX file of the expected shape."""


class DatasetMissingError(GraphoptError, FileNotFoundError):
    """The Fashion-MNIST files are not on this machine; the message says how to install them."""


def dataset_dir(root: str | os.PathLike | None = None) -> Path:
    """The directory the loader reads: ``root``, else ``$GRAPHOPT_FASHION_MNIST_DIR``, else Debian's.

    Example:
        >>> import os
        >>> from graphopt.data import dataset_dir
        >>> str(dataset_dir("/tmp/fm"))
        '/tmp/fm'
    """
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_DIR


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """Turn uint8 pixels (any shape) into the float32 input the bundled model expects.

    ``(pixels / 255 - MEAN) / STD``.

    Example:
        >>> import torch
        >>> from graphopt.data import normalize
        >>> normalize(torch.tensor([0, 255], dtype=torch.uint8))
        tensor([-0.8102,  2.0227])
    """
    return (pixels.to(torch.float32) / 255.0 - MEAN) / STD


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """Parse an (uncompressed) IDX buffer: magic ``0 0 type ndim``, ndim big-endian uint32 dims."""
    if len(raw) < 4:
        raise DatasetCorruptError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise DatasetCorruptError(
            f"{path}: bad IDX magic number 0x{int.from_bytes(raw[:4], 'big'):08x} "
            "(expected 0x000008<ndim>, e.g. 0x00000803 for images, 0x00000801 for labels)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetCorruptError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetCorruptError(
            f"{path}: IDX header says shape {dims} ({expected} data bytes) "
            f"but the file holds {len(raw) - header} data bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetCorruptError(f"{path}: not a readable gzip file ({e})") from e
    return _parse_idx(raw, path)


@functools.lru_cache(maxsize=4)
def _load_raw(images_path: Path, labels_path: Path, _stamp: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    # _stamp (sizes, mtimes) makes a replaced file miss the cache. The cached uint8 tensors are
    # never handed out: callers get freshly normalized / converted copies.
    images = _read_idx(images_path)
    labels = _read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DatasetCorruptError(
            f"{images_path}: expected uint8 images of shape N x 28 x 28, got "
            f"{images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetCorruptError(
            f"{labels_path}: expected a 1-D uint8 label array, got {labels.dtype} {labels.shape}"
        )
    if len(labels) != len(images):
        raise DatasetCorruptError(
            f"{images_path.parent}: {len(images)} images but {len(labels)} labels"
        )
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise DatasetCorruptError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _check_split(split: str) -> None:
    if split not in _FILES:
        raise DatasetError(f"unknown Fashion-MNIST split {split!r}; valid splits: 'train', 'test'")


def _split_paths(split: str, root) -> tuple[Path, Path]:
    _check_split(split)
    directory = dataset_dir(root)
    paths = tuple(directory / name for name in _FILES[split])
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DatasetMissingError(
            f"Fashion-MNIST {split} split not found: {', '.join(missing)} missing in "
            f"{directory}. It comes from the Debian package dataset-fashion-mnist: {_INSTALL_HINT}."
        )
    return paths  # type: ignore[return-value]


def load_fashion_mnist(
    split: str = "test", root: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a whole split of Fashion-MNIST, in file order.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: directory holding the gzipped IDX files; defaults to ``$GRAPHOPT_FASHION_MNIST_DIR``
            or ``/usr/share/datasets/fashion-mnist``.

    Returns:
        ``(images, labels)``: float32 ``N x 1 x 28 x 28`` images normalized with :data:`MEAN`
        and :data:`STD` (see :func:`normalize`), and int64 labels in ``0..9``.

    Raises:
        DatasetMissingError: the files are not there (the message says how to install them).
        DatasetCorruptError: a file is not valid gzipped IDX data of the expected shape.
        DatasetError: unknown split.

    Example:
        >>> from graphopt.data import load_fashion_mnist
        >>> images, labels = load_fashion_mnist("test")  # doctest: +SKIP
        >>> tuple(images.shape), int(labels.max())  # doctest: +SKIP
        ((10000, 1, 28, 28), 9)
    """
    pixels, labels = _pixels(split, root)
    return normalize(pixels).unsqueeze(1), labels.clone()


def _pixels(split: str, root) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached uint8 images and int64 labels of a split (callers must not modify them)."""
    images_path, labels_path = _split_paths(split, root)
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in (images_path, labels_path))
    return _load_raw(images_path.resolve(), labels_path.resolve(), stamp)


def fashion_mnist_batches(
    split: str = "test", batch_size: int = 500, limit: int | None = None,
    root: str | os.PathLike | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a Fashion-MNIST split into ``(images, labels)`` batches, in file order.

    Args:
        split: ``"train"`` or ``"test"``.
        batch_size: images per batch; the last batch may be smaller.
        limit: use only the first ``limit`` images of the split (all when None).
        root: as in :func:`load_fashion_mnist`.

    Returns:
        A list (re-iterable) of ``(images, labels)`` pairs shaped as in :func:`load_fashion_mnist`.

    Example:
        >>> from graphopt.data import fashion_mnist_batches
        >>> batches = fashion_mnist_batches("test", batch_size=256, limit=1000)  # doctest: +SKIP
        >>> [len(labels) for _, labels in batches]  # doctest: +SKIP
        [256, 256, 256, 232]
    """
    _check_batching(batch_size, limit)
    pixels, labels = _pixels(split, root)
    if limit is not None:
        pixels, labels = pixels[:limit], labels[:limit]
    images = normalize(pixels).unsqueeze(1)  # only the images asked for are converted
    return list(zip(images.split(batch_size), labels.clone().split(batch_size)))


def calibration_batches(
    n_batches: int, batch_size: int = 32, root: str | os.PathLike | None = None
) -> list[torch.Tensor]:
    """Deterministic image batches from the TRAIN split, e.g. for quantization calibration.

    The first ``n_batches * batch_size`` training images, in file order (the file's order is
    already shuffled across classes), so every call returns the same data and never touches the
    test split that accuracy is measured on.

    Args:
        n_batches: number of batches.
        batch_size: images per batch.
        root: as in :func:`load_fashion_mnist`.

    Returns:
        A list of ``n_batches`` float32 tensors of shape ``batch_size x 1 x 28 x 28``.

    Example:
        >>> from graphopt.data import calibration_batches
        >>> batches = calibration_batches(4, batch_size=16)  # doctest: +SKIP
        >>> len(batches), tuple(batches[0].shape)  # doctest: +SKIP
        (4, (16, 1, 28, 28))
    """
    _check_batching(batch_size, None)
    if not isinstance(n_batches, int) or n_batches < 1:
        raise DatasetError(f"n_batches must be a positive int, got {n_batches!r}")
    needed = n_batches * batch_size
    if needed > _SPLIT_SIZES["train"]:
        raise DatasetError(
            f"{n_batches} batches of {batch_size} need {needed} images; the train split has "
            f"{_SPLIT_SIZES['train']}"
        )
    pixels, _ = _pixels("train", root)
    if needed > len(pixels):
        raise DatasetError(f"{needed} calibration images asked, only {len(pixels)} in the file")
    return list(normalize(pixels[:needed]).unsqueeze(1).split(batch_size))


def _check_batching(batch_size, limit) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DatasetError(f"batch_size must be a positive int, got {batch_size!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise DatasetError(f"limit must be None or a non-negative int, got {limit!r}")
