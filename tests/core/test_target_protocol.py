"""The target protocol: a third-party target with only ``compile`` gets documented defaults, logged."""
import logging

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.target_protocol import DEFAULTS


class OnlyCompile:
    """A minimal third-party target: it "compiles" to the graph module itself."""

    def __init__(self):
        self.compiled = 0

    def compile(self, gm, example_inputs, **kwargs):
        self.compiled += 1
        return gm


class ArmLike(OnlyCompile):
    name = "my-arm-board"
    activation_dtype = "int8"
    preferred_channel_multiple = 4


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 30, 3, padding=1), nn.BatchNorm2d(30), nn.ReLU(),
                         nn.Conv2d(30, 30, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(30, 5)).eval()


def _quantized_input_dtypes(gm):
    return {str(m.x_qparams.dtype) for m in gm.modules() if hasattr(m, "x_qparams")}


def _run(target, caplog):
    x = torch.randn(2, 3, 12, 12)
    batches = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="graphopt"):
        return graphopt.optimize(_model(), ["fuse_conv_bn", ("prune_channels", {"ratio": 0.5}), "quantize"],
                                 target=target, example_inputs=(x,), calibration_data=batches, progress=False)


def test_minimal_target_gets_documented_defaults_logged(caplog):
    target = OnlyCompile()
    opt = _run(target, caplog)
    assert target.compiled == 1
    assert [r.status for r in opt.report.records] == ["applied", "applied", "applied"]
    # quantize took the default activation dtype
    assert _quantized_input_dtypes(opt.graph_module) == {f"torch.{DEFAULTS['activation_dtype']}"}
    # prune_channels rounded to the default multiple (30 channels cut to 16, not 15)
    prune = opt.report["prune_channels"]
    assert f"round_to={DEFAULTS['preferred_channel_multiple']}" in " ".join(prune.messages)
    assert any("30->16" in m for m in prune.messages), prune.messages
    # and every default was said
    lines = [r.getMessage() for r in caplog.records if "documented defaults" in r.getMessage()]
    assert len(lines) == 1, lines
    for capability in ("activation_dtype", "preferred_channel_multiple", "measure_latency", "emulated"):
        assert capability in lines[0]
    assert opt.report.target == "OnlyCompile"
    assert all(r.latency_ms_after is None for r in opt.report.records)


def test_capabilities_a_target_provides_are_used_and_not_logged(caplog):
    opt = _run(ArmLike(), caplog)
    assert _quantized_input_dtypes(opt.graph_module) == {"torch.int8"}
    line = next(r.getMessage() for r in caplog.records if "documented defaults" in r.getMessage())
    assert "activation_dtype" not in line and "preferred_channel_multiple" not in line
    assert "round_to=4" in " ".join(opt.report["prune_channels"].messages)
    assert opt.report.target == "my-arm-board"


def test_builtin_targets_state_their_capabilities():
    x86, arm = graphopt.capabilities_of(graphopt.get_target("x86")), graphopt.capabilities_of(graphopt.get_target("arm"))
    assert (x86.activation_dtype, arm.activation_dtype) == ("uint8", "int8")
    assert x86.can_measure_latency and not arm.can_measure_latency  # arm runs under qemu here
    assert "activation_dtype" not in x86.defaulted and "measure_latency" not in x86.defaulted


@pytest.mark.parametrize("bad, message", [
    ("activation_dtype", "activation_dtype must be one of"),
    ("preferred_channel_multiple", "preferred_channel_multiple must be an int"),
])
def test_a_capability_with_an_unusable_value_is_refused(bad, message):
    target = OnlyCompile()
    setattr(target, bad, "fp8" if bad == "activation_dtype" else 0)
    with pytest.raises(TypeError, match=message):
        graphopt.capabilities_of(target)


def test_a_target_class_instead_of_an_instance_is_refused_before_work():
    with pytest.raises(TypeError, match="is the class Target, not a target"):
        graphopt.optimize(_model(), target=graphopt.Target, example_inputs=(torch.randn(1, 3, 8, 8),))
