"""separable_conv: SVD-initialized depthwise+pointwise (and spatial) substitution."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import graphopt
import zoo
from requirements import needs_arm_toolchain
from graphopt.passes.separable_conv import depthwise_pair, full_rank, spatial_pair


@torch.no_grad()
def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@settings(max_examples=25, deadline=None)
@given(cin=st.integers(2, 6), cout=st.integers(1, 12), k=st.sampled_from([2, 3, 5]), groups=st.sampled_from([1, 2]),
       stride=st.integers(1, 2), dims=st.sampled_from([1, 2]), seed=st.integers(0, 1000))
def test_full_multiplier_is_exact(cin, cout, k, groups, stride, dims, seed):
    torch.manual_seed(seed)
    cin, cout = cin * groups, cout * groups
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(cin, cout, k, stride, padding=k // 2, groups=groups)
    f = depthwise_pair(conv, full_rank(conv, "depthwise"))
    x = torch.randn(2, cin, *([9] * dims))
    assert f.weight_error <= 1e-6
    assert rel(f.modules[1](f.modules[0](x)), conv(x)) <= 1e-4


def test_full_rank_spatial_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    f = spatial_pair(conv, full_rank(conv, "spatial"))
    x = torch.randn(1, 4, 12, 14)
    assert rel(f.modules[1](f.modules[0](x)), conv(x)) <= 1e-4


@pytest.mark.parametrize("build,mode", [(depthwise_pair, "depthwise"), (spatial_pair, "spatial")])
def test_error_falls_as_multiplier_grows(build, mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    errors = [build(conv, m).weight_error for m in range(1, full_rank(conv, mode) + 1)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] <= 1e-6


@pytest.mark.parametrize("name", ["residual", "unet", "flatten_linear", "se_resnext"])
def test_zoo_defaults_cut_macs(name):
    model, inputs = zoo.build(name)
    opt = graphopt.optimize(model, ["fuse_conv_bn", "separable_conv"], example_inputs=inputs)
    r = opt.report["separable_conv"]
    depthwise = [m for m in opt.graph_module.modules()
                 if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == m.in_channels > 1 and m.kernel_size[0] > 1]
    assert r.status == "applied" and depthwise
    assert r.macs_after <= 0.8 * r.macs_before
    assert r.macs_after == graphopt.count_macs(opt.graph_module)
    assert opt(*inputs).shape == model(*inputs).shape
    replaced = [m for m in r.messages if "depthwise rank" in m]
    assert len(replaced) == len(depthwise) and all("output error" in m and "MACs" in m for m in replaced)


def test_max_error_is_respected_on_real_inputs():
    model, inputs = zoo.build("residual")
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    opt = graphopt.optimize(model, ["fuse_conv_bn", ("separable_conv", {"max_error": 0.2})], example_inputs=inputs,
                            calibration_data=batches)
    r = opt.report["separable_conv"]
    errors = [float(m.split("output error ")[1].split(",")[0]) for m in r.messages if "output error" in m
              and "skipped" not in m]
    assert all(e <= 0.2 for e in errors)
    assert any("skipped" in m for m in r.messages)


def test_explicit_layers_and_ignore():
    model, inputs = zoo.build("residual")
    opt = graphopt.optimize(model, [("separable_conv", {"layers": ("layer1.0.conv1",), "max_error": 10.0,
                                                         "multiplier": 2})], example_inputs=inputs)
    msgs = opt.report["separable_conv"].messages
    assert msgs == [m for m in msgs if m.startswith("layer1.0.conv1: depthwise rank 2")] and len(msgs) == 1
    opt = graphopt.optimize(model, [("separable_conv", {"ignore": ("stem.0",), "max_error": 10.0})],
                            example_inputs=inputs)
    assert "stem.0 skipped: in ignore" in opt.report["separable_conv"].messages


@pytest.mark.parametrize("options,msg", [
    ({"multiplier": 0}, "multiplier=0 is invalid"),
    ({"layers": ("nope",)}, "'nope', which is not a module"),
    ({"layers": ("layer1.0.bn1",)}, "not a standard convolution (a BatchNorm2d)"),
    ({"mode": "lowrank"}, "not one of ['depthwise', 'spatial']"),
])
def test_bad_options(options, msg):
    model, inputs = zoo.build("residual")
    with pytest.raises(graphopt.GraphoptError) as e:
        graphopt.optimize(model, [("separable_conv", options)], example_inputs=inputs)
    assert msg in str(e.value)


def test_depthwise_layer_is_refused():
    model, inputs = zoo.build("mobilenetv2")
    with pytest.raises(graphopt.PassOptionError, match=r"not a standard convolution \(groups=64"):
        graphopt.optimize(model, ["fuse_conv_bn", ("separable_conv", {"layers": ("features.1.block.1.0",)})],
                          example_inputs=inputs)


@pytest.mark.parametrize("name,target", [("residual", "x86"), ("unet", "x86"), ("flatten_linear", "x86"),
                                         ("se_resnext", "x86"),
                                         pytest.param("residual", "arm", marks=needs_arm_toolchain),
                                         pytest.param("se_resnext", "arm", marks=needs_arm_toolchain)])
def test_substituted_model_compiles_and_matches(name, target):
    model, inputs = zoo.build(name)
    opt = graphopt.optimize(model, ["fuse_conv_bn", ("separable_conv", {"measure": False})], target,
                            example_inputs=inputs, measure_latency=False, progress=False)
    assert opt.report["separable_conv"].status == "applied"
    want = opt.graph_module(*inputs)
    got = torch.as_tensor(opt(*inputs))
    assert rel(got, want) <= 1e-4


def test_target_aware_substitution_times_each_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
    x = (torch.randn(1, 16, 24, 24),)
    opt = graphopt.optimize(model, [("separable_conv", {"max_error": 10.0, "multiplier": 1})], "x86",
                            example_inputs=x, measure_latency=False, progress=False)
    (msg,) = opt.report["separable_conv"].messages
    assert " ms -> " in msg and "on x86" in msg
    replaced = any(m.groups == 16 for m in opt.graph_module.modules() if isinstance(m, nn.Conv2d))
    assert replaced == msg.startswith("0: depthwise rank 1")
    assert replaced != ("kept as is: the pair is not faster" in msg)
