"""Analyses: MACs from the hand formulas, parameter and byte counts, the networkx view."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.analysis.metrics import node_macs


def macs_of(module, shape):
    gm = graphopt.capture(module, (torch.randn(*shape),))
    return graphopt.count_macs(gm)


@pytest.mark.parametrize("module,shape,expected", [
    (nn.Conv2d(3, 8, 3, padding=1), (1, 3, 10, 10), 8 * 10 * 10 * 3 * 9),
    (nn.Conv2d(8, 8, 3, groups=4), (2, 8, 10, 10), 2 * 8 * 8 * 8 * 2 * 9),
    (nn.Conv1d(4, 6, 5), (1, 4, 20), 6 * 16 * 4 * 5),
    (nn.Conv3d(2, 4, 3), (1, 2, 5, 5, 5), 4 * 27 * 2 * 27),
    (nn.ConvTranspose2d(4, 2, 2, stride=2), (1, 4, 5, 5), 4 * 25 * 2 * 4),
    (nn.Linear(10, 7), (3, 10), 3 * 7 * 10),
    (nn.MaxPool2d(2), (1, 3, 8, 8), 3 * 16 * 4),
    (nn.AdaptiveAvgPool2d(1), (1, 3, 8, 8), 3 * 64),
])
def test_module_macs(module, shape, expected):
    assert macs_of(module, shape) == expected


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 3, 3, 3))
        self.lin = nn.Parameter(torch.randn(4, 5))

    def forward(self, x):
        y = F.conv2d(x, self.w)  # (1, 5, 6, 6)
        y = y.mean((2, 3))       # reduction over 180 inputs
        return torch.matmul(y, self.lin.t())


def test_functional_macs():
    gm = graphopt.capture(Functional(), (torch.randn(1, 3, 8, 8),))
    per_node = {n.name: node_macs(gm, n) for n in gm.graph.nodes}
    assert per_node["conv2d"] == 5 * 36 * 27
    assert per_node["matmul"] == 4 * 5


def test_params_and_bytes_count_shared_tensors_once():
    lin = nn.Linear(4, 4)
    m = nn.Sequential(lin, nn.ReLU(), lin, nn.BatchNorm1d(4))
    assert graphopt.count_params(m) == 20 + 8
    assert graphopt.model_bytes(m) == (20 + 8 + 4 + 4) * 4 + 8  # + running stats + int64 counter


def test_networkx_view():
    gm = graphopt.capture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (torch.randn(1, 3, 5, 5),))
    g = graphopt.to_networkx(gm)
    assert list(g.edges) == [("input_1", "_0"), ("_0", "_1"), ("_1", "output")]
    assert g.nodes["_0"]["label"] == "Conv2d" and g.nodes["_0"]["shape"] == (1, 4, 3, 3)
