"""The latency-budget search (issue 15): Budget's checks, the search on a fake target whose
latency is known (deterministic: budget reached, max_drop kept, every step recorded, timings
reused; with int8 allowed, a budget channel cuts alone do not reach), the search on x86 untuned
(a real target in the loop, fp32 and with int8), and the report's plot."""
import copy
import json
import pathlib

import jsonschema
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.analysis.signature import structure_signature
from graphopt.passes.latency_search import STOPS, kept_levels
from graphopt.passes.quant.modules import QuantizedConv, QuantizedLinear

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMA = json.loads((pathlib.Path(graphopt.__file__).parent / "report" / "schema.json").read_text())


class FakeTarget:
    """Latency = MACs / 1e6 ms, plus 20% for any conv whose channel counts break the lanes: a
    target whose every timing is known, counted by structure."""

    name = "fake"
    preferred_channel_multiple = 4
    emulated = False

    def __init__(self):
        self.timed = []

    def compile(self, gm, example_inputs, **kwargs):
        return gm

    def measure_latency(self, gm, example_inputs):
        self.timed.append(structure_signature(gm, example_inputs))
        ms = graphopt.count_macs(gm) / 1e6
        odd = any(isinstance(m, nn.Conv2d) and m.out_channels % 4 for m in gm.modules())
        return ms * (1.2 if odd else 1.0)


class Emulated(FakeTarget):
    name = "board-under-qemu"
    emulated = True


def is_int8(gm):
    return any(isinstance(m, (QuantizedConv, QuantizedLinear)) for m in gm.modules())


class Int8Target(FakeTarget):
    """FakeTarget whose int8 graphs run 2.5x faster (their MACs at 0.4 ms per million)."""

    name = "fake-int8"

    def measure_latency(self, gm, example_inputs):
        if not is_int8(gm):
            return super().measure_latency(gm, example_inputs)
        gm = copy.deepcopy(gm)
        graphopt.propagate_shapes(gm, example_inputs)  # the quantized graph's shapes, for its MACs
        return 0.4 * super().measure_latency(gm, example_inputs)


class NoInt8Lowering(FakeTarget):
    def check_graph(self, gm, example_inputs):
        if is_int8(gm):
            raise graphopt.TargetError("no translation for QuantizedConv")


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def data_for(model, shape=(3, 16, 16)):
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, *shape, generator=g) for _ in range(3)]
    fixed = torch.randn(64, *shape, generator=g)
    with torch.no_grad():
        labels = model(fixed).argmax(1)

    def agreement(m):  # a real eval: agreement with the original model's top-1 on a fixed batch
        with torch.no_grad():
            return float((m(fixed).argmax(1) == labels).float().mean())

    return (torch.randn(1, *shape, generator=g),), batches, agreement


def search_of(opt):
    return opt.report["latency_search"].data["search"]


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one"),
    ({"latency": 0.5, "latency_ms": 3.0}, "exactly one"),
    ({"latency": 1.5}, "strictly between 0 and 1"),
    ({"latency": 0.0}, "strictly between 0 and 1"),
    ({"latency_ms": -1.0}, "latency_ms must be > 0"),
    ({"latency": "half"}, "finite number"),
    ({"latency": 0.5, "max_drop": -0.1}, "max_drop"),
    ({"latency": 0.5, "step": 1.0}, "step"),
    ({"latency": 0.5, "max_steps": 0}, "max_steps"),
    ({"latency": 0.5, "recovery_batches": -1}, "recovery_batches"),
    ({"latency": 0.5, "final_recovery": 1.5}, "final_recovery"),
    ({"latency": 0.5, "recovery_lr": 0}, "recovery_lr"),
    ({"latency": 0.5, "compare_uniform": "yes"}, "compare_uniform"),
    ({"latency": 0.5, "compare_macs": 1}, "compare_macs"),
    ({"latency": 0.5, "int8": "yes"}, "int8"),
])
def test_budget_fields_are_checked_when_made(kwargs, match):
    with pytest.raises(graphopt.errors.InvalidArgumentError, match=match):
        graphopt.Budget(**kwargs)


class Untraceable(nn.Module):
    """Fails the moment graphopt does any work with it (capture runs forward)."""

    def forward(self, x):
        raise AssertionError("the model was run: the argument error came too late")


