"""Lowering what timm models do in int8 and fp32: a channel split of a blocked (NCHW[x]c) value
lowers to the right parts (MixNet failed to compile in int8, "Argument 0 type mismatch"), and a
cast to a quantized layer's weight dtype stays a float cast (EdgeNeXt).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
import zoo


class MixedAfterDepthwise(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        c = sum(sizes)
        self.sizes = list(sizes)
        self.pw = nn.Conv2d(3, c, 1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pwl = nn.ModuleList([nn.Conv2d(s, 8, 1) for s in sizes])
        self.head = nn.Conv2d(8 * len(sizes), 10, 1)

    def forward(self, x):
        parts = torch.split(F.relu(self.dw(F.relu(self.pw(x)))), self.sizes, 1)
        return self.head(torch.cat([conv(parts[i]) for i, conv in enumerate(self.pwl)], 1)).mean((2, 3))


@pytest.mark.parametrize("sizes", [(16, 16), (8, 24), (5, 11, 16)])
@pytest.mark.parametrize("passes", [["fuse_conv_bn"], ["fuse_conv_bn", "quantize"]])
def test_channel_split_after_a_blocked_conv_compiles_and_matches(sizes, passes):
    torch.manual_seed(0)
    model, x = MixedAfterDepthwise(sizes).eval(), (torch.randn(1, 3, 16, 16),)
    data = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    opt = graphopt.optimize(model, passes, "x86", example_inputs=x, calibration_data=data, progress=False,
                            measure_latency=False)
    assert all(r.status in ("applied", "no-op") for r in opt.report.records), [r.reason for r in opt.report.records]
    with torch.no_grad():
        want = opt.graph_module(*x)
    got = opt(*x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


class CastToWeightDtype(nn.Module):
    """timm EdgeNeXt's PositionalEncodingFourier: `pos.to(self.proj.weight.dtype)`; once `proj`
    is quantized its weight is int8, and the cast must stay a float cast."""

    def __init__(self):
        super().__init__()
        self.proj, self.conv = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        pos = torch.ones_like(x[:, :4]) * 0.5
        return self.conv(x + self.proj(pos.to(self.proj.weight.dtype)))


def test_a_cast_to_a_quantized_layers_weight_dtype_stays_float():
    torch.manual_seed(0)
    model, x = CastToWeightDtype().eval(), (torch.randn(1, 8, 8, 8),)
    opt = graphopt.optimize(model, ["quantize"], "x86", example_inputs=x, calibration_data=[torch.randn(2, 8, 8, 8)],
                            progress=False, measure_latency=False)
    record = opt.report["quantize"]
    assert record.status == "applied" and any("dtype reads" in m for m in record.messages)
    with torch.no_grad():
        want, ref = opt.graph_module(*x), model(*x)
    assert float((opt(*x) - want).abs().max() / want.abs().max()) < 1e-4
    assert float((want - ref).abs().max() / ref.abs().max()) < 0.05


@pytest.mark.parametrize("passes", [["fuse_conv_bn"], ["fuse_conv_bn", "quantize"]])
def test_same_padding_layers_compile_as_static_pads(passes):
    """tf_* ports: the static F.pad (zeros before convs, -inf before a max pool) lowers and matches."""
    model, x = zoo.build("tf_same")
    calib = [torch.randn(2, *x[0].shape[1:], generator=torch.Generator().manual_seed(3))]
    opt = graphopt.optimize(model, passes, "x86", example_inputs=x, calibration_data=calib, tune_trials=0,
                            measure_latency=False, progress=False)
    ref = opt.graph_module(*x)
    assert ((opt(*x) - ref).abs().max() / ref.abs().max()).item() <= 1e-4
