"""Every tuning task gets a schedule: hard-swish and SE-gate epilogues, and the fallback when a
hand-written design space fails (torchvision's MobileNetV3 used to stop the compile with a
ScheduleError in its conv + hard-swish kernel)."""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.targets import schedules, tuning

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class Epilogues(nn.Module):
    """MobileNetV3's block: conv + hand-written hard-swish, conv + nn.Hardswish, depthwise +
    hard-swish, an SE gate ``x * hardsigmoid(conv(mean(x)))``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 1)
        self.hs = nn.Hardswish()
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.squeeze, self.excite = nn.Conv2d(32, 16, 1), nn.Conv2d(16, 32, 1)

    def forward(self, x):
        x = self.a(x)
        x = x * F.relu6(x + 3) / 6
        x = self.hs(self.dw(self.hs(self.b(x))))
        gate = F.hardsigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        return x * gate


def _rel_error(out, ref):
    return float((out - ref).abs().max() / ref.abs().max())


def _compile(tmp_path, trials):
    torch.manual_seed(0)
    model, x = Epilogues().eval(), torch.randn(1, 16, 8, 8)
    target = graphopt.get_target("x86").replace(cache_dir=str(tmp_path))
    return model, x, target.compile(torch.fx.symbolic_trace(model), (x,), tune_trials=trials)


def test_dag_epilogues_run_under_the_register_tile():
    """Hard-swish reads its input twice; the SE gate's multiply reads a second tensor: every
    epilogue stage is computed per tile, none as a pass of its own after the convolution."""
    from graphopt.targets.pipeline import prepare
    from graphopt.targets.schedules.unmeasured import hand_written_tasks, point

    target = graphopt.get_target("x86")
    x = torch.randn(1, 16, 8, 8)
    prepared = prepare(target.lower(torch.fx.symbolic_trace(Epilogues().eval()), (x,)).mod, target.tvm(),
                       layout_block=target.layout_block)
    tasks = list(hand_written_tasks(prepared, target.tvm()))
    assert len(tasks) == 5 and any("multiply_divide" in name for name, _ in tasks)
    for name, mod in tasks:
        script = point(mod, target.tvm()).mod.script()
        padded = "pad_temp" in script  # the dense kernel's padding is a parallel copy of its own
        assert script.count("T.parallel(") == 1 + padded, name


def test_hard_swish_and_se_gate_epilogues_get_the_hand_written_schedule(tmp_path):
    model, x, compiled = _compile(tmp_path, 4)  # one trial for each conv kernel
    with compiled:
        info = compiled.tuning
        assert info.fallbacks == [] and compiled.summary()["schedule_fallbacks"] == "none"
        assert info.trials_run > 0
        assert _rel_error(compiled(x), model(x).detach()) < 1e-4


def test_a_failing_design_space_falls_back_and_says_so(tmp_path, monkeypatch, caplog):
    import tvm

    def broken_rule(sch, block):
        raise tvm.s_tir.ScheduleError("broken on purpose")

    schedules.register()
    name = f"s_tir.meta_schedule.cpu.{schedules.CONV2D_NCHWC_RULE}"
    tvm.register_global_func(name, broken_rule, override=True)
    try:
        with caplog.at_level(logging.WARNING, logger="graphopt"):
            model, x, compiled = _compile(tmp_path, 2)
    finally:
        tvm.register_global_func(name, schedules.conv2d_nchwc_rule, override=True)
    with compiled:
        fallbacks = compiled.tuning.fallbacks
        assert fallbacks and all("hand-written space failed" in f for f in fallbacks)
        assert any("generic search" in f for f in fallbacks)
        assert "conv2d_NCHWc" in compiled.summary()["schedule_fallbacks"]
        assert "no working schedule" in caplog.text
        assert _rel_error(compiled(x), model(x).detach()) < 1e-4


def test_a_kernel_nothing_can_schedule_keeps_the_default_schedule(tmp_path, monkeypatch):
    def no_search(task, trials, **tools):
        raise RuntimeError("no candidate builds")

    monkeypatch.setattr(tuning, "_tune_one", no_search)
    model, x, compiled = _compile(tmp_path, 4)
    with compiled:
        fallbacks = compiled.tuning.fallbacks
        assert fallbacks and all("TVM default schedule" in f and "no candidate builds" in f for f in fallbacks)
        assert _rel_error(compiled(x), model(x).detach()) < 1e-4
