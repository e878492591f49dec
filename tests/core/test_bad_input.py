"""Bad input to ``optimize()``: a clear error before slow work, or correct behaviour, and the
user's model and tensors are never changed.

Each case asserts the error type, that the message names the argument and the remedy, that no
slow work ran first (the model's forward was never called), and that the caller's objects are
as they were.
"""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import InputShapeError, InvalidArgumentError, InvalidModelError, UnknownNameError


class Counted(nn.Module):
    """Counts its forward calls: a refusal "before slow work" leaves the count at zero."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.calls = 0

    def forward(self, x, scale: float = 1.0):
        self.calls += 1
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3))) * scale


X = torch.randn(2, 3, 8, 8)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def refused_before_work(exc, match, **kwargs):
    """``optimize(Counted(), ...)`` raises ``exc`` matching ``match``, never having run the model."""
    model = Counted().train()
    snap, x = _snapshot(model), kwargs.pop("example_inputs", X)
    x_before = x.clone()
    with pytest.raises(exc, match=match) as info:
        graphopt.optimize(model, example_inputs=x, progress=False, **kwargs)
    assert model.calls == 0, "the model ran before the argument was refused"
    assert _same(model, snap) and model.training
    assert torch.equal(x.nan_to_num(), x_before.nan_to_num())
    return info.value


# --- arguments that are refused before any work ------------------------------------------

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(passes="fuse_conv_bn"), InvalidArgumentError, r"passes must be a list.*passes=\['fuse_conv_bn'\]"),
    (dict(passes="fuse_conv_bn,dce"), InvalidArgumentError, r"passes=\['fuse_conv_bn', 'dce'\]"),
    (dict(passes=[("prune_channels", 0.5)]), InvalidArgumentError,
     r"options of 'prune_channels' must be a dict.*\('prune_channels', \{'ratio': 0.5\}\)"),
    (dict(passes=[("prune_channels", {"ratio": 0.5}, "x")]), InvalidArgumentError, r"is a pair \(name"),
    (dict(passes=[42]), InvalidArgumentError, r"passes\[0\] is a int"),
    (dict(passes=["fuse_conv"]), UnknownNameError, r"Did you mean 'fuse_conv_bn'\?.*Known passes:"),
    (dict(passes=[("prune_channels", {"ratoi": 0.5})]), graphopt.PassOptionError, r"no option 'ratoi'.*ratio"),
    (dict(target=graphopt.Target), InvalidArgumentError, r"is the class Target, not a target.*target='x86'"),
    (dict(target=3), InvalidArgumentError, r"target must be a registered name"),
    (dict(target="x68"), UnknownNameError, r"Did you mean 'x86'"),
    (dict(tolerances={"fuse_conv": 1e-3}), InvalidArgumentError,
     r"tolerances\['fuse_conv'\].*not a pass of this pipeline.*Did you mean 'fuse_conv_bn'"),
    (dict(tolerances={"fuse_conv_bn": -1}), InvalidArgumentError, r"tolerances\['fuse_conv_bn'\] must be a positive"),
    (dict(tolerances=[1e-3]), InvalidArgumentError, r"tolerances must be a dict"),
    (dict(exact_tolerance=-1), InvalidArgumentError, r"exact_tolerance must be a positive number"),
    (dict(exact_tolerance=float("nan")), InvalidArgumentError, r"exact_tolerance must be a positive number"),
    (dict(leaf_modules=["bnn"]), InvalidArgumentError, r"leaf_modules: the model has no submodule named 'bnn'.*'bn'"),
    (dict(leaf_modules=[int]), InvalidArgumentError, r"leaf_modules: int is not an nn.Module class"),
    (dict(concrete_args={"scael": 2.0}), InvalidArgumentError,
     r"concrete_args\['scael'\]: Counted.forward has no argument 'scael'.*'scale'"),
    (dict(eval_fn=lambda: 1.0), InvalidArgumentError, r"eval_fn must take exactly one argument, the model"),
    (dict(eval_fn=0.9), InvalidArgumentError, r"eval_fn must be a function"),
    (dict(tune_trials=-1, target="x86"), InvalidArgumentError, r"tune_trials must be a non-negative int"),
    (dict(tune_trials=True, target="x86"), InvalidArgumentError, r"tune_trials must be a non-negative int"),
    (dict(on_error="ignore"), graphopt.PassOptionError, r"on_error='ignore' is not one of"),
    (dict(seed=1.5), InvalidArgumentError, r"seed must be an int"),
    (dict(measure_latency="yes"), InvalidArgumentError, r"measure_latency must be True or False"),
    (dict(calibration_data=torch.randn(4, 3, 8, 8)), InputShapeError, r"calibration_data must be an iterable.*\[tensor\]"),
    (dict(calibration_data=[]), graphopt.MissingInputError, r"calibration_data is empty"),
    (dict(calibration_data=[torch.randn(4, 3, 9, 9)]), InputShapeError, r"calibration batch 0, input 0 is \(4, 3, 9, 9\)"),
    (dict(passes=["quantize"]), graphopt.MissingInputError, r"needs calibration_data"),
])
def test_bad_arguments_are_refused_before_work(kwargs, exc, match):
    refused_before_work(exc, match, **kwargs)


@pytest.mark.parametrize("make, match", [
    (lambda: X.clone().index_put_((torch.tensor([0]),), torch.tensor(float("nan"))), r"example_inputs\[0\] contains .* NaN/Inf"),
    (lambda: torch.full((1, 3, 8, 8), float("inf")), r"example_inputs\[0\] contains 192 NaN/Inf"),
    (lambda: torch.randn(0, 3, 8, 8), r"example_inputs\[0\] has shape \(0, 3, 8, 8\) with no elements.*batch size >= 1"),
])
def test_bad_example_inputs(make, match):
    refused_before_work(InputShapeError, match, example_inputs=make())


def test_nan_in_calibration_data_is_named_before_work():
    data = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    data[1][0, 0, 0, 0] = float("nan")
    refused_before_work(InputShapeError, r"calibration batch 1, input 0 contains 1 NaN/Inf", calibration_data=data)


def test_nan_in_distill_training_data_is_named_before_the_passes():
    train = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    train[2][1, 1, 1, 1] = float("inf")
    model = Counted().eval()
    with pytest.raises(InputShapeError, match=r"distill: training batch 2, input 0 contains 1 NaN/Inf"):
        graphopt.optimize(model, [("prune_channels", {"ratio": 0.5}), ("distill", {"train_data": train})],
                          example_inputs=X, progress=False)
    assert model.calls == 0  # the model is copied; the copy traced, but no pass ran


def test_tune_trials_without_a_target_is_said():
    with pytest.warns(UserWarning, match=r"tune_trials=8 has no effect without a target"):
        graphopt.optimize(Counted().eval(), example_inputs=X, tune_trials=8, progress=False)


def test_a_torchscript_module_is_refused_with_what_to_pass():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(InvalidArgumentError, match=r"TorchScript module.*pass the eager nn.Module"):
        graphopt.optimize(scripted, example_inputs=X)


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(InvalidModelError, match=r"parameter `0.weight` is on the meta device.*to_empty"):
        graphopt.optimize(model, example_inputs=X)


def test_not_a_module():
    with pytest.raises(InvalidArgumentError, match=r"model must be a torch.nn.Module, got function"):
        graphopt.optimize(lambda x: x, example_inputs=X)


# --- the model's own output, and eval_fn's ------------------------------------------------

def test_a_model_whose_own_output_is_inf_is_refused_naming_the_layer():
    model = Counted().eval()
    model.bn.running_var.zero_()
    model.bn.eps = 0.0
    with pytest.raises(InvalidModelError, match=r"model itself outputs NaN/Inf.*module `bn` \(BatchNorm2d\).*running_var"):
        graphopt.optimize(model, example_inputs=X, progress=False)


@pytest.mark.parametrize("value, match", [(float("nan"), "returned nan"), (None, "returned None"),
                                          ("0.9", "returned '0.9'")])
def test_an_eval_fn_that_does_not_return_a_number_is_refused_before_the_passes(value, match):
    calls = []
    with pytest.raises(InvalidArgumentError, match=f"eval_fn {match} on the original model.*finite number"):
        graphopt.optimize(Counted().eval(), ["fuse_conv_bn"], example_inputs=X, progress=False,
                          eval_fn=lambda m: calls.append(1) or value)
    assert len(calls) == 1


def test_an_eval_fn_that_fails_after_a_pass_rolls_it_back():
    state = {"n": 0}

    def flaky(model):
        state["n"] += 1
        return 0.9 if state["n"] == 1 else float("nan")

    opt = graphopt.optimize(Counted().eval(), ["fuse_conv_bn"], example_inputs=X, progress=False, eval_fn=flaky)
    rec = opt.report["fuse_conv_bn"]
    assert rec.status == "rolled back" and "eval_fn returned nan on the optimized model" in rec.reason


# --- nothing of the user's is touched ----------------------------------------------------

class InPlace(nn.Module):
    """Writes into its own input, as some real models do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x.mul_(2)
        return self.bn(self.conv(x.relu_()))


