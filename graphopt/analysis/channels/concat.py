"""Layer families that join or divide tensors: concat (input k's channel c is the output's
channel offset_k + c), split / chunk / unbind (the reverse), stack along another dim."""
from __future__ import annotations

import operator
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ...layer_registry import register_layer
from .context import RuleContext
from .fxutil import arg, norm_dim
from .spaces import Space, Unsupported


def _cat(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    tensors = arg(node, 0, "tensors")
    if tensors is None:
        tensors = node.kwargs.get("tensors")
    ndim = len(rc.shape(node))
    dim = norm_dim(rc.value(arg(node, 1, "dim", 0)), ndim)
    srcs = [rc.input(t) for t in tensors]
    dims = {s.dim for s in srcs if s is not None}
    if len(dims) > 1:
        raise Unsupported(f"concatenates tensors with their channels in different dims {sorted(dims)}")
    if not dims:
        rc.opaque(rc.reason(tensors[0]))
        return
    dc = dims.pop()
    out = rc.new_space(dc)
    if dim == dc:
        offset = 0
        for t, s in zip(tensors, srcs):
            size = rc.shape(t)[dc]
            if s is None:
                rc.freeze(out, f"concatenated with `{t.name}` ({rc.reason(t)})", np.arange(offset, offset + size))
            else:
                rc.couple(s, np.arange(size), out, offset + np.arange(size), "offset", f"offset {offset}")
            offset += size
        return
    for t, s in zip(tensors, srcs):
        if s is None:
            rc.freeze(out, f"concatenated with `{t.name}` ({rc.reason(t)})")
        else:
            rc.couple(s, np.arange(s.size), out, np.arange(out.size), "identity")


register_layer(torch.cat, torch.concat, torch.concatenate, channels=_cat)


def _split(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    """Each piece read with ``getitem`` gets its own space (an unused piece: a piece space);
    along the channel dim, piece k's channel c is the input's offset_k + c."""
    x = node.args[0]
    src = rc.input(x)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dim_at = 1 if name == "unbind" else 2
    if name in ("unbind", "tensor_split") and src is not None:
        if norm_dim(rc.value(arg(node, dim_at, "dim", 0)), len(rc.shape(x))) == src.dim:
            raise Unsupported(f"{name} along the channel dim")
    shapes = [tuple(m.shape) for m in node.meta.get("tensor_meta")]
    users: Dict[int, List[fx.Node]] = {}
    for u in node.users:
        if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int):
            users.setdefault(u.args[1] % len(shapes), []).append(u)
        else:
            raise Unsupported(f"its result is used as a whole by `{u.name}`")
    if src is None:
        for us in users.values():
            for u in us:
                rc.opaque(rc.reason(x), node=u)
        return
    dim = norm_dim(rc.value(arg(node, dim_at, "dim", 0)), len(rc.shape(x)))
    if name in ("unbind", "tensor_split") or dim != src.dim:
        for us in users.values():
            for u in us:
                out = rc.new_space(src.dim, node=u)
                rc.couple(src, np.arange(src.size), out, np.arange(out.size), "identity")
        return
    pieces, offset = [], 0
    for i, shape in enumerate(shapes):
        size = shape[dim]
        space = None
        for u in users.get(i, []):
            s = rc.new_space(dim, node=u)
            space = space or s
            rc.couple(src, offset + np.arange(size), s, np.arange(size), "offset", f"offset {offset}")
        if space is None:
            space = rc.piece_space(str(i), size, dim)
            rc.couple(src, offset + np.arange(size), space, np.arange(size), "offset", f"offset {offset}")
        pieces.append(space)
        offset += size

    def rewrite(n: fx.Node, new_size: Callable[[Space], int]) -> None:
        # chunk(n) / split(k) would re-split the smaller tensor differently: give explicit sizes
        n.args = (n.args[0], [int(new_size(p)) for p in pieces])
        n.kwargs = {"dim": dim}
        n.target = "split" if n.op == "call_method" else torch.split

    rc.on_resize(rewrite)


register_layer(torch.split, torch.chunk, torch.tensor_split, torch.unbind,
               "split", "chunk", "tensor_split", "unbind", "split_with_sizes", channels=_split)


def _stack(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    """``torch.stack(xs, dim)`` along a new dim: channel c of every input is channel c of the
    output, whose channel dim moves one up when the new dim comes before it."""
    tensors = arg(node, 0, "tensors")
    ndim = len(rc.shape(node))
    dim = norm_dim(rc.value(arg(node, 1, "dim", 0)), ndim)
    srcs = [rc.input(t) for t in tensors]
    dims = {s.dim for s in srcs if s is not None}
    if len(dims) != 1 or any(s is None for s in srcs):
        raise Unsupported("stacks tensors whose channels differ or cannot change")
    dc = dims.pop()
    out = rc.new_space(dc + 1 if dim <= dc else dc)
    for s in srcs:
        rc.couple(s, np.arange(s.size), out, np.arange(out.size), "identity")


register_layer(torch.stack, channels=_stack)
