"""graphopt's translations of ATen ops (graphopt.targets.aten), each against PyTorch.

Every model is exported, checked to use the op graphopt translates (so the test exercises the
translation, not a decomposition that avoids it), compiled for x86 with TVM's default schedules
and run: outputs match PyTorch within 1e-4 relative error (max abs diff / max abs of the
reference), integer outputs exactly.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.errors import TargetError
from graphopt.targets import aten, lowering
from graphopt.targets.coverage import export

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]


class Fn(nn.Module):
    """A module calling ``fn``: the op under test, on the model's input."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _pairs(*pairs):
    """The two outputs of each op returning two (fx cannot unpack a traced value)."""
    return tuple(p[i] for p in pairs for i in (0, 1))


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# name -> (the op graphopt translates, the function, the input). Reductions over every axis keep
# their dims: a compiled model returns 0-d outputs as shape [1] (the artifact's, not the ops')
CASES = {
    "amax": ("amax.default", lambda x: (x.amax(-1), x.amax((2, 3), keepdim=True), x.amax([], keepdim=True)), _rand(1, 3, 4, 5)),
    "amin": ("amin.default", lambda x: (x.amin(1), x.amin((1, 3), keepdim=True)), _rand(1, 3, 4, 5)),
    "min_dim": ("min.dim", lambda x: _pairs(x.min(1), x.min(-1, keepdim=True)), _rand(2, 3, 5)),
    # 7x5 -> 3x2: bins overlap and differ in size, as PyTorch's floor/ceil bounds make them
    "adaptive_max_pool2d": ("adaptive_max_pool2d.default",
                            lambda x: (F.adaptive_max_pool2d(x, (3, 2)), F.adaptive_max_pool2d(x, 1),
                                       F.adaptive_max_pool2d(x[0], 2)), _rand(1, 4, 7, 5)),
    "adaptive_max_pool1d": ("adaptive_max_pool2d.default", lambda x: F.adaptive_max_pool1d(x, 3), _rand(1, 4, 10)),
    "prod": ("prod.dim_int", lambda x: (x.prod(1), x.prod(-1, keepdim=True)), _rand(1, 3, 4)),
    "var_mean": ("var_mean.correction",
                 lambda x: _pairs(torch.var_mean(x, dim=(2, 3)), torch.var_mean(x, dim=1, correction=0, keepdim=True),
                                  torch.var_mean(x, dim=None, keepdim=True)), _rand(2, 3, 4, 4)),
    "rrelu": ("rrelu_with_noise_functional.default", nn.RReLU(0.1, 0.3).eval(), _rand(1, 4, 4, 4)),
    # GhostNetV2's DFC attention: 4x4 gates to 7x7, where TVM's rounding picks other pixels
    "upsample_nearest_size": ("upsample_nearest2d.vec",
                              lambda x: (F.interpolate(x, size=(7, 7)), F.interpolate(x, size=(3, 6)),
                                         F.interpolate(x, size=(8, 8))), _rand(1, 2, 4, 4)),
    "upsample_nearest_scale": ("upsample_nearest2d.vec",
                               lambda x: (F.interpolate(x, scale_factor=1.75), F.interpolate(x, scale_factor=(0.5, 2.5))),
                               _rand(1, 2, 4, 4)),
    "elu": ("elu.default", lambda x: (F.elu(x), F.elu(x, alpha=0.7), F.selu(x), F.selu(x * 40)), _rand(1, 3, 4, 4)),
    # EdgeNeXt's positional encoding divides an integer arange by an int
    "div_rounding": ("div.Tensor_mode",
                     lambda x: (torch.div(x * 10, 3, rounding_mode="floor"), torch.div(x * 10, -3, rounding_mode="trunc"),
                                x + torch.div(torch.arange(x.shape[-1]), 2, rounding_mode="floor"),
                                torch.div(torch.arange(-x.shape[-1], x.shape[-1]) * 7, 3, rounding_mode="trunc"),
                                torch.div(torch.arange(-x.shape[-1], x.shape[-1]) * 7, -3, rounding_mode="floor"),
                                torch.div(x, x.abs() + 0.5, rounding_mode="floor")), _rand(1, 3, 6)),
    "group_norm": ("native_group_norm.default",
                   lambda x: (F.group_norm(x, 2), F.group_norm(x, 4, weight=torch.linspace(0.5, 2, 4)),
                              F.group_norm(x, 1, bias=torch.linspace(-1, 1, 4))),
                   _rand(2, 4, 3, 3)),
}


def rel_error(out, ref):
    if not ref.is_floating_point():
        return 0.0 if torch.equal(out, ref) else float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def x86():
    return graphopt.get_target("x86")


def test_every_translation_is_registered_and_tested():
    tested = {op for op, _, _ in CASES.values()}
    registered = {op for op, fn in lowering.translations().items() if fn.__module__ == aten.__name__}
    assert registered == tested
    undocumented = [op for op in registered if f"``{op.split('.')[0]}" not in aten.__doc__]
    assert not undocumented, "add them to the table in graphopt.targets.aten's docstring"


@pytest.mark.parametrize("name", sorted(CASES))
def test_translation_matches_pytorch(x86, name):
    op, fn, x = CASES[name]
    gm = torch.fx.symbolic_trace(Fn(fn)).eval()
    ops = {getattr(n.target, "__name__", "") for n in export(gm, (x,)).graph.nodes if n.op == "call_function"}
    assert op in ops, f"{name} no longer exports to {op}: {sorted(ops)}"
    with torch.no_grad():
        ref = gm(x)
    refs = ref if isinstance(ref, tuple) else (ref,)
    with x86.compile(gm, (x,), tune_trials=0) as compiled:
        out = compiled(x)
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == len(refs)
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.shape == r.shape and o.dtype == r.dtype, f"output {i}: {o.shape} {o.dtype} vs {r.shape} {r.dtype}"
        assert rel_error(o, r) < 1e-4, f"output {i} of {name}: relative error {rel_error(o, r)}"


def test_nearest_indices_follow_pytorch_not_tvm_rounding():
    # 4 -> 7: PyTorch reads floor(dst * 4 / 7); TVM's half-pixel rounding reads other rows
    assert aten._nearest_indices(4, 7, None).tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert aten._nearest_indices(4, 7, 1.75).tolist() == [0, 0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("fn, what", [
    (lambda x: F.adaptive_max_pool2d(x, 2, return_indices=True)[1].float(), "indices of adaptive_max_pool2d"),
    (lambda x: torch.ops.aten.native_group_norm(x, None, None, 1, 4, 9, 2, 1e-5)[1], "mean and inverse deviation"),
])
def test_outputs_a_translation_does_not_compute_are_refused(x86, fn, what):
    x = _rand(1, 4, 3, 3)
    with pytest.raises(TargetError, match=what):
        x86.lower(torch.fx.symbolic_trace(Fn(fn)), (x,))


def test_rrelu_in_training_mode_is_refused(x86):
    x = _rand(1, 4, 3, 3)
    gm = torch.fx.symbolic_trace(Fn(lambda x: F.rrelu(x, training=True)))
    with pytest.raises(TargetError, match="training mode"):
        x86.lower(gm, (x,))
