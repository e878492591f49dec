"""graphopt's sparse kernels: exact against PyTorch, chosen by timing, stored compressed.

The kernels are built in a few multi-branch models (one build per layer kind and batch size
holds every sparsity and block): a build is seconds on this machine, a kernel test should not be.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.sparsity import SparsityPattern, masked_layers, set_mask
from graphopt.targets.lowering import lower
from graphopt.targets.sparse import choice
from graphopt.targets.sparse.kernels import compress
from graphopt.targets.sparse.lowering import LayerSpec, SparsePlan

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

SPARSITIES = (0.5, 0.8, 0.95)
BLOCKS = (1, 4)


def rel_err(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def mask_randomly(layer: nn.Module, sparsity: float, block: int, seed: int) -> None:
    """A random ``(block, 1)`` mask with ``sparsity`` of the blocks pruned."""
    g = torch.Generator().manual_seed(seed)
    w = layer.weight
    blocks = torch.rand(w.shape[0] // block, *w.shape[1:], generator=g) >= sparsity
    set_mask(layer, blocks.repeat_interleave(block, dim=0), SparsityPattern(block=(block, 1)))


class Branches(nn.Module):
    """One masked layer per (sparsity, block), all on the same input; a tuple out."""

    def __init__(self, make):
        super().__init__()
        self.layers = nn.ModuleList()
        for i, (s, b) in enumerate((s, b) for s in SPARSITIES for b in BLOCKS):
            layer = make(b)
            mask_randomly(layer, s, b, seed=i)
            self.layers.append(layer)

    def forward(self, x):
        return tuple(layer(x) for layer in self.layers)


def out_channels(block: int) -> int:
    return 7 if block == 1 else 20  # odd where the block allows it


def build_forced(model, x, target="x86"):
    target = graphopt.get_target(target)
    gm = torch.fx.symbolic_trace(model.eval())
    plan = SparsePlan(choice.forced(True), lanes=target.preferred_channel_multiple, threads=target.runtime_threads)
    lowered = lower(gm, (x,), sparse=plan)
    prepared, database, info = target.tune(lowered, 0)
    return lowered, target.build(lowered, prepared, database, tuning=info)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind", ["linear", "conv1x1"])
def test_kernels_match_pytorch(kind, batch):
    torch.manual_seed(batch)
    if kind == "linear":
        model, x = Branches(lambda b: nn.Linear(13, out_channels(b))), torch.randn(batch, 13)
    else:
        model = Branches(lambda b: nn.Conv2d(13, out_channels(b), 1, bias=b == 1))
        x = torch.randn(batch, 13, 7, 5)
    lowered, compiled = build_forced(model, x)
    with compiled:
        assert [r["kernel"] for r in lowered.sparse_layers] == ["sparse"] * len(model.layers)
        assert "bsr_" in compiled.ir()
        assert not any(s.name.endswith("weight") for s in lowered.param_specs)  # only the compressed form
        for got, want in zip(compiled(x), model(x)):
            assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("size", [(3, 3), (7, 7)])  # fewer pixels than a vector; a tile overlapping the last
def test_conv_on_small_images(size):
    model = nn.Sequential(nn.Conv2d(24, 16, 1))
    mask_randomly(model[0], 0.8, 4, seed=3)
    x = torch.randn(1, 24, *size)
    _, compiled = build_forced(model, x)
    with compiled:
        assert rel_err(compiled(x), model(x)) < 1e-4


def test_linear_on_a_3d_input():
    model = nn.Sequential(nn.Linear(13, 8, bias=False))
    mask_randomly(model[0], 0.7, 4, seed=5)
    x = torch.randn(2, 3, 13)
    _, compiled = build_forced(model, x)
    with compiled:
        assert rel_err(compiled(x), model(x)) < 1e-4


def test_compress_round_trip_and_bytes():
    w = np.random.default_rng(0).standard_normal((12, 10)).astype("float32")
    w[np.random.default_rng(1).random((12, 10)) < 0.8] = 0
    for block in (1, 4):
        c = compress(w, block)
        np.testing.assert_array_equal(c.dense(), w)
        assert c.nbytes < c.dense_bytes
    with pytest.raises(ValueError, match="does not divide"):
        compress(w, 5)


def test_ineligible_layers_stay_dense_with_the_reason():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1, stride=2))
    for layer in model:
        mask_randomly(layer, 0.9, 1, seed=0)
    x = torch.randn(1, 8, 6, 6)
    lowered = lower(torch.fx.symbolic_trace(model.eval()), (x,), sparse=SparsePlan(choice.forced(True)))
    assert [r["kernel"] for r in lowered.sparse_layers] == ["dense", "dense"]
    assert all("1x1 stride-1" in r["reason"] for r in lowered.sparse_layers)


class Net(nn.Module):
    """A 1x1 conv and a large linear: both worth running sparse at 90%."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.pw = nn.Conv2d(32, 64, 1)
        self.fc = nn.Linear(64 * 8 * 8, 512)
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        y = torch.relu(self.pw(torch.relu(self.stem(x))))
        return self.head(torch.relu(self.fc(y.flatten(1))))


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    choice.clear_decisions()
    opt = graphopt.optimize(Net(), [("prune_weights", {"sparsity": 0.9, "scope": "layer"})], "x86",
                            example_inputs=(x,), progress=False, measure_latency=False)
    yield opt, x
    opt.compiled.close()


