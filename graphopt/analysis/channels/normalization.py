"""Layer families with per-channel parameters: BatchNorm / InstanceNorm, GroupNorm, LayerNorm over
the channel dim, PReLU; as modules and in functional form (``F.batch_norm``, ``F.group_norm``,
``F.layer_norm``...: what fx leaves of a norm subclass with its own ``forward``, such as timm's
``BatchNormAct2d``, ``GroupNormAct`` or ``LayerNorm2d``)."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Tuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ...layer_registry import register_layer
from .context import RuleContext
from .fxutil import arg
from .spaces import Space, Unsupported

_NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")


def _channel_params(rc: RuleContext, node: fx.Node, module: nn.Module, out: Space, names: Iterable[str]) -> None:
    for p in names:
        if getattr(module, p, None) is not None:
            rc.couple(out, np.arange(out.size), rc.param(node.target, p, 0, "channel"),
                      np.arange(out.size), "param")


@register_layer(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
                nn.InstanceNorm2d, nn.InstanceNorm3d, nn.SyncBatchNorm)
class _BatchNorm:
    def channels(rc: RuleContext, node: fx.Node, bn: nn.Module) -> None:
        src = rc.input_or_opaque(node.args[0])
        if src is None:  # channels that cannot change: its parameters stay as they are
            return
        rc.expect_dim(src, 1, type(bn).__name__)
        _channel_params(rc, node, bn, rc.identity(src), _NORM_PARAMS)

    def resize(m: nn.Module, old) -> None:
        t = m.running_mean if m.running_mean is not None else m.weight
        m.num_features = t.shape[0]


def _same_offset_per_group(rc: RuleContext, out: Space, groups: Any) -> None:
    """Group norm: cut the same offset in every group, so that the channel count stays a
    multiple of the number of groups (which the cut does not change) and every group keeps
    as many channels as the others."""
    if not isinstance(groups, int) or groups < 1 or out.size % groups:
        raise Unsupported(f"num_groups={groups!r} does not divide its {out.size} channels")
    c = np.arange(out.size)
    rc.couple(out, c, out, c % (out.size // groups), "group", f"num_groups={groups}")


@register_layer(nn.GroupNorm)
class _GroupNorm:
    def channels(rc: RuleContext, node: fx.Node, gn: nn.GroupNorm) -> None:
        src = rc.input(node.args[0])
        if src is None:
            raise Unsupported("its input has no analyzable channels")
        rc.expect_dim(src, 1, "GroupNorm")
        out = rc.identity(src)
        _same_offset_per_group(rc, out, gn.num_groups)
        _channel_params(rc, node, gn, out, ("weight", "bias"))

    def resize(m: nn.GroupNorm, old) -> None:
        m.num_channels = m.weight.shape[0]


@register_layer(nn.LayerNorm)
class _LayerNorm:
    def channels(rc: RuleContext, node: fx.Node, ln: nn.LayerNorm) -> None:
        src = rc.input(node.args[0])
        ndim = len(rc.shape(node))
        if src is None or len(ln.normalized_shape) != 1 or src.dim != ndim - 1:
            raise Unsupported("normalizes over more than the channel dim")
        _channel_params(rc, node, ln, rc.identity(src), ("weight", "bias"))

    def resize(m: nn.LayerNorm, old) -> None:
        m.normalized_shape = (m.weight.shape[0],)


def _attr_param(rc: RuleContext, a: Any, out: Space, role: str) -> None:
    """Couple a per-channel parameter read with ``get_attr`` to the channels of ``out``; when
    the cut slices it, the owning module's family resizes it (``num_features``...)."""
    if a is None:
        return
    w = rc.attr_space(a, 0, role)
    if w is None or w.size != out.size:
        raise Unsupported("its per-channel parameters are not module attributes it alone reads")
    rc.couple(out, np.arange(out.size), w, np.arange(out.size), "param")


def _functional_norm(params: Tuple[str, ...], groups_at: Optional[int] = None) -> Callable:
    """The rule of a functional norm over dim 1 whose per-channel tensors (statistics, affine)
    are the arguments named ``params`` (positions 1, 2...; or keywords, or None): output c =
    input c, each tensor's entry c follows channel c. Statistics from the batch
    (``training=True``, or None) are per channel too. With ``groups_at`` (group norm's
    ``num_groups``, a literal the cut leaves as it is) the same offset is cut in every group."""

    def rule(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
        src = rc.input_or_opaque(node.args[0])
        if src is None:  # e.g. weight standardization: a norm over a constant, nothing to follow
            return
        rc.expect_dim(src, 1, "a functional norm")
        out = rc.identity(src)
        if groups_at is not None:
            _same_offset_per_group(rc, out, rc.value(arg(node, groups_at, "num_groups")))
        first = 1 if groups_at is None else 2
        for i, name in enumerate(params, first):
            _attr_param(rc, arg(node, i, name), out, "channel")

    return rule


# F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps); the same
# positions for F.instance_norm; torch.batch_norm(x, weight, bias, running_mean, running_var, ...)
_STATS_FIRST = ("running_mean", "running_var", "weight", "bias")
register_layer(F.batch_norm, F.instance_norm, channels=_functional_norm(_STATS_FIRST))
register_layer(torch.batch_norm, torch.instance_norm,
               channels=_functional_norm(("weight", "bias", "running_mean", "running_var")))
register_layer(F.group_norm, torch.group_norm, channels=_functional_norm(("weight", "bias"), groups_at=1))


def _layer_norm_fn(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    """``F.layer_norm(x, (C,), weight, bias)`` over the channel dim (ConvNeXt's LayerNorm2d
    permutes to channels-last first); the literal ``(C,)`` is rewritten after a cut."""
    src = rc.input(node.args[0])
    shape = rc.value(arg(node, 1, "normalized_shape"))
    if src is None or src.dim != len(rc.shape(node)) - 1 or tuple(shape) != (src.size,):
        raise Unsupported("normalizes over more than the channel dim")
    out = rc.identity(src)
    _attr_param(rc, arg(node, 2, "weight"), out, "channel")
    _attr_param(rc, arg(node, 3, "bias"), out, "channel")

    def rewrite(n: fx.Node, new_size: Callable[[Space], int]) -> None:
        if len(n.args) > 1:
            n.args = (n.args[0], (int(new_size(out)),), *n.args[2:])
        else:
            n.kwargs = {**n.kwargs, "normalized_shape": (int(new_size(out)),)}

    rc.on_resize(rewrite)


register_layer(F.layer_norm, torch.layer_norm, channels=_layer_norm_fn)


@register_layer(nn.PReLU)
class _PReLU:
    def channels(rc: RuleContext, node: fx.Node, m: nn.PReLU) -> None:
        src = rc.input(node.args[0])
        if m.num_parameters == 1:
            return rc.identity(src) if src is not None else rc.opaque(rc.reason(node.args[0]))
        if src is None:
            raise Unsupported("its input has no analyzable channels")
        rc.expect_dim(src, 1, "PReLU")
        _channel_params(rc, node, m, rc.identity(src), ("weight",))

    def resize(m: nn.PReLU, old) -> None:
        m.num_parameters = m.weight.shape[0]
