"""int8 values stay in the blocked conv layout between convs (pooling, residual adds, activations),
and every layout corner case computes the same integers as the simulated graph."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
import zoo
from graphopt.targets.int8.kernels import pool_out_size

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _quantized(model, inputs, target="x86"):
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, *inputs[0].shape[1:], generator=g) for _ in range(3)]
    return graphopt.optimize(model, ["fuse_conv_bn", "quantize"], target=target, example_inputs=inputs,
                             calibration_data=calib, progress=False, on_error="raise", tune_trials=0,
                             measure_latency=False)


def _main_kernels(ir: str):
    """The kernels ``main`` calls, in order (weight transforms excluded)."""
    body = ir[ir.index("def main("):]
    body = body[:body.index("\n    @")] if "\n    @" in body else body
    return re.findall(r"R\.call_tir\(cls\.(\w+?)\d*, \((?!p_)", body)


@pytest.mark.parametrize("size,kernel,stride,padding,dilation,ceil_mode", [
    (7, 2, 2, 0, 1, False), (7, 2, 2, 0, 1, True), (8, 3, 2, 1, 1, True), (9, 3, 3, 1, 2, True),
    (5, 3, 2, 1, 1, False), (6, 3, 2, 1, 1, True), (14, 3, 2, 0, 1, True)])
def test_pool_out_size_is_pytorchs(size, kernel, stride, padding, dilation, ceil_mode):
    y = F.max_pool2d(torch.zeros(1, 1, size, size), kernel, stride, padding, dilation, ceil_mode)
    assert pool_out_size(size, kernel, stride, padding, dilation, ceil_mode) == y.shape[-1]


class OddChannels(nn.Module):
    """Channel counts that are not multiples of 16 (or of 4), padded and ceil-mode pooling, a
    dilated stride-2 conv, 1x1 convs reading blocked data as it lies, a residual add, and
    squeeze-excite gating (a broadcast multiply, which must fall back to NCHW)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
        self.mid = nn.Sequential(nn.Conv2d(6, 20, 3, stride=2, padding=2, dilation=2), nn.ReLU())
        self.pw = nn.Conv2d(20, 20, 1)
        self.wide = nn.Sequential(nn.Conv2d(20, 24, 1), nn.ReLU6())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(24, 24, 1), nn.Sigmoid())
        self.head = nn.Linear(24 * 3 * 3, 5)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = self.mid(x)
        x = F.relu(x + self.pw(x))
        x = self.wide(x)
        x = F.max_pool2d(x * self.se(x), 2, ceil_mode=True)
        return self.head(torch.flatten(x, 1))


def test_odd_channel_counts_and_pooling_compile_bit_exactly():
    torch.manual_seed(0)
    model, inputs = OddChannels().eval(), (torch.randn(2, 3, 21, 21),)
    opt = _quantized(model, inputs)
    for seed in range(3):
        x = torch.randn(2, 3, 21, 21, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(opt(x), opt.graph_module(x))
    kernels = _main_kernels(opt.compiled.ir())
    assert "max_pool_blocked" in kernels  # the first pooling runs on the blocked integers


def test_residual_blocks_keep_int8_values_blocked_from_conv_to_conv():
    """The bundled model's shape: convs, int8 max pooling, residual adds, flatten into Linear.
    Only the flatten (and the output) need NCHW, so two unblocking copies remain in all."""
    from graphopt.models import FashionCNN

    torch.manual_seed(0)
    model, inputs = zoo.randomize_bn(FashionCNN()).eval(), (torch.randn(1, 1, 28, 28),)
    opt = _quantized(model, inputs)
    kernels = _main_kernels(opt.compiled.ir())
    assert kernels.count("unblock") == 2, kernels
    assert kernels.count("max_pool_blocked") == 2 and not any(k.startswith("max_pool2d") for k in kernels)
    assert not any("quantize" in k and k != "quantize_pad" for k in kernels), kernels  # folded into epilogues
    x = torch.randn(1, 1, 28, 28)
    assert torch.equal(opt(x), opt.graph_module(x))


def test_float_graphs_are_unchanged_by_the_blocked_translations():
    """The elementwise and pooling translations are the frontend's own on values without
    blocked copies: a float model compiles to the same kernels as before."""
    model, inputs = zoo.build("residual")
    opt = graphopt.optimize(model, ["fuse_conv_bn"], target="x86", example_inputs=inputs, progress=False,
                            on_error="raise", tune_trials=0, measure_latency=False)
    kernels = _main_kernels(opt.compiled.ir())
    assert not any(k in ("unblock", "max_pool_blocked", "pad_blocked") for k in kernels)
    assert torch.allclose(opt(*inputs), opt.graph_module(*inputs), atol=1e-4)


class GlobalPoolHead(nn.Module):
    """Convs, global average pooling (as ``mean`` and as ``AdaptiveAvgPool2d``), a Linear."""

    def __init__(self, adaptive: bool):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.adaptive = adaptive
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1) if self.adaptive else x.mean((2, 3))
        return self.fc(x)


