"""Optional suite: torchvision's CNN classifiers, random weights, offline.

Run with `-m torchvision` in an environment that has torchvision
(`pip install torch==2.14.1 torchvision==0.29.1`); deselected otherwise (see conftest.py).
"""
import pytest
import torch

import graphopt

pytestmark = pytest.mark.torchvision

MODELS = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "densenet121",
          "efficientnet_b0", "regnet_y_400mf", "convnext_tiny", "googlenet", "resnext50_32x4d"]


def build(name):
    tv = pytest.importorskip("torchvision", reason="needs torchvision: pip install torch==2.14.1 torchvision==0.29.1")
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(tv.models, name)(weights=None, **kwargs).eval()
    for m in model.modules():  # trained-looking BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model, (torch.randn(1, 3, 224, 224),)


@pytest.mark.parametrize("name", MODELS)
def test_fuse_conv_bn_on_torchvision(name):
    model, x = build(name)
    opt = graphopt.optimize(model, ["fuse_conv_bn", "dce"], example_inputs=x)
    rec = opt.report["fuse_conv_bn"]
    assert rec.status in ("applied", "no-op") and rec.rel_error <= 1e-4
    if name != "convnext_tiny":  # ConvNeXt uses LayerNorm, nothing to fold
        assert rec.nodes_removed


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "densenet121", "regnet_y_400mf"])
def test_prune_channels_on_torchvision(name):
    model, x = build(name)
    opt = graphopt.optimize(model, ["fuse_conv_bn", ("prune_channels", {"ratio": 0.5})], example_inputs=x)
    rec = opt.report["prune_channels"]
    assert rec.status == "applied", rec.reason
    assert rec.macs_after < rec.macs_before
    assert opt(*x).shape == (1, 1000)
    assert rec.params_after == graphopt.count_params(opt.graph_module)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_compile_torchvision_for_x86(name):
    model, x = build(name)
    opt = graphopt.optimize(model, ["fuse_conv_bn"], "x86", example_inputs=x, measure_latency=False)
    ref = opt.graph_module(*x)
    got = opt(*x)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4
