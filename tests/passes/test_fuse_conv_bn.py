"""fuse_conv_bn: every foldable BatchNorm disappears, outputs stay within 1e-4, the model is untouched."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
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


# ---- functional and fused (timm) batch norms ----------------------------------------------------

def batch_norms_left(gm):
    """BatchNorms of every form still in the graph: modules and F.batch_norm calls."""
    return [n.name for n in gm.graph.nodes
            if (n.op == "call_function" and n.target is torch.nn.functional.batch_norm)
            or (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm))]


class FunctionalBN(nn.Module):
    """F.batch_norm in user code, on the module's own buffers and parameters."""

    def __init__(self, form, affine=True, c=6):
        super().__init__()
        self.conv, self.form = nn.Conv2d(3, c, 3, padding=1), form
        self.register_buffer("rm", torch.randn(c) * 0.1)
        self.register_buffer("rv", torch.rand(c) + 0.5)
        self.w = nn.Parameter(torch.rand(c) + 0.5) if affine else None
        self.b = nn.Parameter(torch.randn(c) * 0.1) if affine else None

    def forward(self, x):
        y = self.conv(x)
        if self.form == "keyword":
            return torch.relu(F.batch_norm(y, self.rm, self.rv, self.w, self.b, training=False, eps=1e-3))
        if self.form == "positional":
            return torch.relu(F.batch_norm(y, self.rm, self.rv, self.w, self.b, False, 0.1, 1e-3))
        return torch.relu(F.batch_norm(y, self.rm, self.rv))  # defaults: training=False, no affine


class ModuleBuffersBN(nn.Module):
    """F.batch_norm on a BatchNorm1d module's buffers (the module itself is never called)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8, eps=1e-3)

    def forward(self, x):
        b = self.bn
        return F.batch_norm(self.conv(x), b.running_mean, b.running_var, b.weight, b.bias, False, b.momentum, b.eps)


@pytest.mark.parametrize("form,affine", [("keyword", True), ("positional", True), ("keyword", False),
                                         ("defaults", False)])
def test_functional_batch_norm_in_user_code_folds(form, affine):
    m = FunctionalBN(form, affine).eval()
    x = torch.randn(2, 3, 8, 8)
    opt = graphopt.optimize(m, ["fuse_conv_bn"], example_inputs=(x,))
    rec = opt.report.records[0]
    assert rec.status == "applied" and rec.rel_error <= 1e-4
    assert batch_norms_left(opt.graph_module) == []
    assert "folded 1 batch norm(s): 1 F.batch_norm call(s)" in rec.messages[0]
    # the folded statistics are gone from the module too: parameter counts stay honest
    assert set(opt.graph_module.state_dict()) == {"conv.weight", "conv.bias"}
    assert rel_error(opt(x), m(x)) <= 1e-4


def test_functional_batch_norm_on_module_buffers_folds():
    m = zoo.randomize_bn(ModuleBuffersBN())
    x = torch.randn(2, 4, 16)
    opt = graphopt.optimize(m, ["fuse_conv_bn"], example_inputs=(x,))
    assert batch_norms_left(opt.graph_module) == []
    assert not any(isinstance(mod, BN_TYPES) for mod in opt.graph_module.modules())
    assert rel_error(opt(x), m(x)) <= 1e-4


@pytest.mark.parametrize("leaf", [False, True], ids=["traced", "leaf"])
def test_timm_batchnormact_folds_and_keeps_drop_and_act(leaf):
    m = zoo.randomize_bn(nn.Sequential(zoo.ConvNormAct(3, 8, 3, apply_act=True), zoo.ConvNormAct(8, 8, 1, apply_act=True)))
    x = torch.randn(1, 3, 8, 8)
    before = graphopt.capture(m, (x,), leaf_modules=[zoo.BatchNormAct2d] if leaf else ())
    assert len(batch_norms_left(before)) == 2
    assert sum(n.target is torch._assert for n in before.graph.nodes) == (0 if leaf else 2)
    opt = graphopt.optimize(m, ["fuse_conv_bn"], example_inputs=(x,),
                            leaf_modules=[zoo.BatchNormAct2d] if leaf else ())
    gm, rec = opt.graph_module, opt.report.records[0]
    assert rec.status == "applied" and rec.rel_error <= 1e-4
    assert batch_norms_left(gm) == [] and not any(isinstance(mod, BN_TYPES) for mod in gm.modules())
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["0.conv", "0.bn.drop", "0.bn.act", "1.conv", "1.bn.drop", "1.bn.act"]
    assert isinstance(gm.get_submodule("0.bn.act"), nn.ReLU)
    assert not any(n.target is torch._assert or n.target is getattr for n in gm.graph.nodes)
    if leaf:
        assert "2 leaf module(s) replaced by their drop and act" in rec.messages[0]
    else:
        assert "2 F.batch_norm call(s)" in rec.messages[0]
        assert rec.messages[1].startswith("removed 2 torch._assert shape check(s) on folded layers")
    assert rel_error(opt(x), m(x)) <= 1e-4


class PreActivation(nn.Module):
    """timm-style BNs that cannot fold: after a ReLU, after a concat, after an add, and in
    training form."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.after_relu, self.after_cat = zoo.BatchNormAct2d(4), zoo.BatchNormAct2d(8, apply_act=False)
        self.after_add = nn.BatchNorm2d(4)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y = self.after_relu(torch.relu(a))
        z = self.after_cat(torch.cat([a, b], 1))
        t = F.batch_norm(self.b(y), None, None, training=True)  # batch statistics, even in eval
        return z[:, :4] + self.after_add(a + b) + t


