"""The project's test architectures: the patterns users' CNNs are made of.

Each entry is small (fast to trace, compile and prune) but keeps the structure that makes
passes hard: residual adds, depthwise and grouped convs, concat, split + channel shuffle,
squeeze-excite gating, transposed conv with skip concat, conv1d, flatten into Linear.
BatchNorm statistics are randomized so that folding is never trivially exact.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.models.reference import BasicBlock


def cbr(cin, cout, k=3, s=1, groups=1, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), act())


class ResidualNet(nn.Module):
    """ResNet-like: stem, two stages of basic blocks, global pool, Linear."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = cbr(3, 16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            cbr(cin, hidden, 1, act=nn.ReLU6),
            cbr(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2Like(nn.Module):
    """Inverted residuals with depthwise convs and linear bottlenecks."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            cbr(3, 16, s=2, act=nn.ReLU6), InvertedResidual(16, 16, 1, 4), InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4), cbr(24, 64, 1, act=nn.ReLU6))
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class DenseNetLike(nn.Module):
    """Dense blocks: every layer concatenates its output to its input (pre-activation BN)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = cbr(3, 16)
        self.block1 = nn.Sequential(DenseLayer(16, 8), DenseLayer(24, 8), DenseLayer(32, 8))
        self.trans = nn.Sequential(nn.BatchNorm2d(40), nn.ReLU(), nn.Conv2d(40, 24, 1, bias=False), nn.AvgPool2d(2))
        self.block2 = nn.Sequential(DenseLayer(24, 8), DenseLayer(32, 8))
        self.head = nn.Linear(40, num_classes)

    def forward(self, x):
        x = self.block2(self.trans(self.block1(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))


class ResNeXtSEBlock(nn.Module):
    def __init__(self, cin, cout, groups=4, stride=1):
        super().__init__()
        mid = cout
        self.conv1 = cbr(cin, mid, 1)
        self.conv2 = cbr(mid, mid, 3, stride, groups=groups)
        self.conv3 = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.se = SqueezeExcite(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        return F.relu(self.se(self.conv3(self.conv2(self.conv1(x)))) + idt)


class SEResNeXtLike(nn.Module):
    """Grouped 3x3 convs (groups=4) with squeeze-excite gating and residual adds."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = cbr(3, 32)
        self.blocks = nn.Sequential(ResNeXtSEBlock(32, 32), ResNeXtSEBlock(32, 64, stride=2))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def channel_shuffle(x, groups: int):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c):
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(cbr(half, half, 1), nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False),
                                    nn.BatchNorm2d(half), cbr(half, half, 1))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([a, self.branch(b)], 1), 2)


class ShuffleNetLike(nn.Module):
    """ShuffleNetV2 units: channel split, a branch, concat, channel shuffle."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = cbr(3, 32, s=2)
        self.units = nn.Sequential(ShuffleUnit(32), ShuffleUnit(32))
        self.conv_last = cbr(32, 64, 1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.conv_last(self.units(self.stem(x))).mean((2, 3)))


class UNetLike(nn.Module):
    """Encoder, bottleneck, transposed-conv decoder with skip concatenation."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.enc1 = nn.Sequential(cbr(3, 16), cbr(16, 16))
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), cbr(16, 32), cbr(32, 32))
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(16)
        self.dec = nn.Sequential(cbr(32, 16), cbr(16, 16))
        self.out = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        d = F.relu(self.up_bn(self.up(e2)))
        return self.out(self.dec(torch.cat([d, e1], 1)))


class FlattenLinearNet(nn.Module):
    """Conv features flattened straight into a Linear (one channel = a block of H*W features)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(cbr(1, 16), nn.MaxPool2d(2), cbr(16, 32), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.bn = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.fc2(F.relu(self.bn(self.fc1(x))))


class Conv1dNet(nn.Module):
    """1-d convolutions over a sequence (audio / sensor style) with a residual."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv1d(4, 32, 5, padding=2, bias=False), nn.BatchNorm1d(32), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv1d(32, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv1d(32, 64, 3, stride=2, padding=1), nn.BatchNorm1d(64), nn.ReLU())
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.c1(x)
        x = x + self.c2(x)
        return self.fc(self.c3(x).mean(-1))


class MatmulNet(nn.Module):
    """Self-attention-like: two projections multiplied together, functional conv with model weights."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(16, 8, 3) * 0.2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):  # x: (N, 8, 16)
        x = F.conv1d(x.transpose(1, 2), self.w, padding=1).transpose(1, 2)
        att = torch.matmul(self.q(x), self.k(x).transpose(1, 2))
        return self.head(torch.matmul(torch.softmax(att, -1), x).mean(1))


# ---- timm's patterns, written as timm writes them (pure PyTorch: the default suite has no timm) ----

class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d whose forward asserts the rank, calls F.batch_norm
    and then its ``drop`` and ``act`` submodules (fx inlines it into get_attr + _assert + F.batch_norm)."""

    def __init__(self, c, apply_act=True, act_layer=nn.ReLU):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act_layer(inplace=True) if apply_act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, bn_training,
                         self.momentum, self.eps)
        return self.act(self.drop(x))


class ConvBnAct(nn.Module):
    """timm's ConvNormAct with an activation: conv, then a BatchNormAct2d."""

    def __init__(self, cin, cout, k=1, stride=1, groups=1, act=nn.ReLU, apply_act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, apply_act, act)

    def forward(self, x):
        return self.bn(self.conv(x))


class ConvNormAct(ConvBnAct):
    """timm's ConvNormAct as RepVGG's branches use it: ``conv`` then a BatchNormAct2d ``bn``, no act."""

    def __init__(self, cin, cout, k, stride=1, groups=1, apply_act=False):
        super().__init__(cin, cout, k, stride, groups, apply_act=apply_act)


class RepVggBlock(nn.Module):
    """timm's RepVggBlock (training-time form): 3x3 conv+BN + 1x1 conv+BN + identity BN, summed."""

    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        use_ident = cin == cout and stride == 1
        self.identity = BatchNormAct2d(cout, apply_act=False) if use_ident else None
        self.conv_kxk = ConvNormAct(cin, cout, 3, stride, groups)
        self.conv_1x1 = ConvNormAct(cin, cout, 1, stride, groups)
        self.drop_path = nn.Identity()
        self.attn = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.identity is None:
            x = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            identity = self.identity(x)
            x = self.conv_1x1(x) + self.conv_kxk(x)
            x = self.drop_path(x)
            x += identity
        return self.act(self.attn(x))


class RepVGGLike(nn.Module):
    """RepVGG as timm builds it: RepVggBlocks (with a grouped stage) and a linear head."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = RepVggBlock(3, 16, stride=2)
        self.stages = nn.Sequential(RepVggBlock(16, 16), RepVggBlock(16, 32, stride=2),
                                    RepVggBlock(32, 32, groups=4), RepVggBlock(32, 32))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


class MobileOneBlock(nn.Module):
    """timm's MobileOneBlock (training-time form): ``branches`` kxk conv+BN, a 1x1 scale branch
    (conv+BN, or a plain biased conv), an identity BN, summed starting from 0 as timm does."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, branches=3, scale_bn=True, attn=None):
        super().__init__()
        self.identity = BatchNormAct2d(cout, apply_act=False) if cin == cout and stride == 1 else None
        self.conv_kxk = nn.ModuleList(ConvNormAct(cin, cout, k, stride, groups) for _ in range(branches))
        self.conv_scale = None
        if k > 1:
            self.conv_scale = ConvNormAct(cin, cout, 1, stride, groups) if scale_bn else \
                nn.Conv2d(cin, cout, 1, stride, groups=groups)
        self.drop_path = nn.Identity()
        self.attn = attn or nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out
        for ck in self.conv_kxk:
            out += ck(x)
        out = self.drop_path(out)
        out += identity_out
        return self.act(self.attn(out))


class MobileOneLike(nn.Module):
    """MobileOne-S0-like: over-parameterized (k>1 branch) depthwise and pointwise blocks, one
    scale branch without BN, one block gated by squeeze-excite."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = MobileOneBlock(3, 16, 3, stride=2, branches=1)
        self.stages = nn.Sequential(
            MobileOneBlock(16, 16, 3, groups=16), MobileOneBlock(16, 32, 1),
            MobileOneBlock(32, 32, 3, stride=2, groups=32, scale_bn=False), MobileOneBlock(32, 32, 1),
            MobileOneBlock(32, 32, 3, groups=32, branches=2, attn=SqueezeExcite(32)))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))
class TimmLinear(nn.Linear):
    """timm.layers.Linear: an nn.Linear whose own forward calls F.linear (on get_attr weights)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def hard_sigmoid(x):
    return F.relu6(x + 3.) / 6.


class HardSigmoid(nn.Module):
    def forward(self, x):
        return hard_sigmoid(x)


class DropPath(nn.Module):
    """timm's DropPath: a per-sample mask in training, the identity in eval."""

    def __init__(self, p=0.1):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0. or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class SEGate(nn.Module):
    """timm's SqueezeExcite (efficientnet blocks): mean, reduce conv, act, expand conv, gate."""

    def __init__(self, c, rd, act=nn.ReLU, gate=nn.Sigmoid):
        super().__init__()
        self.conv_reduce, self.act1 = nn.Conv2d(c, rd, 1), act()
        self.conv_expand, self.gate = nn.Conv2d(rd, c, 1), gate()

    def forward(self, x):
        x_se = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(x_se)


class InvertedResidualSE(nn.Module):
    """MobileNetV3 / EfficientNet block: expand, depthwise, SE, project, DropPath + residual."""

    def __init__(self, cin, cout, mid, stride=1, act=nn.Hardswish, gate=HardSigmoid):
        super().__init__()
        self.conv_pw = ConvBnAct(cin, mid, act=act)
        self.conv_dw = ConvBnAct(mid, mid, 3, stride, groups=mid, act=act)
        self.se = SEGate(mid, 8, nn.ReLU, gate)
        self.conv_pwl = ConvBnAct(mid, cout, apply_act=False)
        self.has_skip, self.drop_path = stride == 1 and cin == cout, DropPath()

    def forward(self, x):
        y = self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))
        return self.drop_path(y) + x if self.has_skip else y


def _same_pads(x: torch.Tensor, kernel, stride, dilation=(1, 1)):
    """timm.layers.padding.pad_same's amounts: computed from the input size at run time."""
    pads = []
    for i, k, s, d in reversed(list(zip(x.size()[-2:], kernel, stride, dilation))):
        total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
        pads += [total // 2, total - total // 2]
    return pads


class Conv2dSame(nn.Conv2d):
    """timm.layers.Conv2dSame (the tf_* ports): "same" padding that torch.fx cannot trace."""

    def forward(self, x):
        x = F.pad(x, _same_pads(x, self.kernel_size, self.stride, self.dilation))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MaxPool2dSame(nn.MaxPool2d):
    """timm.layers.MaxPool2dSame: pads with -inf from the input size, then pools."""

    def forward(self, x):
        x = F.pad(x, _same_pads(x, self.kernel_size, self.stride, (self.dilation,) * 2), value=-float("inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride, (0, 0), self.dilation, self.ceil_mode)


class TfSameLike(nn.Module):
    """tf_efficientnet / tf_mobilenetv3: stride-2 and depthwise "same" convs, a "same" max pool,
    where the padding is asymmetric (one more on the right and bottom)."""

    def __init__(self):
        super().__init__()
        self.stem = Conv2dSame(3, 16, 3, stride=2, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.pool = MaxPool2dSame((3, 3), (2, 2))
        self.pw = nn.Conv2d(16, 32, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.dw = Conv2dSame(32, 32, 5, stride=2, groups=32, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.stem(x))))
        x = F.silu(self.bn3(self.dw(F.silu(self.bn2(self.pw(x))))))
        return self.head(x).mean((2, 3))


class ScaledStdConv2d(nn.Conv2d):
    """timm.layers.ScaledStdConv2d (NF-Nets): the weight standardized by ``F.batch_norm`` over
    itself and scaled by a gain, on every call."""

    def __init__(self, *args, eps=1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = self.weight[0].numel() ** -0.5
        self.eps = eps
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class NfNetLike(nn.Module):
    """NF-RegNet: weight-standardized convs, no BatchNorm, a scaled residual branch."""

    def __init__(self):
        super().__init__()
        self.stem = ScaledStdConv2d(3, 32, 3, stride=2, padding=1)
        self.expand = ScaledStdConv2d(32, 64, 1)
        self.dw = ScaledStdConv2d(64, 64, 3, padding=1, groups=64)
        self.project = ScaledStdConv2d(64, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.gelu(self.stem(x))
        x = x + 0.2 * self.project(F.gelu(self.dw(F.gelu(self.expand(x)))))
        return self.head(x.mean((2, 3)))


class MobileNetV3Like(nn.Module):
    """timm's MobileNetV3: BatchNormAct2d everywhere (functional batch_norm + rank asserts),
    hard-swish, SE with hard-sigmoid, a 1x1 conv head after the pool, timm's Linear classifier."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv_stem = ConvBnAct(3, 16, 3, 2, act=nn.Hardswish)
        self.blocks = nn.Sequential(InvertedResidualSE(16, 16, 32), InvertedResidualSE(16, 24, 48, 2),
                                    InvertedResidualSE(24, 24, 48, act=nn.SiLU, gate=nn.Sigmoid))
        self.conv_head, self.act2 = nn.Conv2d(24, 64, 1), nn.Hardswish()
        self.classifier = TimmLinear(64, num_classes)

    def forward(self, x):
        x = self.blocks(self.conv_stem(x))
        x = self.act2(self.conv_head(x.mean((2, 3), keepdim=True)))
        return self.classifier(x.flatten(1))


class MixedConv2d(nn.ModuleDict):
    """timm's MixedConv2d: uneven channel split, one kernel size per part, concat."""

    def __init__(self, c, kernels=(3, 5, 7)):
        super().__init__()
        self.splits = [c - c // len(kernels) * (len(kernels) - 1)] + [c // len(kernels)] * (len(kernels) - 1)
        for i, (k, n) in enumerate(zip(kernels, self.splits)):
            self[str(i)] = nn.Conv2d(n, n, k, padding=k // 2, groups=n, bias=False)

    def forward(self, x):
        x_split = torch.split(x, self.splits, 1)
        return torch.cat([c(x_split[i]) for i, c in enumerate(self.values())], 1)


class MixNetLike(nn.Module):
    """MixNet: mixed-kernel depthwise convs over uneven splits, SiLU, SE."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = ConvBnAct(3, 56, 3, 2, act=nn.SiLU)
        self.conv_dw, self.bn_dw = MixedConv2d(56), BatchNormAct2d(56, act_layer=nn.SiLU)  # 20/18/18
        self.se = SEGate(56, 16, nn.SiLU)
        self.conv_pwl = ConvBnAct(56, 32, apply_act=False)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.conv_pwl(self.se(self.bn_dw(self.conv_dw(x))))
        return self.head(x.mean((2, 3)))


class GhostModule(nn.Module):
    """timm's GhostModule: a primary conv, a cheap depthwise conv on it, cat, then a channel
    slice ``[:, :out_chs]`` (out_chs odd: the slice drops the last cheap channel)."""

    def __init__(self, cin, out_chs):
        super().__init__()
        self.out_chs, init = out_chs, (out_chs + 1) // 2
        self.primary_conv = ConvBnAct(cin, init)
        self.cheap_operation = ConvBnAct(init, init, 3, groups=init)

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, :self.out_chs, :, :]


class RexBlock(nn.Module):
    """ReXNet's block: its output is wider than its input, and the shortcut is added into the
    first in_channels channels only: ``cat([x[:, 0:C] + shortcut, x[:, C:]])``."""

    def __init__(self, cin, cout):
        super().__init__()
        self.in_channels = cin
        self.conv_exp = ConvBnAct(cin, cin * 2, act=nn.SiLU)
        self.conv_dw = ConvBnAct(cin * 2, cin * 2, 3, groups=cin * 2, act=nn.ReLU6)
        self.conv_pwl = ConvBnAct(cin * 2, cout, apply_act=False)

    def forward(self, x):
        shortcut = x
        torch._assert(shortcut.shape[1] == self.in_channels, "shortcut width")  # a cut changes it
        x = self.conv_pwl(self.conv_dw(self.conv_exp(x)))
        return torch.cat([x[:, 0:self.in_channels] + shortcut, x[:, self.in_channels:]], dim=1)


class GhostRexLike(nn.Module):
    """GhostNet's cat + slice and ReXNet's partial residual."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = ConvBnAct(3, 16, 3, 2)
        self.ghost = GhostModule(16, 23)
        self.rex1, self.rex2 = RexBlock(23, 32), RexBlock(32, 40)
        self.head = TimmLinear(40, num_classes)

    def forward(self, x):
        x = self.rex2(self.rex1(self.ghost(self.stem(x))))
        return self.head(x.mean((2, 3)))


class CrossStage(nn.Module):
    """CSPNet's stage: expand, split in halves, blocks on one half, cat, transition."""

    def __init__(self, c):
        super().__init__()
        self.expand_chs = 2 * c
        self.conv_exp = ConvBnAct(c, 2 * c, act=nn.LeakyReLU)
        self.blocks = nn.Sequential(ConvBnAct(c, c, 3, act=nn.LeakyReLU), ConvBnAct(c, c, 3, act=nn.LeakyReLU))
        self.conv_transition = ConvBnAct(2 * c, c, act=nn.LeakyReLU)

    def forward(self, x):
        xs, xb = self.conv_exp(x).split(self.expand_chs // 2, dim=1)
        return self.conv_transition(torch.cat([xs, self.blocks(xb).contiguous()], dim=1))


class DualPath(nn.Module):
    """DPN's dual path block: the first num_1x1_c channels are a residual path, the rest a
    dense path that grows by ``inc`` per block (slices, add and cat)."""

    def __init__(self, cin, num_1x1_c, inc):
        super().__init__()
        self.num_1x1_c = num_1x1_c
        self.c1x1_w = ConvBnAct(cin, num_1x1_c + 2 * inc)
        self.c1x1_a = ConvBnAct(cin, 16)
        self.c3x3_b = ConvBnAct(16, 16, 3, groups=4)
        self.c1x1_c = nn.Conv2d(16, num_1x1_c + inc, 1, bias=False)

    def forward(self, x):
        x_s = self.c1x1_w(x)
        x_s1, x_s2 = x_s[:, :self.num_1x1_c], x_s[:, self.num_1x1_c:]
        x = self.c1x1_c(self.c3x3_b(self.c1x1_a(x)))
        out1, out2 = x[:, :self.num_1x1_c], x[:, self.num_1x1_c:]
        return torch.cat([x_s1 + out1, x_s2, out2], dim=1)


class CspDpnLike(nn.Module):
    """CSPNet's half split and DPN's dual path."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = ConvBnAct(3, 16, 3, 2)
        self.stage = CrossStage(16)
        self.dpn = DualPath(16, 24, 8)
        self.bn = BatchNormAct2d(24 + 3 * 8)  # pre-activation: after a cat, cannot fold
        self.head = nn.Linear(48, num_classes)

    def forward(self, x):
        return self.head(self.bn(self.dpn(self.stage(self.stem(x)))).mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: permute to channels-last, F.layer_norm over C, permute back."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ScaledBlock(nn.Module):
    """A functional layer norm over channels and a ConvNeXt-style layer-scale parameter on a residual branch."""

    def __init__(self, c=8):
        super().__init__()
        self.a, self.norm, self.b, self.out = nn.Conv2d(3, c, 1), LayerNorm2d(c), nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, 2, 1)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        y = self.norm(self.a(x))
        return self.out(y + self.layer_scale * self.b(y))


class LayerNorm(nn.LayerNorm):
    """timm's LayerNorm (channels-last input): F.layer_norm on get_attr parameters."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNormAct(nn.GroupNorm):
    """timm's GroupNormAct: F.group_norm on get_attr parameters, then the activation."""

    def __init__(self, c, num_groups=4, act=nn.SiLU):
        super().__init__(num_groups, c)
        self.act = act()

    def forward(self, x):
        return self.act(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXt block: depthwise 7x7, channels-last LayerNorm + Linear MLP with GELU,
    layer scale ``x.mul(gamma.reshape(1, -1, 1, 1))``, DropPath, residual."""

    def __init__(self, c):
        super().__init__()
        self.conv_dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = LayerNorm(c)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.drop_path = DropPath()

    def forward(self, x):
        shortcut = x
        x = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
        x = self.fc2(self.act(self.fc1(x))).permute(0, 3, 1, 2)
        return self.drop_path(x.mul(self.gamma.reshape(1, -1, 1, 1))) + shortcut


class NormsLike(nn.Module):
    """Norms over the channels as timm writes them: LayerNorm2d (ConvNeXt stem and
    downsample), channels-last LayerNorm, GroupNormAct (4 groups) and a 1-group GroupNorm."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(3, 16, 2, 2), LayerNorm2d(16)
        self.block = ConvNeXtBlock(16)
        self.down_norm, self.down = LayerNorm2d(16), nn.Conv2d(16, 32, 2, 2)
        self.conv, self.gn = nn.Conv2d(32, 32, 3, padding=1, bias=False), GroupNormAct(32, 4)
        self.conv1, self.gn1 = nn.Conv2d(32, 48, 1), GroupNormAct(48, 1, nn.GELU)
        self.head = nn.Linear(48, num_classes)

    def forward(self, x):
        x = self.block(self.stem_norm(self.stem(x)))
        x = self.gn(self.conv(self.down(self.down_norm(x))))
        return self.head(self.gn1(self.conv1(x)).mean((2, 3)))


class EcaModule(nn.Module):
    """timm's EcaModule: a 1-channel Conv1d sliding along the pooled channel vector."""

    def __init__(self, k=3):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x):
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
        return x * y.sigmoid().view(x.shape[0], -1, 1, 1).expand_as(x)


class CbamModule(nn.Module):
    """timm's CbamModule: channel attention (one MLP called on the mean and on the max),
    then spatial attention (a conv over the channel mean and max)."""

    def __init__(self, c, rd=8):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Conv2d(c, rd, 1), nn.ReLU(), nn.Conv2d(rd, c, 1)
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        x_avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        x_max = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        x = x * (x_avg + x_max).sigmoid()
        x_attn = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * self.spatial(x_attn).sigmoid()


class Conv2dSameLiteral(nn.Conv2d):
    """timm's Conv2dSame, with the TF 'same' padding for a stride-2 3x3 on an even input
    written as a literal (timm computes it with math.ceil, which fx cannot trace):
    F.pad then F.conv2d on get_attr parameters."""

    def forward(self, x):
        x = F.pad(x, (0, 1, 0, 1))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class GatesLike(nn.Module):
    """Gates and functional convs: ECA, CBAM, TF 'same' padding (F.pad + F.conv2d, depthwise
    too), Dropout."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = ConvBnAct(3, 16, 3)
        self.eca = EcaModule()
        self.conv = Conv2dSameLiteral(16, 32, 3, stride=2)
        self.dw = Conv2dSameLiteral(32, 32, 3, stride=2, groups=32)
        self.pw = ConvBnAct(32, 32)
        self.cbam = CbamModule(32)
        self.drop, self.head = nn.Dropout(0.2), nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.eca(self.stem(x))
        x = self.cbam(self.pw(F.relu(self.dw(F.relu(self.conv(x))))))
        return self.head(self.drop(x.mean((2, 3))))


class SplitAttn(nn.Module):
    """ResNeSt's split attention (radix 2): the conv's channels regrouped as (radix, C / radix)
    by an attention-style reshape, summed over the radix, and gated by a softmax over it.
    The analysis does not follow channels spread over several dims into element-wise ops and
    reductions: they are left alone, with the reason; the layers around it prune."""

    def __init__(self, cin, c, radix=2):
        super().__init__()
        self.radix = radix
        self.conv = nn.Conv2d(cin, c * radix, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(c, 8, 1), nn.Conv2d(8, c * radix, 1)

    def forward(self, x):
        x = self.conv(x)
        B, RC, H, W = x.shape
        x = x.reshape((B, self.radix, RC // self.radix, H, W))
        x_attn = self.fc2(F.relu(self.fc1(x.sum(dim=1).mean((2, 3), keepdim=True))))
        x_attn = F.softmax(x_attn.view(B, self.radix, -1), dim=1).reshape(B, -1)
        return (x * x_attn.reshape((B, self.radix, RC // self.radix, 1, 1))).sum(dim=1)


class SplitAttnLike(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem, self.attn = ConvBnAct(3, 16, 3, 2), SplitAttn(16, 16)
        self.head = nn.Sequential(ConvBnAct(16, 32), nn.Flatten(), nn.Linear(32 * 8 * 8, num_classes))

    def forward(self, x):
        return self.head(self.attn(self.stem(x)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, as a trained model would have."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


#: name -> (factory, example input shape)
ZOO: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "residual": (ResidualNet, (1, 3, 32, 32)),
    "mobilenetv2": (MobileNetV2Like, (1, 3, 32, 32)),
    "densenet": (DenseNetLike, (1, 3, 32, 32)),
    "se_resnext": (SEResNeXtLike, (1, 3, 32, 32)),
    "shufflenet": (ShuffleNetLike, (1, 3, 32, 32)),
    "unet": (UNetLike, (1, 3, 32, 32)),
    "flatten_linear": (FlattenLinearNet, (1, 1, 28, 28)),
    "conv1d": (Conv1dNet, (1, 4, 64)),
}

#: Re-parameterizable multi-branch models, timm-style (functional BatchNorm, shape asserts), for
#: merge_branches.
BRANCHY: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "repvgg": (RepVGGLike, (1, 3, 32, 32)),
    "mobileone": (MobileOneLike, (1, 3, 32, 32)),
}

#: timm's patterns (issue 12), for the channel analysis and pruning: functional batch norm and
#: linear, asserts, gates, uneven splits, slices, norms over channels. Kept out of ZOO, whose
#: every model runs through every pass and target in the parametrised suites.
TIMM_PATTERNS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "mobilenetv3": (MobileNetV3Like, (1, 3, 32, 32)),
    "mixnet": (MixNetLike, (1, 3, 32, 32)),
    "ghost_rex": (GhostRexLike, (1, 3, 32, 32)),
    "csp_dpn": (CspDpnLike, (1, 3, 32, 32)),
    "norms": (NormsLike, (1, 3, 32, 32)),
    "gates": (GatesLike, (1, 3, 32, 32)),
    "split_attn": (SplitAttnLike, (1, 3, 16, 16)),
    "tf_same": (TfSameLike, (1, 3, 32, 32)),
    "nfnet": (NfNetLike, (1, 3, 32, 32)),
}


def build(name: str, seed: int = 0) -> Tuple[nn.Module, Tuple[torch.Tensor, ...]]:
    """A zoo model with random weights and BN statistics, and an example input, both seeded."""
    factory, shape = {**ZOO, **BRANCHY, **TIMM_PATTERNS}[name]
    torch.manual_seed(seed)
    model = randomize_bn(factory(), seed)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, (x,)
