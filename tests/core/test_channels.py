"""Channel dependency analysis: the groups found on the zoo and on each pattern, index mappings,
what is refused and why. Pruning soundness (cutting a class == zeroing its consumers) is tested
in test_prune_channels.py."""
import operator

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
import zoo
from graphopt.analysis.channels import Unsupported, analyze_channels, cut, register_channel_rule
from graphopt.layer_registry import unregister_layer


pytestmark = pytest.mark.usefixtures("one_thread")


def analyze(model, *shape):
    x = torch.randn(*shape)
    gm = graphopt.capture(zoo.randomize_bn(model), (x,))
    return gm, analyze_channels(gm)


def group_with(a, module, role="out"):
    found = [g for g in a.groups if any(s.module == module and s.role == role for s in g.params())]
    assert len(found) == 1, f"{module} {role} in {len(found)} groups:\n{a.summary()}"
    return found[0]


def test_zoo_groups_every_conv_and_freezes_inputs_and_outputs(zoo_model):
    name, model, inputs = zoo_model
    gm = graphopt.capture(model, inputs)
    a = analyze_channels(gm)
    assert not a.unknown, a.unknown
    assert a.prunable_groups()
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    assert all(a.node_spaces[out.name].key not in g.spaces for g in a.prunable_groups())
    assert any("model input" in g.reason for g in a.groups if not g.prunable)
    # every conv / linear's output channels are in groups (several when a shuffle splits them);
    # only the output layer's are frozen
    layers = [k for k, m in gm.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    groups = {k: [g for g in a.groups if k in g.producers()] for k in layers}
    assert all(groups.values())
    frozen = [k for k in layers if not all(g.prunable for g in groups[k])]
    assert frozen == [out.target], frozen
    assert all("channel_space" in n.meta for n in gm.graph.nodes)


def test_residual_adds_tie_every_branch():
    _, a = analyze(zoo.ResidualNet(), 1, 3, 32, 32)
    g = group_with(a, "stem.0")
    assert set(g.producers()) == {"stem.0", "layer1.0.conv2", "layer1.1.conv2"}
    assert set(g.consumers()) == {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.down.0"}
    assert set(g.channelwise()) == {"stem.1", "layer1.0.bn2", "layer1.1.bn2"}
    assert g.size == 16 and g.prunable
    assert group_with(a, "layer2.0.down.0") is group_with(a, "layer2.1.conv2")


def test_concat_maps_each_input_to_its_offset():
    gm, a = analyze(zoo.DenseNetLike(), 1, 3, 32, 32)
    g = group_with(a, "block1.1.conv")  # concatenated after the stem (16) and block1.0 (8)
    cat_of_block1_1 = [n.name for n in gm.graph.nodes if n.target is torch.cat][1]
    assert [int(i[0]) for i in g.index[f"node:{cat_of_block1_1}"]] == list(range(24, 32))
    assert "offset" in {c.kind for c in g.history}
    # and the trans conv reads them at the same offsets of its input
    assert [int(i[0]) for i in g.index["param:trans.2.weight:1"]] == list(range(24, 32))


def test_depthwise_conv_is_one_group_with_its_input():
    _, a = analyze(zoo.MobileNetV2Like(), 1, 3, 32, 32)
    g = group_with(a, "features.1.block.1.0")  # the depthwise conv
    assert "features.1.block.0.0" in g.producers()  # the expansion conv feeding it
    assert g.consumers() == ["features.1.block.2"]
    assert "depthwise" in {c.kind for c in g.history}


def test_grouped_conv_cuts_the_same_offsets_in_every_group():
    _, a = analyze(zoo.SEResNeXtLike(), 1, 3, 32, 32)
    g = group_with(a, "blocks.0.conv2.0")  # groups=4, 32 channels
    assert g.size == 8 and g.width == 4
    assert [list(i) for i in g.index["param:blocks.0.conv2.0.weight:0"]][:2] == [[0, 8, 16, 24], [1, 9, 17, 25]]
    g_in = group_with(a, "blocks.0.conv1.0")  # its input side: weight dim 1 holds offsets
    assert [list(i) for i in g_in.index["param:blocks.0.conv2.0.weight:1"]][:2] == [[0], [1]]


def test_squeeze_excite_gate_joins_the_residual_group():
    _, a = analyze(zoo.SEResNeXtLike(), 1, 3, 32, 32)
    g = group_with(a, "blocks.0.se.fc2")
    assert {"stem.0", "blocks.0.conv3.0"} <= set(g.producers())
    assert "blocks.0.se.fc1" in g.consumers()


def test_flatten_into_linear_maps_a_channel_to_hw_features():
    _, a = analyze(zoo.FlattenLinearNet(), 1, 1, 28, 28)
    g = group_with(a, "features.2.0")
    assert g.consumers() == ["fc1"]
    assert [list(i) for i in g.index["param:fc1.weight:1"]][3] == list(range(3 * 49, 4 * 49))
    assert "block" in {c.kind for c in g.history}


def test_transposed_conv_and_skip_concat():
    _, a = analyze(zoo.UNetLike(), 1, 3, 32, 32)
    up = group_with(a, "up")
    assert up.consumers() == ["dec.0.0"] and up.channelwise() == ["up_bn"]
    assert [int(i[0]) for i in up.index["param:dec.0.0.weight:1"]] == list(range(16))
    skip = group_with(a, "enc1.1.0")
    assert [int(i[0]) for i in skip.index["param:dec.0.0.weight:1"]] == list(range(16, 32))
    assert set(skip.consumers()) == {"enc2.1.0", "dec.0.0"}
    assert group_with(a, "enc2.2.0").consumers() == ["up"]  # transposed conv weight dim 0 = input


def test_view_transpose_channel_shuffle_is_mapped():
    gm, a = analyze(zoo.ShuffleNetLike(), 1, 3, 32, 32)
    assert not a.unknown
    shuffled = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape"][0]
    s = a.node_spaces[shuffled.name]
    edges = [d for _, _, d in a.graph.edges(s.key, data=True)]
    assert {"permutation"} <= {e["kind"] for e in edges}
    # inside the shuffle the channels are split over (2, c // 2): the same offset in both halves
    # of the concat is cut together
    assert any(c.kind == "fixed-dim" for g in a.groups for c in g.history)
    assert len(a.prunable_groups()) >= 5


class Shuffle(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a, self.b, self.fn = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), fn

    def forward(self, x):
        return self.b(self.fn(self.a(x)))


@pytest.mark.parametrize("fn", [lambda t: torch.channel_shuffle(t, 2), nn.ChannelShuffle(2),
                                lambda t: zoo.channel_shuffle(t, 2)], ids=["torch", "module", "view"])
def test_channel_shuffle_permutation(fn):
    gm, a = analyze(Shuffle(fn), 1, 3, 4, 4)
    g = group_with(a, "a")
    # output j = k * 2 + b takes input b * 4 + k: input channel c and c + 4 are one class
    assert [list(i) for i in g.index["param:a.weight:0"]] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [list(i) for i in g.index["param:b.weight:1"]] == [[0, 1], [2, 3], [4, 5], [6, 7]]


class LiteralView(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.conv, self.shape = nn.Conv2d(3, 8, 3, padding=1), shape
        self.fc = nn.Linear(8 * 16, 2)

    def forward(self, x):
        y = self.conv(x).view(*self.shape)
        return self.fc(y.reshape(y.shape[0], -1))


def test_literal_view_size_is_rewritable():
    gm, a = analyze(LiteralView((-1, 8 * 16)), 1, 3, 4, 4)
    assert group_with(a, "conv").prunable and a.resizes


def test_literal_sizes_splitting_the_channels_are_refused():
    gm, a = analyze(LiteralView((1, 2, 4, 16)), 1, 3, 4, 4)
    g = group_with(a, "conv")
    assert not g.prunable and "none can change size" in g.reason


class Slice(nn.Module):
    def __init__(self, index):
        super().__init__()
        self.a, self.b, self.index = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1), index

    def forward(self, x):
        return self.b(self.a(x)[self.index])


def test_a_contiguous_channel_slice_maps_offsets_and_its_bounds_are_rewritten():
    gm, a = analyze(Slice((slice(None), slice(2, 6), slice(1, None))), 1, 3, 4, 4)
    read = group_with(a, "b", "in")
    unread = [g for g in a.groups_of("a") if g is not read and "a" in g.producers()]
    assert read.producers() == ["a"] and read.prunable and not a.unknown
    assert [int(i[0]) for i in read.index["param:a.weight:0"]] == [2, 3, 4, 5]
    assert sorted(int(i[0]) for g in unread for i in g.index["param:a.weight:0"]) == [0, 1, 6, 7]
    assert all(g.prunable and g.consumers() == [] for g in unread)  # read by nothing: may go too
    before = next(g for g in unread if int(g.index["param:a.weight:0"][0][0]) == 0)
    removed = {}
    for g in (read, before):  # a's channels 2 (read) and 0 (not)
        for k in g.spaces:
            removed[k] = np.concatenate([removed.get(k, np.zeros(0, int)), g.index[k][0]])
    cut(gm, a, removed, (torch.randn(1, 3, 4, 4),))
    getitem = next(n for n in gm.graph.nodes if n.target is operator.getitem)
    assert getitem.args[1][1] == slice(1, 4)  # a's channels 3, 4, 5 are now 1, 2, 3


@pytest.mark.parametrize("index", [(slice(None), slice(None, None, 2)), (slice(None), [1, 0, 3, 2])],
                         ids=["step", "reorder"])
def test_selecting_or_reordering_the_channels_freezes_with_the_reason(index):
    _, a = analyze(Slice(index), 1, 3, 4, 4)
    g = group_with(a, "a")
    assert not g.prunable and "selects or reorders along a channel dim" in g.reason
    assert "getitem" in a.unknown


class Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 12, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        p, q = torch.split(self.a(x), [4, 8], dim=1)
        return self.b(p) + self.c(q)


def test_split_maps_offsets_and_records_a_resize():
    _, a = analyze(Split(), 1, 3, 4, 4)
    first, second = a.groups_of("a")[:2]
    assert first.consumers() == ["b"] and second.consumers() == ["c"]
    assert [int(i[0]) for i in first.index["param:a.weight:0"]] == list(range(4))
    assert [int(i[0]) for i in second.index["param:a.weight:0"]] == list(range(4, 12))
    assert len(a.resizes) == 1


class ChannelsLast(nn.Module):
    """ConvNeXt-style: permute to channels-last, LayerNorm + Linear MLP, permute back."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)
        self.stem, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.ln(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return self.head(x + y)


def test_permute_to_channels_last_and_back():
    _, a = analyze(ChannelsLast(), 1, 3, 4, 4)
    assert not a.unknown
    assert group_with(a, "fc1").consumers() == ["fc2"]
    g = group_with(a, "stem")
    assert set(g.producers()) == {"stem", "dw", "fc2"} and g.channelwise() == ["ln"]


class Attention(nn.Module):
    """CBAM-style spatial attention: a mean over the channels must not freeze them."""

    def __init__(self):
        super().__init__()
        self.a, self.att, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(2, 1, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        s = torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)
        return self.b(y * torch.sigmoid(self.att(s)))


def test_reduction_over_channels_does_not_freeze_them():
    _, a = analyze(Attention(), 1, 3, 6, 6)
    assert group_with(a, "a").prunable and not a.unknown
    assert not group_with(a, "att", "in").prunable


class Opaque(nn.Module):
    def forward(self, x):
        return x.flip(-1) * 2


class WithUnknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)
        self.odd = Opaque()

    def forward(self, x):
        return self.c(torch.fft.fft(self.b(self.odd(self.a(x)))).real)


def test_unknown_ops_freeze_what_they_touch_and_say_why():
    gm = graphopt.capture(WithUnknown(), (torch.randn(1, 3, 4, 4),), leaf_modules=[Opaque])
    a = analyze_channels(gm)
    assert "odd" in a.unknown and "no channel rule" in a.unknown["odd"]
    assert not group_with(a, "a").prunable and "`odd` (Opaque)" in group_with(a, "a").reason
    assert not group_with(a, "b").prunable and "fft" in group_with(a, "b").reason
    # a rule registered for the module makes it transparent (rules are data)
    try:
        register_channel_rule(Opaque)(lambda rc, node, m: rc.identity(rc.input(node.args[0])))
        assert analyze_channels(gm).groups_of("a")[0].prunable
    finally:
        unregister_layer(Opaque)


class MyConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x)[:, :, :, :]


class PlainSub(nn.Conv2d):
    pass


def test_subclass_with_its_own_forward_is_not_assumed_to_be_a_conv():
    m = nn.Sequential(MyConv(3, 8, 1), nn.ReLU(), PlainSub(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    gm = graphopt.capture(m, (torch.randn(1, 3, 4, 4),), leaf_modules=[MyConv, PlainSub])
    a = analyze_channels(gm)
    assert "MyConv" in a.unknown["_0"]
    assert group_with(a, "2").prunable  # PlainSub inherits Conv2d.forward


def test_frozen_modules_and_errors():
    gm, a = analyze(zoo.ResidualNet(), 1, 3, 32, 32)
    frozen = analyze_channels(gm, frozen_modules={"layer1.0": "kept by the user"})
    assert not group_with(frozen, "layer1.0.conv1").prunable
    assert group_with(frozen, "stem.0").reason == "kept by the user"  # layer1.0.conv1 reads it
    assert group_with(frozen, "layer1.1.conv1").prunable
    with pytest.raises(KeyError, match="did you mean 'layer1.0.conv1'"):
        analyze_channels(gm, frozen_modules={"layer1.0.cnv1": "x"})
    bare = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 1)))
    with pytest.raises(ValueError, match="needs shapes"):
        analyze_channels(bare)
    assert analyze_channels(bare, (torch.randn(1, 3, 2, 2),)).groups


def test_networkx_graph_and_history():
    _, a = analyze(zoo.ResidualNet(), 1, 3, 32, 32)
    g = group_with(a, "stem.0")
    assert a.graph.number_of_nodes() == len(a.spaces)
    assert {c.kind for c in g.history} == {"identity", "param"}
    sub = a.graph.subgraph(g.spaces)
    import networkx as nx
    assert nx.is_connected(sub)
    assert "group" in g.describe() and "stem.0" in a.summary()


def test_pixel_shuffle_blocks():
    m = nn.Sequential(nn.Conv2d(3, 16, 1), nn.PixelShuffle(2), nn.Conv2d(4, 2, 1))
    _, a = analyze(m, 1, 3, 4, 4)
    g = group_with(a, "0")
    assert [list(i) for i in g.index["param:0.weight:0"]][1] == [4, 5, 6, 7]


def test_group_norm_cuts_the_same_offsets_per_group():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 2, 1))
    _, a = analyze(m, 1, 3, 4, 4)
    g = group_with(a, "0")
    assert [list(i) for i in g.index["param:0.weight:0"]] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_rule_raising_unsupported_leaves_no_trace():
    class Half(nn.Module):
        def forward(self, x):
            return x

    @register_channel_rule(Half)
    def half(rc, node, m):
        rc.identity(rc.input(node.args[0]))
        raise Unsupported("changed its mind")

    try:
        m = nn.Sequential(nn.Conv2d(3, 8, 1), Half(), nn.Conv2d(8, 2, 1))
        gm = graphopt.capture(m, (torch.randn(1, 3, 4, 4),), leaf_modules=[Half])
        a = analyze_channels(gm)
        assert "changed its mind" in a.unknown["_1"]
        assert "node:_1" not in a.spaces and not group_with(a, "0").prunable
    finally:
        unregister_layer(Half)


def tv_shuffle(x, groups: int):
    """torchvision's ShuffleNetV2 channel_shuffle: transpose, .contiguous(), view(b, -1, h, w)."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


def test_contiguous_inside_a_shuffle_keeps_the_mapping():
    gm, a = analyze(Shuffle(lambda t: tv_shuffle(t, 2)), 1, 3, 4, 4)
    assert not a.unknown
    assert [list(i) for i in group_with(a, "a").index["param:a.weight:0"]] == [[0, 4], [1, 5], [2, 6], [3, 7]]


ScaledBlock = zoo.ScaledBlock


def test_functional_layer_norm_and_layer_scale_parameters_are_channel_parameters():
    gm, a = analyze(ScaledBlock(), 1, 3, 4, 4)
    assert not a.unknown, a.unknown
    g = group_with(a, "a")
    assert g.prunable and set(g.producers()) == {"a", "b"}
    keys = {s.key for s in g.params("channel")}
    assert keys == {"param:norm.weight:0", "param:norm.bias:0", "param:.layer_scale:0"}
    assert len(a.resizes) == 1  # F.layer_norm's literal normalized_shape


class SharedScale(ScaledBlock):
    def forward(self, x):
        y = self.norm(self.a(x))
        return self.out(y + self.layer_scale * self.b(y)) + self.layer_scale.sum()


def test_a_parameter_read_elsewhere_is_a_constant():
    _, a = analyze(SharedScale(), 1, 3, 4, 4)
    assert not group_with(a, "a").prunable
    assert "constant tensor `layer_scale`" in group_with(a, "a").reason


def test_rules_keyed_by_qualified_name():
    from graphopt.layer_registry import qualified_name as _qualified_name

    assert _qualified_name(torch.fft.fft) == "torch.fft.fft"
    assert _qualified_name(torch.conv2d) == "torch.conv2d"
    assert _qualified_name(F.layer_norm) == "torch.nn.functional.layer_norm"
    m = WithUnknown()
    gm = graphopt.capture(m, (torch.randn(1, 3, 4, 4),), leaf_modules=[Opaque])
    try:
        register_channel_rule("torch.fft.fft")(lambda rc, node, mod: rc.identity(rc.input(node.args[0])))
        assert "fft_fft" not in analyze_channels(gm).unknown
    finally:
        unregister_layer("torch.fft.fft")


def test_docstring_examples():
    import doctest
    from graphopt.analysis import channels

    result = doctest.testmod(channels, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
