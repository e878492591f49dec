"""Relax translations of graphopt's quantized ops: real integer compute, no float emulation.

Registered with :func:`graphopt.targets.lowering.register_translation`, so ``Target.lower`` turns
each ``torch.ops.graphopt.q8_*`` node of the exported program into:

``q8_conv``
    ``pad(x, zero point)`` -> ``R.nn.conv2d`` / ``R.nn.conv1d`` on uint8/int8 data and int8
    weights with ``out_dtype="int32"`` -> ``+ (bias - x_zp * sum(w))`` in int32 (a weights-only
    term, lifted out of the model at build time) -> requantize.
``q8_linear``
    ``R.matmul(x, w.T, out_dtype="int32")`` -> the same int32 correction -> requantize.
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
"""
from __future__ import annotations

import math

from graphopt.targets.lowering import register_translation

from .ops import NAMESPACE

__all__ = ["TRANSLATED"]

TRANSLATED = ("q8_quantize.default", "q8_dequantize.default", "q8_conv.default", "q8_linear.default",
              "q8_matmul.default")


def _dtype(torch_dtype) -> str:
    return str(torch_dtype).replace("torch.", "")


def _check(node) -> None:
    if getattr(node.target, "namespace", None) != NAMESPACE:
        raise ValueError(f"{node.target} is not graphopt's op of that name (namespace "
                         f"{getattr(node.target, 'namespace', '?')!r}): the translation registered for "
                         f"{node.target.__name__!r} handles torch.ops.{NAMESPACE}.* only")


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


@register_translation("q8_quantize.default")
def translate_quantize(node, importer):
    from tvm.relax import op as R

    _check(node)
    x, scale, zp, qmin, qmax, dtype = node.args
    bb = importer.block_builder
    r = R.add(R.round(R.divide(importer.env[x], _f32(scale))), _f32(zp))
    return bb.emit(R.astype(R.clip(r, float(qmin), float(qmax)), _dtype(dtype)))


@register_translation("q8_dequantize.default")
def translate_dequantize(node, importer):
    from tvm.relax import op as R

    _check(node)
    q, scale, zp = node.args
    centered = R.subtract(R.astype(importer.env[q], "int32"), _i32(zp))
    return importer.block_builder.emit(R.multiply(R.astype(centered, "float32"), _f32(scale)))


def _weight_correction(bb, weight, bias, x_zp: int, reduce_axes):
    """``bias - x_zp * sum(weight)`` per output channel, int32 (depends on weights only)."""
    from tvm.relax import op as R

    if x_zp == 0:
        return bias
    wsum = R.sum(R.astype(weight, "int32"), axis=reduce_axes)
    return bb.emit(R.subtract(bias, R.multiply(wsum, _i32(x_zp))))


@register_translation("q8_conv.default")
def translate_conv(node, importer):
    from tvm.relax import op as R

    _check(node)
    x, w, b, m, x_zp, out_zp, lo, hi, out_dtype, stride, padding, dilation, groups = node.args
    bb, env = importer.block_builder, importer.env
    data, weight = env[x], env[w]
    ndim = len(_shape(weight))
    dims = ndim - 2
    if x_zp != 0 and any(padding):
        pad_width = [0, 0, 0, 0]
        for p in padding:
            pad_width += [p, p]
        data = bb.emit(R.nn.pad(data, pad_width, pad_value=float(x_zp)))
        padding = [0] * dims
    conv = R.nn.conv2d if dims == 2 else R.nn.conv1d
    acc = bb.emit(conv(data, weight, strides=stride, padding=padding, dilation=dilation, groups=groups,
                       out_dtype="int32"))
    corr = _weight_correction(bb, weight, env[b], x_zp, list(range(1, ndim)))
    acc = bb.emit(R.add(acc, _channel_vector(bb, corr, ndim)))
    return requantize(bb, acc, _channel_vector(bb, env[m], ndim), out_zp, lo, hi, _dtype(out_dtype))


@register_translation("q8_linear.default")
def translate_linear(node, importer):
    from tvm.relax import op as R

    _check(node)
    x, w, b, m, x_zp, out_zp, lo, hi, out_dtype = node.args
    bb, env = importer.block_builder, importer.env
    weight = env[w]
    acc = bb.emit(R.matmul(env[x], R.permute_dims(weight), out_dtype="int32"))
    corr = _weight_correction(bb, weight, env[b], x_zp, [1])
    acc = bb.emit(R.add(acc, corr))
    return requantize(bb, acc, env[m], out_zp, lo, hi, _dtype(out_dtype))


@register_translation("q8_matmul.default")
def translate_matmul(node, importer):
    from tvm.relax import op as R

    _check(node)
    a, b, a_zp, b_zp, mult, out_zp, lo, hi, out_dtype = node.args
    bb, env = importer.block_builder, importer.env
    av, bv = env[a], env[b]
    k = _shape(av)[-1]
    acc = bb.emit(R.matmul(av, bv, out_dtype="int32"))
    if b_zp != 0:  # - b_zp * sum_k a[..., m, k]
        rows = R.sum(R.astype(av, "int32"), axis=[-1], keepdims=True)
        acc = bb.emit(R.subtract(acc, R.multiply(rows, _i32(b_zp))))
    if a_zp != 0:  # - a_zp * sum_k b[..., k, n]
        cols = R.sum(R.astype(bv, "int32"), axis=[-2], keepdims=True)
        acc = bb.emit(R.subtract(acc, R.multiply(cols, _i32(a_zp))))
    if a_zp != 0 and b_zp != 0:
        acc = bb.emit(R.add(acc, _i32(k * a_zp * b_zp)))
    return requantize(bb, acc, _f32(mult), out_zp, lo, hi, _dtype(out_dtype))
