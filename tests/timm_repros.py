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


def check_prune(model, x) -> str:
    import graphopt

    opt = graphopt.optimize(model, ["fuse_conv_bn", ("prune_channels", {"ratio": 0.3})], example_inputs=x,
                            progress=False)
    rec = opt.report["prune_channels"]
    unknown = sorted({why.split("(")[1].split(")")[0] for why in graphopt.analyze_channels(opt.graph_module).unknown.values()})
    return f"prune_channels {rec.status}: {100 * (1 - rec.macs_after / rec.macs_before):.1f}% of MACs cut; " \
           f"not understood: {', '.join(unknown) or 'nothing'}"


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
    "mixed_conv_int8": Repro(MixedConvInt8, (1, 3, 32, 32), check_int8, "timm.layers.MixedConv2d"),
    "eca_prune": Repro(ECANet, (1, 3, 16, 16), check_prune, "timm.layers.EcaModule"),
    "zero_init_int8": Repro(ZeroInitResidual, (1, 3, 16, 16), check_int8, "timm ResNet zero_init_last"),
    "float_epilogue_int8": Repro(FloatEpilogueInt8, (1, 3, 64, 64), check_int8, "timm.layers.BatchNormAct2d"),
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
