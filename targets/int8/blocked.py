"""Blocked copies of values in the int8 lowering, carried from conv to conv.

An int8 conv computes in the blocked layout ``(N, *spatial, C/16, 16)`` and the graph after it
expects NC(H)W. Converting back and forth around every pooling, residual add or activation
costs a copy per op and a kernel launch each, which is most of the time of a small int8 model
(28x28 Fashion-MNIST: more than the convolutions). So the translations keep, next to each NCHW
value they emit, a **blocked copy** when one is cheap to have:

* an int8 conv's output (its natural layout);
* max pooling of a blocked value (pooled in place, on the integers), and global average
  pooling (a mean over its spatial axes);
* an elementwise op (add, mul, relu, clamp, sigmoid...) whose tensor inputs all have blocked
  copies of one shape: the same op, emitted again on the copies;
* ``q8_quantize`` / ``q8_dequantize`` of a blocked value.

The NC(H)W value of each of these is an unblocking copy of the blocked one. A conv reads its
input's blocked copy when there is one, so the unblocking copies nobody reads are removed by
dead-code elimination: only the boundaries with ops that need NC(H)W (flatten, depthwise
convs, concat...) pay for a layout change.

The blocked copies' padding lanes (channels rounded up to 16) hold finite values that only ever
meet zero weights.

The elementwise and pooling translations replace the Relax frontend's for those ATen ops; on
values without blocked copies (every float graph) they are the frontend's own translation, except
that max pooling gets PyTorch's defaults filled in (the frontend fails on an omitted stride).
:mod:`graphopt.targets.lowering` imports this module, so they apply to every lowering.

The blocked copies are per lowering: they live in the :class:`~graphopt.targets.translations.LoweringState`
that ``lower()`` hands every translation registered here (``with_state=True``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..translations import LoweringState, register_translation
from .kernels import emit_gather, max_pool_blocked, unblock

__all__ = ["Blocked", "ELEMENTWISE", "blocked_of", "remember", "unblocked"]

#: ATen ops that act per element, so they can run on blocked copies unchanged.
ELEMENTWISE = ("add.Tensor", "sub.Tensor", "mul.Tensor", "relu.default", "relu6.default", "hardtanh.default",
               "clamp.default", "clamp_min.default", "clamp_max.default", "sigmoid.default", "hardswish.default",
               "hardsigmoid.default", "silu.default", "tanh.default", "gelu.default", "leaky_relu.default")


@dataclasses.dataclass(frozen=True)
class Blocked:
    """The blocked copy ``var`` (``(N, *spatial, C/16, 16)``) of a value with ``channels`` channels."""

    var: object
    channels: int

    def key(self):
        return tuple(int(s) for s in self.var.ty.shape), str(self.var.ty.dtype), self.channels


def blocked_of(state: LoweringState, value) -> Optional[Blocked]:
    """The blocked copy of the NC(H)W Relax ``value`` in this lowering, if it has one."""
    try:
        return state.blocked.get(value)
    except TypeError:  # not a Relax value (the frontend keeps some arguments as Python lists)
        return None


def remember(state: LoweringState, value, blocked, channels: int) -> None:
    state.blocked[value] = Blocked(blocked, channels)


def unblocked(bb, state: LoweringState, blocked, channels: int):
    """The NC(H)W value of ``blocked`` (an unblocking copy, dead code when no op reads it),
    with ``blocked`` remembered as its copy."""
    out = emit_gather(bb, "unblock", unblock, [blocked], channels)
    remember(state, out, blocked, channels)
    return out


def _tensor_args(node):
    import torch.fx as fx

    found = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a))
    return [a for a in found if isinstance(a, fx.Node)]


def _elementwise(op_name: str):
    def translate(node, importer, state: LoweringState):
        frontend = state.frontend(importer, op_name)
        args = _tensor_args(node)
        copies = [blocked_of(state, importer.env.get(a)) for a in args]
        if not args or not all(copies) or len({c.key() for c in copies}) != 1:
            return frontend(node)
        saved = {a: importer.env[a] for a in args}
        try:  # the frontend's own translation, reading the blocked copies
            importer.env.update({a: c.var for a, c in zip(args, copies)})
            blocked = frontend(node)
        finally:
            importer.env.update(saved)
        return unblocked(importer.block_builder, state, blocked, copies[0].channels)

    translate.__qualname__ = f"elementwise[{op_name}]"
    return translate


for _name in ELEMENTWISE:
    register_translation(_name, with_state=True)(_elementwise(_name))


def _pair(v, dims: int, default):
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, int):
        return [v] * dims
    v = [int(x) for x in v]
    return v * dims if len(v) == 1 else v


_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")


def _max_pool(node, importer, state: LoweringState):
    """Max pooling: of the input's blocked copy when it has one (then unblocked), else the
    frontend's NCHW pooling with PyTorch's defaults filled in (the frontend passes an omitted
    stride on as ``[]``, which Relax rejects)."""
    args = dict(zip(_POOL_ARGS, node.args), **node.kwargs)
    x, kernel, stride, padding, dilation, ceil_mode = (args.get(k) for k in _POOL_ARGS)
    kernel = _pair(kernel, 2, 1)
    stride, padding, dilation = _pair(stride, 2, kernel), _pair(padding, 2, 0), _pair(dilation, 2, 1)
    copy = blocked_of(state, importer.env[x])
    if copy is None:
        return importer._max_pool2d_impl(importer.env[x], kernel, stride, padding, dilation, bool(ceil_mode))
    bb = importer.block_builder
    pooled = emit_gather(bb, "max_pool_blocked", max_pool_blocked, [copy.var], kernel,
                         stride, padding, dilation, bool(ceil_mode), vector_tail=2)
    return unblocked(bb, state, pooled, copy.channels)


@register_translation("max_pool2d.default", with_state=True)
def translate_max_pool2d(node, importer, state: LoweringState):
    return _max_pool(node, importer, state)


@register_translation("max_pool2d_with_indices.default", with_state=True)
def translate_max_pool2d_with_indices(node, importer, state: LoweringState):
    """What ``torch.export`` turns every max pooling into (its ``getitem(0)`` follows).

    Returned as an un-emitted tuple, so ``getitem`` hands on the pooled variable itself (the
    one whose blocked copy is remembered). The indices are zeros, as in the frontend's own
    translation (TVM computes no pooling indices; the quantize pass leaves poolings whose
    indices are read in float).
    """
    from tvm import relax
    from tvm.relax import op as R

    out = _max_pool(node, importer, state)
    return relax.Tuple([out, importer.block_builder.emit(R.zeros_like(out))])


def _spatial_mean(node, importer, state: LoweringState, dims, keepdim: bool):
    """The mean over all spatial axes of the input's blocked copy (global average pooling),
    unblocked; None when the input has no blocked copy or ``dims`` are not its spatial axes."""
    from tvm.relax import op as R

    x = importer.env[node.args[0]]
    copy = blocked_of(state, x)
    ndim = len(x.ty.shape)
    if copy is None or ndim < 3 or not isinstance(dims, (list, tuple)):
        return None
    if sorted(d % ndim for d in dims) != list(range(2, ndim)):
        return None
    bb = importer.block_builder
    pooled = bb.emit(R.mean(copy.var, axis=list(range(1, ndim - 1)), keepdims=keepdim))
    return unblocked(bb, state, pooled, copy.channels)


@register_translation("mean.dim", with_state=True)
def translate_mean(node, importer, state: LoweringState):
    args = dict(zip(("input", "dim", "keepdim"), node.args), **node.kwargs)
    out = None
    if args.get("dtype") is None:
        out = _spatial_mean(node, importer, state, args.get("dim"), bool(args.get("keepdim", False)))
    return out if out is not None else state.frontend(importer, "mean.dim")(node)


def _adaptive_avg_pool2d(op_name: str):
    def translate(node, importer, state: LoweringState):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        out = None
        if size is not None and list(_pair(size, 2, 1)) == [1, 1]:
            out = _spatial_mean(node, importer, state, [2, 3], True)
        return out if out is not None else state.frontend(importer, op_name)(node)

    translate.__qualname__ = f"adaptive_avg_pool2d[{op_name}]"
    return translate


for _name in ("adaptive_avg_pool2d.default", "_adaptive_avg_pool2d.default"):
    register_translation(_name, with_state=True)(_adaptive_avg_pool2d(_name))
