"""Registry, option validation, ordering, checks and rollback in the PassManager."""
import copy

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import Option

X = (torch.randn(2, 3, 8, 8),)


def small():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()


@graphopt.register_pass("t_scale_output", exact=False, tolerance=0.5,
                        options={"factor": Option(1.0, float, check=lambda v: v > 0, help="must be > 0")})
def t_scale_output(gm, ctx, factor):
    """Multiplies the output by a factor (a lossy pass with a declared tolerance)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        scaled = gm.graph.call_function(torch.mul, (out.args[0], factor))
    out.args = (scaled,)
    ctx.note(f"scaled by {factor}")


@graphopt.register_pass("t_raises", exact=True)
def t_raises(gm, ctx):
    """Always raises, after damaging its copy of the graph."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module":
            n.target = "nope"
    raise RuntimeError("plugin bug")


@graphopt.register_pass("t_breaks_exactness", exact=True)
def t_breaks_exactness(gm, ctx):
    """Claims to be exact but changes the conv weights."""
    conv = gm.get_submodule("0")
    conv.weight.data.mul_(1.1)


@graphopt.register_pass("t_needs_data", exact=False, needs=("calibration_data",))
def t_needs_data(gm, ctx):
    """Needs calibration data."""


@graphopt.register_pass("t_first", exact=True, runs_before=("t_second",))
def t_first(gm, ctx):
    """Must run before t_second."""


@graphopt.register_pass("t_second", exact=True)
def t_second(gm, ctx):
    """Ordered after t_first."""


@graphopt.register_pass("t_cycle_a", exact=True, runs_after=("t_cycle_b",))
def t_cycle_a(gm, ctx):
    """Half of a contradictory pair."""


@graphopt.register_pass("t_cycle_b", exact=True, runs_after=("t_cycle_a",))
def t_cycle_b(gm, ctx):
    """Other half of a contradictory pair."""


@graphopt.register_pass("t_class_pass", exact=True, options={"k": 1})
class ClassPass:
    """A pass written as a class: built with its options, then called."""

    def __init__(self, k):
        self.k = k

    def __call__(self, gm, ctx):
        ctx.note(f"k={self.k}")
        return gm


def test_registered_passes_are_listed():
    names = graphopt.list_passes()
    assert {"fuse_conv_bn", "dce", "t_scale_output", "t_class_pass"} <= set(names)


def test_unknown_pass_lists_known_ones():
    with pytest.raises(graphopt.UnknownNameError) as e:
        graphopt.optimize(small(), ["fuse_conv_bm"], example_inputs=X)
    assert "Did you mean 'fuse_conv_bn'" in str(e.value) and "dce" in str(e.value)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(graphopt.PassOptionError, match=r"no option 'factr'.*factor \(default 1.0\)"):
        graphopt.optimize(small(), [("t_scale_output", {"factr": 2})], example_inputs=X)


@pytest.mark.parametrize("value,msg", [(-1.0, "must be > 0"), ("abc", "must be float")])
def test_bad_option_value(value, msg):
    with pytest.raises(graphopt.PassOptionError, match=msg):
        graphopt.optimize(small(), [("t_scale_output", {"factor": value})], example_inputs=X)


def test_option_strings_from_the_cli_are_converted():
    opt = graphopt.optimize(small(), [("t_scale_output", {"factor": "1.2"})], example_inputs=X)
    assert opt.report.records[0].options == {"factor": 1.2}


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        graphopt.register_pass("fuse_conv_bn", exact=True)(lambda gm, ctx: gm)


def test_missing_needs_fail_before_anything_runs():
    with pytest.raises(graphopt.MissingInputError, match=r"t_needs_data.*calibration_data=\["):
        graphopt.optimize(small(), ["fuse_conv_bn", "t_needs_data"], example_inputs=X)


def test_reordering_is_announced(caplog):
    opt = graphopt.optimize(small(), ["t_second", "t_first"], example_inputs=X)
    assert [r.name for r in opt.report.records] == ["t_first", "t_second"]
    assert "reordered" in caplog.text


def test_contradictory_order_is_refused_naming_the_passes():
    with pytest.raises(graphopt.PassOrderError, match="t_cycle_a -> t_cycle_b -> t_cycle_a|t_cycle_b -> t_cycle_a -> t_cycle_b"):
        graphopt.PassManager(["t_cycle_a", "t_cycle_b"])


def test_raising_pass_is_rolled_back_and_recorded():
    m = small()
    opt = graphopt.optimize(m, ["t_raises", "fuse_conv_bn"], example_inputs=X)
    r = opt.report["t_raises"]
    assert r.status == "failed" and "RuntimeError: plugin bug" in r.reason
    assert opt.report["fuse_conv_bn"].status == "applied"  # the pipeline went on from the intact graph
    assert torch.allclose(opt(*X), m(*X), rtol=1e-4, atol=1e-5)


