"""The benchmark models: the bundled default and ImageNet-size reference nets at 224x224.

``mobilenet_v2`` and ``resnet18`` are :mod:`graphopt.models.reference`'s, with random weights
and randomized BatchNorm statistics: latency does not depend on the values. ``tv_<name>`` are
torchvision's classifiers built the same way (random weights, offline), available where
torchvision imports (``pip install torch==2.14.1 torchvision==0.29.1``).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn

from graphopt.models.reference import MobileNetV2, ResNet18


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
    return model.eval()


def _imagenet(factory) -> Callable[[], Tuple[nn.Module, Tuple[torch.Tensor, ...]]]:
    def build():
        torch.manual_seed(0)
        return randomize_bn(factory()), (torch.randn(1, 3, 224, 224),)
    return build


def _default():
    from graphopt.models import default_example_inputs, load_default_model

    return load_default_model().eval(), tuple(default_example_inputs())


def torchvision_model(name: str) -> Callable[[], Tuple[nn.Module, Tuple[torch.Tensor, ...]]]:
    """torchvision's ``name`` (e.g. ``mobilenet_v3_large``), random weights, 1x3x224x224 input."""
    def factory():
        import torchvision

        return getattr(torchvision.models, name)(weights=None)
    return _imagenet(factory)


#: the lightweight nets of benchmarks/mobile.py
TORCHVISION_MOBILE = ("mobilenet_v2", "mobilenet_v3_large", "shufflenet_v2_x1_0", "efficientnet_b0", "mnasnet1_0")

MODELS: Dict[str, Callable[[], Tuple[nn.Module, Tuple[torch.Tensor, ...]]]] = {
    "default": _default,
    "mobilenet_v2": _imagenet(MobileNetV2),
    "resnet18": _imagenet(ResNet18),
    **{f"tv_{name}": torchvision_model(name) for name in TORCHVISION_MOBILE},
}
