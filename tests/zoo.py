"""The project's test architectures: the patterns users' CNNs are made of.

Each entry is small (fast to trace, compile and prune) but keeps the structure that makes
passes hard: residual adds, depthwise and grouped convs, concat, split + channel shuffle,
squeeze-excite gating, transposed conv with skip concat, conv1d, flatten into Linear.
BatchNorm statistics are randomized so that folding is never trivially exact.
"""
from __future__ import annotations

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


def build(name: str, seed: int = 0) -> Tuple[nn.Module, Tuple[torch.Tensor, ...]]:
    """A zoo model with random weights and BN statistics, and an example input, both seeded."""
    factory, shape = ZOO[name]
    torch.manual_seed(seed)
    model = randomize_bn(factory(), seed)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, (x,)