def test_end_to_end_matches_the_pruned_model_and_records_decisions(pruned):
    opt, x = pruned
    assert rel_err(opt.compiled(x), opt.graph_module(x)) < 1e-4
    layers = {r["name"]: r for r in opt.compiled.summary()["sparse_layers"]}
    assert sorted(layers) == sorted(masked_layers(opt.graph_module)) == ["fc", "pw"]
    for r in layers.values():
        assert r["kernel"] in ("sparse", "dense") and r["dense_ms"] > 0 and r["sparse_ms"] > 0
        assert "untuned dense" in r["reason"] and r["sparsity"] == pytest.approx(0.9, abs=0.01)
        assert r["kernel"] == "dense" or "whole model" in r["reason"]  # checked against the dense build
    # the 512 x 4096 linear at 90% reads a fifth of the dense bytes: sparse wins by far
    assert layers["fc"]["kernel"] == "sparse" and layers["fc"]["stored_bytes"] < layers["fc"]["dense_bytes"] / 4
    assert opt.compiled.manifest["sparse_layers"] == list(layers.values())
    assert "masked layers on sparse kernels" in opt.compiled.summary()["sparse"]
    assert opt.report.compile["sparse_layers"] == list(layers.values())
    assert "masked fc (linear, 90% zeros, block 1): sparse kernel" in opt.report.to_text()