def test_a_forward_that_writes_into_its_input_changes_no_caller_tensor():
    x = torch.randn(1, 3, 8, 8)
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    x0, data0 = x.clone(), [d.clone() for d in data]
    model = InPlace().eval()
    opt = graphopt.optimize(model, ["fuse_conv_bn", "quantize"], example_inputs=(x,), calibration_data=data,
                            progress=False)
    assert torch.equal(x, x0) and all(torch.equal(d, d0) for d, d0 in zip(data, data0))
    rec = opt.report["fuse_conv_bn"]
    assert rec.status == "applied" and rec.rel_error < 1e-5  # no false failure from a grown input
    assert opt.report["quantize"].status == "applied"


@graphopt.register_pass("test_bad_input_mutates_original", exact=True)
def mutates_original(gm, ctx):
    """Changes the original model and then fails (a buggy plugin)."""
    with torch.no_grad():
        next(ctx.original.parameters()).mul_(0)
    raise RuntimeError("plugin bug")


@graphopt.register_pass("test_bad_input_mutates_original_quietly", exact=True)
def mutates_original_quietly(gm, ctx):
    """Changes the original model's weights in place and returns normally."""
    with torch.no_grad():
        next(ctx.original.parameters()).add_(1)
    return gm


@pytest.mark.parametrize("name, status", [("test_bad_input_mutates_original", "failed"),
                                          ("test_bad_input_mutates_original_quietly", "rolled back")])
