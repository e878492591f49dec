"""What the lowering cannot take is refused up front (graphopt.targets.coverage): outputs that
are not tensors, naming where they are, and every op without a translation at once, with its
nodes; through ``optimize`` before any pass runs."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.errors import TargetError
from graphopt.manager import PassManager
from graphopt.targets import coverage
from graphopt.targets.coverage import UnsupportedOpsError, check_graph, check_outputs

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class Extra(nn.Module):
    """A classifier returning its logits and ``extra``."""

    def __init__(self, extra):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)
        self.extra = extra

    def forward(self, x):
        logits = self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))
        if self.extra == "shape":
            return logits, x.shape
        if self.extra == "size":
            return {"logits": logits, "n": [logits, x.size(0)]}
        return logits, self.extra


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveMaxPool3d(1)

    def forward(self, x):
        return self.pool(x.unsqueeze(2)).flatten(1)


class Untranslatable(nn.Module):
    """Two ops neither TVM nor graphopt translates, one of them twice, one in a submodule."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 1), Head()

    def forward(self, x):
        y = self.conv(x)
        z = torch.special.zeta(y.abs() + 2, 2.0)
        return self.head(y) + F.adaptive_max_pool3d(z.unsqueeze(2), 1).flatten(1)


X = torch.randn(1, 3, 8, 8)


@pytest.fixture
def no_passes(monkeypatch):
    """Fails the test if any pass would run."""
    def run(self, gm, ctx):
        raise AssertionError("the passes ran before the target refused the graph")

    monkeypatch.setattr(PassManager, "run", run)


@pytest.mark.parametrize("extra, shown", [(3, "output[1] = 3 (int)"), (None, "output[1] = None (NoneType)"),
                                          ("shape", "output[1] = `getattr_1` (a shape)"),
                                          ("size", "output['n'][1] = `size` (int)")])
def test_optimize_refuses_non_tensor_outputs_before_any_pass(no_passes, extra, shown):
    with pytest.raises(TargetError, match="compiled models return tensors only") as info:
        graphopt.optimize(Extra(extra).eval(), passes=["fuse_conv_bn", "dce"], target="x86",
                          example_inputs=(X,), progress=False)
    assert shown in str(info.value)


def test_optimize_lists_every_unsupported_op_before_any_pass(no_passes):
    with pytest.raises(UnsupportedOpsError) as info:
        graphopt.optimize(Untranslatable().eval(), passes=["fuse_conv_bn"], target="x86",
                          example_inputs=(X,), progress=False)
    err = info.value
    assert sorted(err.ops) == ["adaptive_max_pool3d.default", "special_zeta.other_scalar"]
    assert err.ops["adaptive_max_pool3d.default"] == ["`head_pool` in `head.pool`", "`adaptive_max_pool3d`"]
    assert "the graph uses 2 op(s)" in str(err) and "register_translation" in str(err)
    assert not any(op.startswith("adaptive_max_pool2d") for op in err.ops)  # graphopt translates that one


def test_the_arm_targets_check_graphs_the_same_way():
    gm = torch.fx.symbolic_trace(Extra(None).eval())
    with pytest.raises(TargetError, match=r"output\[1\] = None"):
        graphopt.get_target("arm").check_graph(gm, (X,))
    with pytest.raises(UnsupportedOpsError, match="adaptive_max_pool3d"):
        graphopt.get_target("arm-rpi4").check_graph(graphopt.capture(Untranslatable(), (X,)), (X,))


def test_lower_refuses_them_too():
    x86 = graphopt.get_target("x86")
    with pytest.raises(TargetError, match=r"output\[1\] = 3 \(int\)"):
        x86.lower(torch.fx.symbolic_trace(Extra(3).eval()), (X,))
    with pytest.raises(UnsupportedOpsError, match="special_zeta"):
        x86.lower(torch.fx.symbolic_trace(Untranslatable().eval()), (X,))


def test_tensor_outputs_pass_in_any_structure():
    class Nested(nn.Module):
        def forward(self, x):
            return {"stats": torch.var_mean(x, dim=1), "pair": [x.relu(), (x.sigmoid(),)]}

    for gm in (torch.fx.symbolic_trace(Nested()), graphopt.capture(Nested(), (X,))):
        check_outputs(gm)
        check_outputs(gm, (X,))
        check_graph(gm, (X,))


def test_a_graph_without_propagated_shapes_is_run_to_find_non_tensor_outputs():
    gm = torch.fx.symbolic_trace(Extra("size").eval())  # no shape propagation: `size` is unknown
    check_outputs(gm)  # taken on trust without inputs
    with pytest.raises(TargetError, match=r"output\['n'\]\[1\] = 1 \(int\)"):
        check_outputs(gm, (X,))


def test_the_op_list_matches_what_the_frontend_refuses():
    # the frontend's own check on the same program names the same ops (without their nodes)
    gm = torch.fx.symbolic_trace(Untranslatable().eval())
    ep = coverage.export(gm, (X,))
    assert set(coverage.unsupported_ops(ep)) == {"adaptive_max_pool3d.default", "special_zeta.other_scalar"}
    from tvm.relax.frontend.torch import from_exported_program

    with pytest.raises(Exception, match="adaptive_max_pool3d.default") as info:
        from_exported_program(ep, run_ep_decomposition=False)
    assert "special_zeta.other_scalar" in str(info.value)
