"""Layer families with channel-indexed weights: conv, transposed conv, linear, also in functional
form on parameters read with ``get_attr`` (what fx leaves of a subclass with its own
``forward``: timm's ``Linear``, ``Conv2dSame``); matrix products only count MACs.

Each family is described once: how its channels couple, how it is resized after a cut, its MACs.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ...layer_registry import register_layer
from ..shapes import output_shape
from .context import RuleContext
from .fxutil import arg, arg_shape, numel
from .spaces import Space, Unsupported

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _feed(rc: RuleContext, x: fx.Node, src, w: Space, mapping: np.ndarray) -> None:
    """Tie the input channels ``mapping[c]`` of weight space ``w`` to channel c of the input."""
    if src is None:
        rc.freeze(w, f"its input channels come from {rc.reason(x)}")
    else:
        rc.couple(src, np.arange(src.size), w, mapping, "param")


def _out_params(rc: RuleContext, out: Space, name: str, module: nn.Module, weight_dim, mapping) -> None:
    """Output channel c is weight slice ``mapping[c]`` along ``weight_dim`` (None: no weight
    side) and bias c."""
    c = np.arange(out.size)
    if weight_dim is not None:
        rc.couple(out, c, rc.param(name, "weight", weight_dim, "out"), mapping, "param")
    if module.bias is not None:
        rc.couple(out, c, rc.param(name, "bias", 0, "out"), c, "param")


def _depthwise(rc: RuleContext, x: fx.Node, src, out: Space, per_input: int, groups: int, what: str) -> None:
    """Input channel c feeds outputs ``c*m .. c*m+m-1`` (m: the channel multiplier)."""
    if src is None:
        rc.freeze(out, f"a {what} whose input comes from {rc.reason(x)}")
        return
    c = np.arange(src.size)
    for j in range(per_input):
        rc.couple(src, c, out, c * per_input + j, "depthwise", f"groups={groups}")


def _conv_like(rc: RuleContext, x: fx.Node, weight: Callable[[int, str], Space], bias: Optional[Space],
               groups: int, cin: int, cout: int) -> Optional[Space]:
    """A conv's couplings, whoever holds its weight: ``weight(dim, role)`` is the space of a
    weight dim, ``bias`` the bias space (or None). Returns the input space when the conv is
    depthwise (its ``groups`` follow the input's channel count), else None."""
    src = rc.input(x)
    rc.expect_dim(src, 1, "a conv")
    cin_g, cout_g = cin // groups, cout // groups
    out = rc.new_space(1)
    c = np.arange(out.size)
    rc.couple(out, c, weight(0, "out"), c, "param")
    if bias is not None:
        rc.couple(out, c, bias, c, "param")
    if groups == 1:
        _feed(rc, x, src, weight(1, "in"), np.arange(cin))
        return None
    if cin_g == 1:
        _depthwise(rc, x, src, out, cout_g, groups, "depthwise conv")
        return src
    # grouped: the same input offsets and output offsets in every group (same count per group)
    _feed(rc, x, src, weight(1, "in"), np.arange(cin) % cin_g)
    rc.couple(out, c, out, c % cout_g, "group", f"groups={groups}")
    return None


def _conv(rc: RuleContext, node: fx.Node, conv: nn.Module) -> None:
    x = node.args[0]
    src = rc.input(x)
    if src is not None and src.dim != 1 and _slides_over_channels(rc, node, conv, src):
        return
    name = node.target
    bias = rc.param(name, "bias", 0, "out") if conv.bias is not None else None
    _conv_like(rc, x, lambda d, role: rc.param(name, "weight", d, role), bias, conv.groups,
               conv.in_channels, conv.out_channels)


def _slides_over_channels(rc: RuleContext, node: fx.Node, conv: nn.Module, src: Space) -> bool:
    """ECA's gate (timm's ``EcaModule``): a 1-in 1-out Conv1d over the pooled channel vector,
    "same" length. Output position c is computed from the window around input position c with
    weights shared by every position, so it is channel-preserving: after a cut the window
    slides over the kept channels, as the same gate built for the narrower layer would."""
    shape_in, shape_out = rc.shape(node.args[0]), rc.shape(node)
    if not (isinstance(conv, nn.Conv1d) and conv.in_channels == conv.out_channels == conv.groups == 1
            and tuple(conv.stride) == (1,) and src.dim == 2 and shape_out == shape_in):
        return False
    out = rc.new_space(2)
    rc.couple(src, np.arange(src.size), out, np.arange(out.size), "window",
              f"kernel {conv.kernel_size[0]} sliding over the channels")
    return True


def _attr_weight(rc: RuleContext, a: Any) -> Callable[[int, str], Space]:
    """``weight(dim, role)`` for a weight read with ``get_attr`` (a functional layer)."""
    def weight(dim: int, role: str) -> Space:
        w = rc.attr_space(a, dim, role)
        if w is None:
            raise Unsupported("its weight is not a module parameter it alone reads")
        return w

    return weight


def _fconv(rc: RuleContext, node: fx.Node, module: None) -> None:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` on parameters read with
    ``get_attr`` (timm's ``Conv2dSame``...); a depthwise conv's literal ``groups`` is
    rewritten after a cut."""
    x, w = node.args[0], arg(node, 1, "weight")
    wshape, xshape = rc.shape(w), rc.shape(x)
    groups = rc.value(arg(node, 6, "groups", 1))
    if wshape is None or xshape is None or not isinstance(groups, int):
        raise Unsupported("its weight or groups are not known statically")
    b = arg(node, 2, "bias")
    bias = _attr_weight(rc, b)(0, "out") if b is not None else None
    src = _conv_like(rc, x, _attr_weight(rc, w), bias, groups, xshape[1], wshape[0])
    if src is not None:
        def rewrite(n: fx.Node, new_size: Callable[[Space], int]) -> None:
            if len(n.args) > 6:
                n.args = (*n.args[:6], int(new_size(src)), *n.args[7:])
            else:
                n.kwargs = {**n.kwargs, "groups": int(new_size(src))}

        rc.on_resize(rewrite)


def _flinear(rc: RuleContext, node: fx.Node, module: None) -> None:
    """``F.linear(x, weight, bias)`` on parameters read with ``get_attr`` (timm's ``Linear``, an
    ``nn.Linear`` whose own ``forward`` calls it)."""
    x, w, b = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
    weight = _attr_weight(rc, w)
    bias = _attr_weight(rc, b)(0, "out") if b is not None else None
    _linear_like(rc, node, x, weight, bias, rc.shape(w)[1])


def _conv_transpose(rc: RuleContext, node: fx.Node, conv: nn.Module) -> None:
    if len(node.args) > 1 or node.kwargs:
        raise Unsupported("called with an explicit output_size")
    x = node.args[0]
    src = rc.input(x)
    rc.expect_dim(src, 1, "a transposed conv")
    name, g = node.target, conv.groups
    cin_g, cout_g = conv.in_channels // g, conv.out_channels // g
    out = rc.new_space(1)  # weight is (in, out / groups, *kernel)
    _out_params(rc, out, name, conv, None, None)
    _feed(rc, x, src, rc.param(name, "weight", 0, "in"), np.arange(conv.in_channels))
    if g > 1 and cin_g == 1:
        _depthwise(rc, x, src, out, cout_g, g, "depthwise transposed conv")
        return
    rc.couple(out, np.arange(out.size), rc.param(name, "weight", 1, "out"), np.arange(out.size) % cout_g, "param")
    if g > 1 and src is not None:
        c = np.arange(src.size)
        rc.couple(src, c, src, c % cin_g, "group", f"groups={g}")


def _resize_conv(m: nn.Module, old) -> None:
    w = m.weight
    depthwise = old["groups"] > 1 and old["in_channels"] == old["groups"]
    if m.transposed:  # weight: (in, out / groups, *k)
        m.in_channels = w.shape[0]
        m.groups = m.in_channels if depthwise else old["groups"]
        m.out_channels = w.shape[1] * m.groups
    else:  # weight: (out, in / groups, *k)
        m.out_channels = w.shape[0]
        m.groups = m.out_channels // (old["out_channels"] // old["groups"]) if depthwise else old["groups"]
        m.in_channels = w.shape[1] * m.groups


def _conv_macs(node: fx.Node, m: nn.Module) -> int:
    return numel(output_shape(node)) * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def _conv_transpose_macs(node: fx.Node, m: nn.Module) -> int:
    return numel(arg_shape(node)) * (m.out_channels // m.groups) * math.prod(m.kernel_size)


register_layer(*_CONV, channels=_conv, resize=_resize_conv, macs=_conv_macs)
register_layer(*_CONV_T, channels=_conv_transpose, resize=_resize_conv, macs=_conv_transpose_macs)


def _linear_like(rc: RuleContext, node: fx.Node, x: fx.Node, weight: Callable[[int, str], Space],
                 bias: Optional[Space], in_features: int) -> None:
    src = rc.input(x)
    ndim = len(rc.shape(node))
    rc.expect_dim(src, ndim - 1, "a Linear")
    out = rc.new_space(ndim - 1)
    c = np.arange(out.size)
    rc.couple(out, c, weight(0, "out"), c, "param")
    if bias is not None:
        rc.couple(out, c, bias, c, "param")
    _feed(rc, x, src, weight(1, "in"), np.arange(in_features))


@register_layer(nn.Linear)
class _Linear:
    def channels(rc: RuleContext, node: fx.Node, lin: nn.Linear) -> None:
        name = node.target
        bias = rc.param(name, "bias", 0, "out") if lin.bias is not None else None
        _linear_like(rc, node, node.args[0], lambda d, role: rc.param(name, "weight", d, role), bias,
                     lin.in_features)

    def resize(m: nn.Linear, old) -> None:
        m.out_features, m.in_features = m.weight.shape

    def macs(node: fx.Node, m: nn.Linear) -> int:
        return numel(output_shape(node)) * m.in_features


# ---- MAC counters of the rest ------------------------------------------------------------------

def _bilinear_macs(node, m):
    return numel(output_shape(node)) * m.in1_features * m.in2_features


def _fconv_macs(node, m):
    w = arg_shape(node, 1) if len(node.args) > 1 else output_shape(node.kwargs.get("weight"))
    return numel(output_shape(node)) * numel(w[1:]) if w else 0


def _product_macs(operand: int):
    """MACs of a matrix product: output elements times the inner dim of argument ``operand``."""
    def macs(node, m):
        a = arg_shape(node, operand)
        return numel(output_shape(node)) * a[-1] if a else 0

    return macs


register_layer(nn.Bilinear, macs=_bilinear_macs)
register_layer(F.conv1d, F.conv2d, F.conv3d, channels=_fconv, macs=_fconv_macs)  # = torch.conv2d...
register_layer(F.linear, channels=_flinear, macs=_product_macs(1))
register_layer(torch.matmul, operator.matmul, torch.bmm, torch.mm, macs=_product_macs(0))
register_layer(torch.addmm, macs=_product_macs(1))
