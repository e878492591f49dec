"""Relax translations of graphopt's quantized ops: real integer compute, no float emulation.

Registered with :func:`graphopt.targets.translations.register_translation` when
:mod:`graphopt.targets.lowering` is imported, so ``Target.lower`` turns each
``torch.ops.graphopt.q8_*`` node of the exported program (the ops of :mod:`graphopt.ops.int8`) into:

``q8_conv`` (groups = 1), ``q8_linear``
    the input in the conv layout (padded with the zero point; a copy only when needed) ->
    the direct int8 x int8 -> int32 convolution on packed weights (:mod:`.kernels`) ->
    ``+ (bias - x_zp * sum(w))`` in int32 (a weights-only term, lifted out of the model at
    build time) -> requantize, in the blocked layout the next conv reads (:mod:`.blocked`).
``q8_conv`` (depthwise: one filter per channel)
    the input's blocked copy as it lies (a previous conv's output), the border read as the zero
    point inside the kernel -> the depthwise int8 x int8 -> int32 conv on the 16-channel blocks
    (:func:`.kernels.depthwise_blocked`) -> the same correction -> requantize, blocked: values
    stay in the blocked layout through the inverted-residual blocks of MobileNets.
``q8_conv`` (other grouped convs)
    ``pad(x, zero point)`` -> ``R.nn.conv2d`` / ``R.nn.conv1d`` with ``out_dtype="int32"``
    -> the same correction -> requantize.
``q8_matmul``
    ``R.matmul(a, b, out_dtype="int32")`` with the zero-point cross terms
    (``- b_zp * rowsum(a) - a_zp * colsum(b) + K * a_zp * b_zp``) -> requantize.
``q8_quantize`` / ``q8_dequantize``
    the affine maps, elementwise.

Requantize is ``float32(acc) * multiplier`` -> ``round`` (half to even, as ``torch.round``) ->
``+ zero point`` -> ``clip`` (the folded ReLU/ReLU6 lives in its bounds) -> ``astype``: the same
float32 operations in the same order as the PyTorch reference kernels, so the compiled model
and the simulated one agree bit for bit. TVM's FuseOps puts the epilogue into the conv kernel.

Integer activations are padded with their zero point explicitly (a real 0 is the level ``x_zp``);
the conv itself then pads nothing, and ``x_zp * sum(w)`` removes the offset.

Each translation is ``fn(bb, state, *operands)``: the node's arguments in the op's schema order,
tensors as their Relax values, with the lowering's block builder and
:class:`~graphopt.targets.translations.LoweringState` (see :func:`_translates`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch.fx as fx

from graphopt.ops.int8 import NAMESPACE, OP_NAMES

from ..translations import LoweringState, register_translation
from .blocked import blocked_of, unblocked
from .kernels import (LANES, RED, ceil_to, conv_input, conv_packed, depthwise_blocked, emit_gather,
                      pack_depthwise_weight, pack_weight)
from .tensor_intrin import fix_vnni_intrinsic

__all__ = ["packed_conv", "requantize"]


def _dtype(torch_dtype) -> str:
    return str(torch_dtype).replace("torch.", "")


def _check(node) -> None:
    if getattr(node.target, "namespace", None) != NAMESPACE:
        raise ValueError(f"{node.target} is not graphopt's op of that name (namespace "
                         f"{getattr(node.target, 'namespace', '?')!r}): the translation registered for "
                         f"{node.target.__name__!r} handles torch.ops.{NAMESPACE}.* only")


def _translates(op_name: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn(bb, state, *operands)`` as the translation of graphopt's op
    ``op_name`` (one of :data:`graphopt.ops.int8.OP_NAMES`). The node is checked to be
    graphopt's op, and its tensor arguments arrive as their Relax values."""
    if op_name not in OP_NAMES:
        raise ValueError(f"{op_name!r} is not one of graphopt's int8 ops {OP_NAMES}")

    def deco(fn: Callable) -> Callable:
        def translate(node, importer, state: LoweringState):
            _check(node)
            operands = [importer.env[a] if isinstance(a, fx.Node) else a for a in node.args]
            return fn(importer.block_builder, state, *operands)

        translate.__qualname__ = f"{fn.__qualname__}[{op_name}]"
        register_translation(op_name, with_state=True)(translate)
        return fn
    return deco


