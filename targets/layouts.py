"""Blocked channel layouts (NCHW[x]c) for convolutions: the layout CPU kernels vectorize well.

In NCHW a convolution's innermost dimension is the image width, so a vectorized kernel
needs a fresh gather at every row edge and stride; in NCHW16c (16 channels innermost, one
AVX-512 register of fp32) every output pixel is one full vector of output channels, the
weights are one vector per (input channel, tap), and the inner loop is a broadcast-FMA,
the shape oneDNN and ORT's NCHWc kernels use (design.md: blocked layouts were the known
way to close the gap on x86).

Two pieces, run before legalization:

* :func:`blocked_layout_pass`: Relax ``ConvertLayout`` with a callback giving every tensor
  a block chosen by its channel count (:func:`channel_blocks`: the largest block <= the
  target's vector lanes dividing it, and a group of every grouped conv it feeds or leaves),
  so a conv may read one block and write another (MobileNetV2's 24-channel projections:
  NCHW16c in, NCHW8c out) and no block ever meets another; or one block for the whole model
  when TVM's layout inference rejects even that. The layout then propagates through bias
  adds, activations, residual adds and pooling, so transforms appear only where a
  layout-agnostic op (mean, flatten, Linear) needs NCHW back. Weight transforms depend on
  weights only and are lifted out at build time.

  Why per tensor, not per conv: TVM 0.27's ``ConvertLayout`` treats a conversion between
  two layouts of the same rank as a transpose (``RewriteExpr`` -> ``TransposeLike``), and
  a change of block (NCHW16c -> NCHW8c, both rank 5) is not one: it fails on the split axis
  with "Invalid layout axis 8b" (``b`` is the channel axis in its internal ABCD naming).
  A block chosen per conv (dividing both its channel counts) needs such a change wherever
  two convs choose differently, which was every MobileNetV2.
* :func:`legalize_map`: lowers blocked ``conv2d`` to graphopt's own NCHWc compute
  definitions (Relax's legalization refuses blocked layouts; TOPI's ``conv2d_NCHWc``
  indexes the input channel with div/mod, which tuned to 27 GFLOP/s where these reached
  more, and its depthwise version has no generic implementation); plain layouts go to
  Relax's default.

Example:
    >>> choose_block(64, 128, 16), choose_block(24, 144, 16), choose_block(3, 32, 16)
    (16, 8, 0)
"""
from __future__ import annotations

from typing import Dict, Tuple

__all__ = ["blocked_layout_pass", "channel_blocks", "choose_block", "clip_as_min_max", "legalize_map",
           "uniform_block"]

MIN_BLOCK = 4


def choose_block(c_in: int, c_out: int, lanes: int) -> int:
    """Largest power-of-two block <= ``lanes`` dividing both channel counts; 0 if < 4."""
    block = lanes
    while block >= MIN_BLOCK:
        if c_in % block == 0 and c_out % block == 0:
            return block
        block //= 2
    return 0


