"""The hand-written design space for depthwise ``depthwise_conv2d_NCHWc`` blocks.

A depthwise convolution has no channel reduction: each output vector (one channel block of
one pixel) is the sum of ``kh x kw`` products of an input vector and a weight vector. The
kernel is memory-bound (9 or 25 multiply-adds per value read, judged in bytes per second:
``benchmarks/kernels.py``), so the schedule avoids every extra pass over the data:

* a register tile of ``ow_tile`` output pixels of one channel block accumulates in vector
  registers; the taps are the only reduction, unrolled (up to 5x5), so for each tap one
  weight vector is loaded and multiply-added into every pixel of the tile, and LLVM reuses
  the input vectors that neighbouring taps share;
* rows of one channel block (``n x c x oh``) are the parallel loop;
* the padding is folded into the loads: the padded input is inlined into the convolution as
  a bounds check on each input vector, which the unrolled tile reduces to the border pixels
  (measured on MobileNetV2's layers: within 3 % of the same layer without padding; the
  separate padded copy the dense kernel uses was 2-7x slower here, and padding each row's
  inputs under the parallel loop 1.5-3x);
* the bias, residual add and activation (ReLU6, hard-swish, SiLU) are applied per tile on
  the way out (:func:`~graphopt.targets.schedules.common.write_back_at`).

The pixel tile is the only decision (divisors of the output width from 4 to 16; a width with
none, such as 17, gets one 8-pixel tile whose last step is predicated), so the space has at
most a handful of points.
"""
from __future__ import annotations

from typing import List

from .common import parallel_copy, tile_candidates, write_back_at

__all__ = ["depthwise_blocked_int8_rule", "depthwise_nchwc_rule"]

MAX_TILE = 16      # wider pixel tiles were slower on every layer measured (register pressure)
MAX_UNROLLED_TAPS = 25


def _pixel_tile(sch, block, rows, ow, vector, kh, kw, ow_tiles: List[int]):
    """The register tile both spaces share: ``ow_tile`` output pixels of one channel block,
    ``rows`` the parallel loop, the taps unrolled, the epilogue per tile, the block the vector."""
    ow_tile = sch.sample_categorical(ow_tiles, [1.0 / len(ow_tiles)] * len(ow_tiles))
    ow_o, ow_i = sch.split(ow, [None, ow_tile])
    sch.reorder(*rows, ow_o, kh, kw, ow_i, vector)
    sch.parallel(sch.fuse(*rows))
    sch = write_back_at(sch, block, ow_o)
    sch.vectorize(vector)
    sch.unroll(ow_i)
    if int(sch.get(kh).extent) * int(sch.get(kw).extent) <= MAX_UNROLLED_TAPS:
        sch.unroll(kw)
        sch.unroll(kh)
    return sch


def _tiles(out_width: int) -> List[int]:
    """Pixel tiles: divisors of the width from 4 to 16; a width with none (a prime: 17, 13)
    gets one tile that overhangs, the tail predicated."""
    tiles = [t for t in tile_candidates(out_width, 4, MAX_TILE) if t >= 4]
    return tiles or [min(out_width, 8)]


def _depthwise(sch, block, ow_tiles: List[int]):
    sch = sch.copy()
    n, c, oh, ow, b, kh, kw = sch.get_loops(block)
    sch = _pixel_tile(sch, block, (n, c, oh), ow, b, kh, kw, ow_tiles)
    for producer in sch.get_producers(block):  # the padding
        try:
            sch.compute_inline(producer)
        except Exception:  # noqa: BLE001 (ScheduleError): a producer that is not a plain pad
            parallel_copy(sch, producer)
    return sch


def depthwise_nchwc_rule(sch, block):
    """Design space for a ``depthwise_conv2d_NCHWc`` block: the pixel tile is a sampled decision."""
    return [_depthwise(sch, block, _tiles(int(sch.get(sch.get_loops(block)[3]).extent)))]


def _depthwise_blocked(sch, block, ow_tiles: List[int]):
    """The same tile on the int8 kernel's loops ``(n, oh, ow, cb, lane, kh, kw)``; its padding is
    already a bounds check in the load (the compute reads the blocked input directly), and the
    epilogue is the correction and requantize."""
    sch = sch.copy()
    n, oh, ow, cb, lane, kh, kw = sch.get_loops(block)
    return _pixel_tile(sch, block, (n, oh, cb), ow, lane, kh, kw, ow_tiles)


def depthwise_blocked_int8_rule(sch, block):
    """Design space for graphopt's int8 ``depthwise_blocked`` block (2-d): the pixel tile."""
    return [_depthwise_blocked(sch, block, _tiles(int(sch.get(sch.get_loops(block)[2]).extent)))]