@pytest.mark.parametrize("target,extra,match", [
    (None, {}, "needs a target to measure latency on"),
    (Emulated(), {}, "qemu emulation.*rpc= or tracker="),
    ("arm", {}, "qemu emulation"),   # the preset runs under qemu on this host
    (FakeTarget(), {"eval_fn": None}, "needs eval_fn"),
    (FakeTarget(), {"calibration_data": None}, "needs input batches"),
    (FakeTarget(), {"budget": 0.5}, "must be a graphopt.Budget"),
    (FakeTarget(), {"calibration_data": None, "budget": graphopt.Budget(latency=0.5, int8=True, recovery_batches=0,
                                                                         final_recovery=0)},
     r"int8=True\) quantizes.*calibration_data"),
])
def test_budget_against_the_call_is_refused_before_any_work(target, extra, match):
    x = torch.randn(1, 3, 8, 8)
    kwargs = dict(example_inputs=(x,), calibration_data=[x], eval_fn=lambda m: 1.0,
                  budget=graphopt.Budget(latency=0.5, max_drop=0.01), progress=False)
    kwargs.update(extra)
    with pytest.raises(graphopt.errors.InvalidArgumentError, match=match):
        graphopt.optimize(Untraceable(), [], target, **kwargs)


def test_the_pass_named_directly_checks_its_budget_too():
    model = convnet()
    x, batches, _ = data_for(model)
    with pytest.raises(graphopt.errors.InvalidArgumentError, match="qemu"):
        graphopt.optimize(model, [("latency_search", {"budget": graphopt.Budget(latency=0.5)})], Emulated(),
                          example_inputs=x, calibration_data=batches, progress=False)


# --------------------------------------------------------------------------------------------
# The search, on a target whose latencies are known
# --------------------------------------------------------------------------------------------

def test_search_reaches_the_budget_within_max_drop_and_records_every_step():
    model = convnet()
    before = copy.deepcopy(model.state_dict())
    x, batches, agreement = data_for(model)
    target = FakeTarget()
    opt = graphopt.optimize(model, ["fuse_conv_bn"], target, example_inputs=x, calibration_data=batches,
                            eval_fn=agreement, progress=False,
                            budget=graphopt.Budget(latency=0.6, max_drop=0.1, step=0.15,
                                                   recovery_batches=1, final_recovery=1, compare_uniform=True,
                                                   compare_macs=True))
    s = search_of(opt)
    assert s["stopped"] == "budget", s["stop_reason"]
    again = target.measure_latency(opt.graph_module, x)   # measured again, on the final graph
    assert again <= s["target_ms"] == pytest.approx(0.6 * s["start"]["latency_ms"])
    assert s["final"]["latency_ms"] == pytest.approx(again) == pytest.approx(s["final"]["retimed_ms"])
    # the report's timing of the result is the search's (one timing cache per run), not a new one
    assert opt.report["latency_search"].latency_ms_after == s["final"]["latency_ms"]
    assert opt.report["latency_search"].latency_ms_before == s["start"]["latency_ms"]
    assert s["final"]["accuracy"] >= s["start"]["accuracy"] - 0.1
    assert opt.report.final.accuracy == pytest.approx(s["final"]["accuracy"])
    # every step: what changed, the latency measured, its accuracy; in the JSON, the text and the HTML
    kept = [st["chosen"] for st in s["steps"] if st["chosen"]]
    assert kept and all(c["channels_after"] < c["channels_before"] and c["channels_after"] % 4 == 0
                        for c in kept)
    lat = [s["start"]["latency_ms"]] + [c["latency_ms"] for c in kept]
    assert lat == sorted(lat, reverse=True)
    assert all(c["accuracy"] is not None and c["probes"] >= 1 for st in s["steps"] for c in st["candidates"])
    jsonschema.validate(json.loads(opt.report.to_json()), SCHEMA)
    text = opt.report.to_text()
    assert "latency search:" in text and f"{kept[0]['channels_before']}->{kept[0]['channels_after']}" in text
    page = opt.report.to_html()
    assert 'class="search-plot"' in page and page.count('class="step"') == len(kept) + 1
    assert 'class="final"' in page and 'class="budget"' in page
    # uniform-ratio pruning, measured on the target, bisected towards the search's final latency
    assert s["uniform"] and page.count('class="uniform"') == len(s["uniform"])
    assert any(u["latency_ms"] <= s["final"]["latency_ms"] for u in s["uniform"])
    assert all(u["latency_ms"] == pytest.approx(target.measure_latency(
        graphopt.optimize(model, [("prune_channels", {"ratio": u["ratio"], "round_to": 4})], example_inputs=x,
                          progress=False).graph_module, x)) for u in s["uniform"][:1])
    # MAC-budget pruning (target_macs: the fraction of MACs kept), bisected the same way: each
    # probe is the midpoint left by the ones before it, moving up when it was at or under
    final_ms, lo, hi = s["final"]["latency_ms"], 0.0, 1.0
    by_value = {m["target_macs"]: m for m in s["macs"]}
    assert len(by_value) == len(s["macs"]) == 4
    for _ in s["macs"]:
        m = by_value[(lo + hi) / 2]
        lo, hi = (m["target_macs"], hi) if m["latency_ms"] <= final_ms else (lo, m["target_macs"])
    assert any(m["latency_ms"] <= final_ms for m in s["macs"])
    assert all(m["accuracy"] is not None and m["macs"] > 0 for m in s["macs"])
    m = s["macs"][0]
    pruned = graphopt.optimize(model, ["fuse_conv_bn", ("prune_channels", {"target_macs": m["target_macs"],
                                                                            "round_to": 4})],
                               example_inputs=x, progress=False).graph_module
    assert m["latency_ms"] == pytest.approx(target.measure_latency(pruned, x))
    full = graphopt.count_macs(graphopt.optimize(model, ["fuse_conv_bn"], example_inputs=x, progress=False).graph_module)
    assert m["macs"] == graphopt.count_macs(pruned) <= m["target_macs"] * full
    assert f"target_macs {s['macs'][-1]['target_macs']:.3g}: " in text
    assert page.count('class="macs"') == len(s["macs"]) and "target_macs pruning" in page
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[0].out_channels == 32


