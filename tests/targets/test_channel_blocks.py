"""Blocks chosen per channel count: a conv may read one block and write another.

Regression for MobileNetV2 (issue 13): its per-conv blocks (24-channel projections in
NCHW8c between NCHW16c expansions) made TVM's ConvertLayout fail with "Invalid layout axis
8b", which it raises for any change of block between two rank-5 layouts, so the whole model
fell back to NCHW8c. Here every tensor's block follows its channel count, no change of
block is ever needed, and the per-conv blocks apply.
"""
import logging

import pytest
import torch
import torch.nn as nn

import graphopt
import zoo
from graphopt.targets.layouts import blocked_layout_pass, channel_blocks

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]


def decomposed(model, x):
    """``model`` lowered for x86, as the blocked layout pass sees it (inference ops decomposed)."""
    import tvm
    from tvm import relax

    target = graphopt.get_target("x86")
    lowered = target.lower(torch.fx.symbolic_trace(model.eval()), (x,))
    with target.tvm():
        return tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                         relax.transform.CanonicalizeBindings()])(lowered.mod)


def conv_layouts(mod):
    """(data, kernel, out) layout of every conv2d in ``mod``'s Relax functions, in order."""
    from tvm import relax

    found = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            for block in func.body.blocks:
                for binding in block.bindings:
                    value = binding.value
                    if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.nn.conv2d":
                        found.append((value.attrs.data_layout, value.attrs.kernel_layout, value.attrs.out_layout))
    return found


def test_mobilenetv2_like_gets_a_block_per_channel_count_and_convs_change_block():
    import tvm

    mod = decomposed(zoo.MobileNetV2Like(), torch.randn(1, 3, 32, 32))
    assert channel_blocks(mod, 16) == {3: 0, 16: 16, 64: 16, 96: 16, 24: 8}
    with graphopt.get_target("x86").tvm():
        blocked = blocked_layout_pass(16)(mod)  # raised "Invalid layout axis 8b" with blocks per conv
    layouts = conv_layouts(blocked)
    assert ("NCHW3c", "OIHW3i16o", "NCHW16c") in layouts  # the stem
    assert ("NCHW16c", "OIHW16i8o", "NCHW8c") in layouts  # 64 -> 24: the projection writes NCHW8c
    assert ("NCHW8c", "OIHW8i16o", "NCHW16c") in layouts  # 24 -> 96: the expansion reads it
    assert ("NCHW8c", "OIHW8i16o", "NCHW16c") in layouts
    assert ("NCHW16c", "OIHW1i16o", "NCHW16c") in layouts  # depthwise on 96 channels
    assert all(data != "NCHW" for data, _, _ in layouts)
    # values go from conv to conv (and through the residual add) without a layout change: the
    # only transforms of activations (batch 1, not a [1, C, 1, 1] bias) are the image in and
    # the features out to the mean
    shapes = [[int(d) for d in b.value.args[0].ty.shape] for f in blocked.functions.values() if hasattr(f, "body")
              for blk in f.body.blocks for b in blk.bindings
              if isinstance(b.value, tvm.relax.Call) and getattr(b.value.op, "name", "") == "relax.layout_transform"]
    activations = [s for s in shapes if s[0] == 1 and not (len(s) == 4 and s[2] == 1)]
    assert activations == [[1, 3, 32, 32], [1, 4, 16]]  # the mean runs blocked, then unblocks


def test_grouped_convs_lower_the_block_of_their_channel_counts():
    """ResNeXt's 4-channel groups: NCHW4c around the grouped conv only, NCHW16c elsewhere."""
    model = nn.Sequential(nn.Conv2d(32, 128, 1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1, groups=32),
                          nn.ReLU(), nn.Conv2d(128, 32, 1))
    mod = decomposed(model, torch.randn(1, 32, 8, 8))
    assert channel_blocks(mod, 16) == {32: 16, 128: 4}
    with graphopt.get_target("x86").tvm():
        layouts = conv_layouts(blocked_layout_pass(16)(mod))
    assert layouts == [("NCHW16c", "OIHW16i4o", "NCHW4c"), ("NCHW4c", "OIHW4i4o", "NCHW4c"),
                       ("NCHW4c", "OIHW4i16o", "NCHW16c")]


def test_mobilenetv2_like_compiles_with_per_conv_blocks_and_matches(caplog):
    torch.manual_seed(0)
    model, (x,) = zoo.MobileNetV2Like().eval(), (torch.randn(1, 3, 32, 32),)
    gm = torch.fx.symbolic_trace(model)
    x86 = graphopt.get_target("x86").replace(layout_block=16)
    with caplog.at_level(logging.INFO, logger="graphopt"), x86.compile(gm, (x,)) as compiled:
        out, ref = compiled(x).detach(), gm(x).detach()
        ir = compiled.ir()
    assert "not applied" not in caplog.text
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
    # the 24-channel values are NCHW8c, the others NCHW16c: both blocks are in the kernels
    assert "T.int64(1), T.int64(3), T.int64(8), T.int64(8), T.int64(8))" in ir  # 24 channels at 8x8
    assert "T.int64(1), T.int64(4), T.int64(16), T.int64(16), T.int64(16))" in ir  # 64 at 16x16
