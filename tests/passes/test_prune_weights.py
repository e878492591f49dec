"""prune_weights: thresholds, blocks, N:M, which layers, masks through distill and quantize, report."""
import copy
import doctest
import json
from importlib import resources

import jsonschema

import pytest
import torch
import torch.nn as nn

import graphopt
import zoo
from graphopt.report.text import human
from graphopt.sparsity import SparsityPattern, apply_masks, mask_of, masked_layers, pattern_of

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """A stem, a 3x3 conv, a depthwise conv, a 1x1 conv and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 64, 1)
        self.tiny = nn.Conv2d(64, 3, 1)
        self.up = nn.Conv2d(3, 64, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.conv(x))))))
        x = x * torch.sigmoid(self.up(torch.relu(self.tiny(x))))
        return self.fc(x.mean((2, 3)))


def net():
    torch.manual_seed(0)
    return Net().eval()


X = (torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


def prune(model=None, options=None, inputs=X, passes=None, **kw):
    model = model if model is not None else net()
    passes = passes or [("prune_weights", dict(options or {}))]
    return graphopt.optimize(model, passes, example_inputs=inputs, on_error="raise", progress=False, **kw)


def zeros(t):
    return float((t == 0).float().mean())


def layers(opt):
    return masked_layers(opt.graph_module)


def test_docstring_examples():
    from graphopt.passes import prune_weights

    result = doctest.testmod(prune_weights, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --- which layers -----------------------------------------------------------------------------

def test_first_last_depthwise_and_tiny_layers_stay_dense_by_default():
    opt = prune(options={"sparsity": 0.6})
    assert sorted(layers(opt)) == ["conv", "pw"]
    notes = " | ".join(opt.report["prune_weights"].messages)
    assert "stem (16, 3, 3, 3): kept dense: the first layer" in notes
    assert "fc (10, 64): kept dense: the last layer, the classifier" in notes
    assert "dw (32, 1, 3, 3): kept dense: depthwise" in notes
    assert "tiny (3, 64, 1, 1): kept dense: 192 weights < min_params=256" in notes
    assert "up (64, 3, 1, 1): kept dense: 192 weights < min_params=256" in notes
    for name in ("stem", "fc", "dw"):
        assert zeros(opt.graph_module.get_submodule(name).weight) == 0


def test_options_include_what_is_dense_by_default():
    opt = prune(options={"sparsity": 0.6, "prune_first": True, "prune_last": True, "include_depthwise": True,
                         "min_params": 100, "ignore": ("pw",)})
    assert sorted(layers(opt)) == ["conv", "dw", "fc", "stem", "tiny", "up"]
    assert "pw (64, 32, 1, 1): kept dense: in ignore" in " | ".join(opt.report["prune_weights"].messages)


# --- how much ---------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [1, 4])
def test_global_threshold_hits_the_sparsity_over_all_pruned_layers(block):
    opt = prune(options={"sparsity": 0.7, "block": block})
    ws = [m.weight for m in layers(opt).values()]
    total = sum(w.numel() for w in ws)
    z = sum(int((w == 0).sum()) for w in ws)
    assert abs(z - 0.7 * total) <= block
    # one threshold: every pruned weight (block) is smaller than every kept one
    scores = [w.detach().abs().reshape(w.shape[0] // block, block, -1).mean(1) for w in ws]
    masks = [mask_of(m)[::block].reshape(s.shape) for m, s in zip(layers(opt).values(), scores)]
    original = dict(net().named_modules())
    orig = [original[n].weight.detach().abs().reshape(s.shape[0], block, -1).mean(1)
            for n, s in zip(layers(opt), scores)]
    pruned = torch.cat([o[~mk] for o, mk in zip(orig, masks)])
    kept = torch.cat([o[mk] for o, mk in zip(orig, masks)])
    assert pruned.max() <= kept.min()


def test_per_layer_scope_prunes_every_layer_to_the_sparsity():
    opt = prune(options={"sparsity": 0.55, "scope": "layer"})
    for name, m in layers(opt).items():
        assert abs(int((m.weight == 0).sum()) - 0.55 * m.weight.numel()) <= 1, name


def test_alpha_rule_prunes_below_alpha_times_the_layer_max():
    model = net()
    opt = prune(model, {"alpha": 0.3})
    for name, m in layers(opt).items():
        w = dict(model.named_modules())[name].weight.detach()
        expect = w.abs() >= 0.3 * w.abs().max()
        assert torch.equal(mask_of(m), expect), name
        assert torch.equal(m.weight != 0, expect)
    assert "|w| < 0.3 * max|w| per layer (alpha)" in opt.report["prune_weights"].messages[0]


def test_blocks_are_all_zero_or_kept_whole():
    opt = prune(options={"sparsity": 0.8, "block": (8, 1)})
    for name, m in layers(opt).items():
        w = m.weight.detach()
        blocks = (w.reshape(w.shape[0] // 8, 8, -1) != 0)
        assert torch.equal(blocks.any(1), blocks.all(1)), name  # (a random weight is never exactly 0)
        assert pattern_of(m) == SparsityPattern(block=(8, 1))


def test_n_m_holds_in_every_group():
    opt = prune(options={"n_m": (2, 4)})
    for name, m in layers(opt).items():
        w = m.weight.detach().movedim(1, -1)
        nonzero = (w.reshape(*w.shape[:-1], -1, 4) != 0).sum(-1)
        assert bool((nonzero == 2).all()), name
        assert pattern_of(m).n_m == (2, 4)
    # the kept two are the largest of their group
    original = dict(net().named_modules())["conv"].weight.detach().movedim(1, -1).abs().reshape(32, 3, 3, 4, 4)
    mask = mask_of(layers(opt)["conv"]).movedim(1, -1).reshape(32, 3, 3, 4, 4)
    assert bool((torch.where(mask, original, torch.inf).amin(-1) >= torch.where(~mask, original, -1.0).amax(-1)).all())


def test_the_target_sparse_block_is_the_default_block():
    class Blocky:
        name, sparse_block = "blocky", 4

        def compile(self, gm, example_inputs, **kwargs):
            return gm

    opt = prune(options={"sparsity": 0.5}, target=Blocky())
    assert all(pattern_of(m).block == (4, 1) for m in layers(opt).values())
    opt = prune(options={"n_m": (2, 4)}, target=Blocky())  # N:M is along the inputs: no block
    assert all(pattern_of(m) == SparsityPattern(n_m=(2, 4)) for m in layers(opt).values())
    opt = prune(options={"schedule": "gradual"})  # the default sparsity, ramped up
    assert abs(zeros(layers(opt)["conv"].weight) - 0.5) < 0.2


def test_gradual_follows_zhu_gupta_and_recovers_on_calibration_data():
    from graphopt.passes.prune_weights import zhu_gupta

    assert [round(zhu_gupta(t, 4, 0.8), 4) for t in range(5)] == [0.0, 0.4625, 0.7, 0.7875, 0.8]
    data = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = net()
    opt = prune(model, {"sparsity": 0.8, "schedule": "gradual", "steps": 4}, calibration_data=data)
    notes = " | ".join(opt.report["prune_weights"].messages)
    assert "gradual: sparsity and recovery loss" in notes and "46.2%" in notes and "80.0%" in notes
    ws = [m.weight for m in layers(opt).values()]
    assert abs(sum(int((w == 0).sum()) for w in ws) - 0.8 * sum(w.numel() for w in ws)) <= 1
    # recovery trained the kept weights, and the dense layers too
    assert not torch.equal(opt.graph_module.get_submodule("fc").weight, model.fc.weight)
    # without data, gradual is one-shot, and the report says so
    one = prune(net(), {"sparsity": 0.8, "schedule": "gradual"})
    assert "without recovery (no calibration_data)" in " | ".join(one.report["prune_weights"].messages)
    shot = prune(net(), {"sparsity": 0.8})
    for name, m in layers(one).items():
        assert torch.equal(m.weight, layers(shot)[name].weight)


# --- bad options ------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"sparsity": 1.0}, "sparsity=1.0 is invalid"),
    ({"sparsity": -0.1}, "sparsity=-0.1 is invalid"),
    ({"sparsity": 0.5, "alpha": 0.1}, "give one of sparsity"),
    ({"alpha": 0.1, "n_m": (2, 4)}, "give one of sparsity"),
    ({"alpha": 0.1, "scope": "global"}, "alpha is a per-layer rule"),
    ({"alpha": 1.5}, "alpha=1.5 is invalid"),
    ({"n_m": (4, 2)}, "n < m"),
    ({"n_m": (2,)}, "must be 2 positive integers"),
    ({"n_m": (2, 4), "block": 4}, "do not combine"),
    ({"block": (4, 2)}, "blocks span output channels only"),
    ({"block": 0}, "must be a positive integer"),
    ({"block": 3}, r"block=\(3, 1\) does not divide the output channels of conv \(32\), pw \(64\)"),
    ({"n_m": (2, 3)}, "groups 3 input channels, which does not divide those of conv"),
    ({"schedule": "gradual", "alpha": 0.1}, "gradual.*ramps up a sparsity target"),
    ({"steps": 3}, "steps is for schedule='gradual'"),
    ({"ignore": ("convv",)}, "ignore names 'convv'.*Did you mean 'conv'"),
    ({"scope": "model"}, "is not one of"),
])
def test_bad_options_fail_before_any_pass_runs(options, message):
    with pytest.raises(graphopt.PassOptionError, match=message):
        prune(passes=["fuse_conv_bn", ("prune_weights", options)])


def test_user_model_is_untouched():
    model = net()
    state = copy.deepcopy(model.state_dict())
    prune(model, {"sparsity": 0.9})
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(mask_of(m) is not None for m in model.modules())


# --- the mask through later passes ------------------------------------------------------------

def test_masks_survive_distill():
    data = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = net()
    opt = prune(model, passes=[("prune_weights", {"sparsity": 0.7}), ("distill", {"epochs": 2, "lr": 1e-2})],
                calibration_data=data)
    assert opt.report["distill"].status == "applied"
    assert "2 masked layer(s) kept their pruned weights at zero" in opt.report["distill"].messages[-1]
    pruned = prune(model, {"sparsity": 0.7})
    for name, m in layers(opt).items():
        w = m.weight.detach()
        assert bool((w[~mask_of(m)] == 0).all()), name
        assert not torch.equal(w, layers(pruned)[name].weight)  # it trained
        assert abs(zeros(w) - zeros(layers(pruned)[name].weight)) < 0.01


def test_apply_masks_refuses_a_mask_that_no_longer_fits():
    conv = nn.Conv2d(4, 8, 1)
    graphopt.sparsity.set_mask(conv, conv.weight.abs() > 0.1, SparsityPattern())
    conv.weight = nn.Parameter(torch.randn(4, 4, 1, 1))
    with pytest.raises(ValueError, match="no longer fits"):
        apply_masks(conv)


def test_quantize_keeps_zeros_exactly_zero_and_carries_the_mask():
    from graphopt.passes.quant import QuantizedConv

    model, inputs = zoo.build("residual")
    data = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    opt = prune(model, passes=["fuse_conv_bn", ("prune_weights", {"sparsity": 0.8, "block": 4}), "quantize"],
                inputs=inputs, calibration_data=data)
    quantized = {n: m for n, m in opt.graph_module.named_modules() if isinstance(m, QuantizedConv)}
    masked = {n: q for n, q in quantized.items() if mask_of(q) is not None}
    assert len(masked) >= 6 and mask_of(quantized["stem.0"]) is None
    for name, q in masked.items():
        assert q.weight.dtype == torch.int8 and pattern_of(q).block == (4, 1)
        assert bool((q.weight[~mask_of(q)] == 0).all()), name
    total = sum(q.weight.numel() for q in masked.values())
    assert abs(sum(int((q.weight == 0).sum()) for q in masked.values()) / total - 0.8) < 0.02


# --- report -----------------------------------------------------------------------------------

def test_a_layer_emptied_by_the_global_threshold_is_warned_about():
    rec = prune(options={"sparsity": 0.9}).report["prune_weights"]
    assert "conv (32, 16, 3, 3): 100.0% zeros" in " | ".join(rec.messages)
    assert len(rec.warnings) == 1 and "left conv with 99% or more" in rec.warnings[0]
    assert not prune(options={"sparsity": 0.9, "scope": "layer"}).report["prune_weights"].warnings


def test_report_shows_sparsity_and_compressed_bytes():
    opt = prune(options={"sparsity": 0.9, "scope": "layer"})
    rec = opt.report["prune_weights"]
    assert rec.status == "applied" and rec.exact is False
    assert set(rec.nodes_changed) == {"conv", "pw"}
    notes = " | ".join(rec.messages)
    assert "conv (32, 16, 3, 3): 90.0% zeros (4147 of 4608)" in notes
    assert "zeros: " in notes and "nonzero parameters: " in notes
    assert "compressed (CSR: fp32 values, int32 indices" in notes
    assert rec.bytes_after == rec.bytes_before  # stored dense; masks are not counted
    assert rec.params_after == rec.params_before
    pruned = sum(m.weight.numel() for m in layers(opt).values()) - sum(int(mask_of(m).sum()) for m in layers(opt).values())
    assert rec.params_masked_before == 0 and rec.params_masked_after == pruned == opt.report.final.params_masked
    data = json.loads(opt.report.to_json())
    jsonschema.validate(data, json.loads(resources.files("graphopt.report").joinpath("schema.json").read_text()))
    assert any("90.0% zeros" in m for m in data["records"][0]["messages"])
    assert data["records"][0]["params_masked_after"] == pruned
    nonzero = f"({human(rec.params_after - pruned)} nonzero)"
    assert nonzero in opt.report.to_text() and nonzero in opt.report.to_html()


def test_compressed_estimate():
    from graphopt.passes.prune_weights import compressed_bytes

    mask = torch.zeros(8, 10, dtype=torch.bool)
    mask[:4, :2] = True  # 8 values: CSR 8 * 4 + 8 * 4 + 9 * 4; BSR (4, 1): 2 blocks
    assert compressed_bytes(mask, 1) == 32 + 32 + 36
    assert compressed_bytes(mask, 4) == 2 * 4 * 4 + 2 * 4 + 3 * 4


# --- end to end -------------------------------------------------------------------------------

def test_zoo_model_through_the_pipeline_and_an_x86_compile_matches():
    model, inputs = zoo.build("mobilenetv2")
    data = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    opt = graphopt.optimize(model, ["fuse_conv_bn", ("prune_weights", {"sparsity": 0.8}), ("distill", {"epochs": 1}),
                                    "dce"], target="x86", example_inputs=inputs, calibration_data=data,
                            tune_trials=0, measure_latency=False, on_error="raise", progress=False)
    assert [r.status for r in opt.report.records][:3] == ["applied", "applied", "applied"]
    masked = layers(opt)
    assert masked and all(not name.startswith("features.0.") for name in masked)  # the stem
    assert all(m.groups == 1 for m in masked.values())  # depthwise left dense
    assert all(bool((m.weight[~mask_of(m)] == 0).all()) for m in masked.values())  # through distill
    ws = [m.weight for m in masked.values()]
    assert abs(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws) - 0.8) < 0.01
    with torch.no_grad():
        ref = opt.graph_module(*inputs)
        out = opt(*inputs)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4


def test_docs_example_runs(capsys):
    import os
    import re

    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "prune_weights.md")
    code, = re.findall(r"```python\n(.*?)```", open(path).read(), re.S)
    exec(compile(code, "prune_weights.md", "exec"), {})
    assert capsys.readouterr().out.strip() == re.search(r"# (\[.*\])", code).group(1)


def test_subclasses_stay_dense_and_a_second_pruning_keeps_the_first_zeros():
    class SameConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = net()
    model.conv = SameConv(16, 32, 3, padding=1)
    opt = prune(model, {"sparsity": 0.5}, leaf_modules=(SameConv,))  # a leaf: called as a module
    assert "conv" not in layers(opt)
    assert "conv (32, 16, 3, 3): kept dense: a subclass of Conv2d" in " | ".join(opt.report["prune_weights"].messages)
    twice = prune(passes=[("prune_weights", {"sparsity": 0.5, "block": 4}), ("prune_weights", {"sparsity": 0.6})])
    once = prune(options={"sparsity": 0.5, "block": 4})
    for name, m in layers(twice).items():
        assert bool((m.weight[layers(once)[name].weight == 0] == 0).all())
        assert pattern_of(m) == SparsityPattern()  # blocks AND unstructured: no structure left
