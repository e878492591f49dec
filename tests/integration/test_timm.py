"""Optional suite: timm's lightweight CNNs (tests/timm_zoo.py), random weights, offline.

Issue 12's "Done when", per model: what graphopt must do on CNNs as a library writes them.
Run with `-m timm` in an environment that has timm
(`pip install torch==2.14.1 torchvision==0.29.1 timm`); deselected otherwise (see conftest.py).
`python scripts/timm_suite.py` measures the same models and writes the status table.
"""
import re

import pytest
import torch

import graphopt
import timm_zoo
from requirements import needs_arm_toolchain

pytestmark = pytest.mark.timm


def build(name):
    pytest.importorskip("timm", reason=f"needs timm: {timm_zoo.INSTALL}")
    return timm_zoo.build(name)


def reference(model, x):
    with torch.no_grad():
        return model(*x)


@pytest.mark.parametrize("name", list(timm_zoo.MODELS))
def test_fuse_conv_bn_leaves_no_batchnorm_after_a_layer(name):
    model, x = build(name)
    opt = graphopt.optimize(model, ["fuse_conv_bn"], example_inputs=x, progress=False)
    rec = opt.report["fuse_conv_bn"]
    assert rec.status in ("applied", "no-op"), rec.reason
    assert timm_zoo.batchnorms(opt.graph_module).after_layer == []
    assert rec.rel_error_vs_original <= 1e-4


@pytest.mark.parametrize("name", list(timm_zoo.MODELS))
def test_prune_channels_cuts_macs_and_keeps_the_output_shape(name):
    model, x = build(name)
    opt = graphopt.optimize(model, ["fuse_conv_bn", ("prune_channels", {"ratio": 0.3})], example_inputs=x,
                            progress=False)
    rec = opt.report["prune_channels"]
    assert rec.status == "applied", rec.reason
    assert 1 - rec.macs_after / rec.macs_before >= 0.15, "\n".join(rec.messages[-5:])
    assert opt(*x).shape == reference(model, x).shape


@pytest.mark.parametrize("name", list(timm_zoo.MODELS))
def test_compiles_for_x86_untuned(name):
    model, x = build(name)
    opt = graphopt.optimize(model, None, "x86", example_inputs=x, tune_trials=0, measure_latency=False,
                            progress=False)
    assert timm_zoo.rel_error(opt(*x), reference(model, x)) <= 1e-4


@needs_arm_toolchain
@pytest.mark.parametrize("name", timm_zoo.ARM_MODELS)
def test_compiles_for_arm_and_runs_under_qemu(name):
    model, x = build(name)
    opt = graphopt.optimize(model, None, "arm", example_inputs=x, tune_trials=0, measure_latency=False,
                            progress=False)
    assert timm_zoo.rel_error(opt(*x), reference(model, x)) <= 1e-4


@pytest.mark.parametrize("name", timm_zoo.INT8_MODELS)
def test_int8_compiled_agrees_with_simulated(name):
    model, x = build(name)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, *x[0].shape[1:], generator=g) for _ in range(4)]
    opt = graphopt.optimize(model, ["fuse_conv_bn", "quantize"], "x86", example_inputs=x,
                            calibration_data=calib, tune_trials=0, measure_latency=False, progress=False)
    rec = opt.report["quantize"]
    assert rec.status == "applied", rec.reason
    assert any("layer(s) int8" in m for m in rec.messages)
    inputs = [torch.randn(*x[0].shape, generator=g) for _ in range(32)]
    with torch.no_grad():
        agree = sum(int(opt.graph_module(i).argmax() == opt(i).argmax()) for i in inputs) / len(inputs)
    assert agree >= 0.95


@pytest.mark.parametrize("name", list(timm_zoo.UNTRACEABLE))
def test_untraceable_model_gets_a_capture_error_naming_module_and_line(name):
    model, x = build(name)
    with pytest.raises(graphopt.CaptureError) as err:
        graphopt.optimize(model, ["fuse_conv_bn"], example_inputs=x, progress=False)
    where = re.search(r"module `([^`]+)` \((\w+)\) at \S+\.py:\d+: `.+`", str(err.value))
    assert where, str(err.value)
    assert where.group(2) == timm_zoo.UNTRACEABLE[name]
    assert isinstance(model.get_submodule(where.group(1)), torch.nn.Module)