def test_exact_pass_that_breaks_numerics_is_rolled_back():
    m = small()
    opt = graphopt.optimize(m, ["t_breaks_exactness"], example_inputs=X)
    r = opt.report.records[0]
    assert r.status == "rolled back" and "exact pass broke numerics" in r.reason
    assert r.rel_error > 1e-4 and r.nodes_changed == ["_0"]  # the record shows what it tried
    assert torch.equal(opt(*X), m(*X))


def test_lossy_pass_within_and_beyond_its_tolerance():
    ok = graphopt.optimize(small(), [("t_scale_output", {"factor": 1.2})], example_inputs=X)
    assert ok.report.records[0].status == "applied" and ok.report.records[0].messages == ["scaled by 1.2"]
    bad = graphopt.optimize(small(), [("t_scale_output", {"factor": 3.0})], example_inputs=X)
    assert bad.report.records[0].status == "rolled back"
    assert "tolerance 0.5" in bad.report.records[0].reason


def test_tolerance_override():
    opt = graphopt.optimize(small(), [("t_scale_output", {"factor": 3.0})], example_inputs=X,
                            tolerances={"t_scale_output": 5.0})
    assert opt.report.records[0].status == "applied"


def test_on_error_raise_names_the_pass_and_those_before():
    with pytest.raises(graphopt.PassFailedError, match=r"'t_raises' \(after passes: fuse_conv_bn\) failed"):
        graphopt.optimize(small(), ["fuse_conv_bn", "t_raises"], example_inputs=X, on_error="raise")


def test_on_error_stop_skips_the_rest():
    opt = graphopt.optimize(small(), ["t_raises", "fuse_conv_bn"], example_inputs=X, on_error="stop")
    assert [r.status for r in opt.report.records] == ["failed", "skipped"]


def test_bad_on_error_value():
    with pytest.raises(graphopt.PassOptionError, match="on_error"):
        graphopt.optimize(small(), example_inputs=X, on_error="ignore")


def test_class_pass_and_plain_function_items():
    def plain(gm, ctx):
        """An undecorated function is an exact pass without options."""

    opt = graphopt.optimize(small(), [("t_class_pass", {"k": 3}), plain], example_inputs=X)
    assert [r.name for r in opt.report.records] == ["t_class_pass", "plain"]
    assert opt.report.records[0].messages == ["k=3"]


def test_each_pass_gets_a_copy():
    seen = []

    @graphopt.register_pass("t_spy", exact=True)
    def t_spy(gm, ctx):
        """Records the graph object it was given."""
        seen.append(gm)

    pm = graphopt.PassManager(["t_spy"])
    gm = graphopt.capture(small(), X)
    code = gm.code
    out = pm.run(gm, graphopt.PassContext(example_inputs=X))
    assert seen[0] is not gm and out is not gm and gm.code == code


def test_calibration_batches_of_wrong_shape():
    with pytest.raises(graphopt.InputShapeError, match="calibration batch 1"):
        graphopt.optimize(small(), example_inputs=X, calibration_data=[torch.randn(4, 3, 8, 8), torch.randn(4, 2, 8, 8)])


def test_calibration_data_supplies_example_inputs():
    opt = graphopt.optimize(small(), calibration_data=[torch.randn(5, 3, 8, 8)])
    assert opt.report.records[0].status == "applied"


def test_eval_fn_gives_accuracy_per_pass():
    calls = []

    def eval_fn(model):
        calls.append(model)
        return 0.5

    opt = graphopt.optimize(small(), example_inputs=X, eval_fn=eval_fn)
    assert all(r.accuracy_before == 0.5 and r.accuracy_after == 0.5 for r in opt.report.records)
    assert opt.report.original.accuracy == 0.5 and opt.report.final.accuracy == 0.5


def _reject_layer(gm, ctx, layer):
    if layer not in dict(gm.named_modules()):
        raise graphopt.PassOptionError(f"t_validated: no layer {layer!r}")


@graphopt.register_pass("t_validated", exact=True, options={"layer": "0"}, validate=_reject_layer)
def t_validated(gm, ctx, layer):
    """Has a validate hook that checks its option against the model."""


def test_validate_hook_runs_before_any_pass():
    ran = []

    @graphopt.register_pass("t_marker", exact=True)
    def t_marker(gm, ctx):
        """Records that it ran."""
        ran.append(1)

    with pytest.raises(graphopt.PassOptionError, match="no layer 'zz'"):
        graphopt.optimize(small(), ["t_marker", ("t_validated", {"layer": "zz"})], example_inputs=X)
    assert ran == []


def test_user_errors_raised_inside_a_pass_are_not_swallowed_by_rollback():
    @graphopt.register_pass("t_user_error", exact=True)
    def t_user_error(gm, ctx):
        """Discovers a caller mistake while running."""
        raise graphopt.MissingInputError("t_user_error needs eval_fn: pass eval_fn=...")

    with pytest.raises(graphopt.MissingInputError, match="needs eval_fn"):
        graphopt.optimize(small(), ["t_user_error"], example_inputs=X)
