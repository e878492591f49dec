"""Layers that compute their padding from the input size at run time, made static.

TensorFlow ports pad "same": timm's ``Conv2dSame``, ``MaxPool2dSame`` and ``AvgPool2dSame``
subclass the torch layer and call ``F.pad`` with amounts derived from ``x.size()`` through
``max()``/``math.ceil``, which torch.fx cannot trace symbolically. With the example input the
shapes are static, so the padding is a constant: capture keeps such a layer as a leaf, then
rewrites each call into ``F.pad`` with those constants followed by the plain torch layer, and
keeps the rewrite only where it reproduces the layer's own output. Fusion, pruning and lowering
then see an ordinary conv or pool.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .analysis.shapes import output_shape

#: torch layers whose subclasses may pad "same" dynamically, and the value they pad with
_BASES = ((nn.Conv1d, 0.0), (nn.Conv2d, 0.0), (nn.Conv3d, 0.0),
          (nn.MaxPool1d, -math.inf), (nn.MaxPool2d, -math.inf), (nn.MaxPool3d, -math.inf),
          (nn.AvgPool1d, 0.0), (nn.AvgPool2d, 0.0), (nn.AvgPool3d, 0.0))


def base_layer(m: nn.Module) -> Optional[type]:
    """The torch layer class ``m`` subclasses with its own ``forward``, or None."""
    for base, _ in _BASES:
        if isinstance(m, base) and type(m) is not base and type(m).forward is not base.forward:
            return base
    return None


def _tuple(v, n: int) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def same_pads(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
              dilation: Sequence[int]) -> List[int]:
    """TensorFlow's "same" padding as ``F.pad`` amounts (last dimension first, extra on the right)."""
    pads: List[int] = []
    for i, k, s, d in reversed(list(zip(size, kernel, stride, dilation))):
        total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
        pads += [total // 2, total - total // 2]
    return pads


def _plain(m: nn.Module, base: type) -> nn.Module:
    """The torch layer ``m`` would be without its own forward: same parameters, same settings."""
    plain = base.__new__(base)
    nn.Module.__init__(plain)
    for k, v in vars(m).items():
        if k not in ("_parameters", "_buffers", "_modules", "training"):
            setattr(plain, k, v)
    plain._parameters = dict(m._parameters)  # the same Parameter objects: weights stay shared
    plain._buffers = dict(m._buffers)
    plain.train(m.training)
    return plain


def _reproduces(m: nn.Module, pads: List[int], value: float, plain: nn.Module,
                shape: Tuple[int, ...]) -> bool:
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(shape, generator=g), torch.rand(shape, generator=g) - 2):  # two sign mixes
        with torch.no_grad():
            want, got = m(x), plain(F.pad(x, pads, value=value))
        if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-5, atol=1e-6):
            return False
    return True


def make_static(gm: fx.GraphModule, classes: Sequence[type]) -> List[str]:
    """Rewrite every call of a module of ``classes`` into ``F.pad`` + the plain torch layer where
    that is exact for the node's static input shape; the others stay leaves. Needs shapes in
    ``node.meta``; returns one note per class for the report."""
    done: dict = {}
    kept: dict = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if type(m) not in tuple(classes) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        base = base_layer(m)
        shape = output_shape(node.args[0])
        name = type(m).__name__
        if base is None or shape is None:
            kept[name] = kept.get(name, 0) + 1
            continue
        n = len(shape) - 2
        stride = _tuple(m.stride if m.stride is not None else m.kernel_size, n)
        dilation = _tuple(getattr(m, "dilation", 1), n)
        pads = same_pads(shape[2:], _tuple(m.kernel_size, n), stride, dilation)
        value = dict(_BASES)[base]
        plain = _plain(m, base)
        if not _reproduces(m, pads, value, plain, shape):
            kept[name] = kept.get(name, 0) + 1
            continue
        gm.add_submodule(node.target, plain)  # replaces the leaf under its own name
        with gm.graph.inserting_before(node):
            padded = node.args[0] if not any(pads) else gm.graph.call_function(
                F.pad, (node.args[0], pads), {"value": value} if value else {})
        node.args = (padded,) + tuple(node.args[1:])
        done[name] = done.get(name, 0) + 1
    notes = [f"{count} `{name}` layer(s) compute \"same\" padding from the input size: traced as F.pad "
             f"with the constants of the example input's shape + the plain torch layer (checked equal)"
             for name, count in done.items()]
    notes += [f"{count} `{name}` layer(s) cannot be traced and are kept opaque (leaf modules): "
              "graphopt leaves their weights and channels alone" for name, count in kept.items()]
    gm.graph.lint()
    gm.recompile()
    return notes
