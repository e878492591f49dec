"""Layer families with channel-indexed weights: conv, transposed conv, linear (and the functional
and matrix-product forms, which only count MACs: their weights are not module parameters).

Each family is described once: how its channels couple, how it is resized after a cut, its MACs.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ...layer_registry import register_layer
from ..shapes import output_shape
from .context import RuleContext
from .fxutil import arg_shape, numel
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


def _conv(rc: RuleContext, node: fx.Node, conv: nn.Module) -> None:
    x = node.args[0]
    src = rc.input(x)
    rc.expect_dim(src, 1, "a conv")
    name, g = node.target, conv.groups
    cin_g, cout_g = conv.in_channels // g, conv.out_channels // g
    out = rc.new_space(1)
    _out_params(rc, out, name, conv, 0, np.arange(out.size))
    if g == 1:
        _feed(rc, x, src, rc.param(name, "weight", 1, "in"), np.arange(conv.in_channels))
        return
    if cin_g == 1:
        _depthwise(rc, x, src, out, cout_g, g, "depthwise conv")
        return
    # grouped: the same input offsets and output offsets in every group (same count per group)
    _feed(rc, x, src, rc.param(name, "weight", 1, "in"), np.arange(conv.in_channels) % cin_g)
    c = np.arange(out.size)
    rc.couple(out, c, out, c % cout_g, "group", f"groups={g}")


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


@register_layer(nn.Linear)
class _Linear:
    def channels(rc: RuleContext, node: fx.Node, lin: nn.Linear) -> None:
        x = node.args[0]
        src = rc.input(x)
        ndim = len(rc.shape(node))
        rc.expect_dim(src, ndim - 1, "a Linear")
        out = rc.new_space(ndim - 1)
        _out_params(rc, out, node.target, lin, 0, np.arange(out.size))
        _feed(rc, x, src, rc.param(node.target, "weight", 1, "in"), np.arange(lin.in_features))

    def resize(m: nn.Linear, old) -> None:
        m.out_features, m.in_features = m.weight.shape

    def macs(node: fx.Node, m: nn.Linear) -> int:
        return numel(output_shape(node)) * m.in_features


# ---- MACs only: the channel analysis leaves these alone (their weights are not parameters
# of the layer it could slice, or there is no weight at all) -----------------------------------

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
register_layer(F.conv1d, F.conv2d, F.conv3d, macs=_fconv_macs)
register_layer(F.linear, macs=_product_macs(1))
register_layer(torch.matmul, operator.matmul, torch.bmm, torch.mm, macs=_product_macs(0))
register_layer(torch.addmm, macs=_product_macs(1))