def test_search_stops_before_exceeding_max_drop():
    """An eval that loses a point per channel cut: the accuracy budget ends the search."""
    model = convnet()
    x, batches, _ = data_for(model)
    full = graphopt.count_params(model)

    def kept_fraction(m):
        return graphopt.count_params(m) / full

    opt = graphopt.optimize(model, [], FakeTarget(), example_inputs=x, calibration_data=batches,
                            eval_fn=kept_fraction, progress=False,
                            budget=graphopt.Budget(latency=0.2, max_drop=0.3, recovery_batches=0, final_recovery=0))
    s = search_of(opt)
    assert s["stopped"] == "max_drop", s["stop_reason"]
    assert s["final"]["accuracy"] >= s["start"]["accuracy"] - 0.3
    assert s["steps"][-1]["chosen"] is None and s["steps"][-1]["candidates"]
    assert all(c["accuracy"] < s["start"]["accuracy"] - 0.3 for c in s["steps"][-1]["candidates"])
    warnings = opt.report["latency_search"].warnings
    assert warnings and "not reached" in warnings[0] and STOPS["max_drop"] in warnings[0]


def test_each_structure_is_timed_once_and_a_budget_already_met_changes_nothing():
    model = convnet()
    x, batches, agreement = data_for(model)
    target = FakeTarget()
    opt = graphopt.optimize(model, [], target, example_inputs=x, calibration_data=batches, progress=False,
                            budget=graphopt.Budget(latency=0.7, max_steps=2, recovery_batches=1, final_recovery=0))
    s = search_of(opt)
    # every structure timed once through the run's cache; the result once more, on purpose
    assert len(set(target.timed)) == s["timings"]["measured"] == len(target.timed) - 1
    assert target.timed[-1] in target.timed[:-1]
    assert s["timings"]["reused"] >= 1   # the report's timing of the graph before, and the final graph
    assert s["start"]["accuracy"] is None and s["final"]["error"] is not None  # no eval_fn: output error
    # a budget in milliseconds the model already meets: nothing is cut
    met = graphopt.optimize(model, [], FakeTarget(), example_inputs=x, calibration_data=batches,
                            progress=False, budget=graphopt.Budget(latency_ms=1e3))
    assert search_of(met)["stopped"] == "budget" and not search_of(met)["steps"]
    assert met.report["latency_search"].status == "no-op"


# --------------------------------------------------------------------------------------------
# int8 allowed: the int8 form of the current graph, timed and judged at every step
# --------------------------------------------------------------------------------------------

