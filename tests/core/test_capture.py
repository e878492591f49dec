"""Capture: tracing, shapes, and clear errors for models graphopt cannot take."""
import copy

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.capture import capture


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: untraceable
            return x * 2
        return x


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, double: bool = False):
        y = self.conv(x)
        if double:
            y = y * 2
        return y


X = (torch.randn(1, 3, 8, 8),)


def test_shapes_are_propagated():
    gm = capture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), X)
    shapes = [tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if n.op != "output"]
    assert shapes == [(1, 3, 8, 8), (1, 4, 6, 6), (1, 144)]


def test_untraceable_model_names_module_line_and_fix():
    with pytest.raises(graphopt.CaptureError) as e:
        graphopt.optimize(WithGate(), example_inputs=X)
    msg = str(e.value)
    assert "`gate` (Gate)" in msg
    assert "test_capture.py:" in msg and "if x.sum() > 0" in msg
    assert "leaf_modules=['gate']" in msg and "concrete_args" in msg


def test_leaf_modules_make_it_traceable():
    opt = graphopt.optimize(WithGate(), example_inputs=X, leaf_modules=["gate"])
    assert any(n.op == "call_module" and n.target == "gate" for n in opt.graph_module.graph.nodes)
    opt2 = graphopt.optimize(WithGate(), example_inputs=X, leaf_modules=[Gate])
    assert torch.allclose(opt2(*X), WithGate().eval()(*X) * 0 + opt2.graph_module(*X))


def test_concrete_args_are_accepted():
    m = Flagged()
    opt = graphopt.optimize(m, example_inputs=X, concrete_args={"double": True})
    assert torch.allclose(opt(*X), m(*X, double=True), atol=1e-6)
    assert [n.op for n in opt.graph_module.graph.nodes].count("placeholder") == 1


def test_wrong_input_shape_is_clear():
    with pytest.raises(graphopt.InputShapeError, match=r"\(1, 5, 8, 8\).*shaped and typed"):
        graphopt.optimize(WithGate().conv, example_inputs=(torch.randn(1, 5, 8, 8),))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused(bad):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] = bad
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(graphopt.InvalidModelError, match=r"parameter `0.weight` holds 1 NaN/Inf"):
        graphopt.optimize(m, example_inputs=X)
    assert all(torch.equal(before[k], v) or torch.isnan(v).any() for k, v in m.state_dict().items())


def test_missing_example_inputs_says_what_to_pass():
    with pytest.raises(graphopt.MissingInputError, match="example_inputs=\\(torch.randn"):
        graphopt.optimize(WithGate().conv)


def test_not_a_module():
    with pytest.raises(graphopt.CaptureError, match="nn.Module"):
        capture(lambda x: x, X)


def test_user_model_is_not_mutated(zoo_model):
    name, model, inputs = zoo_model
    model.train()  # even a model left in train mode must come back as it was
    state = copy.deepcopy(model.state_dict())
    modules = [type(m) for m in model.modules()]
    graphopt.optimize(model, example_inputs=inputs)
    assert model.training, name
    assert [type(m) for m in model.modules()] == modules
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), f"{name}: {k} changed"
