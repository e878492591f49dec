"""Minimal pure-PyTorch reproductions of what timm's models break in graphopt (docs/timm_survey.md).

Each class is a small ``nn.Module`` written the way timm writes the pattern, without importing
timm: these become models of the default test zoo once graphopt handles them. Running

    python tests/timm_repros.py [name ...]

measures each one on the current code with the check that shows its symptom, and prints it.
Not collected by pytest (no ``test_`` prefix).
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# The patterns
# --------------------------------------------------------------------------------------------

class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d: a BatchNorm2d subclass outside torch.nn, so fx traces into it:
    `_assert` on the rank, `F.batch_norm` on the module's own parameters, then the activation."""

    def __init__(self, c, act=nn.ReLU):
        super().__init__(c)
        self.act = act()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return self.act(x)


class FunctionalBN(nn.Module):
    """conv -> timm BatchNormAct2d (functional batch_norm) -> conv: fuse, prune, quantize all stop here."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, padding=1, bias=False), BatchNormAct2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 32, 3, padding=1, bias=False), BatchNormAct2d(32)
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        return self.head(self.bn2(self.conv2(self.bn1(self.conv1(x))))).mean((2, 3))


class Linear(nn.Linear):
    """timm.layers.Linear: an nn.Linear subclass whose forward is `F.linear` on get_attr weights."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class FunctionalLinearHead(nn.Module):
    """conv -> pool -> timm Linear classifier: the head conv's channels are frozen."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.fc = Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class Conv2dSame(nn.Conv2d):
    """timm.layers.Conv2dSame (tf_* models): TF 'same' padding computed from the input size."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SamePadding(nn.Module):
    """A stride-2 'same' conv, as in tf_efficientnet / tf_mobilenetv3."""

    def __init__(self):
        super().__init__()
        self.conv = Conv2dSame(3, 16, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x)))).mean((2, 3))


class MixedConvInt8(nn.Module):
    """MixNet's MixedConv2d after a depthwise conv: split the channels, a 1x1 conv per part, concat."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pwl = nn.ModuleList([nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 1)])
        self.head = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        parts = torch.split(F.relu(self.dw(F.relu(self.pw(x)))), [16, 16], 1)
        return self.head(torch.cat([conv(parts[i]) for i, conv in enumerate(self.pwl)], 1)).mean((2, 3))


class ECAGate(nn.Module):
    """timm.layers.EcaModule: a Conv1d that slides along the channels of the pooled vector."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
        return x * y.view(x.shape[0], -1, 1, 1).sigmoid()


class ECANet(nn.Module):
    """conv -> ECA gate -> conv (ecaresnet): the gated channels are frozen."""

    def __init__(self):
        super().__init__()
        self.conv1, self.eca, self.conv2 = nn.Conv2d(3, 32, 3, padding=1), ECAGate(), nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        return self.head(F.relu(self.conv2(self.eca(F.relu(self.conv1(x)))))).mean((2, 3))


class ZeroInitResidual(nn.Module):
    """timm's zero_init_last: the last BN of a residual block starts with gamma = 0, so with
    random weights (pretrained=False) the branch outputs exact zeros after folding."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        nn.init.zeros_(self.bn2.weight)
        nn.init.zeros_(self.bn2.bias)
        self.head = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.head(x).mean((2, 3))


class FloatEpilogueInt8(nn.Module):
    """Int8 convs with timm's BatchNormAct2d (hard-swish) left in float between them: float
    results that differ by an ulp between PyTorch and TVM round to different int8 values."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 32, 3, padding=1, bias=False), BatchNormAct2d(32, nn.Hardswish)
        self.c2, self.b2 = nn.Conv2d(32, 64, 3, padding=1, bias=False), BatchNormAct2d(64, nn.Hardswish)
        self.c3, self.b3 = nn.Conv2d(64, 64, 3, padding=1, bias=False), BatchNormAct2d(64, nn.Hardswish)
        self.head = nn.Conv2d(64, 10, 1)

    def forward(self, x):
        return self.head(self.b3(self.c3(self.b2(self.c2(self.b1(self.c1(x))))))).mean((2, 3))


class ShapeFromInputAttention(nn.Module):
    """EdgeNeXt's CrossCovarianceAttn: `B, N, C = x.shape` read from the block input, then
    `reshape(B, N, C)` of the attention output, whose channels are frozen (qkv unbind)."""

    def __init__(self):
        super().__init__()
        self.embed, self.qkv = nn.Linear(8, 32), nn.Linear(32, 96)
        self.proj, self.head = nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = self.embed(x)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 4, -1).permute(2, 0, 3, 1, 4).unbind(0)
        y = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        return self.head(x + self.proj(y)).mean(1)


class FloorDivideFloat(nn.Module):
    """EdgeNeXt's PositionalEncodingFourier: `torch.div(float_arange, 2, rounding_mode='floor')`."""

    def forward(self, x):
        dim_t = torch.arange(x.shape[-1], dtype=torch.int64, device=x.device).to(torch.float32)
        dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / x.shape[-1])
        return x / dim_t


