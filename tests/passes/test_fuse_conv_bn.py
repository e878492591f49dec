"""fuse_conv_bn: every foldable BatchNorm disappears, outputs stay within 1e-4, the model is untouched."""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import graphopt
import zoo

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
FOLDABLE_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d, nn.Linear)


def foldable_bns(gm):
    """BatchNorm nodes fed directly by a conv/linear node that has no other user: the invariant."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), BN_TYPES):
            src = n.args[0]
            if src.op == "call_module" and isinstance(gm.get_submodule(src.target), FOLDABLE_INTO) \
                    and len(src.users) == 1:
                out.append(n.target)
    return out


@torch.no_grad()
def rel_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_zoo_folds_every_foldable_batchnorm(zoo_model):
    name, model, inputs = zoo_model
    state = copy.deepcopy(model.state_dict())
    before = graphopt.capture(model, inputs)
    opt = graphopt.optimize(model, ["fuse_conv_bn"], example_inputs=inputs)
    rec = opt.report.records[0]
    assert foldable_bns(before), f"{name} has nothing to fold: the zoo entry is useless here"
    assert foldable_bns(opt.graph_module) == []
    assert rec.status == "applied" and rec.rel_error <= 1e-4
    assert rel_error(opt(*inputs), model.eval()(*inputs)) <= 1e-4
    assert len(rec.nodes_removed) == len(foldable_bns(before))
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(state[k], v)


def test_bn_kept_when_conv_output_has_other_users():
    class Tap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    m = zoo.randomize_bn(Tap())
    opt = graphopt.optimize(m, ["fuse_conv_bn"], example_inputs=(torch.randn(1, 3, 8, 8),))
    rec = opt.report.records[0]
    assert rec.status == "no-op"
    assert rec.messages == ["bn kept: the output of conv is also used by add; folding would change that use"]


def test_pre_activation_bn_is_explained():
    m = zoo.randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    opt = graphopt.optimize(m, ["fuse_conv_bn"], example_inputs=(torch.randn(1, 3, 8, 8),))
    assert "2 kept: its input 1 is a ReLU" in opt.report.records[0].messages[0]


def test_shared_conv_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(self.conv(x)))

    m = zoo.randomize_bn(Shared())
    x = torch.randn(1, 4, 8, 8)
    opt = graphopt.optimize(m, ["fuse_conv_bn"], example_inputs=(x,))
    assert "called more than once" in opt.report.records[0].messages[0]
    assert rel_error(opt(x), m(x)) <= 1e-4


CONV = {1: (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d),
        2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
        3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d)}


@settings(max_examples=40, deadline=None)
@given(dims=st.sampled_from([1, 2, 3]), transpose=st.booleans(), groups=st.sampled_from([1, 2, 4]),
       cin_per_group=st.integers(1, 3), cout_per_group=st.integers(1, 3), k=st.integers(1, 3),
       stride=st.integers(1, 2), bias=st.booleans(), affine=st.booleans(), eps=st.sampled_from([1e-5, 1e-3]),
       seed=st.integers(0, 2**16))
def test_property_random_conv_bn(dims, transpose, groups, cin_per_group, cout_per_group, k, stride,
                                 bias, affine, eps, seed):
    conv_t, convT_t, bn_t = CONV[dims]
    cin, cout = groups * cin_per_group, groups * cout_per_group
    torch.manual_seed(seed)
    layer = (convT_t if transpose else conv_t)(cin, cout, k, stride=stride, groups=groups, bias=bias)
    m = zoo.randomize_bn(nn.Sequential(layer, bn_t(cout, eps=eps, affine=affine)), seed)
    x = torch.randn(2, cin, *([5] * dims))
    opt = graphopt.optimize(m, ["fuse_conv_bn"], example_inputs=(x,))
    assert opt.report.records[0].status == "applied"
    assert not any(isinstance(mod, BN_TYPES) for mod in opt.graph_module.modules())
    assert rel_error(opt(x), m(x)) <= 1e-4


@settings(max_examples=15, deadline=None)
@given(fin=st.integers(1, 16), fout=st.integers(1, 16), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_property_linear_bn1d(fin, fout, bias, seed):
    torch.manual_seed(seed)
    m = zoo.randomize_bn(nn.Sequential(nn.Linear(fin, fout, bias=bias), nn.BatchNorm1d(fout)), seed)
    x = torch.randn(3, fin)
    opt = graphopt.optimize(m, ["fuse_conv_bn"], example_inputs=(x,))
    assert [type(mod) for mod in opt.graph_module.modules()][1:] == [nn.Linear]
    assert rel_error(opt(x), m(x)) <= 1e-4
