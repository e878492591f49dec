"""Fold inference BatchNorm into the convolution or linear layer that feeds it.

BN(conv(x)) = conv'(x) with W' = W * s and b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps),
s taken per output channel. Written only against graphopt's public API, like any plugin.
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

import graphopt

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Which layers each BatchNorm can fold into (the pattern list is data).
FOLDABLE = {
    nn.BatchNorm1d: (nn.Conv1d, nn.ConvTranspose1d, nn.Linear),
    nn.BatchNorm2d: (nn.Conv2d, nn.ConvTranspose2d),
    nn.BatchNorm3d: (nn.Conv3d, nn.ConvTranspose3d),
}


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def fold(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of ``layer`` whose output equals ``bn(layer(x))`` in eval mode."""
    scale, shift = _bn_scale_shift(bn)
    w = layer.weight.detach().double()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        # weight is (in, out/groups, *k): output channel o = g * (out/groups) + j
        g = layer.groups
        shaped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        s = scale.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        new_w = (shaped * s).reshape(w.shape)
    else:
        new_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    fused = copy.deepcopy(layer)
    fused.weight = nn.Parameter(new_w.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    fused.bias = nn.Parameter((bias * scale + shift).to(layer.weight.dtype))
    return fused


def _why_not(gm: fx.GraphModule, bn_node: fx.Node, bn: nn.Module) -> Optional[str]:
    """None if ``bn_node`` can be folded into its input, else the reason it cannot."""
    src = bn_node.args[0] if bn_node.args else None
    if not isinstance(src, fx.Node) or src.op != "call_module":
        return "its input is not a conv or linear module"
    layer = gm.get_submodule(src.target)
    if not isinstance(layer, FOLDABLE[type(bn)]):
        return f"its input {src.target} is a {type(layer).__name__}, not one of " \
               f"{', '.join(t.__name__ for t in FOLDABLE[type(bn)])}"
    if bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False uses batch statistics)"
    if len(src.users) > 1:
        others = ", ".join(u.name for u in src.users if u is not bn_node)
        return f"the output of {src.target} is also used by {others}; folding would change that use"
    shared = graphopt.shared_weights(gm)
    if src.target in shared or bn_node.target in shared:
        return shared.get(src.target) or shared[bn_node.target]
    if isinstance(layer, nn.Linear):
        shape = src.meta.get("tensor_meta")
        if shape is None or len(shape.shape) != 2:
            return "BatchNorm1d after a Linear folds only on (batch, features) outputs"
    return None


@graphopt.register_pass(
    "fuse_conv_bn",
    exact=True,
    description="Fold BatchNorm into the preceding Conv1d/2d/3d, ConvTranspose or Linear",
    runs_before=("prune_channels", "separable_conv", "quantize"),
)
def fuse_conv_bn(gm: fx.GraphModule, ctx: graphopt.PassContext) -> fx.GraphModule:
    """Fold every foldable inference BatchNorm; explain each one left alone."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(node.target)
        if not isinstance(bn, _BN):
            continue
        reason = _why_not(gm, node, bn)
        if reason:
            ctx.note(f"{node.target} kept: {reason}")
            continue
        src = node.args[0]
        gm.add_submodule(src.target, fold(gm.get_submodule(src.target), bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    return gm