def int8_search(model, target, int8, eval_fn=None, **budget):
    x, batches, agreement = data_for(model)
    kwargs = dict(latency=0.3, max_drop=0.2, step=0.15, max_steps=2, recovery_batches=1, final_recovery=1)
    kwargs.update(budget)
    return graphopt.optimize(model, ["fuse_conv_bn"], target, example_inputs=x, calibration_data=batches,
                             eval_fn=eval_fn or agreement, progress=False,
                             budget=graphopt.Budget(int8=int8, **kwargs))


def test_int8_reaches_a_budget_channel_cuts_alone_do_not():
    model = convnet()
    x, _, _ = data_for(model)
    fp32 = search_of(int8_search(model, Int8Target(), False))
    assert fp32["stopped"] == "max_steps" and fp32["final"]["latency_ms"] > fp32["target_ms"]
    assert "int8" not in fp32 and all("int8" not in st for st in fp32["steps"])  # reports as before
    target = Int8Target()
    opt = int8_search(model, target, True, compare_uniform=True, compare_macs=True)
    s = search_of(opt)
    assert s["stopped"] == "budget", s["stop_reason"]
    assert s["int8"]["taken"] and "meets the budget" in s["int8"]["why"]
    assert len(s["steps"]) <= 2 and all(st["int8"]["latency_ms"] < st["chosen"]["latency_ms"] for st in s["steps"])
    # the result is the int8 graph (graphopt's integer ops), and meets the budget measured again
    assert is_int8(opt.graph_module)
    assert "torch.ops.graphopt.q8_conv" in str(torch.export.export(opt.graph_module, x).graph_module.code)
    assert target.measure_latency(opt.graph_module, x) <= s["target_ms"] < fp32["final"]["latency_ms"]
    assert s["final"]["latency_ms"] == s["steps"][-1]["int8"]["latency_ms"]
    assert s["final"]["accuracy"] >= s["start"]["accuracy"] - 0.2
    # the fp32 cuts aim at the latency where the int8 form meets the budget, not at the budget
    assert s["steps"][-1]["aim_ms"] > s["target_ms"]
    # both baselines are quantized too, as the result was (int8 takes 0.4x the latency of its MACs)
    assert s["uniform"] and all(u["latency_ms"] < fp32["start"]["latency_ms"] * 0.5 for u in s["uniform"])
    assert s["macs"] and all(m["latency_ms"] == pytest.approx(0.4 * m["macs"] / 1e6) for m in s["macs"])
    jsonschema.validate(json.loads(opt.report.to_json()), SCHEMA)
    record = opt.report["latency_search"]
    assert any(m.startswith("int8 taken:") for m in record.messages)
    assert "int8 ms" in opt.report.to_text()
    assert opt.report.to_html().count('class="int8"') == len(s["steps"]) + 1


def test_int8_over_max_drop_is_not_taken_and_fp32_within_the_budget_needs_none():
    model = convnet()
    _, _, agreement = data_for(model)

    def int8_loses(m):  # int8 costs half the accuracy: never within max_drop
        return agreement(m) - (0.5 if is_int8(m) else 0.0)

    fp32 = search_of(int8_search(model, Int8Target(), False, eval_fn=int8_loses))
    opt = int8_search(model, Int8Target(), True, eval_fn=int8_loses)
    s = search_of(opt)
    assert not s["int8"]["taken"] and "max_drop" in s["int8"]["why"] and not is_int8(opt.graph_module)
    assert s["final"]["accuracy"] >= s["start"]["accuracy"] - 0.2
    assert all(st["int8"]["accuracy"] < s["start"]["accuracy"] - 0.2 for st in s["steps"] if st["chosen"])
    # no int8 credit: the fp32 cuts go exactly as without int8
    assert [st["aim_ms"] for st in s["steps"]] == [st["aim_ms"] for st in fp32["steps"]]
    assert s["final"]["latency_ms"] == fp32["final"]["latency_ms"]
    # a budget the fp32 graph already meets: int8 is measured, not taken
    met = search_of(int8_search(model, Int8Target(), True, latency=None, latency_ms=1e3))
    assert met["stopped"] == "budget" and not met["steps"] and not met["int8"]["taken"]
    assert "without it" in met["int8"]["why"]


