"""Honest per-pass latency (issue 15): a graph whose structure a pass left alone keeps its timing,
a change inside the noise band is said to be noise, and the report names the schedules timed."""
import itertools

import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt.analysis.signature import structure_signature
from graphopt.api import latency_schedules
from graphopt.report.text import latency_change
from graphopt.target_protocol import Latency


@graphopt.register_pass("test_report_latency_reweight", exact=False)
def reweight(gm, ctx):
    """New weight values, the same structure: what distill does."""
    with torch.no_grad():
        for p in gm.parameters():
            p.mul_(1.0 + 1e-3)
    return gm


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()


def test_structure_signature_ignores_weight_values_but_not_shapes_dtypes_or_zeros():
    a, b = fx.symbolic_trace(_net()), fx.symbolic_trace(_net())
    assert structure_signature(a) == structure_signature(b)
    wider = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                                            nn.Conv2d(16, 8, 1)).eval())
    assert structure_signature(wider) != structure_signature(a)
    half = fx.symbolic_trace(_net().half())
    assert structure_signature(half) != structure_signature(a)
    with torch.no_grad():
        b.get_submodule("3").weight[:4] = 0
    assert structure_signature(b) != structure_signature(a)
    x = torch.randn(1, 3, 8, 8)
    assert structure_signature(a, (x,)) != structure_signature(a, (torch.randn(2, 3, 8, 8),))


def test_a_pass_that_changes_no_structure_shows_no_latency_change():
    """distill-like: new weights, same structure. The timing is reused, not taken again."""
    calls, noise = [], itertools.count(1)

    def latency_fn(gm):
        calls.append(gm)
        return Latency(1.0 + 0.1 * next(noise), 0.05)   # every new timing differs: noise

    x = torch.randn(1, 3, 8, 8)
    from graphopt.report.instrument import ReportInstrument
    from graphopt.manager import PassManager
    from graphopt.context import PassContext

    reporter = ReportInstrument("Net", "fake", latency_fn=latency_fn)
    reporter.latency_schedules = "untuned: test"
    manager = PassManager(["test_report_latency_reweight", "fuse_conv_bn"])
    manager.instruments.append(reporter)
    manager.run(graphopt.capture(_net(), (x,)), PassContext(example_inputs=(x,)))
    report = reporter.report
    reweighted, fused = report.records
    assert reweighted.status == "applied"
    assert reweighted.latency_ms_after == reweighted.latency_ms_before  # the same timing, reused
    assert fused.status == "applied" and fused.latency_ms_after != fused.latency_ms_before
    assert len(calls) == 2  # the original (= reweighted) and the fused graph
    assert report.latency_schedules == "untuned: test"
    assert report.records[0].latency_spread_ms_after == 0.05
    assert "latency: untuned: test" in report.to_text()
    assert "untuned: test" in report.to_html()


def test_a_difference_inside_the_noise_band_is_called_noise():
    assert latency_change(1.00, 1.03, 0.05, 0.04) == "1.03ms (within noise)"
    assert latency_change(1.00, 0.50, 0.05, 0.04).endswith("(-50%)")
    assert latency_change(1.00, 1.03).endswith("(+3%)")       # no band known: the plain change
    assert latency_change(None, 1.0) == "-"


def test_the_schedules_label_says_tuned_or_untuned():
    assert latency_schedules(200).startswith("tuned") and "tune_trials=200" in latency_schedules(200)
    for trials in (None, 0):
        label = latency_schedules(trials)
        assert label.startswith("untuned") and "do not compare" in label


def test_x86_reports_noise_bands_and_schedules():
    x = torch.randn(1, 3, 16, 16)
    opt = graphopt.optimize(_net(), ["fuse_conv_bn", "dce"], "x86", example_inputs=(x,), progress=False)
    assert opt.report.latency_schedules.startswith("untuned")
    assert opt.report.original.latency_ms > 0 and opt.report.original.latency_spread_ms >= 0
    fused, dce = opt.report.records
    assert fused.latency_spread_ms_after is not None and fused.latency_spread_ms_after >= 0
    assert dce.status == "no-op"
    data = opt.report.to_dict()
    assert data["latency_schedules"].startswith("untuned")
    assert data["records"][0]["latency_spread_ms_after"] is not None
