"""Depthwise and grouped convolutions in the blocked layout: graphopt's hand-written spaces.

Correctness is checked for every point of the kernel's space (each design space, each
candidate of its sampled decision) against PyTorch, through schedules applied without
measuring (``schedules.unmeasured``): strides 1 and 2, 3x3, 5x5, 7x7 and 1x5 kernels,
dilation 2, padding (none, symmetric, asymmetric), channel counts the vector width does not
divide (the 8- or 4-channel block, or no block at all: NCHW), widths no tile divides, group
sizes from 4 to 32 channels, and the fused activations.
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


def kernel_tasks(prepared, tvm_target, kind):
    return [(name, mod) for name, mod in hand_written_tasks(prepared, tvm_target) if kind in name]


def every_point(mod, tvm_target):
    """``(space, candidate index)`` of every point of ``mod``'s hand-written design spaces."""
    return [(space, i) for space, sizes in enumerate(decision_sizes(mod, tvm_target))
            for i in range(max(sizes, default=1))]


def check_every_point(model, x, target, kind, rel=1e-5):
    """Build ``model`` with every point of the space of its one ``kind`` kernel; compare.

    The other hand-written kernels (the 1x1 convs around a grouped one) get a valid point
    too: the same space index and candidate index, clamped to theirs.
    """
    torch.manual_seed(0)
    lowered, prepared = lowered_and_prepared(model, x, target)
    tvm_target = target.tvm()
    tasks = kernel_tasks(prepared, tvm_target, kind)
    assert len(tasks) == 1, [name for name, _ in hand_written_tasks(prepared, tvm_target)]
    ref = model(x).detach()
    points = every_point(tasks[0][1], tvm_target)
    for space, i in points:
        database = unmeasured_database(prepared, tvm_target, space=space, choice=lambda n, i=i: min(i, n - 1))
        with target.build(lowered, prepared, database) as compiled:
            out = compiled(x)
            assert float((out - ref).abs().max() / ref.abs().max()) < rel, (space, i)
    return tasks, points


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
    check_every_point(model, torch.randn(1, channels, size, size), graphopt.get_target("x86"), "depthwise")


def test_the_depthwise_task_names_the_rule_and_its_space_is_the_pixel_tile():
    target = graphopt.get_target("x86")
    _, prepared = lowered_and_prepared(Depthwise(32, 3), torch.randn(1, 32, 56, 56), target)
    ((name, mod),) = kernel_tasks(prepared, target.tvm(), "depthwise")
    assert schedules.DEPTHWISE_NCHWC_RULE in mod.script()
    assert schedules.custom_rule(mod) == schedules.DEPTHWISE_NCHWC_RULE
    assert schedules.trial_cap(mod) == schedules.RULES[schedules.DEPTHWISE_NCHWC_RULE][1]
    assert decision_sizes(mod, target.tvm()) == [[len(schedules.tile_candidates(56, 4, 16))]]  # 4, 7, 8, 14
    # the padding is folded into the loads: no padded copy is left in any point of the space
    from graphopt.targets.schedules.unmeasured import point

    scheduled = point(mod, target.tvm()).mod.script()
    assert "pad_temp" not in scheduled and "T.if_then_else" in scheduled


class Grouped(nn.Module):
    """A grouped conv between two 1x1 convs (ResNeXt's and RegNet's block), so its layout is
    the blocked one the dense convs around it propagate. Blocks go by channel count
    (``layouts.channel_blocks``): the ``outer`` values take their own block, the inner ones the
    largest that divides both their count and a group."""

    def __init__(self, channels, groups, kernel=3, stride=1, dilation=1, outer=8):
        super().__init__()
        self.expand = nn.Conv2d(outer, channels, 1)
        self.grouped = nn.Conv2d(channels, channels, kernel, stride, dilation * (kernel // 2), dilation,
                                 groups=groups)
        self.project = nn.Conv2d(channels, outer, 1)

    def forward(self, x):
        return self.project(F.relu(self.grouped(F.relu(self.expand(x)))))


GROUPED_CASES = [  # channels, groups, kernel, stride, dilation, outer channels, input size
    (64, 8, 3, 1, 1, 8, 14),     # 8 channels per group: NCHW8c, one block per group
    (128, 4, 3, 2, 1, 16, 15),   # 32 per group: NCHW16c, two blocks per group (channel tiles 1, 2); stride 2
    (128, 2, 3, 1, 1, 8, 10),    # 64 per group in NCHW16c: four blocks per group (channel tiles 1, 2, 4)
    (128, 32, 3, 1, 1, 8, 9),    # ResNeXt's 4 per group: NCHW4c
    (48, 2, 1, 1, 1, 8, 10),     # 24 per group (RegNet): NCHW8c, three blocks per group
    (64, 4, 5, 1, 1, 16, 12),    # 5x5, 16 per group: NCHW16c
    (96, 4, 5, 2, 1, 8, 13),     # 5x5 stride 2, 24 per group: NCHW8c; output width 7
    (64, 8, 3, 1, 2, 8, 13),     # dilation 2
    (40, 2, 3, 2, 1, 20, 11),    # 40 channels, 20 per group: the vector width does not divide them, NCHW4c
]


@pytest.mark.parametrize("channels,groups,kernel,stride,dilation,outer,size", GROUPED_CASES)
def test_grouped_conv_matches_pytorch_at_every_point_of_its_space(channels, groups, kernel, stride, dilation,
                                                                  outer, size):
    model = Grouped(channels, groups, kernel, stride, dilation, outer)
    ((name, mod),), points = check_every_point(model, torch.randn(1, outer, size, size),
                                               graphopt.get_target("x86"), "group")
    assert schedules.custom_rule(mod) == schedules.GROUPED_CONV2D_NCHWC_RULE
    assert "group_conv2d_NCHWc" in name
    assert len(points) >= 2  # two unrollings at least


def test_the_grouped_space_tiles_output_channels_within_a_group():
    """128 channels in 4 groups, NCHW16c: 2 blocks per group, so channel tiles 1 and 2 (never 4,
    which would straddle two groups), each with and without the channel block unrolled."""
    target = graphopt.get_target("x86")
    _, prepared = lowered_and_prepared(Grouped(128, 4, outer=16), torch.randn(1, 16, 14, 14), target)
    ((_, mod),) = kernel_tasks(prepared, target.tvm(), "group")
    nchw16c = "T.Buffer((T.int64(1), T.int64(8), T.int64(14), T.int64(14), T.int64(16))"
    assert nchw16c in mod.script()  # the data: 8 blocks of 16 channels
    assert schedules.trial_cap(mod) == schedules.RULES[schedules.GROUPED_CONV2D_NCHWC_RULE][1]
    assert decision_sizes(mod, target.tvm()) == [[len(schedules.tile_candidates(14, 4, 28))]] * 4  # 7, 14


@pytest.mark.parametrize("model,channels,kind", [
    (Grouped(24, 12), 8, "group"),        # 2 channels per group: no block divides a group
    (Depthwise(18, 3), 18, "depthwise"),  # 18 channels: no block of 4 or more divides them
])
def test_convs_no_block_divides_keep_tvms_nchw_conv(model, channels, kind):
    target = graphopt.get_target("x86")
    x = torch.randn(1, channels, 10, 10)
    lowered, prepared = lowered_and_prepared(model, x, target)
    assert not kernel_tasks(prepared, target.tvm(), kind)
    with target.build(lowered, prepared, unmeasured_database(prepared, target.tvm())) as compiled:
        ref = model.eval()(x).detach()
        assert float((compiled(x) - ref).abs().max() / ref.abs().max()) < 1e-5
