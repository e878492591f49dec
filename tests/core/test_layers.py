"""The layer registry: a family registered through the public API alone prunes and counts; one
lookup rule for every part; duplicates name both origins; the union-find solver's classes."""
import math

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import graphopt
import zoo
from graphopt.analysis.channels import solver
from graphopt.layer_registry import LAYERS, register_channel_rule, register_macs, unregister_layer


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- a new family, through the public API alone -------------------------------------------------

class ScaledConv(nn.Module):
    """A 3x3 conv with a learned per-output-channel scale; graphopt knows nothing about it."""

    def __init__(self, cin, cout):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) / (3 * cin ** 0.5))
        self.scale = nn.Parameter(torch.rand(cout) + 0.5)

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1) * self.scale.view(1, -1, 1, 1)


class ScaledConvFamily:
    def channels(rc, node, m):
        x = node.args[0]
        src = rc.input(x)
        rc.expect_dim(src, 1, "ScaledConv")
        out = rc.new_space(1)
        c = np.arange(out.size)
        rc.couple(out, c, rc.param(node.target, "weight", 0, "out"), c, "param")
        rc.couple(out, c, rc.param(node.target, "scale", 0, "out"), c, "param")
        w_in = rc.param(node.target, "weight", 1, "in")
        if src is None:
            rc.freeze(w_in, f"its input comes from {rc.reason(x)}")
        else:
            rc.couple(src, np.arange(src.size), w_in, np.arange(src.size), "param")

    def resize(m, old):
        m.out_channels, m.in_channels = m.weight.shape[:2]

    def macs(node, m):
        out = math.prod(node.meta["tensor_meta"].shape)
        return out * m.in_channels * 9 + out  # the conv, then one multiply per output for the scale


@pytest.fixture
def scaled_conv_family():
    graphopt.register_layer(ScaledConv)(ScaledConvFamily)
    yield
    unregister_layer(ScaledConv)


def scaled_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), ScaledConv(16, 32), nn.ReLU(),
                         nn.Conv2d(32, 4, 1))


def test_a_family_registered_through_the_public_api_prunes_and_counts(scaled_conv_family):
    x = (torch.randn(1, 3, 8, 8),)
    before = graphopt.capture(scaled_model(), x, leaf_modules=[ScaledConv])
    assert not graphopt.analyze_channels(before).unknown  # the rule made ScaledConv transparent
    sc_before = graphopt.node_macs(before, next(n for n in before.graph.nodes if n.target == "2"))
    assert sc_before == 64 * 32 * 16 * 9 + 64 * 32

    opt = graphopt.optimize(scaled_model(), [("prune_channels", {"ratio": 0.5})], example_inputs=x,
                            leaf_modules=[ScaledConv], on_error="raise", progress=False)
    rec = opt.report["prune_channels"]
    assert rec.status == "applied"
    gm = opt.graph_module
    sc = gm.get_submodule("2")
    assert sc.weight.shape == (16, 8, 3, 3) and sc.scale.shape == (16,)  # both sides cut
    assert (sc.in_channels, sc.out_channels) == (8, 16)  # its resize ran
    assert gm.get_submodule("0").out_channels == 8 and gm.get_submodule("4").in_channels == 16
    assert opt(*x).shape == (1, 4, 8, 8)
    sc_after = graphopt.node_macs(gm, next(n for n in gm.graph.nodes if n.target == "2"))
    assert sc_after == 64 * 16 * 8 * 9 + 64 * 16  # the family's counter at the new sizes
    assert rec.macs_after == graphopt.count_macs(gm) < rec.macs_before == graphopt.count_macs(before)


def test_without_its_family_the_custom_layer_is_left_alone():
    x = (torch.randn(1, 3, 8, 8),)
    gm = graphopt.capture(scaled_model(), x, leaf_modules=[ScaledConv])
    a = graphopt.analyze_channels(gm)
    assert "no channel rule" in a.unknown["_2"]
    assert graphopt.node_macs(gm, next(n for n in gm.graph.nodes if n.target == "2")) == 0


def test_a_cut_layer_without_a_resize_part_is_an_error():
    register_channel_rule(ScaledConv)(ScaledConvFamily.channels)
    try:
        x = (torch.randn(1, 3, 8, 8),)
        gm = graphopt.capture(scaled_model(), x, leaf_modules=[ScaledConv])
        a = graphopt.analyze_channels(gm)
        g = a.groups_of("2")[0]
        removed = {k: np.concatenate(idx[:1]) for k, idx in g.index.items()}
        with pytest.raises(TypeError, match=r"cannot resize `2` \(ScaledConv\).*register_layer"):
            graphopt.analysis.channels.cut(gm, a, removed, x)
    finally:
        unregister_layer(ScaledConv)


# ---- one lookup rule ------------------------------------------------------------------------

class OwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + 1


class SameForward(nn.Conv2d):
    pass


def test_every_part_follows_the_mro_rule_with_the_forward_check():
    for part in ("channels", "resize", "macs"):
        assert LAYERS.for_type(SameForward, part) is LAYERS.for_type(nn.Conv2d, part) is not None
        assert LAYERS.for_type(OwnForward, part) is None
    gm = graphopt.capture(nn.Sequential(OwnForward(3, 4, 1), SameForward(4, 4, 1)), (torch.randn(1, 3, 2, 2),),
                          leaf_modules=[OwnForward, SameForward])
    assert [graphopt.node_macs(gm, n) for n in gm.graph.nodes if n.op == "call_module"] == [0, 4 * 4 * 4]


