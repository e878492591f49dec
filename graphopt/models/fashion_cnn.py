"""The bundled default model: a small residual CNN for Fashion-MNIST, with committed weights.

It is small (142,826 parameters, about 0.57 MB in fp32, 11.1 M MACs per image) but built to
give every graphopt pass something real to do:

- Conv-BatchNorm-ReLU blocks everywhere (conv-BN fusion);
- dense 3x3 convolutions with ``groups=1`` (separable-conv substitution, channel pruning);
- two residual adds, so pruning has to keep channel groups across an add consistent;
- a ``flatten`` of a ``64 x 7 x 7`` feature map into the ``Linear`` classifier, so pruning a
  channel removes 49 of the classifier's input columns;
- no data-dependent control flow: it traces with ``torch.fx.symbolic_trace``.

Its widths are generous for Fashion-MNIST, so that pruning half of the MACs and fine-tuning
costs little accuracy. ``scripts/train_default_model.py`` trains it deterministically on the real
train split and writes ``fashion_cnn.pt`` (the state_dict) and ``fashion_cnn.json`` (how it was
trained, its test accuracy). ``docs/default_model.md`` describes it.

Example:
    >>> import torch
    >>> from graphopt.models import FashionCNN, default_example_inputs
    >>> model = FashionCNN().eval()
    >>> tuple(model(*default_example_inputs()).shape)
    (1, 10)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..data import fashion_mnist_batches

__all__ = [
    "FashionCNN", "WEIGHTS_PATH", "INFO_PATH", "default_example_inputs", "default_model_info",
    "evaluate_accuracy", "load_default_model",
]

WEIGHTS_PATH = Path(__file__).with_name("fashion_cnn.pt")
INFO_PATH = Path(__file__).with_name("fashion_cnn.json")


def conv_bn_relu(c_in: int, c_out: int, relu: bool = True) -> nn.Sequential:
    """3x3 convolution (stride 1, padding 1, no bias), BatchNorm, and optionally ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """Two Conv-BN layers with an identity shortcut: ``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + x)


class FashionCNN(nn.Module):
    """Residual CNN for 1 x 28 x 28 Fashion-MNIST images normalized as in ``graphopt.data``.

    Layout (``c1=32``, ``c2=64``), shapes for one image::

        stem    Conv3x3(1->32)-BN-ReLU         32 x 28 x 28
        pool1   MaxPool 2x2                    32 x 14 x 14
        block1  ResidualBlock(32)              32 x 14 x 14   (2 x Conv3x3-BN, add, ReLU)
        expand  Conv3x3(32->64)-BN-ReLU        64 x 14 x 14
        pool2   MaxPool 2x2                    64 x  7 x  7
        block2  ResidualBlock(64)              64 x  7 x  7
        dropout Dropout(0.2)                   (identity in eval mode)
        flatten                                3136
        fc      Linear(3136 -> 10)             logits

    Args:
        c1: channels of the 28x28 and first 14x14 stage.
        c2: channels of the second 14x14 conv and the 7x7 stage.
        num_classes: classifier outputs.
        dropout: dropout probability on the last feature map (training only).

    Example:
        >>> import torch
        >>> from graphopt.models import FashionCNN
        >>> sum(p.numel() for p in FashionCNN().parameters())
        142826
    """

    def __init__(self, c1: int = 32, c2: int = 64, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.stem = conv_bn_relu(1, c1)
        self.pool1 = nn.MaxPool2d(2)
        self.block1 = ResidualBlock(c1)
        self.expand = conv_bn_relu(c1, c2)
        self.pool2 = nn.MaxPool2d(2)
        self.block2 = ResidualBlock(c2)
        # Dropout before the flatten, so that the flatten feeds the Linear directly.
        self.dropout = nn.Dropout(dropout)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c2 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.stem(x))
        x = self.block1(x)
        x = self.pool2(self.expand(x))
        x = self.block2(x)
        return self.fc(self.flatten(self.dropout(x)))


def default_example_inputs() -> tuple[torch.Tensor]:
    """One example input for the default model: a ``1 x 1 x 28 x 28`` float32 tensor.

    Deterministic (a fixed-seed normal tensor, the scale of normalized images) and independent
    of the dataset, so tracing and shape analysis work on machines without Fashion-MNIST.

    Example:
        >>> from graphopt.models import default_example_inputs
        >>> [tuple(t.shape) for t in default_example_inputs()]
        [(1, 1, 28, 28)]
    """
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(1, 1, 28, 28, generator=generator),)


def default_model_info() -> dict:
    """What ``scripts/train_default_model.py`` recorded about the committed weights.

    Keys: ``test_accuracy``, ``epochs``, ``seed``, ``parameters``, ``torch_version``,
    ``training_seconds`` (and the training hyper-parameters).

    Example:
        >>> from graphopt.models import default_model_info
        >>> default_model_info()["test_accuracy"] >= 0.9
        True
    """
    return json.loads(INFO_PATH.read_text())


def load_default_model() -> FashionCNN:
    """The bundled :class:`FashionCNN` with its trained weights, in eval mode.

    Each call returns a new model, so callers may modify it freely.

    Example:
        >>> import torch
        >>> from graphopt.models import load_default_model, default_example_inputs
        >>> model = load_default_model()
        >>> model.training
        False
        >>> int(model(*default_example_inputs()).argmax()) in range(10)
        True
    """
    model = FashionCNN()
    state = torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def evaluate_accuracy(
    model: Callable[[torch.Tensor], torch.Tensor], split: str = "test",
    limit: int | None = None, batch_size: int = 500,
) -> float:
    """Top-1 accuracy of ``model`` on real Fashion-MNIST (an ``eval_fn(model) -> float``).

    Works for any callable taking a ``N x 1 x 28 x 28`` float32 batch and returning ``N x 10``
    logits (a tensor or anything ``torch.as_tensor`` accepts, e.g. a numpy array): an
    ``nn.Module``, a ``torch.fx.GraphModule``, a compiled model. An ``nn.Module`` is evaluated
    in eval mode without gradients and put back in the mode it was in.

    Args:
        model: the model or callable.
        split: ``"test"`` (10,000 images) or ``"train"``.
        limit: use only the first ``limit`` images of the split (all when None).
        batch_size: images per call; use the batch size a compiled model was built for.

    Returns:
        The fraction of images whose arg-max logit is the true label, in [0, 1].

    Raises:
        graphopt.data.DatasetMissingError: Fashion-MNIST is not installed.
        ValueError: the model's output is not ``batch x classes``.

    Example:
        >>> from graphopt.models import evaluate_accuracy, load_default_model
        >>> evaluate_accuracy(load_default_model(), limit=1000) > 0.85
        True
    """
    batches = fashion_mnist_batches(split, batch_size, limit)
    was_training = model.training if isinstance(model, nn.Module) else None
    if was_training:
        model.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            for images, labels in batches:
                logits = torch.as_tensor(model(images))
                if logits.dim() != 2 or logits.shape[0] != len(labels):
                    raise ValueError(
                        f"expected {len(labels)} x num_classes logits from the model, got shape "
                        f"{tuple(logits.shape)}"
                    )
                correct += int((logits.argmax(dim=1) == labels).sum())
                total += len(labels)
    finally:
        if was_training:
            model.train()
    return correct / total if total else float("nan")
