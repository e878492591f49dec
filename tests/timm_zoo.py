"""The timm architectures of the optional timm suite, and the measurements both it and
``scripts/timm_suite.py`` make on them (one list, so the test suite and the status table agree).

Each entry names the pattern it brings: these are the models people take from timm for a
CPU, written the way a library writes them (``BatchNormAct2d``, "same" padding, uneven
splits, reparameterizable branches, attention reshapes). Weights are random (``pretrained=False``,
offline) and BatchNorm statistics randomized, so folding is never trivially exact.

Needs ``pip install torch==2.14.1 torchvision==0.29.1 timm``; importing this module does not.
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

INSTALL = "pip install torch==2.14.1 torchvision==0.29.1 timm"

#: Traceable models: name -> what it exercises.
MODELS = {
    "mobilenetv2_050": "MobileNetV2, BatchNormAct2d, ReLU6",
    "mobilenetv3_large_100": "MobileNetV3, hard-swish, SE with hard-sigmoid",
    "mobilenetv3_small_050": "MobileNetV3-Small, SE, hard-swish, narrow channels",
    "tf_mobilenetv3_small_100": "TF port: 'same' padding (F.pad before conv), Conv2dSame",
    "mobilenetv4_conv_small": "MobileNetV4 universal inverted bottleneck",
    "efficientnet_b0": "EfficientNet: SiLU, SE, DropPath",
    "tf_efficientnet_b0": "EfficientNet TF port: F.pad 'same' padding",
    "efficientnet_lite0": "EfficientNet-Lite: no SE, ReLU6",
    "tinynet_e": "TinyNet: EfficientNet at 106x106",
    "mixnet_s": "MixNet: mixed kernels (uneven split + cat)",
    "mnasnet_small": "MNASNet",
    "semnasnet_050": "MNASNet with SE",
    "fbnetc_100": "FBNet",
    "lcnet_050": "PP-LCNet: hard-swish, SE, depthwise",
    "ghostnet_050": "GhostNet: cat + slice, SE",
    "ghostnetv2_100": "GhostNetV2: DFC attention (pool, interpolate, sigmoid gate)",
    "repghostnet_050": "RepGhost: reparameterizable identity BN branch",
    "rexnet_100": "ReXNet: partial residual that pads channels, SiLU",
    "repvgg_a0": "RepVGG: 3x3 + 1x1 + identity BN branches",
    "mobileone_s0": "MobileOne: over-parameterized branches",
    "resnet18": "ResNet basic blocks (plain BatchNorm2d)",
    "resnet50": "ResNet bottlenecks",
    "resnext26ts": "ResNeXt (byobnet): grouped convs, SiLU",
    "seresnet18": "ResNet with SE",
    "ecaresnet26t": "ResNet with ECA (conv1d gate over channels), deep stem",
    "regnetx_002": "RegNetX: grouped convs",
    "regnety_002": "RegNetY: grouped convs, SE",
    "dla46_c": "DLA: tree aggregation (concat of levels)",
    "cspresnet50": "CSPNet: split + cat cross-stage",
    "hrnet_w18_small": "HRNet: parallel resolutions, upsample + add",
    "densenet121": "DenseNet: concat, pre-activation BN",
    "dpn48b": "DPN: dual path (split + add + cat)",
    "ese_vovnet19b_dw": "VoVNet: one-shot aggregation, eSE gate, depthwise",
    "convnext_atto": "ConvNeXt: LayerNorm2d, permutes, layer scale, GELU",
    "edgenext_xx_small": "EdgeNeXt: split depthwise, transposed attention",
    "fastvit_t8": "FastViT: reparameterizable mixers, attention",
}

#: Models torch.fx cannot trace: name -> the class of the module graphopt must name.
UNTRACEABLE = {
    "mobilevit_xxs": "MobileVitBlock",  # `if new_h != H or new_w != W:` on traced sizes
    "efficientvit_b0": "LiteMLA",  # `if ... v.device.type != 'meta':` on a traced tensor
}

#: Compiled for ARM and run under qemu (slow: a few of the small ones).
ARM_MODELS = ("mobilenetv2_050", "mobilenetv3_large_100", "efficientnet_lite0", "lcnet_050",
              "regnetx_002", "resnet18")

#: Quantized to int8 in the test suite (the status table quantizes every model).
INT8_MODELS = ("mobilenetv2_050", "mobilenetv3_large_100", "efficientnet_lite0", "lcnet_050",
               "mnasnet_small", "ghostnet_050", "regnetx_002", "repvgg_a0", "resnet18", "densenet121")

MAX_SIDE = 224  # inputs are 224x224, or the model's default size when it is smaller


def build(name: str, seed: int = 0) -> Tuple[nn.Module, Tuple[torch.Tensor]]:
    """``(model in eval mode, (input,))`` for a timm model, random weights, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).eval()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # trained-looking statistics (timm's BatchNormAct2d is a subclass)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.weight is not None and not m.weight.any():
                # timm zero-initialises the last BN of residual blocks (zero_init_last): with
                # random weights those branches output exact zeros, which no trained model does
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    _, h, w = model.pretrained_cfg.get("input_size", (3, MAX_SIDE, MAX_SIDE))
    return model, (torch.randn(1, 3, min(h, MAX_SIDE), min(w, MAX_SIDE), generator=g),)


_BN_FUNCTIONS = (F.batch_norm, torch.batch_norm)
_LAYER_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                    F.conv_transpose3d, F.linear)


def _is(gm: fx.GraphModule, node: fx.Node, modules: tuple, functions: tuple) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), modules)
    return node.op == "call_function" and node.target in functions


@dataclasses.dataclass
class BatchNorms:
    """The BatchNorms of a graph (modules and functional calls), and those fed by a conv/linear."""

    total: int
    after_layer: List[str]  # node names of BatchNorms whose input is a conv or linear output


def batchnorms(gm: fx.GraphModule) -> BatchNorms:
    bns = [n for n in gm.graph.nodes if _is(gm, n, (nn.modules.batchnorm._BatchNorm,), _BN_FUNCTIONS)]
    after = [n.name for n in bns if isinstance(n.args[0], fx.Node)
             and _is(gm, n.args[0], (nn.modules.conv._ConvNd, nn.Linear), _LAYER_FUNCTIONS)]
    return BatchNorms(len(bns), after)


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max|got - ref| / max|ref|, the measure graphopt's own checks use."""
    got, ref = torch.as_tensor(got).double(), torch.as_tensor(ref).double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