def test_functions_by_identity_then_qualified_name_and_methods_by_name():
    class M(nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real.mean(2)

    gm = graphopt.capture(M(), (torch.randn(1, 3, 4),))
    fft = next(n for n in gm.graph.nodes if n.op == "call_function" and "fft" in n.name)
    mean = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "mean")

    def count(node, m):
        return 7

    assert LAYERS.lookup(fft, None, "macs") is None
    register_macs("torch.fft.fft")(count)
    register_macs("mean")(count)
    try:
        assert LAYERS.lookup(fft, None, "macs") is count  # found by its qualified name
        assert graphopt.node_macs(gm, mean) == 7  # Tensor.mean by name, not torch.mean's counter
    finally:
        unregister_layer("torch.fft.fft", "mean", parts=("macs",))
    assert LAYERS.lookup(mean, None, "channels") is not None and LAYERS.lookup(mean, None, "macs") is None


# ---- duplicates -------------------------------------------------------------------------------

class Thing(nn.Module):
    def forward(self, x):
        return x


def first_rule(rc, node, m):
    rc.identity(rc.input(node.args[0]))


def second_rule(rc, node, m):
    rc.identity(rc.input(node.args[0]))


def test_a_duplicate_part_names_both_origins():
    graphopt.register_layer(Thing, channels=first_rule)
    try:
        with pytest.raises(graphopt.RegistrationError,
                           match=r"Thing: its channels part is already registered by "
                                 r"test_layers:first_rule; test_layers:second_rule cannot"):
            register_channel_rule(Thing)(second_rule)
        assert LAYERS.family(Thing).channels is first_rule
        graphopt.register_layer(Thing, channels=first_rule)  # the same registration again: a reload
        graphopt.register_layer(Thing, macs=lambda node, m: 0)  # another part of the same key
    finally:
        unregister_layer(Thing)


def test_a_duplicate_of_a_built_in_raises_and_registers_nothing():
    with pytest.raises(graphopt.RegistrationError,
                       match=r"torch.nn.modules.conv.Conv2d: its macs part is already registered by "
                             r"graphopt.analysis.channels.parametric:_conv_macs; test_layers:"):
        register_macs(Thing, nn.Conv2d)(lambda node, m: 0)
    assert LAYERS.family(Thing) is None  # all or nothing
    with pytest.raises(TypeError, match="unknown layer family part"):
        LAYERS.add((Thing,), {"shape": first_rule})
    with pytest.raises(TypeError, match="nn.Module type"):
        graphopt.register_layer(int, channels=first_rule)


# ---- the solver --------------------------------------------------------------------------------

def bfs_labels(n, pairs):
    """Connected components by breadth-first search, numbered in order of their first element."""
    g = nx.Graph()
    g.add_nodes_from(range(n))
    for a, b in pairs:
        g.add_edges_from(zip(a.tolist(), b.tolist()))
    labels = np.empty(n, dtype=np.int64)
    for i, comp in enumerate(sorted(nx.connected_components(g), key=min)):
        labels[list(comp)] = i
    return labels


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40).flatmap(lambda n: st.tuples(st.just(n), st.lists(
    st.lists(st.tuples(st.integers(0, max(n - 1, 0)), st.integers(0, max(n - 1, 0))), max_size=6),
    max_size=8 if n else 0))))
def test_union_find_is_connected_components(case):
    n, calls = case
    pairs = [(np.array([a for a, _ in c], dtype=np.int64), np.array([b for _, b in c], dtype=np.int64))
             for c in calls]
    assert np.array_equal(solver.components(n, pairs), bfs_labels(n, pairs))


#: size[F: frozen]/spaces of every group, in order, as the scipy connected-components solver gave them
ZOO_GROUPS = {
    "conv1d": "32/20 4F/1 64/11 5F/3",
    "densenet": "16/39 3F/1 8/26 8/18 8/10 24/22 8/14 8/6 10F/3",
    "flatten_linear": "16/10 1F/1 32/11 64/10 10F/3",
    "mobilenetv2": "16/18 3F/1 64/17 64/17 24/17 96/17 64/10 10F/3",
    "residual": "16/30 3F/1 16/9 16/9 32/29 32/9 32/9 10F/3",
    "se_resnext": "32/27 3F/1 8/9 8/9 8/5 64/25 16/9 16/9 16/5 10F/3",
    "shufflenet": "8/31 8/21 16/10 3F/1 16/16 16/16 64/10 10F/3",
    "unet": "16/9 3F/1 16/12 32/9 32/9 16/11 16/9 16/9 3F/3",
}


def test_zoo_classes_and_groups_are_the_same_as_before(zoo_model, monkeypatch):
    name, model, inputs = zoo_model
    seen = []
    real = solver.components
    monkeypatch.setattr(solver, "components", lambda n, pairs: seen.append((n, pairs)) or real(n, pairs))
    a = graphopt.analyze_channels(graphopt.capture(model, inputs))
    (n, pairs), = seen
    assert np.array_equal(real(n, pairs), bfs_labels(n, pairs))
    got = " ".join(f"{g.size}{'' if g.prunable else 'F'}/{len(g.spaces)}" for g in a.groups)
    assert got == ZOO_GROUPS[name]
