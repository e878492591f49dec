"""The TE computations of graphopt's int8 lowering, and the pre-scheduled data-movement kernels.

Layouts (``LANES = 16`` output channels per block, ``RED = 4`` reduction elements per group):

* **blocked** activations ``(N, *spatial, C/16, 16)``: what every int8 conv writes. Each pixel's
  channels are contiguous, so ``(C/16, 16)`` is also ``(C/4, 4)``: the next conv can read it
  as its input without a copy when it needs no padding.
* **conv input** ``(N, *spatial, C/4, 4)``: channels innermost in the groups of 4 one dot-product
  instruction consumes; made by :func:`conv_input` (padding with the zero point, from NCHW or
  blocked data, optionally quantizing float data on the way).
* **packed weights** ``(O/16, *kernel, C/4, 16, 4)``: :func:`pack_weight`, lifted out of the model
  at build time (runs once).

:func:`conv_packed` is the direct convolution on these layouts: an Einsum whose innermost
``(16, 4)`` block is exactly the dot-product intrinsics' operands, so MetaSchedule tensorizes it
with ``vpdpbusd`` (``dot_16x4_vnni``) on x86 and ``sdot`` (in 4 x 4 pieces) on ARM. No im2col
copy: the windows are read in place.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

from ..schedules.common import DEPTHWISE_BLOCKED_INT8_RULE

__all__ = ["LANES", "RED", "ceil_to", "conv_input", "conv_out_size", "conv_packed", "depthwise_blocked",
           "emit_gather", "max_pool_blocked", "pack_depthwise_weight", "pack_weight", "pool_out_size", "unblock"]

#: The packed weight block: 16 output channels x 4 reduction elements. That is VNNI's
#: ``vpdpbusd`` shape (``dot_16x4_vnni``: 16 int32 lanes, each a 4-element uint8 x int8 dot
#: product) and, split in four, ARM ``sdot``'s (``dot_4x4_i8i8s32_sdot``: 4 lanes x 4).
LANES, RED = 16, 4

#: ``(scale, zero_point, qmin, qmax, dtype)``: quantize float data on the fly, as ``q8_quantize``.
Quant = Tuple[float, int, int, int, str]


def ceil_to(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def conv_out_size(spatial, kernel, stride, dilation):
    """Output size of a convolution over already padded ``spatial`` extents."""
    return [(spatial[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(len(kernel))]


def pool_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size (a last window starting in the right padding is dropped)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def pack_weight(weight):
    """TE: int8 ``(O, C, *kernel)`` -> ``(O/16, *kernel, C/4, 16, 4)`` (both rounded up, zero padded).

    Every index is affine: no division in any kernel.
    """
    from tvm import te, tirx

    o, c, *kernel = [int(s) for s in weight.shape]

    def f(ob, *rest):
        *kk, cb, ji, ci = rest
        j, ch = ob * LANES + ji, cb * RED + ci
        return tirx.if_then_else(tirx.all(j < o, ch < c), weight[(j, ch, *kk)], tirx.const(0, weight.dtype))

    return te.compute((ceil_to(o, LANES) // LANES, *kernel, ceil_to(c, RED) // RED, LANES, RED), f,
                      name="packed_weight")


def _quantize(value, quant: Quant):
    from tvm import tirx

    scale, zp, qmin, qmax, dtype = quant
    r = tirx.round(value / tirx.const(scale, "float32")) + tirx.const(float(zp), "float32")
    return tirx.max(tirx.min(r, tirx.const(float(qmax), "float32")), tirx.const(float(qmin), "float32")).astype(dtype)


def conv_input(data, padding: Sequence[int], pad_value: int, blocked_channels: int = 0,
               quant: Optional[Quant] = None, group: int = RED):
    """TE: ``(N, C, *spatial)`` -> ``(N, *(spatial + 2 * padding), C/4, 4)``; the border and the
    channels beyond ``C`` hold ``pad_value`` (the zero point: a real 0), and meet zero weights.
    ``group=LANES`` gives the blocked layout ``(..., C/16, 16)`` instead (a depthwise conv's input).

    ``blocked_channels = C``: ``data`` is a previous conv's blocked ``(N, *spatial, C/16, 16)``
    output, read as it lies (each pixel one contiguous copy). ``quant``: ``data`` is float32
    and is quantized with exactly ``q8_quantize``'s float32 steps. With no spatial dimensions a
    matrix ``(M, K)`` becomes ``(M, K/4, 4)``.
    """
    from tvm import te, tirx

    if blocked_channels:
        n, *spatial = [int(s) for s in data.shape[:-2]]
        c = blocked_channels
    else:
        n, c, *spatial = [int(s) for s in data.shape]
    dims = len(spatial)
    out_dtype = quant[4] if quant is not None else data.dtype

    def f(b, *rest):
        pos, (g, ci) = [rest[i] - padding[i] for i in range(dims)], rest[dims:]
        inside = [tirx.all(p >= 0, p < spatial[i]) for i, p in enumerate(pos)]
        if blocked_channels:
            value = data[(b, *pos, g // (LANES // group), (g % (LANES // group)) * group + ci)]
        else:
            value = data[(b, g * group + ci, *pos)]
        if not blocked_channels or c % group:
            inside.append(g * group + ci < c)
        if quant is not None:
            value = _quantize(value, quant)
        if not inside:
            return value
        return tirx.if_then_else(tirx.all(*inside), value, tirx.const(pad_value, out_dtype))

    shape = [spatial[i] + 2 * padding[i] for i in range(dims)]
    return te.compute((n, *shape, ceil_to(c, group) // group, group), f, name="conv_input")


def conv_packed(data, packed, stride: Sequence[int], dilation: Sequence[int]):
    """TE: ``acc[n, *o, ob, ji] = sum(data[n, *(o * stride + k * dilation), cb, ci] * packed[ob, *k, cb, ji, ci])``.

    int32 accumulation of uint8/int8 x int8. ``data`` is a conv input (already padded; it may
    hold more channel groups than the weights, which are then not read).
    """
    from tvm import te

    ob, *kernel, cb, lanes, red = [int(s) for s in packed.shape]
    dims = len(kernel)
    lead = int(data.shape[0])
    spatial = [int(s) for s in data.shape[1:1 + dims]]
    out = conv_out_size(spatial, kernel, stride, dilation)
    rk = [te.reduce_axis((0, k), name=f"k{i}") for i, k in enumerate(kernel)]
    rcb, rci = te.reduce_axis((0, cb), name="cb"), te.reduce_axis((0, red), name="ci")

    def f(b, *idx):
        o, jo, ji = idx[:dims], idx[dims], idx[dims + 1]
        pos = [o[i] * stride[i] + rk[i] * dilation[i] for i in range(dims)]
        return te.sum(data[(b, *pos, rcb, rci)].astype("int32") * packed[(jo, *rk, rcb, ji, rci)].astype("int32"),
                      axis=[*rk, rcb, rci])

    return te.compute((lead, *out, ob, lanes), f, name="conv_packed")


def pack_depthwise_weight(weight):
    """TE: int8 ``(C, 1, KH, KW)`` -> ``(C/16, KH, KW, 16)`` (zero padded): one tap's 16 channels
    contiguous, the vector a depthwise conv multiplies a blocked pixel by."""
    from tvm import te, tirx

    c, _, *kernel = [int(s) for s in weight.shape]

    def f(cb, *rest):
        *kk, l = rest
        ch = cb * LANES + l
        return tirx.if_then_else(ch < c, weight[(ch, 0, *kk)], tirx.const(0, weight.dtype))

    return te.compute((ceil_to(c, LANES) // LANES, *kernel, LANES), f, name="packed_dw_weight")


def depthwise_blocked(data, packed, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                      pad_value: int):
    """TE: the depthwise conv on blocked ``(N, H, W, C/16, 16)`` integers, int32 accumulators in
    the same layout: ``acc[n, y, x, cb, l] = sum(data[n, y*s + ky*d - p, x*s + kx*d - p, cb, l] *
    packed[cb, ky, kx, l])``. The taps are the only reduction, the 16 channels of a block the
    vector; the border reads ``pad_value`` (the zero point) in the load, so no padded copy exists.
    """
    from tvm import te, tirx

    n, *spatial = [int(s) for s in data.shape[:-2]]
    blocks, lanes = [int(s) for s in data.shape[-2:]]
    kernel = [int(s) for s in packed.shape[1:-1]]
    dims = len(kernel)
    padded = [spatial[i] + 2 * padding[i] for i in range(dims)]
    out = conv_out_size(padded, kernel, stride, dilation)
    rk = [te.reduce_axis((0, k), name=f"k{i}") for i, k in enumerate(kernel)]

    def f(b, *rest):
        o, cb, l = rest[:dims], rest[dims], rest[dims + 1]
        pos = [o[i] * stride[i] + rk[i] * dilation[i] - padding[i] for i in range(dims)]
        value = data[(b, *pos, cb, l)]
        if any(padding):
            inside = tirx.all(*[tirx.all(p >= 0, p < spatial[i]) for i, p in enumerate(pos)])
            value = tirx.if_then_else(inside, value, tirx.const(pad_value, data.dtype))
        return te.sum(value.astype("int32") * packed[(cb, *rk, l)].astype("int32"), axis=rk)

    attrs = {"schedule_rule": DEPTHWISE_BLOCKED_INT8_RULE} if dims == 2 else {}
    return te.compute((n, *out, blocks, lanes), f, name="depthwise_blocked", attrs=attrs)


def unblock(y, o: int):
    """TE: ``(N, *spatial, O/16, 16)`` -> ``(N, O, *spatial)`` (channels back in NC(H)W order)."""
    from tvm import te

    def f(n, c, *sp):
        return y[(n, *sp, c // LANES, c % LANES)]

    return te.compute((int(y.shape[0]), o, *[int(v) for v in y.shape[1:-2]]), f, name="unblock")


def max_pool_blocked(data, kernel, stride, padding, dilation, ceil_mode: bool):
    """TE: max pooling on blocked ``(N, *spatial, C/16, 16)`` data, taps unrolled (no reduction).

    Max pooling commutes with quantization (a monotonic map), so it runs on the integers; out
    of the image a tap is the dtype's minimum (never the maximum).
    """
    from tvm import te, tirx

    n, *spatial = [int(s) for s in data.shape[:-2]]
    blocks, lanes = [int(s) for s in data.shape[-2:]]
    dims = len(spatial)
    out = [pool_out_size(spatial[i], kernel[i], stride[i], padding[i], dilation[i], ceil_mode) for i in range(dims)]
    lowest = tirx.min_value(data.dtype)
    # a window reaches outside the image only with padding or a ceil_mode overhang
    clipped = any(padding) or any((out[i] - 1) * stride[i] + dilation[i] * (kernel[i] - 1) >= spatial[i]
                                  for i in range(dims))

    def f(b, *rest):
        o, cb, l = rest[:dims], rest[dims], rest[dims + 1]
        windows = [[]]
        for i in range(dims):
            windows = [w + [o[i] * stride[i] - padding[i] + k * dilation[i]] for w in windows
                       for k in range(kernel[i])]
        best = None
        for pos in windows:
            v = data[(b, *pos, cb, l)]
            if clipped:
                v = tirx.if_then_else(tirx.all(*[tirx.all(p >= 0, p < spatial[i]) for i, p in enumerate(pos)]),
                                      v, lowest)
            best = v if best is None else tirx.max(best, v)
        return best

    return te.compute((n, *out, blocks, lanes), f, name="max_pool_blocked")


#: Below this many output elements a copy runs on one thread: waking the other threads for a
#: microsecond of copying costs more than it saves (and at batch 1 most copies are this small).
PARALLEL_MIN_ELEMENTS = 1 << 15


def _schedule_gather(sch, block, elements: int, vector_tail: int = 0) -> None:
    """Outer two loops fused and parallel (large copies only); the last ``vector_tail`` loops
    fused and vectorized (contiguous copies), else the innermost unrolled.

    MetaSchedule's generic rules fuse every loop of such a gather into one flat vectorized
    loop, where each element recomputes its source index with 64-bit divisions (4-9 ms for a
    56x56 layer's window gather, 10x the GEMM it fed).
    """
    loops = sch.get_loops(block)
    outer = sch.fuse(*loops[:2]) if len(loops) > 2 else loops[0]
    if elements >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(outer)
    if vector_tail and len(loops) - vector_tail >= 2:
        sch.vectorize(sch.fuse(*loops[-vector_tail:]))
    elif len(loops) > 2:
        sch.unroll(loops[-1])


def emit_gather(bb, name: str, compute, inputs, *args, vector_tail: int = 0):
    """Emit ``compute(*inputs, *args)`` as a pre-scheduled, unfused kernel (data movement only).

    Marked scheduled (not a tuning task) and opaque to FuseOps, so no rule re-flattens it.
    """
    from tvm import relax, s_tir, te

    holders = [te.placeholder([int(s) for s in v.ty.shape], v.ty.dtype, name=f"x{i}") for i, v in enumerate(inputs)]
    out = compute(*holders, *args)
    sch = s_tir.Schedule(te.create_prim_func([*holders, out]))
    _schedule_gather(sch, sch.get_sblock(out.op.name), math.prod(int(d) for d in out.shape), vector_tail)
    func = sch.mod["main"].without_attr("global_symbol")
    func = func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)  # kOpaque
    gv = bb.add_func(func, name)
    return bb.emit(relax.call_tir(gv, inputs, relax.TensorType([int(d) for d in out.shape], out.dtype)))