def test_short_of_the_budget_the_fastest_int8_form_within_max_drop_is_returned():
    """int8 fits on the uncut graph only: the fp32 cuts go on, then the start's int8 form wins."""
    model = convnet()
    _, _, agreement = data_for(model)
    full = graphopt.count_params(model)

    def int8_of_a_cut_loses(m):
        cut = graphopt.count_params(m) < 0.99 * full
        return agreement(m) - (0.5 if is_int8(m) and cut else 0.0)

    opt = int8_search(model, Int8Target(), True, eval_fn=int8_of_a_cut_loses, latency=0.1)
    s = search_of(opt)
    assert s["stopped"] == "max_steps" and any(st["chosen"] for st in s["steps"])
    assert s["int8"]["taken"] and s["int8"]["step"] == 0 and "short of the budget" in s["int8"]["why"]
    assert is_int8(opt.graph_module) and graphopt.count_params(opt.graph_module) >= 0.99 * full
    assert s["final"]["latency_ms"] == s["int8"]["start"]["latency_ms"]
    assert s["final"]["latency_ms"] < min(st["chosen"]["latency_ms"] for st in s["steps"] if st["chosen"])
    assert s["final"]["accuracy"] >= s["start"]["accuracy"] - 0.2
    assert any("not reached" in w for w in opt.report["latency_search"].warnings)


def test_int8_on_a_target_that_cannot_lower_it_is_refused_before_any_timing():
    model = convnet()
    target = NoInt8Lowering()
    with pytest.raises(graphopt.TargetError, match="cannot lower graphopt's int8 ops.*leave int8 out"):
        int8_search(model, target, True)
    assert target.timed == []


def test_groups_round_to_the_targets_multiple():
    model = convnet()
    x, _, _ = data_for(model)
    gm = graphopt.capture(model, x)
    groups = {g.producers()[0]: g for g in graphopt.analyze_channels(gm).prunable_groups()}
    assert kept_levels(groups["0"], 8) == [24, 16, 8]
    assert kept_levels(groups["0"], 16) == [16]


# --------------------------------------------------------------------------------------------
# x86, untuned: the real target in the loop
# --------------------------------------------------------------------------------------------

def test_search_on_x86_untuned_stops_at_the_budget_or_says_why():
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    x, batches, agreement = data_for(model, (3, 24, 24))
    target = graphopt.get_target("x86").replace(num_threads=1)
    opt = graphopt.optimize(model, [], target, example_inputs=x, calibration_data=batches,
                            eval_fn=agreement, progress=False, tune_trials=0,
                            budget=graphopt.Budget(latency=0.75, max_drop=0.5, step=0.25, max_steps=2,
                                                   recovery_batches=1, final_recovery=1))
    s = search_of(opt)
    record = opt.report["latency_search"]
    assert s["stopped"] in STOPS and STOPS[s["stopped"]] in "\n".join(record.messages)
    again = graphopt.capabilities_of(target).time(opt.graph_module, x, 0)  # timed anew, not reused
    if s["steps"] and any(st["chosen"] for st in s["steps"]):
        assert s["final"]["retimed_ms"] > 0   # the search timed its result once more, too
    if s["stopped"] == "budget":
        # the search's timing and this one differ only by the machine's noise
        noise = max(again.spread_ms, s["final"]["spread_ms"] or 0.0)
        assert again.median_ms <= s["target_ms"] + noise + 0.1 * s["target_ms"]
    else:
        assert any("not reached" in w for w in record.warnings)
    assert s["final"]["accuracy"] >= s["start"]["accuracy"] - 0.5
    assert all(st["candidates"] or st["skipped"] for st in s["steps"])
    jsonschema.validate(json.loads(opt.report.to_json()), SCHEMA)


def test_int8_search_on_x86_untuned_lowers_and_times_the_int8_form():
    """The x86 target's check_graph takes the quantized graph, and its int8 form is timed."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    x, batches, agreement = data_for(model, (3, 16, 16))
    target = graphopt.get_target("x86").replace(num_threads=1)
    opt = graphopt.optimize(model, [], target, example_inputs=x, calibration_data=batches, eval_fn=agreement,
                            progress=False, tune_trials=0,
                            budget=graphopt.Budget(latency=0.6, max_drop=0.5, max_steps=1, recovery_batches=1,
                                                   final_recovery=0, int8=True))
    s = search_of(opt)
    assert s["int8"]["start"]["latency_ms"] > 0 and s["stopped"] in STOPS
    assert is_int8(opt.graph_module) == s["int8"]["taken"]
    if s["int8"]["taken"]:
        assert s["final"]["accuracy"] >= s["start"]["accuracy"] - 0.5
        assert opt.compiled is not None   # the int8 result compiles for the target
    jsonschema.validate(json.loads(opt.report.to_json()), SCHEMA)
