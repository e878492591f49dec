"""Hand-written MetaSchedule design spaces for the kernels where the generic search falls short.

MetaSchedule's generic rules can express fast blocked convolutions, but their spaces are so
large that a few hundred trials per kernel rarely find them; the schedules that oneDNN, ONNX
Runtime's MLAS and XNNPACK use are known. graphopt writes them down as MetaSchedule *custom
rules*, one per kernel family, whose only sampled decisions are the few knobs that matter, so
tuning picks among a handful to a few dozen good candidates:

* :mod:`.dense`: ``conv2d_NCHWc`` (dense, stem and grouped convs): register tile of pixels x
  output channel blocks, broadcast-FMA over input channels and taps (for a grouped conv, those
  of the tile's group);
* :mod:`.depthwise`: ``depthwise_conv2d_NCHWc``: register tile of pixels of one channel
  block, the taps as the only reduction, the padding folded into the loads; the same tile for
  the int8 ``depthwise_blocked`` kernel of :mod:`graphopt.targets.int8.kernels`.

A compute definition opts in by annotating its block with ``schedule_rule = <rule name>`` (see
:mod:`graphopt.targets.layouts`); MetaSchedule's ``ApplyCustomRule`` then calls the function
registered as ``s_tir.meta_schedule.cpu.<rule>`` for it instead of the generic rules.

Example:
    >>> register()  # idempotent; the tuner calls it before generating design spaces
    >>> sorted(RULES) == sorted([CONV2D_NCHWC_RULE, DEPTHWISE_BLOCKED_INT8_RULE, DEPTHWISE_NCHWC_RULE,
    ...                          GROUPED_CONV2D_NCHWC_RULE])
    True
"""
from __future__ import annotations

import functools
from typing import Optional

from .common import (CONV2D_NCHWC_RULE, DEPTHWISE_BLOCKED_INT8_RULE, DEPTHWISE_NCHWC_RULE,
                     GROUPED_CONV2D_NCHWC_RULE, MAX_ACCUMULATORS, tile_candidates)
from .dense import conv2d_nchwc_rule, grouped_conv2d_nchwc_rule
from .depthwise import depthwise_blocked_int8_rule, depthwise_nchwc_rule

__all__ = ["CONV2D_NCHWC_RULE", "DEPTHWISE_BLOCKED_INT8_RULE", "DEPTHWISE_NCHWC_RULE", "GROUPED_CONV2D_NCHWC_RULE", "MAX_ACCUMULATORS", "RULES",
           "conv2d_nchwc_rule", "custom_rule", "depthwise_blocked_int8_rule", "depthwise_nchwc_rule", "grouped_conv2d_nchwc_rule", "register",
           "space_generator", "tile_candidates", "trial_cap", "uses_custom_rule"]

#: rule name -> (the rule, the most trials its space can use: a few more than its points)
RULES = {
    CONV2D_NCHWC_RULE: (conv2d_nchwc_rule, 40),   # up to 3 channel tiles x 2 unrollings x ~6 pixel tiles
    DEPTHWISE_NCHWC_RULE: (depthwise_nchwc_rule, 8),  # up to 5 pixel tiles
    GROUPED_CONV2D_NCHWC_RULE: (grouped_conv2d_nchwc_rule, 40),  # the dense space, tiles within a group
    DEPTHWISE_BLOCKED_INT8_RULE: (depthwise_blocked_int8_rule, 8),  # up to 5 pixel tiles
}


def custom_rule(mod) -> Optional[str]:
    """The hand-written rule that schedules a tuning task's kernel, or None (generic search)."""
    text = mod.script(show_meta=False)
    return next((name for name in RULES if f'"{name}"' in text), None)


def uses_custom_rule(mod) -> bool:
    """Whether a tuning task's kernel has a block that one of graphopt's hand-written rules schedules."""
    return custom_rule(mod) is not None


def trial_cap(mod) -> Optional[int]:
    """The most trials a task can use: its hand-written space's size, or None (generic search)."""
    rule = custom_rule(mod)
    return RULES[rule][1] if rule else None


def space_generator(mod, target):
    """The space generator for a task that :func:`uses_custom_rule`: no generic unrolling.

    MetaSchedule's ``ParallelizeVectorizeUnroll`` would add a sampled auto-unroll over the
    whole hand-written loop nest (unrolling the kernel taps too: 25 % slower, and builds
    that time out); the hand-written schedules already parallelize, vectorize and unroll.
    Every other rule, postprocessor and mutator is the target's default.
    """
    from tvm.s_tir import meta_schedule as ms

    default = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply").space_generator
    rules = [r for r in default.sch_rules if not isinstance(r, ms.schedule_rule.ParallelizeVectorizeUnroll)]
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=list(default.postprocs),
                                             mutator_probs=dict(default.mutator_probs))


@functools.lru_cache(maxsize=None)
def register() -> None:
    """Register the custom rules with MetaSchedule (for every CPU target: key ``cpu``)."""
    import tvm

    for name, (rule, _) in RULES.items():
        tvm.register_global_func(f"s_tir.meta_schedule.cpu.{name}", rule, override=True)
