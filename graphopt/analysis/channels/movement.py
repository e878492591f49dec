"""Layer families that move data without computing: view, reshape, flatten, unflatten,
transpose, permute, squeeze, expand, indexing, channel shuffle, pixel shuffle.

The generic rule does not guess: it replays the op on a *probe*, a tensor holding at every
position the channel found there, and reads the mapping off the result (a flatten gives blocks
of H*W features per channel, a permute moves the channel dim). A view that spreads the channels
over several dims (``(n, g, c // g, h, w)`` in a channel shuffle) becomes a :class:`Chain`
until a later view gathers them again. A contiguous slice of the channels (GhostNet's
``out[:, :self.out_chs]``, ReXNet's and DPN's ``x[:, :c]`` / ``x[:, c:]``) maps offsets, as a
split does, and its bounds are rewritten after a cut.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ...layer_registry import register_layer
from .context import RuleContext
from .fxutil import arg, is_tensor, norm_dim
from .spaces import Chain, Space, Unsupported

#: ops whose shape arguments (positional after the tensor) give the output size per dim
_EXPLICIT = {"view", "reshape", "expand", torch.reshape}
#: ops whose output shape is computed from the input's
_COMPUTED = {
    "flatten", "transpose", "permute", "movedim", "moveaxis", "swapaxes", "swapdims", "t", "squeeze",
    "unsqueeze", "repeat", "flip", "roll", "view_as", "reshape_as", "expand_as", "__getitem__", "narrow",
    torch.flatten, torch.transpose, torch.permute, torch.movedim, torch.moveaxis, torch.swapaxes,
    torch.swapdims, torch.t, torch.squeeze, torch.unsqueeze, torch.flip, torch.roll, torch.narrow,
    operator.getitem, nn.Flatten,
}
#: ops that select along a dim: they must leave every channel dim whole
_SELECTING = {"__getitem__", "narrow", "roll", operator.getitem, torch.narrow, torch.roll}
_UNFLATTEN = {"unflatten", torch.unflatten, nn.Unflatten}
_SELECTS = "it selects or reorders along a channel dim"


def _varies(p: torch.Tensor, d: int) -> bool:
    return p.shape[d] > 1 and bool((p != p.narrow(d, 0, 1)).any())


def _along(p: torch.Tensor, d: int) -> np.ndarray:
    """Values of ``p`` along dim ``d`` (at index 0 of every other dim)."""
    return p.movedim(d, 0).reshape(p.shape[d], -1)[:, 0].numpy().astype(np.int64)


def _index_probe(shape: Sequence[int], dim: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return torch.arange(shape[dim], dtype=torch.int64).view(view).expand(*shape).contiguous()


def _unflatten_adapts(rc, node, module, in_shape, adapts_in):
    """unflatten(dim, sizes): the new dims have the sizes given (literals are fixed)."""
    if module is not None:
        dim, sizes, locs = module.dim, list(module.unflattened_size), [None] * len(module.unflattened_size)
    else:
        dim, sizes = rc.value(arg(node, 1, "dim")), arg(node, 2, "sizes")
        if not isinstance(sizes, (list, tuple)):
            raise Unsupported("its sizes are not a literal list")
        locs = [("args", 2, i) for i in range(len(sizes))] if len(node.args) > 2 else [None] * len(sizes)
    dim = norm_dim(dim, len(in_shape))
    adapts = list(adapts_in[:dim]) + [s == -1 or not isinstance(s, int) for s in sizes] + list(adapts_in[dim + 1:])
    locations = [None] * dim + locs + [None] * (len(in_shape) - dim - 1)
    return tuple(adapts), locations


def _shape_args(rc: RuleContext, node: fx.Node) -> Tuple[List[Any], List[Optional[tuple]]]:
    """(sizes, locations) of an explicit-shape op's size arguments: ``view(n, -1)``,
    ``view((n, -1))``, ``torch.reshape(x, shape)``."""
    args = list(node.args[1:])
    base: tuple = ("args",)
    start = 1
    if node.op == "call_function":  # torch.reshape(x, shape)
        args = [node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return list(args[0]), [base + (start, i) for i in range(len(args[0]))]
    if len(args) == 1 and isinstance(args[0], fx.Node):
        v = rc.value(args[0])
        if isinstance(v, (tuple, list, torch.Size)):
            return [args[0]] * len(v), [None] * len(v)  # a whole shape from elsewhere: adapts
    return args, [base + (start + i,) for i in range(len(args))]


def _shape_read(rc: RuleContext, size: Any) -> Optional[Tuple[Space, str]]:
    """The channel space whose count a size argument reads at run time (``t.shape[k]``,
    ``t.size(k)``, ``B, N, C = t.shape``), when dim ``k`` of ``t`` carries channels."""
    if not isinstance(size, fx.Node):
        return None
    t, k = None, None
    if size.op == "call_method" and size.target == "size" and len(size.args) == 2:
        t, k = size.args
    elif size.op == "call_function" and size.target is operator.getitem and isinstance(size.args[1], int):
        shape = size.args[0]
        if isinstance(shape, fx.Node) and (
                (shape.op == "call_function" and shape.target is getattr and shape.args[1:] == ("shape",))
                or (shape.op == "call_method" and shape.target == "size" and len(shape.args) == 1)):
            t, k = shape.args[0], size.args[1]
    got = rc.channels_of(t) if isinstance(t, fx.Node) and isinstance(k, int) else None
    ndim = len(rc.shape(t) or ()) if isinstance(t, fx.Node) else 0
    if isinstance(got, Space) and ndim and norm_dim(k, ndim) == got.dim:
        return got, t.name
    return None


def _set_arg(node: fx.Node, loc: tuple, value: int) -> None:
    args = list(node.args)
    if len(loc) == 2:
        args[loc[1]] = value
    else:
        inner = list(args[loc[1]])
        inner[loc[2]] = value
        args[loc[1]] = type(node.args[loc[1]])(inner)
    node.args = tuple(args)


def _run_movement(rc: RuleContext, node: fx.Node, module: Optional[nn.Module], probe: torch.Tensor) -> torch.Tensor:
    x = node.args[0]

    def sub(a):
        if a is x:
            return probe
        if isinstance(a, fx.Node) and is_tensor(a):
            return torch.empty(rc.shape(a))  # view_as / expand_as read only its shape
        return rc.value(a)

    args = [sub(a) for a in node.args]
    kwargs = {k: sub(v) for k, v in node.kwargs.items()}
    try:
        if node.op == "call_module":
            return module(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise Unsupported(f"could not replay it on a channel map: {e}") from None


def _index_element(index: Any, ndim: int, dim: int) -> Optional[int]:
    """Position in a ``getitem`` index tuple of the element that indexes input dim ``dim``."""
    consumed = sum(1 for e in index if e is not None and e is not Ellipsis)
    at = 0
    for i, e in enumerate(index):
        if e is Ellipsis:
            at += ndim - consumed
        elif e is not None:
            if at == dim:
                return i
            at += 1
    return None


def channel_slice(rc: RuleContext, node: fx.Node, src: Space, probe: torch.Tensor) -> bool:
    """``x[:, a:b]`` or ``x.narrow(1, a, b - a)``: output channel j is input channel a + j; the
    channels before a and from b on are pieces this op does not read (as for an unused split
    output), so they may be cut too; the bounds are rewritten from the pieces' new sizes.

    ``probe`` is the op replayed on the input's channel numbers. Returns False when the op
    keeps every channel (it only slices other dims).
    """
    varying = [d for d in range(probe.dim()) if _varies(probe, d)]
    if len(varying) != 1:
        return False
    d = varying[0]
    ids = _along(probe, d)
    lo, hi = int(ids[0]), int(ids[0]) + len(ids)
    if (lo, hi) == (0, src.size):
        return False
    if not np.array_equal(ids, np.arange(lo, hi)):
        raise Unsupported(_SELECTS)
    ndim = len(rc.shape(node.args[0]))
    if node.target == "narrow" or node.target is torch.narrow:
        if len(node.args) != 4 or node.kwargs or norm_dim(rc.value(node.args[1]), ndim) != src.dim:
            raise Unsupported(_SELECTS)
        loc = None
    else:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        loc = _index_element(index, ndim, src.dim)
        e = index[loc] if loc is not None else None
        if not isinstance(e, slice) or rc.value(e).indices(src.size) != (lo, hi, 1):
            raise Unsupported(_SELECTS)
    out = rc.new_space(d)
    before = rc.piece_space("before", lo, src.dim) if lo else None
    after = rc.piece_space("after", src.size - hi, src.dim) if hi < src.size else None
    for piece, offset in ((before, 0), (out, lo), (after, hi)):
        if piece is not None:
            rc.couple(src, offset + np.arange(piece.size), piece, np.arange(piece.size), "offset",
                      f"offset {offset}")

    def rewrite(n: fx.Node, new_size: Callable[[Space], int]) -> None:
        start = int(new_size(before)) if before is not None else 0
        stop = start + int(new_size(out))
        if loc is None:  # narrow(x, dim, start, length)
            n.args = (n.args[0], n.args[1], start, stop - start)
            return
        index = list(n.args[1]) if isinstance(n.args[1], tuple) else [n.args[1]]
        index[loc] = slice(start or None, stop if after is not None else None, None)
        n.args = (n.args[0], tuple(index) if isinstance(n.args[1], tuple) else index[0])

    rc.on_resize(rewrite)
    return True


def _computed_adapts(rc, node, module, shape_in, adapts_in, check_identity_dims=()) -> Tuple[bool, ...]:
    """Which output dims follow the input's channel count, found by replaying the op on one
    probe per input dim; also checks that the op keeps ``check_identity_dims`` whole."""
    out_shape = rc.shape(node)
    images: Dict[int, List[int]] = {}
    for k, size in enumerate(shape_in):
        if size == 1:
            continue
        p = _run_movement(rc, node, module, _index_probe(shape_in, k))
        images[k] = [d for d in range(p.dim()) if _varies(p, d)]
        if k in check_identity_dims:
            d = images[k]
            if len(d) != 1 or p.shape[d[0]] != size or not np.array_equal(_along(p, d[0]), np.arange(size)):
                raise Unsupported(_SELECTS)
    adapts = []
    for d in range(len(out_shape)):
        pre = [k for k, ds in images.items() if d in ds]
        adapts.append(any(adapts_in[k] for k in pre) if pre else True)
    return tuple(adapts)


def _parameter_channels(rc: RuleContext, x: fx.Node) -> Optional[Space]:
    """A per-channel parameter read with ``get_attr`` and reshaped to broadcast (ConvNeXt's
    ``gamma.reshape(1, -1, 1, 1)``, ``weight[:, None, None]``): its one dim longer than 1 is
    a param space, followed through the view like a tensor's channels."""
    shape = rc.shape(x)
    if x.op != "get_attr" or shape is None:
        return None
    long = [d for d, n in enumerate(shape) if n > 1]
    return rc.attr_space(x, long[0], "channel") if len(long) == 1 else None