@pytest.mark.parametrize("leaf", [False, True], ids=["traced", "leaf"])
def test_unfoldable_batch_norms_stay_with_their_reason(leaf):
    m = zoo.randomize_bn(PreActivation())
    x = torch.randn(1, 4, 8, 8)
    opt = graphopt.optimize(m, ["fuse_conv_bn"], example_inputs=(x,),
                            leaf_modules=[zoo.BatchNormAct2d] if leaf else ())
    rec = opt.report.records[0]
    assert rec.status == "no-op", rec.messages
    text = "\n".join(rec.messages)
    assert "is not a conv or linear module" in text and "(relu)" in text
    assert "kept: the output of a is also used by relu, add" in text  # a part of its concat
    assert "after_add kept: its input add (add) is not a conv or linear module" in text
    assert "training=True (batch statistics)" in text
    assert len(batch_norms_left(opt.graph_module)) == 4


class Mixed(nn.Module):
    """MixNet's mixed kernels: convs of different sizes concatenated, then one BatchNorm."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 5, 5, padding=2, bias=False)
        self.c, self.bn = nn.Sequential(nn.Conv2d(4, 2, 1), nn.Identity()), zoo.BatchNormAct2d(10)

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), self.b(x), self.c(x)], dim=1))


def test_bn_after_a_channel_concat_of_convs_folds_slice_by_slice():
    m = zoo.randomize_bn(Mixed())
    x = torch.randn(1, 4, 8, 8)
    opt = graphopt.optimize(m, ["fuse_conv_bn"], example_inputs=(x,))
    assert batch_norms_left(opt.graph_module) == [] and opt.report.records[0].rel_error <= 1e-4
    assert rel_error(opt(x), m(x)) <= 1e-4


def test_bn_after_a_concat_with_a_part_that_does_not_fold_is_explained():
    model, inputs = zoo.build("densenet")
    msgs = graphopt.optimize(model, ["fuse_conv_bn"], example_inputs=inputs).report.records[0].messages
    assert "block1.1.bn kept: its input cat (cat) joins a part that does not fold: stem.2 is a ReLU, " \
           "not one of Conv2d, ConvTranspose2d" in msgs


def test_functional_bn_with_shared_statistics_is_kept():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)
            self.register_buffer("rm", torch.randn(4) * 0.1)
            self.register_buffer("rv", torch.rand(4) + 0.5)

        def forward(self, x):
            return F.batch_norm(self.c1(x), self.rm, self.rv) + F.batch_norm(self.c2(x), self.rm, self.rv)

    m = Twice().eval()
    x = torch.randn(1, 3, 8, 8)
    opt = graphopt.optimize(m, ["fuse_conv_bn"], example_inputs=(x,))
    msgs = opt.report.records[0].messages
    assert len(msgs) == 2 and all("(shared weights)" in msg for msg in msgs), msgs
    assert "rm is also read by batch_norm_1" in msgs[0]


def test_batchnorm_subclass_with_another_forward_is_kept():
    class ActFirst(zoo.BatchNormAct2d):
        """Has timm's act and drop, but applies the activation before normalising."""

        def forward(self, x):
            return F.batch_norm(self.act(x), self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.1, self.eps)

    m = zoo.randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), ActFirst(4)))
    x = torch.randn(1, 3, 8, 8)
    opt = graphopt.optimize(m, ["fuse_conv_bn"], example_inputs=(x,), leaf_modules=[ActFirst])
    rec = opt.report.records[0]
    assert rec.status == "no-op"
    assert rec.messages[0].startswith("1 kept: ActFirst.forward is not batch_norm -> drop -> act")


