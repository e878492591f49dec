"""Capture: tracing, shapes, and clear errors for models graphopt cannot take."""
import copy

import pytest
import torch
import torch.nn as nn

import graphopt
import zoo
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


def test_same_padding_layers_become_static_pad_and_the_plain_layer():
    """TF ports (timm's Conv2dSame, MaxPool2dSame) pad from x.size() through max()/math.ceil:
    captured as F.pad with the example shape's constants and a plain torch layer, exactly."""
    model, x = zoo.build("tf_same")
    gm = capture(model, x)
    kinds = {type(m) for m in gm.modules()}
    assert not kinds & {zoo.Conv2dSame, zoo.MaxPool2dSame} and {nn.Conv2d, nn.MaxPool2d} <= kinds
    pads = [n.args[1] for n in gm.graph.nodes if n.target is torch.nn.functional.pad]
    assert pads == [[0, 1, 0, 1], [0, 1, 0, 1], [1, 2, 1, 2]]  # asymmetric: TF puts the extra on the right
    assert torch.equal(gm(*x), model(*x))
    assert gm.stem.weight is not model.stem.weight  # the copy's, and shared with nothing of the user's
    notes = gm.meta["graphopt_capture_notes"]
    assert any("2 `Conv2dSame`" in n for n in notes) and any("1 `MaxPool2dSame`" in n for n in notes)
    opt = graphopt.optimize(model, ["fuse_conv_bn"], example_inputs=x, progress=False)
    assert opt.report.capture == notes and "capture: 2 `Conv2dSame`" in opt.report.to_text()
    assert not [n for n in opt.graph_module.graph.nodes if n.op == "call_module"
                and isinstance(opt.graph_module.get_submodule(n.target), nn.BatchNorm2d)]


class OddConv(nn.Conv2d):
    """A conv subclass whose untraceable forward is not "same" padding: kept as an opaque leaf."""

    def forward(self, x):
        return super().forward(x) * (2 if x.sum() > 0 else 1)


def test_an_untraceable_layer_subclass_that_is_not_same_padding_stays_a_leaf():
    model = nn.Sequential(OddConv(3, 4, 3), nn.ReLU())
    gm = capture(model, X)
    assert isinstance(gm.get_submodule("0"), OddConv)
    assert any("kept opaque" in n for n in gm.meta["graphopt_capture_notes"])
    assert torch.equal(gm(*X), model(*X))


def test_an_explicit_leaf_is_not_rewritten():
    model, x = zoo.build("tf_same")
    gm = capture(model, x, leaf_modules=[zoo.Conv2dSame])
    assert isinstance(gm.get_submodule("stem"), zoo.Conv2dSame)
    assert isinstance(gm.get_submodule("pool"), nn.MaxPool2d)  # not listed: still made static


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


def test_a_model_that_cannot_be_copied_gets_a_capture_error_saying_why():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated weight_norm, on purpose
        model = nn.Sequential(torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3)))  # a computed (non-leaf) weight
    with pytest.raises(graphopt.CaptureError, match="parametrizations.weight_norm"):
        capture(model, X)
