"""graphopt's hand-written design space for blocked convolutions, and the runtime's thread count."""
import os
import re

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.targets import schedules
from graphopt.targets.runtime import set_runtime_threads

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_tile_candidates():
    assert schedules.tile_candidates(56, 4, 28) == [4, 7, 8, 14, 28]
    assert schedules.tile_candidates(7, 4, 28) == [7]
    assert schedules.tile_candidates(13, 4, 28) == [13]
    assert schedules.tile_candidates(29, 4, 28) == [1]  # a prime wider than any tile: one pixel
    assert schedules.tile_candidates(4, 1, 4) == [1, 2, 4]


def _conv_tasks(model, x):
    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.pipeline import prepare

    target = graphopt.get_target("x86")
    tvm_target = target.tvm()
    prepared = prepare(target.lower(torch.fx.symbolic_trace(model), (x,)).mod, tvm_target,
                       layout_block=target.layout_block)
    tasks = [t for t in ms.relax_integration.extract_tasks(prepared, tvm_target)
             if schedules.uses_custom_rule(t.dispatched[0])]
    return tasks, tvm_target


def test_blocked_convs_get_the_register_tiled_design_space():
    from tvm.s_tir import meta_schedule as ms

    schedules.register()
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()).eval()
    tasks, tvm_target = _conv_tasks(model, torch.randn(1, 32, 28, 28))
    assert len(tasks) == 1
    mod = tasks[0].dispatched[0]
    space = schedules.space_generator(mod, tvm_target)
    ctx = ms.TuneContext(mod=mod, target=tvm_target, space_generator=space, task_name="conv")
    traces = [str(sch.trace) for sch in ctx.space_generator.generate_design_space(ctx.mod)]
    # 64 output channels in blocks of 16: output-channel tiles 1, 2, 4; each with and without unrolling
    assert len(traces) == 6
    for trace in traces:
        oc_tile = int(re.search(r"sch.split\(loop=\w+, factors=\[None, (\d+)\]", trace).group(1))
        ow_tiles = [int(v) for v in re.search(r"candidates=\[([\d, ]+)\]", trace).group(1).split(",")]
        assert all(oc_tile * t <= schedules.MAX_ACCUMULATORS for t in ow_tiles)
        assert "parallel" in trace and "vectorize" in trace
        assert "meta_schedule.unroll_explicit" not in trace  # no generic auto-unroll over the taps


class _Shapes(nn.Module):
    """Stride 2, 1x1, a residual add, an odd width and a conv whose output is the model's."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 32, 3, 2, 1)
        self.b = nn.Conv2d(32, 32, 1)
        self.c = nn.Conv2d(32, 16, 3, 1, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(y) + y))


def test_tuned_custom_schedules_compile_and_match(tmp_path):
    model, x = _Shapes().eval(), torch.randn(1, 16, 26, 26)  # 13x13 after the stride
    target = graphopt.get_target("x86").replace(cache_dir=str(tmp_path))
    opt = graphopt.optimize(model, [], target=target, example_inputs=(x,), tune_trials=24, progress=False,
                            measure_latency=False)
    with opt.compiled:
        assert opt.compiled.tuning.trials_run > 0
        ref = model(x).detach()
        assert float((opt.compiled(x) - ref).abs().max() / ref.abs().max()) < 1e-4


def test_runtime_threads_raise_tvms_cap():
    """TVM caps its pool at TVM_NUM_THREADS (default: half the logical cores); setting threads sets it."""
    before = os.environ.get("TVM_NUM_THREADS")
    try:
        set_runtime_threads(3)
        assert os.environ["TVM_NUM_THREADS"] == "3"
    finally:
        set_runtime_threads(int(before or 1))