class NearestUpsampleGate(nn.Module):
    """GhostNetV2's DFC attention: pool 7x7 -> 3x3, gate, `F.interpolate(size=7x7, mode='nearest')`:
    a non-integer ratio, where TVM picks other source pixels than PyTorch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        gate = self.conv(F.avg_pool2d(x, 2, 2)).sigmoid()
        return x * F.interpolate(gate, size=x.shape[-2:], mode="nearest")


class RepVGGBlock(nn.Module):
    """RepVGG / MobileOne / FastViT training-time block: 3x3 conv+BN, 1x1 conv+BN and an
    identity BN summed on the same input: one 3x3 conv at inference."""

    def __init__(self, c=16):
        super().__init__()
        self.conv3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.identity(x))


class RepVGGNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, 16, 3, padding=1), RepVGGBlock(), nn.Conv2d(16, 10, 1)

    def forward(self, x):
        return self.head(self.block(F.relu(self.stem(x)))).mean((2, 3))


class ResizeIfNeeded(nn.Module):
    """MobileViT's MobileVitBlock: `if new_h != H or new_w != W:` on traced sizes. Must stay a
    CaptureError; the message calls it control flow "on a tensor value" and offers concrete_args,
    where the branch is on the input's size (the leaf_modules advice does work)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        H, W = x.shape[-2:]
        new_h, new_w = math.ceil(H / 2) * 2, math.ceil(W / 2) * 2
        if new_h != H or new_w != W:
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
        return self.conv(x).mean((2, 3))