def test_a_tuned_compile_compares_with_the_tuned_dense_layer(tmp_path):
    """With tune_trials, each masked layer's dense variant is tuned (a few trials, the target's
    cache) before it is timed against the sparse kernel: the choice is against the kernel the
    model would run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    x = torch.randn(1, 256)
    target = graphopt.get_target("x86").replace(cache_dir=str(tmp_path / "cache"))
    opt = graphopt.optimize(model, [("prune_weights", {"sparsity": 0.9, "scope": "layer", "prune_last": True,
                                                       "prune_first": True})],
                            target, example_inputs=(x,), progress=False, measure_latency=False, tune_trials=4)
    try:
        records = opt.compiled.summary()["sparse_layers"]
        assert records and all("tuned dense (4 trials)" in r["reason"] for r in records), records
        assert rel_err(opt.compiled(x), opt.graph_module(x)) < 1e-4
    finally:
        opt.compiled.close()


def test_decisions_are_cached_by_shape_and_pattern(pruned, monkeypatch):
    opt, x = pruned
    monkeypatch.setattr(choice, "time_layer", lambda *a, **k: pytest.fail("timed again"))
    again = graphopt.get_target("x86").lower(opt.graph_module, (x,))
    assert [r["kernel"] for r in again.sparse_layers] == [r["kernel"] for r in opt.compiled.manifest["sparse_layers"]]


def test_the_dense_time_of_a_shape_is_measured_once(monkeypatch):
    """Layers of one shape with different zeros (MobileNetV2's repeated blocks) get one dense
    timing between them, and a sparse timing each."""
    choice.clear_decisions()
    calls = []

    def fake_time(target, spec, sparse, **kw):
        calls.append((spec.name, sparse))
        return 1.0 if sparse else 2.0

    monkeypatch.setattr(choice, "time_layer", fake_time)
    decide = choice.policy_for(graphopt.get_target("x86"))
    specs = []
    for name, sparsity in (("a", 0.8), ("b", 0.9)):
        torch.manual_seed(0)
        layer = nn.Conv2d(32, 64, 1)
        w = layer.weight.detach()
        keep = w.abs() > w.abs().flatten().kthvalue(int(sparsity * w.numel())).values
        packed = compress((w * keep).reshape(64, -1).numpy(), 1)
        specs.append(LayerSpec(name, "conv1x1", (1, 32, 8, 8), (64, 32, 1, 1), 1, packed.blocks, sparsity, layer))
    assert [decide(s)[0] for s in specs] == [True, True]
    assert calls == [("a", False), ("a", True), ("b", True)]
    choice.clear_decisions()


def test_artifact_is_smaller_and_round_trips(pruned, tmp_path):
    opt, x = pruned
    dense = graphopt.get_target("x86").compile(torch.fx.symbolic_trace(Net().eval()), (x,))

    def size(d):
        return sum(f.stat().st_size for f in d.iterdir())

    with dense:
        dense_dir = dense.save(tmp_path / "dense")
    sparse_dir = opt.compiled.save(tmp_path / "sparse")
    assert size(sparse_dir) < 0.5 * size(dense_dir)
    with graphopt.load(sparse_dir) as again:
        assert rel_err(again(x), opt.graph_module(x)) < 1e-4
        assert json.loads((sparse_dir / "manifest.json").read_text())["sparse_layers"] == again.manifest["sparse_layers"]


def test_a_pruned_model_built_dense_still_saves_a_small_artifact(monkeypatch, tmp_path):
    """Layers kept dense (sparse timed slower) keep their zeros: the weights are stored deflated,
    so the artifact shrinks with the sparsity anyway, and it loads back to the same outputs."""
    choice.clear_decisions()
    monkeypatch.setattr(choice, "time_layer", lambda target, spec, sparse, **kw: 2.0 if sparse else 1.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 256, 1), nn.ReLU(),
                          nn.Conv2d(256, 256, 1), nn.ReLU(), nn.Conv2d(256, 8, 1)).eval()
    x = torch.randn(1, 3, 12, 12)
    sizes = {}
    for sparsity in (0.0, 0.9):
        passes = [("prune_weights", {"sparsity": sparsity, "scope": "layer"})] if sparsity else []
        opt = graphopt.optimize(model, passes, "x86", example_inputs=(x,), progress=False, measure_latency=False)
        try:
            assert all(r["kernel"] == "dense" for r in opt.compiled.manifest.get("sparse_layers") or [])
            path = opt.compiled.save(tmp_path / f"m{sparsity}")
            sizes[sparsity] = (path / "params.npz").stat().st_size
            again = graphopt.load(path)
            assert torch.equal(torch.as_tensor(again(x)), torch.as_tensor(opt.compiled(x)))
            again.close()
        finally:
            opt.compiled.close()
    assert sizes[0.9] < 0.3 * sizes[0.0], sizes
    choice.clear_decisions()


def test_a_whole_model_slower_with_sparse_layers_is_built_dense(monkeypatch):
    import types

    from graphopt.targets import lowering as lowering_module
    from graphopt.targets.target import Target

    class Built:
        def __init__(self, ms, layers=()):
            self.ms, self.closed, self.layers = ms, False, list(layers)

        manifest = property(lambda self: {"sparse_layers": self.layers})
        benchmark = lambda self, repeat, warmup: types.SimpleNamespace(median_ms=self.ms)  # noqa: E731

        def close(self):
            self.closed = True

        def set_sparse_layers(self, layers):
            self.layers = layers

    record = {"name": "fc", "kernel": "sparse", "reason": "faster alone", "dense_bytes": 100, "stored_bytes": 20}
    sparse, dense = Built(2.0, [record]), Built(1.0)
    monkeypatch.setattr(lowering_module, "lower", lambda *a, **k: None)
    monkeypatch.setattr(Target, "tune", lambda self, *a, **k: (None, None, None))
    monkeypatch.setattr(Target, "build", lambda self, *a, **k: dense)
    target = graphopt.get_target("x86").replace(layout_block=0)  # two variants: sparse and dense
    assert choice.check_whole_model(target, None, (), sparse) is dense and sparse.closed
    (r,) = dense.manifest["sparse_layers"]
    assert r["kernel"] == "dense" and r["stored_bytes"] == 100
    assert "2.000 ms with the sparse layers, 1.000 ms all dense: the dense build is kept" in r["reason"]


def test_arm_under_qemu_keeps_dense_with_the_reason(pruned):
    opt, x = pruned
    lowered = graphopt.get_target("arm-rpi4").lower(opt.graph_module, (x,))
    assert {r["kernel"] for r in lowered.sparse_layers} == {"dense"}
    assert all("qemu" in r["reason"] for r in lowered.sparse_layers)
    assert "bsr_" not in lowered.mod.script(show_meta=False)


@pytest.mark.parametrize("module", [choice, __import__("graphopt.targets.sparse.kernels", fromlist=["x"])])
def test_docstring_examples(module):
    import doctest

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
