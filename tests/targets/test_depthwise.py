"""Depthwise convolutions in the blocked layout: graphopt's hand-written design space.

Correctness is checked for every point of the space (the first and last pixel tile) against
PyTorch, through schedules applied without measuring (``schedules.unmeasured``): strides,
kernel sizes, dilation, padding (none, symmetric, asymmetric), channel counts that need the
8- or 4-channel block, widths no tile divides, and the fused activations.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.targets import schedules
from graphopt.targets.pipeline import prepare
from graphopt.targets.schedules.unmeasured import decision_sizes, hand_written_tasks, unmeasured_database

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]

ACTIVATIONS = {"relu6": F.relu6, "hardswish": F.hardswish, "silu": F.silu, "none": lambda x: x}


class Depthwise(nn.Module):
    def __init__(self, channels, kernel, stride=1, padding=None, dilation=1, act="relu6"):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = (dilation * (kh // 2), dilation * (kw // 2)) if padding is None else padding
        self.conv = nn.Conv2d(channels, channels, kernel, stride, padding, dilation, groups=channels)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.act(self.conv(x))


def lowered_and_prepared(model, x, target):
    lowered = target.lower(torch.fx.symbolic_trace(model.eval()), (x,))
    return lowered, prepare(lowered.mod, target.tvm(), prepack=target.weight_prepack,
                            layout_block=target.layout_block)


def depthwise_tasks(prepared, tvm_target):
    return [(name, mod) for name, mod in hand_written_tasks(prepared, tvm_target) if "depthwise" in name]


def check_every_point(model, x, target, rel=1e-5):
    """Build ``model`` with the first and the last point of each hand-written space; compare."""
    torch.manual_seed(0)
    lowered, prepared = lowered_and_prepared(model, x, target)
    tvm_target = target.tvm()
    tasks = depthwise_tasks(prepared, tvm_target)
    assert len(tasks) == 1, [name for name, _ in hand_written_tasks(prepared, tvm_target)]
    ref = model(x).detach()
    for choice in (lambda n: 0, lambda n: n - 1):
        with target.build(lowered, prepared, unmeasured_database(prepared, tvm_target, choice=choice)) as compiled:
            out = compiled(x)
            assert float((out - ref).abs().max() / ref.abs().max()) < rel
    return tasks


CASES = [  # channels, kernel, stride, padding, dilation, activation, input size
    (32, 3, 1, None, 1, "relu6", 14),       # NCHW16c, MobileNetV2's block
    (32, 3, 2, None, 1, "hardswish", 15),   # stride 2 from an odd size
    (48, 5, 1, None, 1, "silu", 14),        # EfficientNet's 5x5
    (48, 5, 2, None, 1, "relu6", 17),       # 5x5 stride 2, output width 9: no tile divides it
    (24, 3, 1, None, 2, "relu6", 13),       # dilation 2, 24 channels: NCHW8c
    (20, 3, 1, None, 1, "hardswish", 12),   # 20 channels: NCHW4c
    (12, 7, 1, None, 1, "none", 11),        # 7x7: taps not unrolled
    (16, 3, 1, 0, 1, "relu6", 10),          # no padding: no pad stage at all
    (32, 3, 1, (0, 2), 1, "relu6", 9),      # asymmetric padding
    (32, (1, 5), 1, (0, 2), 1, "silu", 12),  # a 1x5 kernel
]


@pytest.mark.parametrize("channels,kernel,stride,padding,dilation,act,size", CASES)
def test_depthwise_matches_pytorch_at_every_point_of_its_space(channels, kernel, stride, padding, dilation,
                                                               act, size):
    model = Depthwise(channels, kernel, stride, padding, dilation, act)
    check_every_point(model, torch.randn(1, channels, size, size), graphopt.get_target("x86"))


def test_the_depthwise_task_names_the_rule_and_its_space_is_the_pixel_tile():
    target = graphopt.get_target("x86")
    _, prepared = lowered_and_prepared(Depthwise(32, 3), torch.randn(1, 32, 56, 56), target)
    ((name, mod),) = depthwise_tasks(prepared, target.tvm())
    assert schedules.DEPTHWISE_NCHWC_RULE in mod.script()
    assert schedules.custom_rule(mod) == schedules.DEPTHWISE_NCHWC_RULE
    assert schedules.trial_cap(mod) == schedules.RULES[schedules.DEPTHWISE_NCHWC_RULE][1]
    assert decision_sizes(mod, target.tvm()) == [[len(schedules.tile_candidates(56, 4, 16))]]  # 4, 7, 8, 14
    # the padding is folded into the loads: no padded copy is left in any point of the space
    from graphopt.targets.schedules.unmeasured import point

    scheduled = point(mod, target.tvm()).mod.script()
    assert "pad_temp" not in scheduled and "T.if_then_else" in scheduled