def _movement(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    key = node.target if node.op != "call_module" else type(module)
    # sizes read from another tensor's channel count at run time (EdgeNeXt's `B, N, C = x.shape`
    # then `y.reshape(B, N, C)`): that count must follow this op's output, or stay as it is
    reads = {}
    if key in _EXPLICIT:
        reads = {d: r for d, size in enumerate(_shape_args(rc, node)[0])
                 if (r := _shape_read(rc, size)) is not None}
    try:
        _movement_rule(rc, node, module, key, reads)
    finally:
        for read, name in reads.values():  # the ones not coupled to the output below
            rc.freeze(read, f"its channel count is read from `{name}`'s shape by `{node.name}`, "
                            "which cannot follow a cut")


def _movement_rule(rc: RuleContext, node: fx.Node, module: Optional[nn.Module], key: Any,
                   reads: Dict[int, Tuple[Space, str]]) -> None:
    x = node.args[0]
    got = rc.channels_of(x)
    in_shape = rc.shape(x)
    if isinstance(got, Chain):
        start, probe_in, adapts_in = got.start, got.probe, got.adapts
    elif isinstance(got, Space) or (got := _parameter_channels(rc, x)) is not None:
        start, probe_in, adapts_in = got, _index_probe(in_shape, got.dim), (True,) * len(in_shape)
    else:
        rc.opaque(rc.reason(x))
        return
    p = _run_movement(rc, node, module, probe_in)
    if tuple(p.shape) != tuple(rc.shape(node) or ()):
        raise Unsupported(f"replayed shape {tuple(p.shape)} differs from the recorded one")
    if key in _SELECTING and isinstance(got, Space) and not got.is_param and channel_slice(rc, node, got, p):
        return
    locations: List[Optional[tuple]] = [None] * p.dim()
    if key in _EXPLICIT:
        sizes, locations = _shape_args(rc, node)
        if len(sizes) != p.dim():
            raise Unsupported("its shape arguments could not be matched to its output dims")
        lead = p.dim() - len(in_shape)
        adapts = tuple(
            (adapts_in[d - lead] if key == "expand" and d >= lead else True) if s == -1
            else not isinstance(s, int) for d, s in enumerate(sizes))
    elif key in _UNFLATTEN:
        adapts, locations = _unflatten_adapts(rc, node, module, in_shape, adapts_in)
    else:
        channel_dims = [k for k in range(len(in_shape)) if _varies(probe_in, k)]
        check = channel_dims if key in _SELECTING else ()
        adapts = _computed_adapts(rc, node, module, in_shape, adapts_in, check)
    dims = [d for d in range(p.dim()) if _varies(p, d)]
    if not dims:
        if start.size > 1:
            raise Unsupported("its output has no channel structure left")
        rc.opaque("a single channel")
        return
    if len(dims) == 1:
        d = dims[0]
        if d == 0 and p.dim() > 1:
            raise Unsupported("it moves the channels into dim 0 (the batch dim)")
        out = rc.new_space(d)
        ids = _along(p, d)
        kind = "identity" if np.array_equal(ids, np.arange(start.size)) else (
            "permutation" if len(ids) == start.size else "block")
        rc.couple(out, np.arange(out.size), start, ids, kind,
                  f"{out.size} features from {start.size} channels" if kind == "block" else "")
        read = reads.pop(d, None)
        if read is not None and read[0] is not start and read[0].size == out.size:
            # both counts must stay equal: cut together
            rc.couple(out, np.arange(out.size), read[0], np.arange(out.size), "same-count",
                      f"its channel count is read from `{read[1]}`'s shape")
        elif read is not None and read[0] is not start:
            reads[d] = read
        if not adapts[d]:
            loc = locations[d]
            if loc is None:
                raise Unsupported(f"it gives the channel dim {d} a fixed size that cannot be rewritten")

            def rewrite(n: fx.Node, new_size: Callable[[Space], int], loc=loc, out=out) -> None:
                _set_arg(n, loc, int(new_size(out)))

            rc.on_resize(rewrite)
        return
    # channels spread over several dims (e.g. (n, groups, c // groups, h, w) in a channel shuffle):
    # only one of them may follow the channel count; every fixed one must stay whole, so the
    # channels at the same position along the others are cut together
    moving = [d for d in dims if adapts[d]]
    if len(moving) != 1:
        raise Unsupported(f"it spreads the channels over dims {dims} of which "
                          f"{'none' if not moving else 'several'} can change size")
    for d in dims:
        if not adapts[d]:
            first = p.narrow(d, 0, 1).numpy().ravel()
            for i in range(1, p.shape[d]):
                rc.couple(start, first, start, p.narrow(d, i, 1).numpy().ravel(), "fixed-dim",
                          f"dim {d} of `{node.name}` has fixed size {p.shape[d]}")
    rc.set_chain(Chain(start, p, tuple(adapts)))


register_layer(*_EXPLICIT, *_COMPUTED, *_UNFLATTEN, channels=_movement)


def _channel_shuffle(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    src = rc.input_or_opaque(node.args[0])
    if src is None:
        return
    rc.expect_dim(src, 1, "channel_shuffle")
    g = module.groups if module is not None else rc.value(arg(node, 1, "groups"))
    per = src.size // g
    c = np.arange(src.size)
    rc.couple(src, c, src, c % per, "fixed-dim", f"channel shuffle with {g} groups")
    out = rc.new_space(1)
    j = np.arange(src.size)  # output j = a * g + b takes input b * per + a
    rc.couple(out, j, src, (j % g) * per + j // g, "permutation", f"channel shuffle, {g} groups")


register_layer(torch.channel_shuffle, torch.native_channel_shuffle, nn.ChannelShuffle, channels=_channel_shuffle)


def _pixel_shuffle(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    """Each coarse channel is r*r fine ones (r: the up- or downscale factor)."""
    src = rc.input_or_opaque(node.args[0])
    if src is None:
        return
    rc.expect_dim(src, 1, "pixel shuffle")
    out = rc.new_space(1)
    if module is not None:
        up = isinstance(module, nn.PixelShuffle)
        r = module.upscale_factor if up else module.downscale_factor
    else:
        up = "unshuffle" not in node.target.__name__
        r = rc.value(arg(node, 1, "upscale_factor" if up else "downscale_factor"))
    coarse, fine = (out, src) if up else (src, out)
    c = np.arange(coarse.size)
    for k in range(r * r):
        rc.couple(coarse, c, fine, c * r * r + k, "block", f"pixel shuffle, factor {r}")


register_layer(nn.PixelShuffle, nn.PixelUnshuffle, F.pixel_shuffle, F.pixel_unshuffle,
               torch.pixel_shuffle, torch.pixel_unshuffle, channels=_pixel_shuffle)
