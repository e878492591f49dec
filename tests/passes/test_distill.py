"""distill: knowledge distillation from the model before the lossy passes, after pruning."""
import copy

import pytest
import torch
import torch.nn as nn

import graphopt
import zoo


pytestmark = pytest.mark.usefixtures("one_thread")


def data(n=6, batch=16, shape=(3, 32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=g) for _ in range(n)]


def run(passes, model=None, calibration=None, **kw):
    model = model if model is not None else zoo.build("residual")[0]
    calibration = calibration if calibration is not None else data()
    return graphopt.optimize(model, passes, example_inputs=(calibration[0][:2],), calibration_data=calibration,
                             on_error="raise", progress=False, **kw)


def kd_error(student, teacher, batches):
    with torch.no_grad():
        return sum(float((student(b) - teacher(b)).pow(2).mean()) for b in batches) / len(batches)


def test_distill_brings_the_pruned_model_back_towards_the_teacher():
    model = zoo.build("residual")[0]
    held_out = data(2, seed=99)
    pruned = run([("prune_channels", {"ratio": 0.5})], model)
    distilled = run([("prune_channels", {"ratio": 0.5}), ("distill", {"epochs": 3, "lr": 3e-3})], model)
    rec = distilled.report["distill"]
    assert rec.status == "applied"
    before, after = kd_error(pruned.graph_module, model, held_out), kd_error(distilled.graph_module, model, held_out)
    assert after < 0.5 * before, (before, after)
    assert not distilled.graph_module.training
    assert all(not m.training for m in distilled.graph_module.modules())
    assert "distilled from the model before the lossy passes: 3 epoch(s) x 6 batches" in rec.messages[-1]
    assert rec.params_after == rec.params_before  # training changes values, not sizes


def test_teacher_is_the_reference_and_is_not_modified():
    model, x = zoo.build("residual")
    gm = graphopt.capture(model, x)
    ctx = graphopt.PassContext(example_inputs=x, calibration_data=[(b,) for b in data(2)])
    state = copy.deepcopy(gm.state_dict())
    out = graphopt.PassManager([("prune_channels", {"ratio": 0.5}), ("distill", {"epochs": 1})],
                               on_error="raise").run(gm, ctx)
    assert ctx.reference is not gm and ctx.reference.code == gm.code  # a copy of the graph before the first lossy pass
    for teacher in (gm, ctx.reference):
        for k, v in teacher.state_dict().items():
            assert torch.equal(v, state[k]), k
    assert out is not gm and not gm.training


def test_deterministic_per_seed_and_global_rng_untouched():
    model = zoo.build("residual")[0]
    passes = [("prune_channels", {"ratio": 0.5}), ("distill", {"epochs": 1, "batch_size": 8})]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = run(passes, model).graph_module.state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = run(passes, model).graph_module.state_dict()
    c = run(passes, model, seed=1).graph_module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def bn_stats(gm):
    return {n: m.running_mean.clone() for n, m in gm.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.mark.parametrize("bn, changes", [("frozen", False), ("train", True)])
def test_batchnorm_modes(bn, changes):
    model = zoo.build("residual")[0]
    ref = bn_stats(run([("prune_channels", {"ratio": 0.5})], model).graph_module)
    opt = run([("prune_channels", {"ratio": 0.5}), ("distill", {"epochs": 1, "bn": bn})], model,
              calibration=data(3, 8))
    got = bn_stats(opt.graph_module)
    changed = any(not torch.equal(ref[k], got[k]) for k in ref)
    assert changed == changes
    assert ("BatchNorm frozen" in opt.report["distill"].messages[-1]) == (not changes)


def test_train_data_option_with_labels_and_a_generator():
    model = zoo.build("conv1d")[0]
    x = torch.randn(2, 4, 64)
    pairs = ((torch.randn(8, 4, 64), torch.randint(0, 5, (8,))) for _ in range(3))  # labels are ignored
    opt = graphopt.optimize(model, [("prune_channels", {}), ("distill", {"epochs": 2, "train_data": pairs})],
                            example_inputs=(x,), on_error="raise", progress=False)
    assert "2 epoch(s) x 3 batches" in opt.report["distill"].messages[-1]


def test_mse_for_outputs_without_classes_and_kl_for_maps():
    from graphopt.passes.distill import kd_loss
    s, t = torch.randn(4, 1), torch.randn(4, 1)
    assert torch.allclose(kd_loss(s, t, 4.0, "auto"), ((s - t) ** 2).mean())
    seg = torch.randn(2, 3, 5, 5)
    assert float(kd_loss(seg, seg, 2.0, "auto")) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(seg, torch.randn(2, 3, 5, 5), 2.0, "kl")) > 0
    opt = run([("prune_channels", {}), ("distill", {"epochs": 1})], zoo.build("unet")[0])
    assert opt.report["distill"].status == "applied"


def test_progress_bar_counts_every_step():
    calls = []

    class Bar:
        def __init__(self, iterable=None, **kw):
            calls.append(kw)
            self.n = 0

        def update(self, k):
            self.n += k

        def close(self):
            calls.append(self.n)

    model, x = zoo.build("residual")
    gm = graphopt.capture(model, x)
    ctx = graphopt.PassContext(example_inputs=x, calibration_data=[(b,) for b in data(3)], progress=Bar)
    graphopt.PassManager([("distill", {"epochs": 2})], on_error="raise").run(gm, ctx)
    assert calls == [{"total": 6, "desc": "distill", "unit": "batch"}, 6]


def test_missing_data_fails_before_any_pass_runs():
    model, x = zoo.build("residual")
    with pytest.raises(graphopt.MissingInputError, match="distill needs input batches"):
        graphopt.optimize(model, ["prune_channels", "distill"], example_inputs=x)
    with pytest.raises(graphopt.PassOptionError, match="train_data must be an iterable"):
        graphopt.optimize(model, [("distill", {"train_data": torch.randn(2, 3, 32, 32)})], example_inputs=x)
    for bad in ({"epochs": 0}, {"lr": 0}, {"temperature": -1}, {"loss": "l1"}):
        with pytest.raises(graphopt.PassOptionError):
            graphopt.optimize(model, [("distill", bad)], example_inputs=x, calibration_data=data(1))


def test_distill_is_ordered_after_pruning():
    model = zoo.build("residual")[0]
    opt = run([("distill", {"epochs": 1}), ("prune_channels", {"ratio": 0.5})], model)
    assert [r.name for r in opt.report.records] == ["prune_channels", "distill"]


def test_docstring_examples():
    import doctest
    from graphopt.passes import distill

    result = doctest.testmod(distill, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
