"""merge_branches: parallel convs summed on one input become one conv, exactly; what cannot merge
stays, with the reason."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import graphopt
import zoo

pytestmark = pytest.mark.usefixtures("one_thread")
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def rel_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


def convs(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), CONVS)]


def batch_norms(gm):
    return [n.name for n in gm.graph.nodes
            if (n.op == "call_function" and n.target is F.batch_norm)
            or (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm))]


def blocks(model, cls):
    return [name for name, m in model.named_modules() if isinstance(m, cls)]


def run(model, x, passes=("fuse_conv_bn", "merge_branches"), **kw):
    opt = graphopt.optimize(model, list(passes), example_inputs=(x,), **kw)
    assert all(r.status == "applied" for r in opt.report.records), [(r.name, r.reason) for r in opt.report.records]
    assert rel_error(opt(x), model(x)) <= 1e-4
    return opt, opt.report["merge_branches"]


REPVGG_NOTES = ["stem: 3x3 + 1x1 -> one 3x3 conv",
                "stages.0: 3x3 + 1x1 + identity BN -> one 3x3 conv (folded 1 batch norm(s){})",
                "stages.1: 3x3 + 1x1 -> one 3x3 conv",
                "stages.2: 3x3 + 1x1 + identity BN -> one 3x3 conv (folded 1 batch norm(s){})",
                "stages.3: 3x3 + 1x1 + identity BN -> one 3x3 conv (folded 1 batch norm(s){})"]
MOBILEONE_NOTES = ["stem: 3x3 + 1x1 -> one 3x3 conv",
                   "stages.0: 3 x 3x3 + 1x1 + identity BN -> one 3x3 conv (folded 1 batch norm(s){})",
                   "stages.1: 3 x 1x1 -> one 1x1 conv",
                   "stages.2: 3 x 3x3 + 1x1 -> one 3x3 conv",
                   "stages.3: 3 x 1x1 + identity BN -> one 1x1 conv (folded 1 batch norm(s){})",
                   "stages.4: 2 x 3x3 + 1x1 + identity BN -> one 3x3 conv (folded 1 batch norm(s){})"]


@pytest.mark.parametrize("leaf", [False, True], ids=["traced", "leaf"])
@pytest.mark.parametrize("name,block,notes", [("repvgg", zoo.RepVggBlock, REPVGG_NOTES),
                                              ("mobileone", zoo.MobileOneBlock, MOBILEONE_NOTES)])
def test_timm_like_blocks_become_one_conv_each(name, block, notes, leaf):
    model, (x,) = zoo.build(name)
    opt, rec = run(model, x, leaf_modules=[zoo.BatchNormAct2d] if leaf else ())
    gm = opt.graph_module
    branch_convs = [c for c in convs(gm) if ".attn." not in c]  # the SE gate's convs stay
    assert len(branch_convs) == len(blocks(model, block))  # one conv per block
    assert batch_norms(gm) == [] and not any(n.target is torch._assert for n in gm.graph.nodes)
    asserts = "" if leaf else ", removed 1 static shape assertion(s)"
    assert rec.messages == [n.format(asserts) for n in notes]
    assert rec.rel_error <= 1e-4
    if name == "mobileone":  # the SE gate and the activations after the sums stay
        assert "stages.4.attn.fc1" in [n.target for n in gm.graph.nodes]


@pytest.mark.parametrize("name,note", [
    ("repvgg", "stages.0: 3x3 + 1x1 + identity BN -> one 3x3 conv (folded 3 batch norm(s), removed 3 static "
               "shape assertion(s))"),
    ("mobileone", "stages.0: 3 x 3x3 + 1x1 + identity BN -> one 3x3 conv (folded 5 batch norm(s), removed 5 "
                  "static shape assertion(s))")])
def test_merges_without_fuse_conv_bn_first(name, note):
    model, (x,) = zoo.build(name)
    opt, rec = run(model, x, passes=("merge_branches",))
    branch_convs = [c for c in convs(opt.graph_module) if ".attn." not in c]
    assert len(branch_convs) == len(blocks(model, (zoo.RepVggBlock, zoo.MobileOneBlock)))
    assert batch_norms(opt.graph_module) == []
    assert note in rec.messages
    assert not any(n.target is torch._assert for n in opt.graph_module.graph.nodes)


def test_existing_zoo_models_are_left_alone(zoo_model):
    name, model, inputs = zoo_model
    opt = graphopt.optimize(model, ["fuse_conv_bn", "merge_branches"], example_inputs=inputs)
    rec = opt.report["merge_branches"]
    assert rec.status == "no-op" and rec.messages == [], rec.messages


class ACBlock(nn.Module):
    """ACNet's asymmetric convolution block: 3x3 + 1x3 + 3x1, each with its BatchNorm."""

    def __init__(self, c, groups=1):
        super().__init__()
        self.square = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(c))
        self.hor = nn.Sequential(nn.Conv2d(c, c, (1, 3), padding=(0, 1), groups=groups, bias=False), nn.BatchNorm2d(c))
        self.ver = nn.Sequential(nn.Conv2d(c, c, (3, 1), padding=(1, 0), groups=groups, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(self.square(x) + self.hor(x) + self.ver(x))


def test_acnet_asymmetric_branches_merge():
    model = zoo.randomize_bn(nn.Sequential(ACBlock(8), ACBlock(8, groups=2)))
    x = torch.randn(1, 8, 12, 12)
    opt, rec = run(model, x)
    assert convs(opt.graph_module) == ["0.square.0", "1.square.0"]
    assert rec.messages == ["0: 3x3 + 1x3 + 3x1 -> one 3x3 conv", "1: 3x3 + 1x3 + 3x1 -> one 3x3 conv"]


def test_plain_identity_and_constants_merge():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 5, padding=2, groups=3)

        def forward(self, x):
            return torch.add(x, self.conv(x)) + 0.5

    model = Res().eval()
    x = torch.randn(1, 6, 9, 9)
    opt, rec = run(model, x, passes=("merge_branches",))
    assert [n.op for n in opt.graph_module.graph.nodes] == ["placeholder", "call_module", "output"]
    assert rec.messages == ["add_1: 5x5 + identity -> one 5x5 conv"]


class Mismatched(nn.Module):
    """Branches on one input that one conv cannot compute, beside three that it can."""

    def __init__(self):
        super().__init__()
        self.k3, self.k1 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.even = nn.Conv2d(4, 4, 2, padding="same")
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.shifted = nn.Conv2d(4, 4, 3, padding=(2, 0))
        self.wide = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        y = self.k3(x) + self.dilated(x) + self.grouped(x) + self.even(x) + self.reflect(x)
        return y + self.k1(x) + x + self.wide(x)[:, :4] + self.shifted(F.pad(x, (1, 1, -1, -1)))


def test_what_cannot_merge_is_explained():
    model = Mismatched().eval()
    x = torch.randn(1, 4, 8, 8)
    opt = graphopt.optimize(model, ["merge_branches"], example_inputs=(x,))
    rec = opt.report.records[0]
    assert rec.status == "applied"
    assert rec.messages[:4] == [
        "add_7: 3x3 branch dilated not merged: dilation (2, 2) differs from (1, 1)",
        "add_7: 3x3 branch grouped not merged: groups 2 differs from 1",
        "add_7: 2x2 branch even not merged: its 2x2 kernel has no centre",
        "add_7: 3x3 branch reflect not merged: padding_mode='reflect'"]
    assert rec.messages[4:] == ["add_7: 3x3 + 1x1 + identity -> one 3x3 conv"]
    assert convs(opt.graph_module) == ["k3", "dilated", "grouped", "even", "reflect", "wide", "shifted"]
    assert rel_error(opt(x), model(x)) <= 1e-4


def test_uncentred_padding_is_explained():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=(2, 0)), nn.Conv2d(4, 4, (5, 3), padding=(3, 0))

        def forward(self, x):
            return self.a(x) + self.b(x)

    model = Shifted().eval()
    x = torch.randn(1, 4, 8, 8)
    rec = graphopt.optimize(model, ["merge_branches"], example_inputs=(x,)).report.records[0]
    assert rec.status == "no-op"
    assert rec.messages == ["add: 3x3 branch a not merged: its padding (2, 0) does not centre its 3x3 kernel "
                            "(needs (1, 1))",
                            "add: 5x3 branch b not merged: its padding (3, 0) does not centre its 5x3 kernel "
                            "(needs (2, 1))"]


