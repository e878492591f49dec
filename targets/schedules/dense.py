"""The hand-written design space for dense (and stem, and grouped) ``conv2d_NCHWc`` blocks.

MetaSchedule's generic rules (multi-level tiling over every loop) can express a fast blocked
convolution, but the space is so large that a few hundred trials per kernel rarely find
it. The schedule oneDNN, ONNX Runtime's MLAS and NeoCPU (Liu et al., 2019)
use for ``NCHW[b]c`` convolutions is known: keep a register tile of ``ow_tile`` output
pixels x ``oc_tile`` output-channel blocks in vector registers, and for every input channel
and kernel tap broadcast one input value per pixel and multiply-add it with one weight
vector per block. That is written here once, with only the knobs that matter (``ow_tile``,
``oc_tile``, unrolling the input-channel block) as sampled decisions, so tuning picks among
a few dozen good candidates instead of searching for them (ResNet-18's convolutions:
193-230 GFLOP/s on 2 cores, ``benchmarks/kernels.py``). The padding stage is annotated
``schedule_rule = "None"`` (no generic rule may move it into the kernel's loops) and
scheduled here as a parallel, vectorized copy: the input-channel reduction reads every
padded value ``oc_blocks x taps`` times, so one copy is cheap next to the bounds checks.
"""
from __future__ import annotations

from typing import List

from .common import MAX_ACCUMULATORS, parallel_copy, tile_candidates, write_back_at

__all__ = ["conv2d_nchwc_rule", "grouped_conv2d_nchwc_rule"]


def _conv2d_nchwc(sch, block, oc_tile: int, ow_tiles: List[int], unroll_channel_block: bool):
    """The register-tiled direct convolution (module docstring) on a copy of ``sch``."""
    sch = sch.copy()
    n, oc, oh, ow, ob, icc, kh, kw, icb = sch.get_loops(block)
    ow_tile = sch.sample_categorical(ow_tiles, [1.0 / len(ow_tiles)] * len(ow_tiles))
    oc_o, oc_i = sch.split(oc, [None, oc_tile])
    ow_o, ow_i = sch.split(ow, [None, ow_tile])
    sch.reorder(n, oc_o, oh, ow_o, icc, kh, kw, icb, oc_i, ow_i, ob)
    sch.parallel(sch.fuse(n, oc_o, oh))
    sch = write_back_at(sch, block, ow_o)
    sch.vectorize(ob)
    sch.unroll(ow_i)
    sch.unroll(oc_i)
    if unroll_channel_block:
        sch.unroll(icb)
    for producer in sch.get_producers(block):
        parallel_copy(sch, producer)
    return sch


def conv2d_nchwc_rule(sch, block):
    """Design spaces for a ``conv2d_NCHWc`` block: one per output-channel tile and unrolling.

    The pixel tile is a sampled decision within each space, limited so that the register
    tile (``oc_tile`` x ``ow_tile`` vectors) fits :data:`MAX_ACCUMULATORS`.
    """
    return _spaces(sch, block, groups=1)


def grouped_conv2d_nchwc_rule(sch, block):
    """Design spaces for a grouped ``conv2d_NCHWc`` block (ResNeXt, RegNet): the dense kernel
    per group. Output-channel tiles divide a group's blocks, so the input values broadcast
    into a tile are those of one group."""
    return _spaces(sch, block, groups=int(sch.get(block).annotations["groups"]))


def _spaces(sch, block, groups: int):
    loops = sch.get_loops(block)
    oc_blocks, out_width = int(sch.get(loops[1]).extent), int(sch.get(loops[3]).extent)
    ow_tiles = tile_candidates(out_width, 4, MAX_ACCUMULATORS)
    spaces = []
    for oc_tile in tile_candidates(oc_blocks // groups, 1, 4):
        fitting = [t for t in ow_tiles if t * oc_tile <= MAX_ACCUMULATORS]
        if fitting:
            spaces += [_conv2d_nchwc(sch, block, oc_tile, fitting, unroll) for unroll in (False, True)]
    return spaces
