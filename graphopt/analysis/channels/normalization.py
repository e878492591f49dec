"""Layer families with per-channel parameters: BatchNorm / InstanceNorm, GroupNorm, LayerNorm over
the channel dim (module and ``F.layer_norm``), PReLU."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import numpy as np
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


@register_layer(nn.GroupNorm)
class _GroupNorm:
    def channels(rc: RuleContext, node: fx.Node, gn: nn.GroupNorm) -> None:
        src = rc.input(node.args[0])
        if src is None:
            raise Unsupported("its input has no analyzable channels")
        rc.expect_dim(src, 1, "GroupNorm")
        out = rc.identity(src)
        c = np.arange(out.size)
        rc.couple(out, c, out, c % (gn.num_channels // gn.num_groups), "group", f"num_groups={gn.num_groups}")
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
    """Couple a per-channel parameter read with ``get_attr`` to the channels of ``out``."""
    if a is None:
        return
    w = rc.attr_space(a, 0, role)
    if w is None:
        raise Unsupported("its per-channel parameters are not module attributes it alone reads")
    rc.couple(out, np.arange(out.size), w, np.arange(out.size), "param")


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


register_layer(F.layer_norm, channels=_layer_norm_fn)


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
