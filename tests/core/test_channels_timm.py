"""The channel rules for what timm's models are made of (issue 12), one test per family: the
groups each pattern gives, and an end-to-end prune (ratio 0.5) that cuts and runs. The models
are timm's code written out in pure PyTorch (``zoo.TIMM_PATTERNS``); no timm here."""
import operator

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
import zoo
from graphopt.analysis.channels import analyze_channels, cut


pytestmark = pytest.mark.usefixtures("one_thread")


def analyzed(name):
    model, x = zoo.build(name)
    gm = graphopt.capture(model, x)
    return model, x, gm, analyze_channels(gm)


def group_with(a, module, role="out"):
    found = [g for g in a.groups if any(s.module == module and s.role == role for s in g.params())]
    assert len(found) == 1, f"{module} {role} in {len(found)} groups:\n{a.summary()}"
    return found[0]


def prune(model, x, ratio=0.5, **options):
    """Prune, check the run (output shape, finite), return (graph module, record, MAC cut)."""
    opt = graphopt.optimize(model, [("prune_channels", {"ratio": ratio, **options})], example_inputs=x,
                            on_error="raise", progress=False)
    rec = opt.report["prune_channels"]
    with torch.no_grad():
        got, want = opt(*x), model(*x)
    assert rec.status == "applied" and got.shape == want.shape and torch.isfinite(got).all()
    return opt.graph_module, rec, 1 - rec.macs_after / rec.macs_before


# ---- functional batch norm (timm's BatchNormAct2d), asserts, timm's Linear, SE gates ----------

def test_functional_batch_norm_follows_its_input_channels_and_is_sliced():
    model, x, gm, a = analyzed("mobilenetv3")
    assert not a.unknown, a.unknown
    g = group_with(a, "conv_stem.conv")
    stats = {s.key for s in g.params("channel")}
    assert {f"param:conv_stem.bn.{p}:0" for p in ("weight", "bias", "running_mean", "running_var")} <= stats
    assert g.prunable and "blocks.0.conv_pwl.conv" in g.producers()  # and the residual's branch
    pruned, rec, macs_cut = prune(model, x)
    assert macs_cut > 0.5
    bn = pruned.get_submodule("conv_stem.bn")
    width = pruned.get_submodule("conv_stem.conv").out_channels
    assert width < 16 and all(getattr(bn, p).shape == (width,) for p in ("weight", "bias", "running_mean", "running_var"))