def test_shared_conv_is_not_merged():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.a(self.a(x) + self.b(x))

    model = Twice().eval()
    x = torch.randn(1, 4, 8, 8)
    opt = graphopt.optimize(model, ["merge_branches"], example_inputs=(x,))
    rec = opt.report.records[0]
    assert rec.status == "no-op"
    assert rec.messages == ["add: 3x3 branch a not merged: a is called more than once (2 calls: shared weights)"]


@settings(max_examples=30, deadline=None)
@given(dims=st.sampled_from([1, 2, 3]), groups=st.sampled_from([1, 2, 4]), cpg=st.integers(1, 3),
       kernels=st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3), dilation=st.sampled_from([1, 2]),
       identity=st.sampled_from(["none", "plain", "bn"]), bn=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_random_branches(dims, groups, cpg, kernels, dilation, identity, bn, bias, seed):
    c = groups * cpg
    conv_t, bn_t = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.branches = nn.ModuleList(
                nn.Sequential(conv_t(c, c, k, padding=(k - 1) // 2 * dilation, dilation=dilation, groups=groups,
                                     bias=bias), *([bn_t(c)] if bn else [])) for k in kernels)
            self.identity = bn_t(c)

        def forward(self, x):
            out = sum(b(x) for b in self.branches)
            if identity == "plain":
                out = out + x
            elif identity == "bn":
                out = out + self.identity(x)
            return torch.tanh(out)  # an activation after the sum; never all zeros, unlike a ReLU

    model = zoo.randomize_bn(Block(), seed)
    x = torch.randn(2, c, *([7] * dims))
    n_branches = len(kernels) + (identity != "none")
    opt = graphopt.optimize(model, ["merge_branches"], example_inputs=(x,))
    rec = opt.report.records[0]
    assert rel_error(opt(x), model(x)) <= 1e-4
    if n_branches > 1:
        assert rec.status == "applied" and len(convs(opt.graph_module)) == 1, rec.messages
        assert batch_norms(opt.graph_module) == []
        merged = opt.graph_module.get_submodule(convs(opt.graph_module)[0])
        assert merged.kernel_size == (max(kernels),) * dims and merged.groups == groups
    else:
        assert rec.status == "no-op"


def test_merge_branches_is_listed_and_ordered_after_fuse():
    assert "merge_branches" in graphopt.list_passes()
    model, (x,) = zoo.build("repvgg")
    opt = graphopt.optimize(model, ["merge_branches", "fuse_conv_bn"], example_inputs=(x,))
    assert [r.name for r in opt.report.records] == ["fuse_conv_bn", "merge_branches"]