@pytest.mark.parametrize("adaptive", [False, True])
def test_global_average_pooling_reads_the_blocked_values(adaptive):
    torch.manual_seed(0)
    model, inputs = GlobalPoolHead(adaptive).eval(), (torch.randn(1, 3, 32, 32),)
    opt = _quantized(model, inputs)
    kernels = _main_kernels(opt.compiled.ir())
    # the classifier's output; after AdaptiveAvgPool2d also the flatten of its (N, C, 1, 1) output
    assert kernels.count("unblock") == (2 if adaptive else 1), kernels
    assert any(k.startswith("fused_mean") for k in kernels) and not any("adaptive" in k for k in kernels)
    for seed in range(3):
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        want = opt.graph_module(x)
        torch.testing.assert_close(opt(x), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_prescheduled_kernels_are_not_tuning_tasks_and_survive_the_database():
    """Hand-scheduled copies are no tuning tasks, and a database record for one (older caches
    have them) does not replace the hand schedule at build time."""
    import tvm
    import tvm_ffi

    from graphopt.targets.measure import load_cpu_intrinsics
    from graphopt.targets.pipeline import _keep_prescheduled, prepare
    from graphopt.targets.tuning import is_prescheduled, tuning_tasks

    torch.manual_seed(0)
    model, inputs = GlobalPoolHead(False).eval(), (torch.randn(1, 3, 32, 32),)
    gm = _quantized(model, inputs, target=None).graph_module
    target = graphopt.get_target("x86")
    load_cpu_intrinsics()
    prepared = prepare(target.lower(gm, inputs).mod, target.tvm())
    scheduled = {gv.name_hint for gv, f in prepared.functions_items() if is_prescheduled(f)}
    assert any(name.startswith("quantize_pad") for name in scheduled), scheduled
    assert not scheduled & {t.name for t in tuning_tasks(prepared, target.tvm())}
    # what MetaScheduleApplyDatabase does with a record: replace the function under its name
    name = sorted(scheduled)[0]
    replaced = tvm.IRModule({gv: f for gv, f in prepared.functions_items()})
    victim = next(gv for gv in replaced.get_global_vars() if gv.name_hint == name)
    other = next(f for gv, f in prepared.functions_items() if gv.name_hint != name and isinstance(f, tvm.tirx.PrimFunc))
    replaced[victim] = other
    restored = _keep_prescheduled(prepared)(replaced)
    assert tvm_ffi.structural_equal(restored[victim], prepared[name])


class InvertedResiduals(nn.Module):
    """MobileNetV2/EfficientNet blocks: 1x1 expand -> depthwise (3x3 and 5x5, stride 1 and 2,
    dilation 2, channels not a multiple of 16) -> 1x1 project, a residual add; a depthwise conv
    straight after the input (its blocked copy made from the quantized input)."""

    def __init__(self):
        super().__init__()
        self.dw0 = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU6())
        blocks, self.residual = [], []
        for k, s, d, c in ((3, 1, 1, 24), (5, 2, 1, 40), (3, 1, 2, 20)):
            self.residual.append(s == 1)
            blocks.append(nn.Sequential(nn.Conv2d(16, c, 1), nn.ReLU6(),
                                        nn.Conv2d(c, c, k, s, d * (k // 2), dilation=d, groups=c), nn.ReLU6(),
                                        nn.Conv2d(c, 16, 1)))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(self.dw0(x))
        for block, residual in zip(self.blocks, self.residual):
            x = x + block(x) if residual else block(x)
        return self.head(x.mean((2, 3)))


def test_depthwise_convs_run_on_blocked_integers_bit_exactly():
    torch.manual_seed(0)
    model, inputs = InvertedResiduals().eval(), (torch.randn(1, 3, 29, 29),)
    opt = _quantized(model, inputs)
    kernels = _main_kernels(opt.compiled.ir())
    assert sum(k.startswith("fused_depthwise_blocked") or k == "depthwise_blocked" for k in kernels) == 4, kernels
    assert not any("conv2d" in k for k in kernels), kernels  # no NCHW conv left
    assert kernels.count("unblock") == 1, kernels  # only the classifier's output
    for seed in range(3):
        x = torch.randn(1, 3, 29, 29, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(opt(x), opt.graph_module(x))