class TrainingForms(nn.Module):
    """F.batch_norm with batch statistics (training=True, no running stats), torch.batch_norm
    (weight before the statistics) and F.instance_norm."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 4, 1)
        self.w, self.bias = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.zeros(16))
        self.register_buffer("mean", torch.zeros(16))
        self.register_buffer("var", torch.ones(16))
        self.w2 = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x):
        y = F.batch_norm(self.a(x), None, None, self.w, self.bias, True, 0.1, 1e-5)
        y = torch.batch_norm(self.b(y), self.w2, None, self.mean, self.var, False, 0.1, 1e-5, False)
        return self.c(F.instance_norm(y)).mean((2, 3))


def test_functional_norms_in_training_form_and_aten_argument_order():
    model = TrainingForms()
    x = (torch.randn(2, 3, 6, 6),)
    a = analyze_channels(graphopt.capture(model, x))
    assert not a.unknown, a.unknown
    assert {s.key for s in group_with(a, "a").params("channel")} == {"param:.w:0", "param:.bias:0"}
    assert {s.key for s in group_with(a, "b").params("channel")} == {"param:.w2:0", "param:.mean:0", "param:.var:0"}
    pruned, _, macs_cut = prune(model, x)
    assert macs_cut > 0.5 and pruned.mean.shape == pruned.w2.shape == (8,)


def test_a_module_only_read_by_get_attr_is_resized_by_its_family():
    """fx keeps no BatchNormAct2d in the graph module (it traced through it); where the module
    object is there (here: put back by hand), the cut fixes its num_features too."""
    model, x = zoo.build("mobilenetv3")
    gm = graphopt.capture(model, x)
    gm.conv_stem.bn = model.conv_stem.bn  # the real BatchNormAct2d: get_attr reads it now
    a = analyze_channels(gm)
    g = group_with(a, "conv_stem.conv")
    removed = {k: np.concatenate([g.index[k][c] for c in range(8)]) for k in g.spaces}
    cut(gm, a, removed, x)
    assert isinstance(gm.conv_stem.bn, zoo.BatchNormAct2d) and gm.conv_stem.bn.num_features == 8


def test_timm_linear_classifier_is_a_consumer():
    model, x, gm, a = analyzed("mobilenetv3")
    g = group_with(a, "conv_head")
    assert g.consumers() == ["classifier"] and g.prunable
    assert not group_with(a, "classifier").prunable  # its outputs are the model's
    pruned, _, _ = prune(model, x)
    fc = pruned.get_submodule("classifier")
    assert fc.weight.shape == (10, pruned.get_submodule("conv_head").out_channels) and fc.weight.shape[1] < 64


def test_squeeze_excite_reduce_is_its_own_group_expand_follows_the_gated_tensor():
    model, x, gm, a = analyzed("mobilenetv3")
    reduce = group_with(a, "blocks.1.se.conv_reduce")
    assert reduce.producers() == ["blocks.1.se.conv_reduce"] and reduce.consumers() == ["blocks.1.se.conv_expand"]
    gated = group_with(a, "blocks.1.se.conv_expand")
    assert {"blocks.1.conv_pw.conv", "blocks.1.conv_dw.conv"} <= set(gated.producers())
    assert "depthwise" in {c.kind for c in gated.history}
    pruned, _, _ = prune(model, x, round_to=4)
    assert pruned.get_submodule("blocks.1.se.conv_reduce").out_channels == 4
    assert pruned.get_submodule("blocks.1.se.conv_expand").out_channels == pruned.get_submodule(
        "blocks.1.conv_dw.conv").out_channels == 24


def test_shape_asserts_read_sizes_and_are_updated_after_a_cut():
    model, x, gm, a = analyzed("ghost_rex")
    assert not a.unknown  # `_assert(x.ndim == 4)` and `_assert(x.shape[1] == C)` do not freeze
    pruned, rec, _ = prune(model, x)
    notes = [m for m in rec.messages if m.startswith("shape assert")]
    assert notes and all("updated" in m for m in notes), rec.messages
    checks = [n for n in pruned.graph.nodes if n.target is operator.eq and n.args[1] != 4]
    widths = {pruned.get_submodule("ghost.primary_conv.conv").out_channels * 2 - 1}
    assert checks and checks[0].args[1] in widths  # compares with the ghost module's new width


class Checks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = self.a(x)
        torch._assert(y.shape[1] % 16 == 0, "not a literal comparison: removed")
        torch._assert(y.size(1) > 0, "still true: kept")
        return self.b(y).mean((2, 3))


def test_a_shape_assert_that_would_fail_and_cannot_be_updated_is_removed():
    pruned, rec, _ = prune(Checks(), (torch.randn(1, 3, 4, 4),))
    asserts = [n for n in pruned.graph.nodes if n.target is torch._assert]
    assert [n.args[1] for n in asserts] == ["still true: kept"]
    assert any("removed: the sizes it checks change" in m for m in rec.messages)


# ---- splits, concats and slices ---------------------------------------------------------------

def test_mixed_conv_uneven_split_groups_each_part_and_rewrites_the_sizes():
    model, x, gm, a = analyzed("mixnet")
    parts = [group_with(a, f"conv_dw.{i}") for i in range(3)]
    assert [g.size for g in parts] == [20, 18, 18] and all(g.prunable for g in parts)
    assert all("se.conv_expand" in g.producers() and "stem.conv" in g.producers() for g in parts)
    pruned, _, macs_cut = prune(model, x)
    split = next(n for n in pruned.graph.nodes if n.target is torch.split)
    assert split.args[1] == [8, 8, 8] and macs_cut > 0.5


def test_ghost_cat_and_slice_and_rexnet_partial_residual():
    model, x, gm, a = analyzed("ghost_rex")
    # the slice drops the last cheap channel (23 of 12 + 12): its class, with the primary
    # channel the depthwise cheap conv reads, is read by nothing past the slice but is kept
    dropped = [g for g in a.groups_of("ghost.cheap_operation.conv") if g.size == 1]
    assert len(dropped) == 1 and dropped[0].size == 1 and dropped[0].prunable
    # rex1 adds its 23-channel input into the first 23 of its 32, rex2 its 32 into its 40
    joined = [g for g in a.groups_of("ghost.primary_conv.conv") if "rex2.conv_pwl.conv" in g.producers()]
    assert joined and all({"rex1.conv_pwl.conv", "ghost.cheap_operation.conv"} <= set(g.producers()) for g in joined)
    pruned, _, macs_cut = prune(model, x, round_to=1)
    slices = [n.args[1][1] for n in pruned.graph.nodes if n.target is operator.getitem
              and isinstance(n.args[1], tuple) and len(n.args[1]) > 1]
    assert all(isinstance(s, slice) for s in slices) and macs_cut > 0.4


def test_csp_half_split_and_dpn_dual_path():
    model, x, gm, a = analyzed("csp_dpn")
    assert not a.unknown and len(a.groups_of("stage.conv_exp.conv")) >= 2  # one group per half
    res = [g for g in a.groups_of("dpn.c1x1_w.conv") if "dpn.c1x1_c" in g.producers()]
    assert len(res) == 1 and res[0].size == 24  # x_s1 + out1: the residual path
    pruned, _, macs_cut = prune(model, x)
    assert pruned.get_submodule("bn") is not None and macs_cut > 0.5


def test_stack_along_a_new_dim_moves_the_channel_dim():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 16, 1), nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.c(torch.stack([self.a(x), self.b(x)], dim=1).sum(1)).mean((2, 3))

    x = (torch.randn(1, 3, 4, 4),)
    a = analyze_channels(graphopt.capture(Stack(), x))
    assert set(group_with(a, "a").producers()) == {"a", "b"} and group_with(a, "a").prunable
    prune(Stack(), x)


# ---- norms over the channels ------------------------------------------------------------------

def test_layer_norm_2d_channels_last_layer_norm_and_layer_scale():
    model, x, gm, a = analyzed("norms")
    assert not a.unknown, a.unknown
    g = group_with(a, "stem")
    keys = {s.key for s in g.params("channel")}
    assert {"param:stem_norm.weight:0", "param:block.norm.weight:0", "param:block.gamma:0",
            "param:down_norm.bias:0"} <= keys
    pruned, _, _ = prune(model, x)
    width = pruned.get_submodule("stem").out_channels
    assert pruned.block.gamma.shape == (width,) and pruned.stem_norm.weight.shape == (width,)


def test_group_norm_cuts_the_same_offset_in_every_group():
    model, x, gm, a = analyzed("norms")
    g = group_with(a, "conv")  # 32 channels, GroupNormAct with 4 groups
    assert g.size == 8 and [list(i) for i in g.index["param:conv.weight:0"]][1] == [1, 9, 17, 25]
    assert group_with(a, "conv1").size == 48  # one group: any channel may go
    pruned, _, _ = prune(model, x)
    assert pruned.get_submodule("conv").out_channels == 16  # 4 groups of 4
    norm = next(n for n in pruned.graph.nodes if n.target is F.group_norm)
    assert norm.args[1] == 4


# ---- gates, padding, functional convs, attention --------------------------------------------

def test_eca_conv1d_slides_over_the_channels_and_keeps_them():
    model, x, gm, a = analyzed("gates")
    g = group_with(a, "stem.conv")
    window = [c for c in g.history if c.kind == "window"]
    assert g.prunable and window and "sliding over the channels" in window[0].detail
    pruned, _, _ = prune(model, x)
    assert pruned.get_submodule("eca.conv").weight.shape == (1, 1, 3)  # shared weights: untouched


def test_cbam_channel_mlp_called_twice_and_spatial_attention():
    model, x, gm, a = analyzed("gates")
    mlp = group_with(a, "cbam.fc1")
    assert mlp.prunable and mlp.consumers() == ["cbam.fc2"]
    assert "pw.conv" in group_with(a, "cbam.fc2").producers()
    assert not group_with(a, "cbam.spatial", "in").prunable  # mean / max over the channels
    pruned, _, _ = prune(model, x)
    assert pruned.get_submodule("cbam.fc2").out_channels == pruned.get_submodule("pw.conv").out_channels == 16


def test_same_padding_and_functional_convs_with_depthwise_groups_rewritten():
    model, x, gm, a = analyzed("gates")
    assert group_with(a, "conv") is group_with(a, "dw")  # depthwise F.conv2d
    pruned, _, _ = prune(model, x)
    convs = [n for n in pruned.graph.nodes if n.target is F.conv2d]
    assert convs[1].args[6] == pruned.get_submodule("conv").weight.shape[0] == 16  # groups follow
    assert pruned.get_submodule("dw").weight.shape == (16, 1, 3, 3)


def test_padding_the_channel_dim_is_refused():
    class PadC(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(10, 2, 1)

        def forward(self, x):
            return self.b(F.pad(self.a(x), (0, 0, 0, 0, 1, 1)))

    a = analyze_channels(graphopt.capture(PadC(), (torch.randn(1, 3, 4, 4),)))
    assert not group_with(a, "a").prunable and "pads its channel dim 1" in group_with(a, "a").reason


def test_attention_style_reshapes_are_left_alone_with_the_reason():
    model, x, gm, a = analyzed("split_attn")
    g = group_with(a, "attn.conv")
    assert not g.prunable and "attention-style regrouping" in g.reason
    assert group_with(a, "attn.fc1").prunable  # the gate's own reduction still prunes
    pruned, rec, macs_cut = prune(model, x)
    assert pruned.get_submodule("attn.conv").out_channels == 32 and macs_cut > 0.2


def test_identity_dropout_and_droppath_keep_the_channels():
    model, x, gm, a = analyzed("gates")
    assert group_with(a, "pw.conv").prunable  # through nn.Dropout into the head
    assert not any(isinstance(m, zoo.DropPath) for m in gm.modules())  # identity in eval: traced away


class ShapeFromOther(nn.Module):
    """A view sized by another tensor's channel count (`y.view(B, x.size(1), -1)`): both counts
    are cut together."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(3, 16, 1)
        self.head_a, self.head_b = nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        u, w = self.a(x), self.b(x)
        B = u.shape[0]
        return self.head_b(w.view(B, u.size(1), -1).mean(-1)) + self.head_a(u.mean((2, 3)))


def test_a_size_read_from_another_tensors_shape_freezes_or_couples_its_channels():
    from timm_repros import ShapeFromInputAttention  # EdgeNeXt's `B, N, C = x.shape ... reshape(B, N, C)`

    model, x = ShapeFromInputAttention().eval(), (torch.randn(1, 16, 8),)
    gm = graphopt.capture(model, x)
    a = analyze_channels(gm)
    g = group_with(a, "embed")
    assert not g.prunable and "shape" in g.reason, g.reason
    opt = graphopt.optimize(model, [("prune_channels", {"ratio": 0.3})], example_inputs=x, progress=False)
    assert opt.report["prune_channels"].status in ("applied", "no-op"), opt.report["prune_channels"].reason
    other, y = ShapeFromOther().eval(), (torch.randn(1, 3, 4, 4),)
    a = analyze_channels(graphopt.capture(other, y))
    assert group_with(a, "a") is group_with(a, "b")  # cut together: the view stays consistent
    gm, rec, cut_macs = prune(other, y)
    assert cut_macs > 0.2
