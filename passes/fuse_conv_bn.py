"""Fold inference BatchNorm into the convolution or linear layer that feeds it (or into each layer
of a channel concat that feeds it).

BN(conv(x)) = conv'(x) with W' = W * s and b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps),
s taken per output channel. BatchNorm modules, ``F.batch_norm`` calls (timm's ``BatchNormAct2d``
once traced, or user code) and leaf BatchNorm subclasses with timm's ``drop``/``act`` (which stay)
all fold. Written only against graphopt's public API, like any plugin.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn

import graphopt

from .batch_norms import Norm, behind, describe, drop_static_asserts, fold, read_norm, remove_norm, sharing, value_users
from .weight_folding import fold_computed_weights

#: Which layers fold into a batch norm over a tensor of each rank (the pattern list is data).
FOLDABLE = {
    2: (nn.Linear,),
    3: (nn.Conv1d, nn.ConvTranspose1d),
    4: (nn.Conv2d, nn.ConvTranspose2d),
    5: (nn.Conv3d, nn.ConvTranspose3d),
}


def _cat_parts(src) -> Optional[List[fx.Node]]:
    """The tensors ``torch.cat(parts, dim=1)`` joins (MixNet's mixed kernels), else None."""
    if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target is torch.cat):
        return None
    parts = src.args[0] if src.args else src.kwargs.get("tensors")
    dim = src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)
    rank = len(getattr(src.meta.get("tensor_meta"), "shape", ()))
    if not (isinstance(parts, (list, tuple)) and all(isinstance(p, fx.Node) for p in parts)):
        return None
    return list(parts) if rank and isinstance(dim, int) and dim % rank == 1 else None


def folds_into(gm: fx.GraphModule, norm: Norm) -> List[fx.Node]:
    """The layers ``norm`` folds into: the one before it, or each part of a channel concat."""
    src, _ = behind(gm, norm.input)
    parts = _cat_parts(src)
    return [behind(gm, p)[0] for p in parts] if parts else [src]


def _layer_problem(gm, src, user, rank: int, shared: Dict[str, str], role: str) -> Optional[str]:
    """None if a batch norm over ``src`` (read by ``user``) folds into it, else why not."""
    if not isinstance(src, fx.Node) or src.op != "call_module":
        what = describe(gm, src) if isinstance(src, fx.Node) else repr(src)
        return f"{role} {what} is not a conv or linear module"
    layer = gm.get_submodule(src.target)
    if isinstance(layer, nn.Linear) and rank != 2:
        return "BatchNorm1d after a Linear folds only on (batch, features) outputs"
    if not isinstance(layer, FOLDABLE.get(rank, ())):
        return f"{role} {src.target} is a {type(layer).__name__}, not one of " \
               f"{', '.join(t.__name__ for t in FOLDABLE.get(rank, ()))}"
    others = [u.name for u in value_users(src) if u is not user]
    if others:
        return f"the output of {src.target} is also used by {', '.join(others)}; folding would change that use"
    return shared.get(src.target)


def why_not(gm: fx.GraphModule, norm: Norm, shared: Dict[str, str]) -> Optional[str]:
    """None if ``norm`` can be folded into its input, else the reason it cannot."""
    if not isinstance(norm.input, fx.Node):
        return f"its input {norm.input!r} is not a conv or linear module"
    meta = norm.input.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return f"{norm.input.name} has no shape information"
    rank = len(meta.shape)
    src, chain = behind(gm, norm.input)
    parts = _cat_parts(src)
    if parts is None:
        why = _layer_problem(gm, src, chain[-1] if chain else norm.node, rank, shared, "its input")
    elif len(set(parts)) < len(parts):
        why = f"its input {src.name} (cat) joins the same tensor twice"
    else:
        role = f"its input {src.name} (cat) joins a part that does not fold:"
        why = next(filter(None, (_layer_problem(gm, *_feeding(gm, p, src), rank, shared, role) for p in parts)), None)
    return why or sharing(gm, norm, shared)


def _feeding(gm, part: fx.Node, cat: fx.Node):
    """The layer behind ``part``, and the node through which it feeds ``cat``."""
    layer, chain = behind(gm, part)
    return layer, chain[-1] if chain else cat


@graphopt.register_pass(
    "fuse_conv_bn",
    exact=True,
    description="Fold BatchNorm (modules, F.batch_norm, timm's BatchNormAct2d) into the preceding "
                "Conv1d/2d/3d, ConvTranspose or Linear",
    runs_before=("prune_channels", "separable_conv", "quantize"),
)
def fuse_conv_bn(gm: fx.GraphModule, ctx: graphopt.PassContext) -> fx.GraphModule:
    """Fold every foldable inference BatchNorm; explain each one left alone. Weights computed
    from parameters (weight standardization, weight norm) become constants first."""
    computed = fold_computed_weights(gm)
    if computed:
        ctx.note(f"folded {computed} weight(s) computed from parameters on every call (weight "
                 "standardization, weight norm...) into constant weights: exact at inference; a later "
                 "training pass trains the folded weights")
    shared = graphopt.shared_weights(gm)
    folded, functional, tails, asserts = 0, 0, 0, 0
    for node in list(gm.graph.nodes):
        norm = read_norm(gm, node)
        if norm is None:
            continue
        reason = norm if isinstance(norm, str) else why_not(gm, norm, shared)
        if reason:
            name = norm.name if isinstance(norm, Norm) else node.target if node.op == "call_module" else node.name
            ctx.note(f"{name} kept: {reason}")
            continue
        start = 0
        for layer in folds_into(gm, norm):
            c = layer.meta["tensor_meta"].shape[1]
            s = slice(start, start + c)
            gm.add_submodule(layer.target, fold(gm.get_submodule(layer.target), norm.scale[s], norm.shift[s]))
            asserts += drop_static_asserts(gm, layer)
            start += c
        remove_norm(gm, norm, norm.input)
        folded, functional, tails = folded + 1, functional + bool(norm.stats), tails + bool(norm.tail)
    gm.delete_all_unused_submodules()
    if functional or tails:
        ctx.note(f"folded {folded} batch norm(s): {functional} F.batch_norm call(s), "
                 f"{tails} leaf module(s) replaced by their drop and act")
    if asserts:
        ctx.note(f"removed {asserts} torch._assert shape check(s) on folded layers: they hold for "
                 "the static shapes of the graph")
    return gm