class DualPath(nn.Module):
    """DPN's DualPathBlock: channel slices `x[:, :n]` / `x[:, n:]` of one tensor, a residual
    add on the first part and a dense concat of the rest."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 48, 3, padding=1), nn.Conv2d(48, 40, 3, padding=1)
        self.head = nn.Conv2d(56, 10, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.conv(x))
        out = torch.cat([x[:, :32] + y[:, :32], x[:, 32:], y[:, 32:]], dim=1)
        return self.head(out).mean((2, 3))


# --------------------------------------------------------------------------------------------
# The checks (each prints the symptom on the current code)
# --------------------------------------------------------------------------------------------

def _after_layer(gm) -> int:
    import timm_zoo

    return len(timm_zoo.batchnorms(gm).after_layer)


def check_fuse(model, x) -> str:
    import graphopt
    import timm_zoo

    before = timm_zoo.batchnorms(graphopt.capture(model, x))
    opt = graphopt.optimize(model, ["fuse_conv_bn"], example_inputs=x, progress=False)
    return f"fuse_conv_bn {opt.report['fuse_conv_bn'].status}: {_after_layer(opt.graph_module)} of " \
           f"{len(before.after_layer)} BatchNorms after a conv left"


def check_merge(model, x) -> str:
    import graphopt
    import timm_zoo

    opt = graphopt.optimize(model, ["fuse_conv_bn"], example_inputs=x, progress=False)
    gm = opt.graph_module
    convs = sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d))
    kept = [m.split(" kept: ")[1] for m in opt.report["fuse_conv_bn"].messages if " kept: " in m]
    return f"after fuse_conv_bn: {convs} convs and {timm_zoo.batchnorms(gm).total} BatchNorm(s) left " \
           f"({'; '.join(kept)}); a branch merge would leave 3 convs"


def check_prune(model, x, leaf_modules=()) -> str:
    import graphopt

    opt = graphopt.optimize(model, ["fuse_conv_bn", ("prune_channels", {"ratio": 0.3})], example_inputs=x,
                            leaf_modules=leaf_modules, progress=False)
    rec = opt.report["prune_channels"]
    if rec.status in ("failed", "rolled back"):
        return f"prune_channels {rec.status}: {rec.reason.splitlines()[0][:300]}"
    unknown = sorted({why.split("(")[1].split(")")[0] for why in graphopt.analyze_channels(opt.graph_module).unknown.values()})
    return f"prune_channels {rec.status}: {100 * (1 - rec.macs_after / rec.macs_before):.1f}% of MACs cut; " \
           f"not understood: {', '.join(unknown) or 'nothing'}"


def check_prune_with_leaf(model, x) -> str:
    """Conv2dSame kept as a leaf explicitly (capture now does it by itself, then makes the
    padding static: graphopt/static_padding.py)."""
    return check_prune(model, x, leaf_modules=[Conv2dSame])


def check_capture(model, x) -> str:
    import graphopt

    try:
        graphopt.capture(model, x)
    except graphopt.CaptureError as e:
        return "CaptureError: " + " / ".join(line.strip() for line in str(e).splitlines()[:2])
    return "captured"


def check_x86(model, x) -> str:
    import graphopt
    import timm_zoo

    try:
        opt = graphopt.optimize(model, None, "x86", example_inputs=x, tune_trials=0, measure_latency=False,
                                progress=False)
    except Exception as e:  # noqa: BLE001 - the failure is the symptom
        return f"x86 compile fails: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    with torch.no_grad():
        return f"x86 compiles, rel. error {timm_zoo.rel_error(opt(*x), model(*x)):.1e}"


def check_int8(model, x) -> str:
    import graphopt

    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, *x[0].shape[1:], generator=g) for _ in range(4)]
    try:
        opt = graphopt.optimize(model, ["fuse_conv_bn", "quantize"], "x86", example_inputs=x,
                                calibration_data=calib, tune_trials=0, measure_latency=False, progress=False)
    except Exception as e:  # noqa: BLE001
        return f"int8 fails: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    import timm_zoo

    rec = opt.report["quantize"]
    if rec.status != "applied":
        return f"quantize {rec.status}: {rec.reason.split(' | ')[0][:240]}"
    xs = [torch.randn(*x[0].shape, generator=g) for _ in range(16)]
    with torch.no_grad():
        sim = [opt.graph_module(i) for i in xs]
    comp = [opt(i) for i in xs]
    agree = sum(int(a.argmax() == b.argmax()) for a, b in zip(sim, comp)) / len(xs)
    err = max(timm_zoo.rel_error(b, a) for a, b in zip(sim, comp))
    return f"int8 compiles; simulated vs compiled: top-1 agreement {100 * agree:.0f}%, max rel. error {err:.1e}" \
           f" (bit-exact when 0)"


def check_int8_flips(model, x) -> str:
    """Compile the int8 graph with every quantized activation as an output, and count the int8
    values where the compiled model and the simulated graph differ (rounding flips)."""
    import graphopt

    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, *x[0].shape[1:], generator=g) for _ in range(4)]
    gm = graphopt.optimize(model, ["fuse_conv_bn", "quantize"], example_inputs=x, calibration_data=calib,
                           progress=False).graph_module
    taps = [n for n in gm.graph.nodes if "q8_quantize" in str(n.target)]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(taps),)
    gm.recompile()
    compiled = graphopt.get_target("x86").compile(gm, x, tune_trials=0)
    flips = total = 0
    for _ in range(4):
        xi = torch.randn(*x[0].shape, generator=g)
        with torch.no_grad():
            ref = gm(xi)
        for r, c in zip(ref, compiled(xi)):
            flips += int((r.to(torch.int32) != c.to(torch.int32)).sum())
            total += r.numel()
    return f"int8 activations differing between simulated and compiled: {flips} of {total} ({len(taps)} quantize points, 4 inputs)"


@dataclasses.dataclass
class Repro:
    model: Callable[[], nn.Module]
    input_shape: Tuple[int, ...]
    check: Callable
    timm: str  # the timm code it reproduces


REPROS: Dict[str, Repro] = {
    "functional_bn_fuse": Repro(FunctionalBN, (1, 3, 16, 16), check_fuse, "timm.layers.BatchNormAct2d"),
    "functional_bn_prune": Repro(FunctionalBN, (1, 3, 16, 16), check_prune, "timm.layers.BatchNormAct2d"),
    "functional_linear_prune": Repro(FunctionalLinearHead, (1, 3, 16, 16), check_prune, "timm.layers.Linear"),
    "same_padding_capture": Repro(SamePadding, (1, 3, 17, 17), check_capture, "timm.layers.Conv2dSame"),
    "size_branch_capture": Repro(ResizeIfNeeded, (1, 3, 15, 15), check_capture, "timm MobileVitBlock"),
    "same_padding_leaf_prune": Repro(SamePadding, (1, 3, 17, 17), check_prune_with_leaf, "timm.layers.Conv2dSame"),
    "mixed_conv_int8": Repro(MixedConvInt8, (1, 3, 32, 32), check_int8, "timm.layers.MixedConv2d"),
    "shape_from_input_prune": Repro(ShapeFromInputAttention, (1, 16, 8), check_prune, "timm edgenext CrossCovarianceAttn"),
    "floor_divide_float_x86": Repro(FloorDivideFloat, (1, 3, 4, 8), check_x86, "timm edgenext PositionalEncodingFourier"),
    "nearest_upsample_x86": Repro(NearestUpsampleGate, (1, 8, 7, 7), check_x86, "timm ghostnetv2 DFC attention"),
    "repvgg_branches": Repro(RepVGGNet, (1, 3, 16, 16), check_merge, "timm RepVggBlock / MobileOneBlock"),
    "channel_slice_prune": Repro(DualPath, (1, 3, 16, 16), check_prune, "timm DualPathBlock (dpn)"),
    "eca_prune": Repro(ECANet, (1, 3, 16, 16), check_prune, "timm.layers.EcaModule"),
    "zero_init_int8": Repro(ZeroInitResidual, (1, 3, 16, 16), check_int8, "timm ResNet zero_init_last"),
    "float_epilogue_int8": Repro(FloatEpilogueInt8, (1, 3, 224, 224), check_int8_flips, "timm.layers.BatchNormAct2d"),
}


def build(name: str):
    torch.manual_seed(0)
    r = REPROS[name]
    model = r.model().eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model, (torch.randn(*r.input_shape),)


def main(names) -> None:
    for name in names or REPROS:
        model, x = build(name)
        print(f"{name} ({REPROS[name].timm}): {REPROS[name].check(model, x)}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, __file__.rpartition("/")[0])  # timm_zoo's helpers
    main(sys.argv[1:])