def test_bn_behind_an_identity_folds():
    m = zoo.randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.Dropout(0.2), nn.BatchNorm2d(4)))
    x = torch.randn(1, 3, 8, 8)
    opt = graphopt.optimize(m, ["fuse_conv_bn"], example_inputs=(x,))
    assert batch_norms_left(opt.graph_module) == []
    assert rel_error(opt(x), m(x)) <= 1e-4


@settings(max_examples=25, deadline=None)
@given(dims=st.sampled_from([1, 2, 3]), transpose=st.booleans(), groups=st.sampled_from([1, 2, 3]),
       cout_per_group=st.integers(1, 3), k=st.integers(1, 3), affine=st.booleans(), positional=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-3]), seed=st.integers(0, 2**16))
def test_property_random_conv_functional_bn(dims, transpose, groups, cout_per_group, k, affine, positional,
                                            eps, seed):
    conv_t, convT_t, bn_t = CONV[dims]
    cout = groups * cout_per_group
    torch.manual_seed(seed)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = (convT_t if transpose else conv_t)(groups * 2, cout, k, groups=groups)
            self.bn = zoo.randomize_bn(bn_t(cout, eps=eps, affine=affine), seed)

        def forward(self, x):
            bn = self.bn
            if positional:
                return F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, eps)
            return F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, weight=bn.weight, bias=bn.bias,
                                training=False, eps=eps)

    m = M().eval()
    x = torch.randn(2, groups * 2, *([5] * dims))
    opt = graphopt.optimize(m, ["fuse_conv_bn"], example_inputs=(x,))
    assert opt.report.records[0].status == "applied"
    assert batch_norms_left(opt.graph_module) == []
    assert rel_error(opt(x), m(x)) <= 1e-4


@pytest.mark.parametrize("leaf", [False, True], ids=["traced", "leaf"])
@pytest.mark.parametrize("name", sorted(zoo.BRANCHY))
def test_timm_like_zoo_leaves_no_batch_norm_after_a_conv(name, leaf):
    model, inputs = zoo.build(name)
    opt = graphopt.optimize(model, ["fuse_conv_bn"], example_inputs=inputs,
                            leaf_modules=[zoo.BatchNormAct2d] if leaf else ())
    gm, rec = opt.graph_module, opt.report.records[0]
    assert rec.status == "applied" and rec.rel_error <= 1e-4
    left = [n for n in gm.graph.nodes if n.name in batch_norms_left(gm)]
    assert left and all(n.args[0].op == "call_module" and isinstance(gm.get_submodule(n.args[0].target), nn.ReLU)
                        for n in left)  # only the identity branches' BNs, on the previous block's ReLU
    kept = [m for m in rec.messages if " kept: " in m]
    assert len(kept) == len(left) and all("is a ReLU, not one of Conv2d" in m for m in kept)


def test_weight_standardized_convs_fold_into_constant_weights():
    """NF-Nets' ScaledStdConv2d computes its weight from parameters on every call: fuse_conv_bn
    folds that into one weight per conv (exact), the raw weight and gain go, the channel analysis
    then sees plain functional convs."""
    model, inputs = zoo.build("nfnet")
    opt = graphopt.optimize(model, ["fuse_conv_bn"], example_inputs=inputs, progress=False)
    rec = opt.report["fuse_conv_bn"]
    assert rec.status == "applied" and any("folded 4 weight(s) computed" in m for m in rec.messages)
    assert rec.rel_error_vs_original <= 1e-6
    gm = opt.graph_module
    assert not any(n.target is torch.nn.functional.batch_norm for n in gm.graph.nodes)
    names = {name for name, _ in gm.named_parameters()}
    assert "stem.weight" in names and not any(n.endswith("gain") for n in names)
    assert rec.params_after == rec.params_before - sum(m.gain.numel() for m in model.modules() if hasattr(m, "gain"))
    assert torch.equal(model.stem.weight, zoo.build("nfnet")[0].stem.weight)  # the user's model is untouched
