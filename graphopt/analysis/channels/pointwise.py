"""Layer families that keep channel c as channel c: activations, casts, dropout, pooling,
resampling, padding, reductions over other dims, and element-wise ops on several tensors
(residual add, squeeze-excite gating, masks)."""
from __future__ import annotations

import math
import operator
from typing import Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ...layer_registry import register_layer
from ..shapes import output_shape
from .context import RuleContext
from .fxutil import arg, arg_shape, is_tensor, norm_dim, numel
from .spaces import Chain, Unsupported


def _same_channels(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    """Output channel c is computed from input channel c only (or is input channel c)."""
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    got = rc.channels_of(x)
    if isinstance(got, Chain):
        if rc.shape(node) != rc.shape(x):
            raise Unsupported("its input has its channels spread over several dims")
        # e.g. .contiguous() between the transpose and the view of a channel shuffle
        rc.set_chain(Chain(got.start, got.probe.contiguous(), got.adapts))
        return
    src = rc.input_or_opaque(x)
    if src is not None:
        rc.identity(src)


register_layer(
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Softmax2d, nn.LocalResponseNorm,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.sigmoid, F.tanh,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.logsigmoid, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.softmax, F.log_softmax,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs, torch.sqrt, torch.rsqrt,
    torch.neg, torch.square, torch.erf, torch.clamp, torch.clip, torch.softmax, torch.log_softmax,
    torch.nn.functional.relu_, torch.relu_, torch.nan_to_num, torch.sign, torch.reciprocal,
    torch.clamp_min, torch.clamp_max, F.hardtanh_, F.leaky_relu_, F.elu_, operator.neg,
    operator.pos,
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "sqrt", "rsqrt",
    "neg", "square", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "softmax", "log_softmax",
    "float", "double", "half", "bfloat16", "to", "type", "type_as", "cpu", "detach", "clone",
    "contiguous", "requires_grad_", "sign", "reciprocal", "nan_to_num", "erf", "exp_", "neg_",
    "abs_", "sqrt_", "rsqrt_", "reciprocal_", "square_", "erf_", "hardtanh_", "clamp_min_",
    "clamp_max_",
    # by qualified name: packages the core does not import (identity in eval, a per-sample
    # or per-element mask in training: never mixes channels)
    "torchvision.ops.stochastic_depth.stochastic_depth",
    channels=_same_channels,
)

# ---- pooling, resampling, padding: per channel; pooling counts one MAC per window element ----


def _pool_kernel(k, dims: int) -> int:
    return math.prod(k) if isinstance(k, (tuple, list)) else int(k) ** dims


def _pool_macs(node: fx.Node, m: nn.Module) -> int:
    out = output_shape(node)
    return numel(out) * _pool_kernel(m.kernel_size, len(out) - 2) if out else 0


def _fpool_macs(node: fx.Node, m: None) -> int:
    out = output_shape(node)
    k = node.args[1] if len(node.args) > 1 else node.kwargs.get("kernel_size", 1)
    return numel(out) * _pool_kernel(k, len(out) - 2) if out else 0


def _input_macs(node: fx.Node, m: Optional[nn.Module]) -> int:
    """Global pooling and means: every input element is read once."""
    return numel(arg_shape(node))


register_layer(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
               channels=_same_channels, macs=_pool_macs)
register_layer(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
               nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, channels=_same_channels, macs=_input_macs)
register_layer(F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, channels=_same_channels, macs=_fpool_macs)
register_layer(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, channels=_same_channels, macs=_input_macs)
register_layer(
    nn.LPPool1d, nn.LPPool2d, F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d, F.lp_pool2d, torch.max_pool2d,
    torch.avg_pool1d, torch.adaptive_avg_pool1d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate, F.upsample,
    F.upsample_nearest, F.upsample_bilinear,
    channels=_same_channels,
)


def _pad(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    """Padding (timm's "same" padding: ``F.pad`` before a conv) keeps channel c as channel c
    when it pads other dims only; padding (or cropping, with negative pads) the channel dim
    shifts or adds channels no layer produces, so it is refused."""
    src = rc.input_or_opaque(node.args[0])
    if src is None:
        return
    pad = module.padding if module is not None else rc.value(arg(node, 1, "pad"))
    ndim = len(rc.shape(node))
    for i in range(len(pad) // 2):
        if ndim - 1 - i == src.dim and (pad[2 * i] or pad[2 * i + 1]):
            raise Unsupported(f"it pads its channel dim {src.dim} by {tuple(pad[2 * i:2 * i + 2])}")
    rc.identity(src)


register_layer(nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
               nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
               nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d,
               nn.CircularPad2d, nn.CircularPad3d, F.pad, channels=_pad)


# ---- element-wise ops with several tensors -------------------------------------------------

def _elementwise(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    """All inputs' channels are coupled, with broadcasting: a (N, C, 1, 1) gate couples, a
    (N, 1, H, W) mask does not; an input without analyzable channels freezes the output."""
    out_shape = rc.shape(node)
    if out_shape is None:
        raise Unsupported("no recorded output shape")
    n = len(out_shape)
    aligned = []  # (node, space or None, offset)
    for a in (*node.args, *node.kwargs.values()):
        if not is_tensor(a):
            continue
        if isinstance(rc.channels_of(a), Chain):
            raise Unsupported(f"its input `{a.name}` has its channels spread over several dims")
        aligned.append((a, rc.input(a), n - len(rc.shape(a))))
    dims = {s.dim + off for a, s, off in aligned
            if s is not None and rc.shape(a)[s.dim] == out_shape[s.dim + off]}
    if len(dims) > 1:
        raise Unsupported(f"its inputs have their channels in different dims {sorted(dims)}")
    if not dims:
        first = next((a for a, _, _ in aligned), None)
        rc.opaque(rc.reason(first) if first is not None else "no tensor input")
        return
    dc = dims.pop()
    out = rc.new_space(dc)
    frozen_by = []
    for a, s, off in aligned:
        shape = rc.shape(a)
        d = dc - off
        if d < 0 or shape[d] == 1:
            continue  # broadcast along the channels: any channel count works
        if s is not None and s.dim == d:
            rc.couple(s, np.arange(s.size), out, np.arange(out.size), "identity")
        elif (w := rc.attr_space(a, d, "channel")) is not None:  # e.g. layer_scale * x
            rc.couple(out, np.arange(out.size), w, np.arange(out.size), "param")
        else:
            frozen_by.append(a)
    for a in frozen_by:
        rc.freeze(out, f"combined element-wise with `{a.name}` ({rc.reason(a)})")


register_layer(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, operator.pow, operator.floordiv,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.maximum, torch.minimum, torch.where, torch.pow, torch.addcmul,
    torch.lerp, torch.fmax, torch.fmin,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum",
    "where", "masked_fill", "lerp", "addcmul",
    channels=_elementwise,
)


# ---- reductions ------------------------------------------------------------------------------

def _reduce(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    """Over other dims: output c = input c. Over the channel dim: the result has no channels,
    and the input's channels may still be cut (fewer terms in the reduction)."""
    x = node.args[0]
    src = rc.input_or_opaque(x)
    if src is None:
        return
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dims = rc.value(arg(node, 2 if name == "norm" else 1, "dim"))
    ndim = len(rc.shape(x))
    if dims is None:
        rc.opaque("a full reduction")
        return
    dims = {norm_dim(d, ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    keepdim = len(rc.shape(node)) == ndim  # read from the shapes: positional flags vary by op
    if src.dim in dims:
        rc.opaque("a reduction over the channels")
        return
    dim = src.dim if keepdim else src.dim - sum(d < src.dim for d in dims)
    out = rc.new_space(dim)
    rc.couple(src, np.arange(src.size), out, np.arange(out.size), "identity")


register_layer(torch.mean, channels=_reduce, macs=_input_macs)
register_layer(torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.prod, torch.logsumexp,
               torch.norm, "mean", "sum", "amax", "amin", "std", "var", "prod", "logsumexp", "norm",
               channels=_reduce)
