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
from .tensor_intrin import fix_vnni_intrinsic

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
    out = bb.emit(R.astype(R.clip(r, float(qmin), float(qmax)), _dtype(dtype)))
    # a conv reading this can quantize while it gathers its windows (and this op then goes dead)
    _quantized_source(importer)[out] = (importer.env[x], (scale, zp, qmin, qmax, _dtype(dtype)))
    return out


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


#: The packed weight block: 16 output channels x 4 reduction elements. That is VNNI's
#: ``vpdpbusd`` shape (``dot_16x4_vnni``: 16 int32 lanes, each a 4-element uint8 x int8 dot
#: product) and, split in four, ARM ``sdot``'s (``dot_4x4_i8i8s32_sdot``: 4 lanes x 4).
LANES, RED = 16, 4


def _ceil_to(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def _out_size(spatial, kernel, stride, padding, dilation):
    return [(spatial[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
            for i in range(len(kernel))]


def pack_weight(weight):
    """TE: int8 ``(O, C, *kernel)`` -> ``(O/16, *kernel, C/4, 16, 4)`` (both rounded up, zero padded).

    A weights-only computation: the build lifts it out of the model, so it runs once
    (prepacking). Every index is affine: no division in any kernel.
    """
    from tvm import te, tirx

    o, c, *kernel = [int(s) for s in weight.shape]

    def f(ob, *rest):
        *kk, cb, ji, ci = rest
        j, ch = ob * LANES + ji, cb * RED + ci
        return tirx.if_then_else(tirx.all(j < o, ch < c), weight[(j, ch, *kk)], tirx.const(0, weight.dtype))

    return te.compute((_ceil_to(o, LANES) // LANES, *kernel, _ceil_to(c, RED) // RED, LANES, RED), f,
                      name="packed_weight")


def im2col(data, kernel, stride, padding, dilation, pad_value: int, blocked_channels: int = 0, quant=None):
    """TE: ``(N, C, *spatial)`` -> ``(N, *out, *kernel, C/4, 4)``; outside the image: ``pad_value``.

    One input window per output position, channels innermost in groups of 4 (what one
    dot-product instruction consumes); padded channels (C rounded up to 4) hold ``pad_value``
    and meet zero weights. With ``kernel == []`` a matrix ``(M, K)`` becomes ``(M, K/4, 4)``.

    ``blocked_channels = C``: ``data`` is a previous layer's ``(N, *spatial, C/16, 16)`` output,
    read directly. Its padding lanes hold finite values that meet zero weights, so the channel
    bound needs no check, and each window row is one contiguous copy.

    ``quant = (scale, zero_point, qmin, qmax, dtype)``: ``data`` is float32 and is quantized
    on the fly, with exactly ``q8_quantize``'s float32 steps.
    """
    from tvm import te, tirx

    if blocked_channels:
        n, *spatial = [int(s) for s in data.shape[:-2]]
        c = blocked_channels
    else:
        n, c, *spatial = [int(s) for s in data.shape]
    dims = len(kernel)
    out = _out_size(spatial, kernel, stride, padding, dilation)

    def f(b, *rest):
        o, kk, (cb, ci) = rest[:dims], rest[dims:2 * dims], rest[2 * dims:]
        pos = [o[i] * stride[i] - padding[i] + kk[i] * dilation[i] for i in range(dims)]
        inside = [tirx.all(p >= 0, p < spatial[i]) for i, p in enumerate(pos)]
        if blocked_channels:
            value = data[(b, *pos, cb // (LANES // RED), (cb % (LANES // RED)) * RED + ci)]
        else:
            value = data[(b, cb * RED + ci, *pos)]
            inside.append(cb * RED + ci < c)
        if quant is not None:
            scale, zp, qmin, qmax, dtype = quant
            r = tirx.round(value / tirx.const(scale, "float32")) + tirx.const(float(zp), "float32")
            value = tirx.max(tirx.min(r, tirx.const(float(qmax), "float32")),
                             tirx.const(float(qmin), "float32")).astype(dtype)
        if not inside:
            return value
        out_dtype = quant[4] if quant is not None else data.dtype
        return tirx.if_then_else(tirx.all(*inside), value, tirx.const(pad_value, out_dtype))

    return te.compute((n, *out, *kernel, _ceil_to(c, RED) // RED, RED), f, name="im2col")


def gemm_packed(cols, packed):
    """TE: ``acc[n, *out, ob, ji] = sum(cols[n, *out, *k, cb, ci] * packed[ob, *k, cb, ji, ci])``, int32.

    An Einsum whose innermost blocks are exactly the dot-product intrinsics' operands:
    MetaSchedule's auto-tensorization maps ``(ji, ci)`` onto ``dot_16x4_vnni`` (16 lanes x 4)
    or, in 4 x 4 pieces, onto ARM's ``sdot`` / NEON dot products.
    """
    from tvm import te

    ob, *kernel, cb, lanes, red = [int(s) for s in packed.shape]
    dims = len(kernel)
    spatial = [int(s) for s in cols.shape[:len(cols.shape) - dims - 2]]  # (n, *out)
    rk = [te.reduce_axis((0, k), name=f"k{i}") for i, k in enumerate(kernel)]
    rcb, rci = te.reduce_axis((0, cb), name="cb"), te.reduce_axis((0, red), name="ci")

    def f(*idx):
        pos, jo, ji = idx[:-2], idx[-2], idx[-1]
        return te.sum(cols[(*pos, *rk, rcb, rci)].astype("int32") * packed[(jo, *rk, rcb, ji, rci)].astype("int32"),
                      axis=[*rk, rcb, rci])

    return te.compute((*spatial, ob, lanes), f, name="gemm_packed")


def _lane_blocks(bb, v, o: int):
    """A per-output-channel vector ``(O,)`` zero padded and shaped ``(O/16, 16)`` (weights only)."""
    from tvm.relax import op as R

    padded = _ceil_to(o, LANES)
    if padded != o:
        v = bb.emit(R.nn.pad(v, [0, padded - o], pad_value=0.0))
    return bb.emit(R.reshape(v, [padded // LANES, LANES]))


def packed_matmul(bb, cols, weight, bias, multiplier, x_zp: int, out_zp: int, lo, hi, out_dtype: str):
    """``cols`` x packed ``weight`` + correction, requantized: ``(N, *out, O/16, 16)``."""
    fix_vnni_intrinsic()  # tuning (now or later in this process) may tensorize this GEMM with VNNI
    o = _shape(weight)[0]
    packed = bb.emit_te(pack_weight, weight, primfunc_name_hint="pack_weight")
    acc = bb.emit_te(gemm_packed, cols, packed, primfunc_name_hint="gemm_packed")
    corr = _weight_correction(bb, weight, bias, x_zp, list(range(1, len(_shape(weight)))))
    from tvm.relax import op as R

    acc = bb.emit(R.add(acc, _lane_blocks(bb, corr, o)))
    return requantize(bb, acc, _lane_blocks(bb, multiplier, o), out_zp, lo, hi, out_dtype)


def unblock(y, o: int):
    """TE: ``(N, *spatial, O/16, 16)`` -> ``(N, O, *spatial)`` (channels back in NC(H)W order)."""
    from tvm import te

    def f(n, c, *sp):
        return y[(n, *sp, c // LANES, c % LANES)]

    return te.compute((int(y.shape[0]), o, *[int(v) for v in y.shape[1:-2]]), f, name="unblock")


def _schedule_gather(sch, block, vector_tail: int = 0, inner_spatial: bool = False) -> None:
    """Outer two loops fused and parallel; the last ``vector_tail`` loops fused and vectorized
    (contiguous copies), else the innermost unrolled.

    MetaSchedule's generic rules fuse every loop of such a gather into one flat vectorized
    loop, where each element recomputes its source index with 64-bit divisions: 4-9 ms for the
    im2col of one 56x56 layer, 10x the GEMM it feeds.
    """
    loops = sch.get_loops(block)
    if inner_spatial:  # im2col of NCHW data: rows of one channel plane are contiguous in x
        b, oy, ox, *rest = loops
        sch.reorder(*rest, ox)
        sch.parallel(sch.fuse(b, oy))
        return
    if len(loops) > 2:
        sch.parallel(sch.fuse(*loops[:2]))
    else:
        sch.parallel(loops[0])
    if vector_tail and len(loops) - vector_tail >= 2:
        sch.vectorize(sch.fuse(*loops[-vector_tail:]))
    elif len(loops) > 2:
        sch.unroll(loops[-1])


def emit_gather(bb, name: str, compute, inputs, *args, vector_tail: int = 0, inner_spatial: bool = False):
    """Emit ``compute(*inputs, *args)`` as a pre-scheduled, unfused kernel (data movement only).

    Marked scheduled (not a tuning task) and opaque to FuseOps, so no rule re-flattens it.
    """
    from tvm import relax, s_tir, te

    holders = [te.placeholder(_shape(v), v.ty.dtype, name=f"x{i}") for i, v in enumerate(inputs)]
    out = compute(*holders, *args)
    sch = s_tir.Schedule(te.create_prim_func([*holders, out]))
    _schedule_gather(sch, sch.get_sblock(out.op.name), vector_tail, inner_spatial)
    func = sch.mod["main"].without_attr("global_symbol")
    func = func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)  # kOpaque
    gv = bb.add_func(func, name)
    return bb.emit(relax.call_tir(gv, inputs, relax.TensorType([int(d) for d in out.shape], out.dtype)))


def _blocked_source(importer):
    """Per lowering: unblocked tensor -> (blocked tensor it came from, channels)."""
    if not hasattr(importer, "_graphopt_blocked"):
        importer._graphopt_blocked = {}
    return importer._graphopt_blocked


def _im2col(bb, importer, data, kernel, stride, padding, dilation, x_zp: int):
    source = _blocked_source(importer).get(data)
    if source is not None:  # read the previous layer's blocked output, skipping its NCHW copy
        blocked, channels = source
        return emit_gather(bb, "im2col_blocked", im2col, [blocked], kernel, stride, padding, dilation, x_zp,
                           channels, vector_tail=2)
    quantized = _quantized_source(importer).get(data)
    if quantized is not None:  # quantize the float input while gathering
        source, quant = quantized
        return emit_gather(bb, "quantize_im2col", im2col, [source], kernel, stride, padding, dilation, x_zp,
                           0, quant, inner_spatial=len(kernel) == 2)
    return emit_gather(bb, "im2col", im2col, [data], kernel, stride, padding, dilation, x_zp,
                       inner_spatial=len(kernel) == 2)


def _quantized_source(importer):
    """Per lowering: quantized tensor -> (the float tensor, its quantization)."""
    if not hasattr(importer, "_graphopt_quantized"):
        importer._graphopt_quantized = {}
    return importer._graphopt_quantized


def _from_lane_blocks(bb, importer, y, o: int):
    """``(N, *spatial, O/16, 16)`` -> ``(N, O, *spatial)``, padding channels cut."""
    out = emit_gather(bb, "unblock", unblock, [y], o)
    _blocked_source(importer)[out] = (y, o)
    return out


@register_translation("q8_conv.default")
def translate_conv(node, importer):
    from tvm.relax import op as R

    _check(node)
    x, w, b, m, x_zp, out_zp, lo, hi, out_dtype, stride, padding, dilation, groups = node.args
    bb, env = importer.block_builder, importer.env
    data, weight = env[x], env[w]
    ndim = len(_shape(weight))
    dims = ndim - 2
    if groups == 1:  # im2col + packed int8 GEMM: the form dot-product instructions tensorize
        kernel = _shape(weight)[2:]
        cols = _im2col(bb, importer, data, kernel, stride, padding, dilation, x_zp)
        y = packed_matmul(bb, cols, weight, env[b], env[m], x_zp, out_zp, lo, hi, _dtype(out_dtype))
        return _from_lane_blocks(bb, importer, y, _shape(weight)[0])  # back to NC(H)W
    # grouped / depthwise: a direct integer convolution (too little reduction per group to pack)
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
    data, weight = env[x], env[w]
    lead, k = _shape(data)[:-1], _shape(data)[-1]
    rows = bb.emit(R.reshape(data, [-1, k]))  # (M, K): im2col of a matrix only groups K by 4
    cols = emit_gather(bb, "im2col", im2col, [rows], [], [], [], [], x_zp)
    y = packed_matmul(bb, cols, weight, env[b], env[m], x_zp, out_zp, lo, hi, _dtype(out_dtype))
    y = _from_lane_blocks(bb, importer, y, _shape(weight)[0])  # (M, O)
    return bb.emit(R.reshape(y, [*lead, _shape(weight)[0]]))


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
