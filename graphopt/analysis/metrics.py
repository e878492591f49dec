"""Size and cost of a GraphModule: parameters, bytes and multiply-accumulates per node.

MAC counts come from the shapes in ``node.meta`` (run ``propagate_shapes`` first) and from
per-op handlers in one table, extended with ``@register_macs(nn.SomeModule)`` or
``@register_macs(torch.some_function)``; plugins (e.g. quantized ops) add their own.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Dict, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .shapes import output_shape

MacHandler = Callable[[fx.Node, Optional[nn.Module]], int]
_MAC_HANDLERS: Dict[object, MacHandler] = {}


def register_macs(*keys):
    """Register a MAC counter for module types or functions: ``handler(node, module_or_None)``."""

    def decorate(fn: MacHandler) -> MacHandler:
        for k in keys:
            _MAC_HANDLERS[k] = fn
        return fn

    return decorate


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _arg_shape(node: fx.Node, i: int = 0):
    a = node.args[i] if len(node.args) > i else None
    return output_shape(a) if isinstance(a, fx.Node) else None


@register_macs(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_macs(node, m):
    kernel = math.prod(m.kernel_size)
    return _numel(output_shape(node)) * (m.in_channels // m.groups) * kernel


@register_macs(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose_macs(node, m):
    kernel = math.prod(m.kernel_size)
    return _numel(_arg_shape(node)) * (m.out_channels // m.groups) * kernel


@register_macs(nn.Linear)
def _linear_macs(node, m):
    return _numel(output_shape(node)) * m.in_features


@register_macs(nn.Bilinear)
def _bilinear_macs(node, m):
    return _numel(output_shape(node)) * m.in1_features * m.in2_features


def _pool_kernel(k, dims: int) -> int:
    return math.prod(k) if isinstance(k, (tuple, list)) else int(k) ** dims


@register_macs(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def _pool_macs(node, m):
    out = output_shape(node)
    return _numel(out) * _pool_kernel(m.kernel_size, len(out) - 2) if out else 0


@register_macs(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
               nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
def _adaptive_pool_macs(node, m):
    # every input element is read once
    return _numel(_arg_shape(node))


@register_macs(F.conv1d, F.conv2d, F.conv3d)
def _fconv_macs(node, m):
    w = _arg_shape(node, 1) if len(node.args) > 1 else output_shape(node.kwargs.get("weight"))
    return _numel(output_shape(node)) * _numel(w[1:]) if w else 0


@register_macs(F.linear)
def _flinear_macs(node, m):
    w = _arg_shape(node, 1)
    return _numel(output_shape(node)) * w[-1] if w else 0


@register_macs(torch.matmul, operator.matmul, torch.bmm, torch.mm)
def _matmul_macs(node, m):
    a = _arg_shape(node, 0)
    return _numel(output_shape(node)) * a[-1] if a else 0


@register_macs(torch.addmm)
def _addmm_macs(node, m):
    a = _arg_shape(node, 1)
    return _numel(output_shape(node)) * a[-1] if a else 0


@register_macs(F.max_pool2d, F.avg_pool2d, F.max_pool1d, F.avg_pool1d)
def _fpool_macs(node, m):
    out = output_shape(node)
    k = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel_size", 1)
    return _numel(out) * _pool_kernel(k, len(out) - 2) if out else 0


@register_macs(F.adaptive_avg_pool2d, F.adaptive_avg_pool1d, torch.mean)
def _freduce_macs(node, m):
    return _numel(_arg_shape(node))


def node_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    """Multiply-accumulates of one node (0 for ops without a handler, e.g. add or relu)."""
    module = None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        handler = next((h for t, h in _MAC_HANDLERS.items()
                        if isinstance(t, type) and isinstance(module, t)), None)
    elif node.op in ("call_function", "call_method"):
        handler = _MAC_HANDLERS.get(node.target)
    else:
        return 0
    if handler is None or output_shape(node) is None:
        return 0
    return int(handler(node, module))


def count_macs(gm: fx.GraphModule) -> int:
    """Total MACs of one forward pass at the shapes recorded in ``node.meta``."""
    return sum(node_macs(gm, n) for n in gm.graph.nodes)


def count_params(module: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


def model_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (what a serialized model must store)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
