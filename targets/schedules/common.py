"""What graphopt's hand-written design spaces share: the rule names, tile sizes, the epilogue.

Every rule keeps a register tile of output vectors in registers while it accumulates, and
writes the tile (through the fused epilogue: bias, residual add, activation) once at the end:
:func:`write_back_at`.

Example:
    >>> tile_candidates(56, 4, 28)[:4], tile_candidates(7, 4, 28)
    ([4, 7, 8, 14], [7])
"""
from __future__ import annotations

from typing import List

__all__ = ["CONV2D_NCHWC_RULE", "DEPTHWISE_BLOCKED_INT8_RULE", "DEPTHWISE_NCHWC_RULE", "GROUPED_CONV2D_NCHWC_RULE",
           "MAX_ACCUMULATORS",
           "parallel_copy", "tile_candidates", "write_back_at"]

CONV2D_NCHWC_RULE = "graphopt_conv2d_nchwc"
DEPTHWISE_NCHWC_RULE = "graphopt_depthwise_conv2d_nchwc"
GROUPED_CONV2D_NCHWC_RULE = "graphopt_grouped_conv2d_nchwc"
DEPTHWISE_BLOCKED_INT8_RULE = "graphopt_depthwise_blocked_int8"  # targets/int8/kernels.depthwise_blocked
MAX_ACCUMULATORS = 28  # vector registers for the output tile (32 on AVX-512 and NEON, minus operands)


def tile_candidates(extent: int, smallest: int, largest: int) -> List[int]:
    """Divisors of ``extent`` in [smallest, largest]; else the largest divisor <= ``largest``."""
    divisors = [d for d in range(1, min(extent, largest) + 1) if extent % d == 0]
    good = [d for d in divisors if d >= smallest]
    return good or divisors[-1:]


def write_back_at(sch, block, loop):
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
        _epilogue_at(fused, block, loop, fused.get_consumers(block))
        return fused
    except Exception:  # noqa: BLE001 (tvm.s_tir.ScheduleError): the unfused epilogue below
        pass
    epilogue = sch.get_consumers(block)
    _epilogue_at(sch, block, loop, [])
    for stage in epilogue:
        parallel_copy(sch, stage)
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


def parallel_copy(sch, block) -> None:
    """An injective producer (the padding): outer loops parallel, innermost vectorized."""
    loops = sch.get_loops(block)
    if len(loops) >= 2:
        sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
        sch.vectorize(loops[-1])