def _conv_block(call, lanes: int) -> Tuple[int, bool]:
    """(block for this conv2d call or 0, depthwise?).

    A grouped conv's block must divide the channels of one group (in and out), so that no
    block straddles two groups: ResNeXt's 4-channel groups run in NCHW4c, RegNet's 8-channel
    ones in NCHW8c; groups of fewer than 4 channels keep NCHW (TVM's grouped conv).
    """
    c_in, c_out, groups = _channels(call)
    if c_in is None:
        return 0, False
    if groups == 1:
        return choose_block(c_in, c_out, lanes), False
    if groups == c_in == c_out:
        return choose_block(c_in, c_out, lanes), True
    return choose_block(c_in // groups, c_out // groups, lanes), False


def _narrow_input_block(call, lanes: int) -> Tuple[int, int]:
    """(c_in, output block) for a dense conv with fewer than MIN_BLOCK input channels, else (0, 0).

    A network's stem (3 RGB channels, 1 grey) cannot share a block with its output, but it
    can read its whole input channel dimension as one block: NCHW3c in, NCHW16c out. Its
    input is then a cheap transpose of the image, and the stem, often the heaviest single
    layer (ResNet's 7x7), runs the register-tiled blocked kernel instead of plain NCHW.
    """
    weight_shape = [int(s) for s in call.args[1].ty.shape]
    data_shape = [int(s) for s in call.args[0].ty.shape]
    if (call.attrs.data_layout != "NCHW" or call.attrs.kernel_layout != "OIHW" or len(data_shape) != 4
            or int(call.attrs.groups) != 1 or data_shape[1] >= MIN_BLOCK):
        return 0, 0
    block = choose_block(weight_shape[0], weight_shape[0], lanes)
    return (data_shape[1], block) if block else (0, 0)


def _conv_calls(mod):
    from tvm import relax

    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for block in getattr(func.body, "blocks", []):
            for binding in block.bindings:
                value = binding.value
                if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.nn.conv2d":
                    yield value


def channel_blocks(mod, lanes: int) -> Dict[int, int]:
    """Block of every tensor of ``mod``'s convs, by channel count (0: NCHW), see the module doc.

    Keyed by channel count, so the two sides of a residual add, and a conv's output and the
    next conv's input, always agree. A grouped conv lowers the block of its input and output
    counts to one dividing a group (ResNeXt's 4-channel groups: NCHW4c around them only);
    groups too narrow for any block keep the grouped conv NCHW and constrain nothing.
    """
    blocks: Dict[int, int] = {}

    def lower(channels: int, block: int) -> None:
        blocks[channels] = min(blocks.get(channels, block), block)

    for call in _conv_calls(mod):
        c_in, c_out, groups = _channels(call)
        if c_in is None:
            continue
        lower(c_in, choose_block(c_in, c_in, lanes))
        lower(c_out, choose_block(c_out, c_out, lanes))
        if groups > 1 and choose_block(c_in // groups, c_out // groups, lanes):
            lower(c_in, choose_block(c_in // groups, c_in // groups, lanes))
            lower(c_out, choose_block(c_out // groups, c_out // groups, lanes))
    return blocks


def _channels(call):
    """(c_in, c_out, groups) of an NCHW/OIHW 2-d conv call, else (None, None, None)."""
    data_shape = [int(s) for s in call.args[0].ty.shape]
    if call.attrs.data_layout != "NCHW" or call.attrs.kernel_layout != "OIHW" or len(data_shape) != 4:
        return None, None, None
    return data_shape[1], int(call.args[1].ty.shape[0]), int(call.attrs.groups)


def _tensor_block_layouts(call, blocks: Dict[int, int], narrow_inputs: bool):
    """``[data, kernel, output]`` layouts of a conv whose tensors take ``blocks``' blocks."""
    c_in, c_out, groups = _channels(call)
    if c_in is None:
        return ["NCHW", "OIHW"]
    b_in, b_out = blocks.get(c_in, 0), blocks.get(c_out, 0)
    if narrow_inputs and b_out and groups == 1 and c_in < MIN_BLOCK:
        return [f"NCHW{c_in}c", f"OIHW{c_in}i{b_out}o", f"NCHW{b_out}c"]  # the stem
    if not b_in or not b_out:
        return ["NCHW", "OIHW"]
    if groups == c_in == c_out and b_in == b_out:  # depthwise: one block in and out
        return [f"NCHW{b_in}c", f"OIHW1i{b_in}o", f"NCHW{b_in}c"]
    if groups > 1 and ((c_in // groups) % b_in or (c_out // groups) % b_out):
        return ["NCHW", "OIHW"]  # a block would straddle two groups
    return [f"NCHW{b_in}c", f"OIHW{b_in}i{b_out}o", f"NCHW{b_out}c"]


def uniform_block(mod, lanes: int) -> int:
    """The block every blockable conv of ``mod`` can share (powers of two: the smallest)."""
    blocks = [b for b, _ in (_conv_block(c, lanes) for c in _conv_calls(mod)) if b]
    return min(blocks) if blocks else 0


def blocked_layout_pass(lanes: int, uniform: bool = False, narrow_inputs: bool = True):
    """A Relax pass giving every eligible conv2d an NCHW[block]c layout (see module doc).

    Args:
        lanes: the largest block (the target's fp32 vector lanes).
        uniform: one block for the whole module (the largest all convs share), instead of
            one per channel count (:func:`channel_blocks`): the fallback for graphs where
            tensors of different channel counts still meet in one op (a concat feeding a
            conv, whose output block then differs from the conv's input block).
        narrow_inputs: block convs with 1-3 input channels too (see :func:`_narrow_input_block`).
    """
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="graphopt.BlockedConvLayouts")
    def transform(mod, _ctx):
        limit = uniform_block(mod, lanes) if uniform else lanes
        blocks = {} if uniform else channel_blocks(mod, lanes)

        def layout_cb(call):
            if getattr(call.op, "name", None) != "relax.nn.conv2d":
                return {}
            if not uniform:
                return {"relax.nn.conv2d": _tensor_block_layouts(call, blocks, narrow_inputs)}
            block, depthwise = _conv_block(call, limit) if limit else (0, False)
            c_in, out_block = _narrow_input_block(call, limit) if limit and narrow_inputs else (0, 0)
            if not block and out_block:
                return {"relax.nn.conv2d": [f"NCHW{c_in}c", f"OIHW{c_in}i{out_block}o", f"NCHW{out_block}c"]}
            if not block:
                return {"relax.nn.conv2d": ["NCHW", "OIHW"]}
            return {"relax.nn.conv2d": [f"NCHW{block}c", f"OIHW1i{block}o" if depthwise
                                        else f"OIHW{block}i{block}o"]}

        return relax.transform.ConvertLayout({}, layout_cb=layout_cb)(split_as_slices()(clip_as_min_max()(mod)))

    return transform


def clip_as_min_max():
    """Rewrite ``clip(x, lo, hi)`` as ``minimum(maximum(x, lo), hi)``.

    TVM's layout inference has no rule for ``clip`` (ReLU6), so ConvertLayout wrapped every
    ReLU6 of MobileNetV2 in a transform back to NCHW and out again, which also split it from
    its convolution: 12 extra kernels and 24 transforms. Elementwise max/min with scalar
    constants propagate any layout and fuse.
    """
    from tvm import relax
    from tvm.relax.dpl import is_op, wildcard

    x, lo, hi = wildcard(), wildcard(), wildcard()
    pattern = is_op("relax.clip")(x, lo, hi)

    def constant(bound):
        # a FloatImm (TVM 0.27), or a PrimValue wrapping one; anything else is dynamic
        value = getattr(bound, "value", None)
        value = getattr(value, "value", value)
        return value if isinstance(value, (int, float)) else None

    def rewrite(expr, matches):
        low, high = constant(matches[lo]), constant(matches[hi])
        if low is None or high is None:
            return expr
        dtype = expr.ty.dtype
        return relax.op.minimum(relax.op.maximum(matches[x], relax.const(low, dtype)),
                                relax.const(high, dtype))

    return _rewrite_pass("graphopt.ClipAsMinMax", pattern, rewrite)


def split_as_slices():
    """Rewrite a channel ``split`` of a 4-d tensor as one ``strided_slice`` per part.

    TVM 0.27's layout inference moves such a split onto the outer channel axis of an
    NCHW[x]c input but keeps its indices in channels, so the parts come out with wrong shapes
    (MixNet's mixed convs after a blocked depthwise conv: "Argument 0 type mismatch").
    ``strided_slice`` falls back to NCHW on blocked inputs, which is correct.
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, wildcard

    x = wildcard()
    pattern = is_op("relax.split")(x)

    def rewrite(expr, matches):
        data = matches[x]
        shape = [int(d) for d in data.ty.shape] if hasattr(data.ty, "shape") else None
        axis = int(expr.attrs.axis)
        if shape is None or len(shape) != 4 or axis % 4 != 1:
            return expr
        sections = expr.attrs.indices_or_sections
        if isinstance(sections, (int, tvm.tirx.IntImm)) or hasattr(sections, "value"):
            n = int(getattr(sections, "value", sections))
            step = -(-shape[1] // n)
            bounds = list(range(0, shape[1], step)) + [shape[1]]
        else:
            bounds = [0] + [int(i) for i in sections] + [shape[1]]
        return relax.Tuple([relax.op.strided_slice(data, axes=[1], begin=[b], end=[e])
                            for b, e in zip(bounds, bounds[1:])])

    return _rewrite_pass("graphopt.SplitAsSlices", pattern, rewrite)


def _rewrite_pass(name: str, pattern, rewrite):
    """A module pass applying ``rewrite`` to every match of ``pattern`` in each Relax function."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    @tvm.transform.module_pass(opt_level=0, name=name)
    def transform(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gv] = rewrite_call(pattern, rewrite, func)
        return mod

    return transform


def _blocked(layout: str) -> bool:
    return len(layout) > 4


def _legalize_conv2d(bb, call):
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    attrs = call.attrs
    if not _blocked(attrs.data_layout):
        return _nn_conv2d(bb, call)
    out_dtype = attrs.out_dtype if attrs.out_dtype != "" else None
    groups = int(attrs.groups)
    weight_in_blocks = int(call.args[1].ty.shape[1])
    if groups == 1 or weight_in_blocks * groups == int(call.args[0].ty.shape[1]):  # dense, or grouped
        return bb.call_te(conv2d_nchwc, call.args[0], call.args[1], attrs.strides,
                          attrs.padding, attrs.dilation, out_dtype or call.args[0].ty.dtype, groups,
                          primfunc_name_hint="conv2d_NCHWc" if groups == 1 else "group_conv2d_NCHWc")
    # TOPI's depthwise_conv2d_NCHWc is a generic function with no default implementation
    return bb.call_te(depthwise_conv2d_nchwc, call.args[0], call.args[1], attrs.strides,
                      attrs.padding, attrs.dilation, out_dtype or call.args[0].ty.dtype,
                      primfunc_name_hint="depthwise_conv2d_NCHWc")


def _pad_and_size(data, kernel_hw, strides, padding, dilation, pad_attrs=None):
    height, width = int(data.shape[2]), int(data.shape[3])
    (kh_size, kw_size), (sh, sw), (dh, dw) = kernel_hw, strides, dilation
    top, left, bottom, right = padding
    padded = _pad_hw(data, top, left, bottom, right, pad_attrs) if any(padding) else data
    out_h = (height + top + bottom - (kh_size - 1) * dh - 1) // sh + 1
    out_w = (width + left + right - (kw_size - 1) * dw - 1) // sw + 1
    return padded, out_h, out_w


def _pad_hw(data, top, left, bottom, right, attrs=None):
    """Zero-pad H and W of an NCHW[b]c tensor (TOPI's ``pad``, plus block annotations)."""
    from tvm import te, tirx

    n, c, h, w, b = (int(d) for d in data.shape)

    def value(i, j, y, x, k):
        inside = tirx.all(y >= top, y < top + h, x >= left, x < left + w)
        return tirx.if_then_else(inside, data[i, j, y - top, x - left, k], tirx.const(0, data.dtype))

    return te.compute((n, c, h + top + bottom, w + left + right, b), value, name="pad_temp", attrs=attrs or {})


def conv2d_nchwc(data, kernel, strides, padding, dilation, out_dtype, groups: int = 1):
    """Conv, data ``[N, C/b, H, W, b]``, kernel ``[O/b, C/g/b, KH, KW, b(in), b(out)]`` (TE).

    Unlike TOPI's ``conv2d_NCHWc`` (one fused input-channel reduction indexed with div/mod),
    the input-channel chunk and block are separate reduction axes, so the block stays a
    clean, contiguous axis to vectorize and unroll. The blocks carry the annotations of
    graphopt's hand-written design spaces (:mod:`graphopt.targets.schedules`). With
    ``groups`` > 1, output block ``oc`` reads the input chunks of its group only (the block
    divides a group's channels, see :func:`_conv_block`): the same register-tiled kernel,
    one group at a time.
    """
    from tvm import te

    from .schedules import CONV2D_NCHWC_RULE, GROUPED_CONV2D_NCHWC_RULE

    kh_size, kw_size = int(kernel.shape[2]), int(kernel.shape[3])
    strides, dilation = [int(s) for s in strides], [int(d) for d in dilation]
    padded, out_h, out_w = _pad_and_size(data, (kh_size, kw_size), strides, [int(p) for p in padding], dilation,
                                         pad_attrs={"schedule_rule": "None"})
    (sh, sw), (dh, dw) = strides, dilation
    icc = te.reduce_axis((0, int(kernel.shape[1])), name="icc")
    icb = te.reduce_axis((0, int(kernel.shape[4])), name="icb")
    kh = te.reduce_axis((0, kh_size), name="kh")
    kw = te.reduce_axis((0, kw_size), name="kw")
    if groups == 1:  # the dense kernel's TIR is unchanged (its tuning records stay valid)
        return te.compute(
            (data.shape[0], kernel.shape[0], out_h, out_w, kernel.shape[5]),
            lambda n, oc, h, w, ob: te.sum(
                padded[n, icc, h * sh + kh * dh, w * sw + kw * dw, icb].astype(out_dtype)
                * kernel[oc, icc, kh, kw, icb, ob].astype(out_dtype), axis=[icc, kh, kw, icb]),
            name="conv2d_NCHWc", attrs={"schedule_rule": CONV2D_NCHWC_RULE})
    out_chunks_per_group, in_chunks_per_group = int(kernel.shape[0]) // groups, int(kernel.shape[1])
    return te.compute(
        (data.shape[0], kernel.shape[0], out_h, out_w, kernel.shape[5]),
        lambda n, oc, h, w, ob: te.sum(
            padded[n, oc // out_chunks_per_group * in_chunks_per_group + icc, h * sh + kh * dh,
                   w * sw + kw * dw, icb].astype(out_dtype)
            * kernel[oc, icc, kh, kw, icb, ob].astype(out_dtype), axis=[icc, kh, kw, icb]),
        name="conv2d_NCHWc", attrs={"schedule_rule": GROUPED_CONV2D_NCHWC_RULE, "groups": groups})


def depthwise_conv2d_nchwc(data, kernel, strides, padding, dilation, out_dtype):
    """Depthwise conv, data ``[N, C/b, H, W, b]``, kernel ``[C/b, 1, KH, KW, 1, b]`` (TE).

    The block carries the annotation of graphopt's hand-written depthwise design space
    (:mod:`graphopt.targets.schedules.depthwise`), which folds the padding into the loads.
    """
    from tvm import te

    from .schedules import DEPTHWISE_NCHWC_RULE

    _, cb, _, _, block = data.shape
    kh_size, kw_size = int(kernel.shape[2]), int(kernel.shape[3])
    strides, dilation = [int(s) for s in strides], [int(d) for d in dilation]
    padded, out_h, out_w = _pad_and_size(data, (kh_size, kw_size), strides, [int(p) for p in padding], dilation,
                                         pad_attrs={"schedule_rule": "None"})
    (sh, sw), (dh, dw) = strides, dilation
    kh = te.reduce_axis((0, kh_size), name="kh")
    kw = te.reduce_axis((0, kw_size), name="kw")
    return te.compute(
        (data.shape[0], cb, out_h, out_w, block),
        lambda n, c, h, w, b: te.sum(
            padded[n, c, h * sh + kh * dh, w * sw + kw * dw, b].astype(out_dtype)
            * kernel[c, 0, kh, kw, 0, b].astype(out_dtype), axis=[kh, kw]),
        name="depthwise_conv2d_NCHWc", attrs={"schedule_rule": DEPTHWISE_NCHWC_RULE})


def legalize_map() -> Dict[str, object]:
    """``LegalizeOps(customize_legalize_map=...)`` entries for blocked layouts."""
    return {"relax.nn.conv2d": _legalize_conv2d}