def _f32(value: float):
    from tvm import relax

    return relax.const(float(value), "float32")


def _i32(value: int):
    from tvm import relax

    return relax.const(int(value), "int32")


def requantize(bb, acc, multiplier, out_zp: int, lo: float, hi: float, out_dtype: str):
    """int32 accumulator -> float32 or uint8/int8, in the reference kernels' exact steps."""
    from tvm.relax import op as R

    f = bb.emit(R.multiply(R.astype(acc, "float32"), multiplier))
    if out_dtype == "float32":
        if not math.isinf(lo):
            f = bb.emit(R.maximum(f, _f32(lo)))
        if not math.isinf(hi):
            f = bb.emit(R.minimum(f, _f32(hi)))
        return f
    r = R.add(R.round(f), _f32(out_zp))
    return bb.emit(R.astype(R.clip(r, float(lo), float(hi)), out_dtype))


def _channel_vector(bb, v, ndim: int, axis: int = 1):
    """A length-C vector reshaped to broadcast over axis ``axis`` of an ``ndim``-d tensor."""
    from tvm.relax import op as R

    shape = [1] * ndim
    shape[axis] = -1
    return bb.emit(R.reshape(v, shape))


def _shape(expr):
    return [int(s) for s in expr.ty.shape]


def _affine(bb, state: LoweringState, x, emit) -> object:
    """``emit(value)`` on ``x``'s blocked copy when it has one (see :mod:`.blocked`), else on ``x``."""
    copy = blocked_of(state, x)
    if copy is None:
        return emit(x)
    return unblocked(bb, state, emit(copy.var), copy.channels)


@_translates("q8_quantize.default")
def translate_quantize(bb, state: LoweringState, x, scale, zp, qmin, qmax, dtype):
    from tvm.relax import op as R

    def emit(v):
        r = R.add(R.round(R.divide(v, _f32(scale))), _f32(zp))
        return bb.emit(R.astype(R.clip(r, float(qmin), float(qmax)), _dtype(dtype)))

    out = _affine(bb, state, x, emit)
    state.quantized[out] = (x, (scale, zp, qmin, qmax, _dtype(dtype)))
    return out


@_translates("q8_dequantize.default")
def translate_dequantize(bb, state: LoweringState, q, scale, zp):
    from tvm.relax import op as R

    def emit(v):
        centered = R.subtract(R.astype(v, "int32"), _i32(zp))
        return bb.emit(R.multiply(R.astype(centered, "float32"), _f32(scale)))

    return _affine(bb, state, q, emit)


def _weight_correction(bb, weight, bias, x_zp: int, reduce_axes):
    """``bias - x_zp * sum(weight)`` per output channel, int32 (depends on weights only)."""
    from tvm.relax import op as R

    if x_zp == 0:
        return bias
    wsum = R.sum(R.astype(weight, "int32"), axis=reduce_axes)
    return bb.emit(R.subtract(bias, R.multiply(wsum, _i32(x_zp))))


