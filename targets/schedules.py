"""Hand-written MetaSchedule design spaces for the kernels where the generic search falls short.

MetaSchedule's generic rules (multi-level tiling over every loop) can express a fast blocked
convolution, but the space is so large that a few hundred trials per kernel rarely find
it. The schedule oneDNN, ONNX Runtime's MLAS and NeoCPU (Liu et al., 2019)
use for ``NCHW[b]c`` convolutions is known: keep a register tile of ``ow_tile`` output
pixels x ``oc_tile`` output-channel blocks in vector registers, and for every input channel
and kernel tap broadcast one input value per pixel and multiply-add it with one weight
vector per block. That is written here once, as a MetaSchedule *custom rule* with only the
knobs that matter (``ow_tile``, ``oc_tile``, unrolling the input-channel block) as sampled
decisions, so tuning picks among a few dozen good candidates instead of searching for them
(ResNet-18's convolutions: 193-230 GFLOP/s on 2 cores, ``benchmarks/kernels.py``).

A compute definition opts in by annotating its block with ``schedule_rule =
CONV2D_NCHWC_RULE`` (see :func:`graphopt.targets.layouts.conv2d_nchwc`); MetaSchedule's
``ApplyCustomRule`` then calls the function registered as
``s_tir.meta_schedule.cpu.<rule>`` for it instead of the generic rules. The padding stage
is annotated ``schedule_rule = "None"`` (no generic rule may move it into the kernel's
loops) and scheduled here as a parallel, vectorized copy.

Example:
    >>> register()  # idempotent; the tuner calls it before generating design spaces
    >>> tile_candidates(56, 4, 28)[:4], tile_candidates(7, 4, 28)
    ([4, 7, 8, 14], [7])
"""
from __future__ import annotations

import functools
from typing import List

__all__ = ["CONV2D_NCHWC_RULE", "register", "space_generator", "tile_candidates", "uses_custom_rule"]

CONV2D_NCHWC_RULE = "graphopt_conv2d_nchwc"
MAX_ACCUMULATORS = 28  # vector registers for the output tile (32 on AVX-512 and NEON, minus operands)


def tile_candidates(extent: int, smallest: int, largest: int) -> List[int]:
    """Divisors of ``extent`` in [smallest, largest]; else the largest divisor <= ``largest``."""
    divisors = [d for d in range(1, min(extent, largest) + 1) if extent % d == 0]
    good = [d for d in divisors if d >= smallest]
    return good or divisors[-1:]


def _conv2d_nchwc(sch, block, oc_tile: int, ow_tiles: List[int], unroll_channel_block: bool):
    """The register-tiled direct convolution (module docstring) on a copy of ``sch``."""
    sch = sch.copy()
    n, oc, oh, ow, ob, icc, kh, kw, icb = sch.get_loops(block)
    ow_tile = sch.sample_categorical(ow_tiles, [1.0 / len(ow_tiles)] * len(ow_tiles))
    oc_o, oc_i = sch.split(oc, [None, oc_tile])
    ow_o, ow_i = sch.split(ow, [None, ow_tile])
    sch.reorder(n, oc_o, oh, ow_o, icc, kh, kw, icb, oc_i, ow_i, ob)
    sch.parallel(sch.fuse(n, oc_o, oh))
    sch = _write_back_at(sch, block, ow_o)
    sch.vectorize(ob)
    sch.unroll(ow_i)
    sch.unroll(oc_i)
    if unroll_channel_block:
        sch.unroll(icb)
    for producer in sch.get_producers(block):
        _parallel_copy(sch, producer)
    return sch


def _write_back_at(sch, block, loop):
    """Compute the output (or the fused epilogue: bias, residual add, activation) per tile.

    The accumulators then live only for one tile, which LLVM keeps in registers; the
    epilogue reads them there and writes the result once. Every intermediate elementwise
    stage is inlined into the kernel's output stage first: an epilogue that is a DAG
    (hard-swish ``x * relu6(x + 3) / 6`` reads ``x`` twice) then has one stage, whose only
    computed producer is the tile. Where that still cannot move under the tile loop, the
    epilogue runs after the whole convolution instead (parallel, vectorized): slower by one
    pass over the output, but a schedule. Returns the schedule to use (``sch`` or a copy).
    """
    _inline_intermediate_stages(sch, block)
    fused = sch.copy()  # the same random variables name the same blocks and loops in the copy
    try:
        _epilogue_at(fused, block, loop, sch.get_consumers(block))
        return fused
    except Exception:  # noqa: BLE001 (tvm.s_tir.ScheduleError): the unfused epilogue below
        pass
    epilogue = sch.get_consumers(block)
    _epilogue_at(sch, block, loop, [])
    for stage in epilogue:
        _parallel_copy(sch, stage)
    return sch


def _inline_intermediate_stages(sch, block) -> None:
    """Inline every elementwise stage after ``block`` that is not an output of the kernel."""
    progress = True
    while progress:
        progress = False
        for stage in _stages_after(sch, block):
            if not sch.get_consumers(stage):
                continue  # writes one of the kernel's outputs
            try:
                sch.compute_inline(stage)
            except Exception:  # noqa: BLE001 (not inlinable: a reduction, several writes)
                continue
            progress = True
            break


def _stages_after(sch, block) -> list:
    """The blocks that (transitively) consume ``block``, nearest first."""
    seen, order, frontier = set(), [], list(sch.get_consumers(block))
    while frontier:
        stage = frontier.pop(0)
        name = sch.get(stage).name_hint
        if name not in seen:
            seen.add(name)
            order.append(stage)
            frontier += list(sch.get_consumers(stage))
    return order


def _epilogue_at(sch, block, loop, consumers) -> None:
    if not consumers:
        consumers = [sch.cache_write(block, 0, "global")]
    for consumer in consumers:
        sch.reverse_compute_at(consumer, loop, preserve_unit_loops=True)  # same loops for every decision
        sch.vectorize(sch.get_loops(consumer)[-1])


def _parallel_copy(sch, block) -> None:
    """An injective producer (the padding): outer loops parallel, innermost vectorized."""
    loops = sch.get_loops(block)
    if len(loops) >= 2:
        sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
        sch.vectorize(loops[-1])


def conv2d_nchwc_rule(sch, block):
    """Design spaces for a ``conv2d_NCHWc`` block: one per output-channel tile and unrolling.

    The pixel tile is a sampled decision within each space, limited so that the register
    tile (``oc_tile`` x ``ow_tile`` vectors) fits :data:`MAX_ACCUMULATORS`.
    """
    loops = sch.get_loops(block)
    oc_blocks, out_width = int(sch.get(loops[1]).extent), int(sch.get(loops[3]).extent)
    ow_tiles = tile_candidates(out_width, 4, MAX_ACCUMULATORS)
    spaces = []
    for oc_tile in tile_candidates(oc_blocks, 1, 4):
        fitting = [t for t in ow_tiles if t * oc_tile <= MAX_ACCUMULATORS]
        if fitting:
            spaces += [_conv2d_nchwc(sch, block, oc_tile, fitting, unroll) for unroll in (False, True)]
    return spaces


def uses_custom_rule(mod) -> bool:
    """Whether a tuning task's kernel has a block that graphopt's hand-written rule schedules."""
    return CONV2D_NCHWC_RULE in mod.script(show_meta=False)


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

    tvm.register_global_func(f"s_tir.meta_schedule.cpu.{CONV2D_NCHWC_RULE}", conv2d_nchwc_rule, override=True)