def test_a_pass_that_changes_ctx_original_is_rolled_back_and_the_original_restored(name, status):
    model = Counted().eval()
    opt = graphopt.optimize(model, [name, "fuse_conv_bn"], example_inputs=X, progress=False)
    rec = opt.report[name]
    assert rec.status == status and "modified ctx.original, which passes may only read (restored" in rec.reason
    # the next pass still compares against the untouched original: fusion is exact
    fuse = opt.report["fuse_conv_bn"]
    assert fuse.status == "applied" and fuse.rel_error_vs_original < 1e-5


def test_the_users_model_is_never_modified_even_in_train_mode():
    model = Counted().train()
    snap = _snapshot(model)
    graphopt.optimize(model, ["fuse_conv_bn", ("prune_channels", {"ratio": 0.5})], example_inputs=X, progress=False)
    assert _same(model, snap) and model.training


def test_tensors_in_the_report_do_not_alias_the_callers():
    x = torch.randn(1, 3, 8, 8)
    opt = graphopt.optimize(Counted().eval(), example_inputs=x, progress=False)
    x.add_(1)  # the caller reuses their tensor
    out = opt(torch.zeros(1, 3, 8, 8))
    assert out.shape == (1, 4)


class TiedConvs(nn.Module):
    """Two convs holding one weight tensor (tied weights), and a block called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.b.weight = self.a.weight
        self.stem = nn.Conv2d(3, 8, 1)
        self.twice = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.twice(self.twice(self.b(torch.relu(self.a(x))))))


@pytest.mark.parametrize("passes", [["fuse_conv_bn"], [("prune_channels", {"ratio": 0.5})],
                                    [("separable_conv", {"measure": False, "max_error": 10.0})]])
def test_shared_weights_stay_shared_or_the_layer_is_refused_with_the_reason(passes):
    model = TiedConvs().eval()
    opt = graphopt.optimize(model, passes, example_inputs=torch.randn(1, 3, 8, 8), progress=False)
    gm = opt.graph_module
    assert gm.get_submodule("a").weight is gm.get_submodule("b").weight  # still tied
    rec = opt.report.records[0]
    if passes[0][0] == "prune_channels":
        assert gm.get_submodule("a").weight.shape == (8, 8, 3, 3)
        assert "tied weights): cutting it would change every use" in " ".join(rec.messages), rec.messages


def test_an_eval_fn_that_raises_on_the_original_is_the_callers_error():
    def broken(model):
        raise KeyError("labels")

    with pytest.raises(InvalidArgumentError, match=r"eval_fn raised on the original model, before any pass ran: KeyError"):
        graphopt.optimize(Counted().eval(), ["fuse_conv_bn"], example_inputs=X, progress=False, eval_fn=broken)


def test_a_target_that_cannot_compile_here_is_refused_before_work():
    bad = graphopt.get_target("arm").replace(name="arm-no-toolchain", cross_compiler="aarch64-no-such-g++")
    refused_before_work(graphopt.TargetError, r"needs aarch64-no-such-g\+\+, which is not installed", target=bad)
    unknown_cpu = graphopt.get_target("x86").replace(name="x86-imaginary", tvm_target={"kind": "llvm", "mcpu": "pentium9"})
    refused_before_work(graphopt.TargetError, r"LLVM does not know mcpu 'pentium9'", target=unknown_cpu)
