"""Shared weights (issue 16): every built-in pass keeps a tensor shared by two modules, or by two
calls of one module, shared, or leaves those layers alone and says why in the report."""
import pytest
import torch
import torch.nn as nn

import graphopt


class Tied(nn.Module):
    """Two convs holding one weight tensor."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.bn_a, self.bn_b = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        return self.fc((self.bn_a(self.a(x)) + self.bn_b(self.b(x))).mean((2, 3)))


class CalledTwice(nn.Module):
    """One conv called twice."""

    def __init__(self):
        super().__init__()
        self.stem, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn, self.fc = nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.c(self.stem(x)))
        return self.fc(self.bn(self.c(x)).mean((2, 3)))


PASSES = ["fuse_conv_bn", "merge_branches", "prune_channels", "separable_conv", "quantize", "distill"]


def _build(cls):
    torch.manual_seed(0)
    model = cls().eval()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_var.uniform_(0.5, 2.0)
            bn.running_mean.normal_()
    return model


@pytest.mark.parametrize("name", PASSES)
@pytest.mark.parametrize("cls", [Tied, CalledTwice])
def test_shared_weights_stay_shared_or_the_layer_is_left_alone_with_the_reason(cls, name):
    model = _build(cls)
    x = torch.randn(2, 3, 16, 16)
    batches = [(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    opt = graphopt.optimize(model, [name], example_inputs=(x,), calibration_data=batches, progress=False)
    record = opt.report.records[0]
    assert record.status in ("applied", "no-op"), record.reason
    gm = opt.graph_module
    if cls is Tied:
        held = {}
        for mod_name, module in gm.named_modules(remove_duplicate=False):
            for p in module.parameters(recurse=False):
                held.setdefault(id(p), []).append(mod_name)
        assert any(sorted(v) == ["a", "b"] for v in held.values()), f"{name} untied a.weight and b.weight"
        said = "tied weights"
    else:
        assert sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == "c") == 2
        said = "shared weights"
    # passes that would rewrite the shared layer leave it alone and say so (prune_channels cuts
    # a module called twice consistently across its calls; distill trains a tensor as one)
    must_say = {Tied: set(PASSES) - {"distill"}, CalledTwice: {"fuse_conv_bn", "separable_conv", "quantize"}}
    if name in must_say[cls]:
        text = "\n".join(record.messages + record.warnings)
        assert said in text, f"{name} does not say why the shared layer was left alone:\n{text}"