def _lane_blocks(bb, v, o: int):
    """A per-output-channel vector ``(O,)`` zero padded and shaped ``(O/16, 16)`` (weights only)."""
    from tvm.relax import op as R

    padded = ceil_to(o, LANES)
    if padded != o:
        v = bb.emit(R.nn.pad(v, [0, padded - o], pad_value=0.0))
    return bb.emit(R.reshape(v, [padded // LANES, LANES]))


def packed_conv(bb, data, weight, bias, multiplier, x_zp: int, out_zp: int, lo, hi, out_dtype: str,
                stride=(), dilation=()):
    """Conv input x packed ``weight`` + correction, requantized: ``(N, *out, O/16, 16)``."""
    from tvm.relax import op as R

    fix_vnni_intrinsic()  # tuning (now or later in this process) may tensorize this conv with VNNI
    o = _shape(weight)[0]
    packed = bb.emit_te(pack_weight, weight, primfunc_name_hint="pack_weight")
    acc = bb.emit_te(conv_packed, data, packed, list(stride), list(dilation), primfunc_name_hint="conv_packed")
    corr = _weight_correction(bb, weight, bias, x_zp, list(range(1, len(_shape(weight)))))
    acc = bb.emit(R.add(acc, _lane_blocks(bb, corr, o)))
    return requantize(bb, acc, _lane_blocks(bb, multiplier, o), out_zp, lo, hi, out_dtype)


def _conv_input(bb, state: LoweringState, data, padding, x_zp: int):
    """``data`` in the conv layout ``(N, *padded, C/4, 4)``: its blocked copy as it lies when no
    padding is needed, else one pre-scheduled copy (quantizing a float input on the way)."""
    from tvm.relax import op as R

    copy = blocked_of(state, data)
    if copy is not None:
        shape = _shape(copy.var)
        if not any(padding):  # (N, *spatial, C/16, 16) is (N, *spatial, C/4, 4) in memory
            return bb.emit(R.reshape(copy.var, [*shape[:-2], shape[-2] * LANES // RED, RED]))
        return emit_gather(bb, "pad_blocked", conv_input, [copy.var], padding, x_zp, copy.channels,
                           vector_tail=2)
    quantized = state.quantized.get(data)
    if quantized is not None:  # quantize the float input while laying it out (the quantize goes dead)
        source, quant = quantized
        return emit_gather(bb, "quantize_pad", conv_input, [source], padding, x_zp, 0, quant)
    return emit_gather(bb, "pad", conv_input, [data], padding, x_zp)


def _blocked_input(bb, state: LoweringState, data, x_zp: int, dims: int):
    """``data`` as blocked ``(N, *spatial, C/16, 16)`` integers: its blocked copy, or one copy
    (quantizing a float input on the way, as :func:`_conv_input`)."""
    copy = blocked_of(state, data)
    if copy is not None:
        return copy.var
    quantized = state.quantized.get(data)
    if quantized is not None:
        source, quant = quantized
        return emit_gather(bb, "quantize_block", conv_input, [source], [0] * dims, x_zp, 0, quant, LANES,
                           vector_tail=1)
    return emit_gather(bb, "block", conv_input, [data], [0] * dims, x_zp, 0, None, LANES, vector_tail=1)


def depthwise_conv(bb, state: LoweringState, data, weight, bias, mult, x_zp: int, out_zp: int, lo, hi,
                   out_dtype: str, stride, padding, dilation):
    """A depthwise int8 conv on blocked integers, requantized, its output blocked."""
    from tvm.relax import op as R

    c, dims = _shape(weight)[0], len(_shape(weight)) - 2
    blocked = _blocked_input(bb, state, data, x_zp, dims)
    packed = bb.emit_te(pack_depthwise_weight, weight, primfunc_name_hint="pack_dw_weight")
    acc = bb.emit_te(depthwise_blocked, blocked, packed, list(stride), list(padding), list(dilation), int(x_zp),
                     primfunc_name_hint="depthwise_blocked")
    corr = _weight_correction(bb, weight, bias, x_zp, list(range(1, dims + 2)))
    acc = bb.emit(R.add(acc, _lane_blocks(bb, corr, c)))
    y = requantize(bb, acc, _lane_blocks(bb, mult, c), out_zp, lo, hi, out_dtype)
    return unblocked(bb, state, y, c)


def is_depthwise(weight, groups: int) -> bool:
    """One filter per input channel and one output channel per filter (channel multiplier 1)."""
    shape = _shape(weight)
    return groups > 1 and shape[0] == groups and shape[1] == 1


@_translates("q8_conv.default")
def translate_conv(bb, state: LoweringState, data, weight, bias, mult, x_zp, out_zp, lo, hi, out_dtype,
                   stride, padding, dilation, groups):
    from tvm.relax import op as R

    ndim = len(_shape(weight))
    dims = ndim - 2
    if groups == 1:  # direct int8 conv on packed weights: the form dot-product instructions tensorize
        cols = _conv_input(bb, state, data, padding, x_zp)
        y = packed_conv(bb, cols, weight, bias, mult, x_zp, out_zp, lo, hi, _dtype(out_dtype), stride, dilation)
        return unblocked(bb, state, y, _shape(weight)[0])
    if is_depthwise(weight, groups):
        return depthwise_conv(bb, state, data, weight, bias, mult, x_zp, out_zp, lo, hi, _dtype(out_dtype),
                              stride, padding, dilation)
    # grouped: a direct integer convolution (too little reduction per group to pack)
    if x_zp != 0 and any(padding):
        pad_width = [0, 0, 0, 0]
        for p in padding:
            pad_width += [p, p]
        data = bb.emit(R.nn.pad(data, pad_width, pad_value=float(x_zp)))
        padding = [0] * dims
    conv = R.nn.conv2d if dims == 2 else R.nn.conv1d
    acc = bb.emit(conv(data, weight, strides=stride, padding=padding, dilation=dilation, groups=groups,
                       out_dtype="int32"))
    corr = _weight_correction(bb, weight, bias, x_zp, list(range(1, ndim)))
    acc = bb.emit(R.add(acc, _channel_vector(bb, corr, ndim)))
    return requantize(bb, acc, _channel_vector(bb, mult, ndim), out_zp, lo, hi, _dtype(out_dtype))


@_translates("q8_linear.default")
def translate_linear(bb, state: LoweringState, data, weight, bias, mult, x_zp, out_zp, lo, hi, out_dtype):
    from tvm.relax import op as R

    lead, k = _shape(data)[:-1], _shape(data)[-1]
    rows = data if len(lead) == 1 else bb.emit(R.reshape(data, [-1, k]))
    if k % RED == 0 and blocked_of(state, rows) is None:  # (M, K) is (M, K/4, 4) in memory
        cols = bb.emit(R.reshape(rows, [-1, k // RED, RED]))
    else:  # a previous linear's blocked output as it lies, or K grouped by 4 with zero-point padding
        cols = _conv_input(bb, state, rows, [], x_zp)
    y = packed_conv(bb, cols, weight, bias, mult, x_zp, out_zp, lo, hi, _dtype(out_dtype))
    y = unblocked(bb, state, y, _shape(weight)[0])  # (M, O)
    return bb.emit(R.reshape(y, [*lead, _shape(weight)[0]]))


@_translates("q8_matmul.default")
def translate_matmul(bb, state: LoweringState, a, b, a_zp, b_zp, mult, out_zp, lo, hi, out_dtype):
    from tvm.relax import op as R

    k = _shape(a)[-1]
    acc = bb.emit(R.matmul(a, b, out_dtype="int32"))
    if b_zp != 0:  # - b_zp * sum_k a[..., m, k]
        rows = R.sum(R.astype(a, "int32"), axis=[-1], keepdims=True)
        acc = bb.emit(R.subtract(acc, R.multiply(rows, _i32(b_zp))))
    if a_zp != 0:  # - a_zp * sum_k b[..., k, n]
        cols = R.sum(R.astype(b, "int32"), axis=[-2], keepdims=True)
        acc = bb.emit(R.subtract(acc, R.multiply(cols, _i32(a_zp))))
    if a_zp != 0 and b_zp != 0:
        acc = bb.emit(R.add(acc, _i32(k * a_zp * b_zp)))
    return requantize(bb, acc, _f32(mult), out_zp, lo, hi, _dtype(out_dtype))
