"""graphopt's fp32 sparse x dense kernels (TIR), and the compressed form they read.

TVM 0.27 has no sparse operator, so graphopt writes its own. The weights of a masked layer
are stored as BSR with blocks of ``k`` consecutive output channels at one input channel
(``(k, 1)``, the block ``prune_weights`` writes; ``k = 1`` is CSR), see :func:`compress`:

* ``values``  ``(nnzb, k)`` float32: the kept blocks, row-major by output-channel block;
* ``indices`` ``(nnzb,)`` int32: each block's input channel;
* ``indptr``  ``(O / k + 1,)`` int32: where each output-channel block's run starts.

The kernels are specialised to the layer's shapes and number of blocks (all loop extents but
the per-row run are constants) and run only over the kept blocks:

* :func:`conv1x1_kernel` (1x1, stride 1, groups 1, NCHW as ``(N, C, H*W)``): XNNPACK's CHW
  sparse scheme (Elsen et al., "Fast Sparse ConvNets"). For a tile of ``tile`` pixels and one
  output-channel block, ``k x tile`` accumulators stay in vector registers; each kept block
  broadcasts its ``k`` weights and multiply-adds them with one contiguous row of the input
  tile, so the input tile (all its channels) is read from L1 for every output row.
* :func:`linear_kernel` (``(M, K) x (O, K)^T``): per row of the batch and output-channel
  block, a ``k``-wide vector accumulator over the kept blocks (one input value broadcast per
  block). At batch 1 and 2 there is no dense dimension worth vectorising over, so ``k = 1``
  runs scalar: its gain is reading ``2 x density`` of the dense weight bytes.

The bias is added in the kernel (a layer without one gets zeros). Both kernels are emitted already scheduled (parallel over
pixel tiles and groups of output rows), never a tuning task.

Example:
    >>> import numpy as np
    >>> w = np.array([[0, 2, 0], [0, 3, 0], [1, 0, 0], [0, 0, 0]], "float32")
    >>> c = compress(w, 2)
    >>> c.values.tolist(), c.indices.tolist(), c.indptr.tolist()
    ([[2.0, 3.0], [1.0, 0.0]], [1, 0], [0, 1, 2])
    >>> c.dense_bytes, c.nbytes
    (48, 36)
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["Compressed", "compress", "conv1x1_kernel", "conv_tile", "linear_kernel", "row_groups", "with_blocks"]

UNROLL = 4  # the linear kernel's independent accumulators (its sum below adds exactly four)


@dataclasses.dataclass(frozen=True)
class Compressed:
    """A weight matrix ``(O, C)`` in BSR with ``(block, 1)`` blocks (module docstring)."""

    values: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    block: int
    shape: tuple

    @property
    def blocks(self) -> int:
        return int(self.indices.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.indices.nbytes + self.indptr.nbytes)

    @property
    def dense_bytes(self) -> int:
        return int(math.prod(self.shape) * 4)

    def dense(self) -> np.ndarray:
        """The ``(O, C)`` matrix back (for checks)."""
        out_rows, cols = self.shape
        w = np.zeros((out_rows // self.block, self.block, cols), "float32")
        for r in range(out_rows // self.block):
            for j in range(self.indptr[r], self.indptr[r + 1]):
                w[r, :, self.indices[j]] += self.values[j]
        return w.reshape(out_rows, cols)


def with_blocks(func):
    """``func``'s loop nest under a root block holding one opaque compute block: the structure
    TVM's Relax passes expect of every PrimFunc (``SplitLayoutRewritePreproc`` rejects others)."""
    from tvm import s_tir

    def realize(name, body):
        return s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], name, body))

    return func.with_body(realize("root", realize("bsr", func.body)))


def compress(weight: np.ndarray, block: int = 1) -> Compressed:
    """``(O, C)`` float32 -> BSR keeping every ``(block, 1)`` block with a nonzero.

    Blocks come from the zeros of ``weight`` itself (so the math is exactly the dense
    layer's, whatever the mask says); a matrix with no nonzero keeps one zero block (TVM
    buffers cannot be empty).

    Raises:
        ValueError: ``block`` does not divide ``O``.
    """
    w = np.ascontiguousarray(weight, dtype="float32")
    rows, cols = w.shape
    if block < 1 or rows % block:
        raise ValueError(f"block {block} does not divide the {rows} output channels")
    blocked = w.reshape(rows // block, block, cols)
    kept = (blocked != 0).any(axis=1)  # (R, C)
    if not kept.any():
        kept[0, 0] = True
    r, c = np.nonzero(kept)  # row-major: sorted by output block, then input channel
    values = np.ascontiguousarray(blocked[r, :, c], dtype="float32").reshape(-1, block)
    indptr = np.concatenate([[0], np.cumsum(kept.sum(axis=1))]).astype("int32")
    return Compressed(values, c.astype("int32"), indptr, block, (rows, cols))


def conv_tile(pixels: int, block: int, lanes: int) -> int:
    """Pixels per register tile: whole vectors, at most 4 (fewer for larger blocks: ``block x
    tile`` accumulators must stay in the 32 vector registers) and at most the image.

    The last tile overlaps the one before it instead of being narrower (a tile that is not whole
    vectors, 49 pixels as one <49 x float>, spilled and ran 2-4x slower; a narrow scalar tail
    re-walks every row's blocks). Among the widths, the least recomputed work wins, with a
    small premium for wider tiles (fewer index loads per pixel).
    """
    if pixels <= lanes:
        return pixels
    # 1, 2 or 4 vectors: 3 (a <48 x float>) ran 2-5x slower than 2 or 4 (measured, 14x14 layers)
    widths = [v * lanes for v in (1, 2, 4) if v <= max(1, 16 // block) and v * lanes <= pixels]
    return min(widths, key=lambda w: (-(-pixels // w) * w * (1 + lanes / (2 * w)), -w))


def row_groups(rows: int, tasks: int, threads: int) -> int:
    """Groups of output rows per tile, so that at least ``4 x threads`` tasks run in parallel."""
    want = 4 * max(1, threads)
    return 1 if tasks >= want else max(1, min(rows, -(-want // tasks)))


def conv1x1_kernel(n: int, c: int, pixels: int, rows: int, block: int, nnzb: int, tile: int, groups: int):
    """The PrimFunc ``(X (n, c, pixels), V, IDX, PTR, B) -> Y (n, rows*block, pixels)``.

    Tiles start every ``tile`` pixels; the last starts at ``pixels - tile``, so it overlaps its
    neighbour and writes the same values again (every pixel's sum is computed the same way).
    """
    from tvm.script import tirx as T

    o = rows * block
    tiles = -(-pixels // tile)
    per_group = -(-rows // groups)

    @T.prim_func(private=True)
    def func(X: T.Buffer((n, c, pixels), "float32"), V: T.Buffer((nnzb, block), "float32"),
             IDX: T.Buffer((nnzb,), "int32"), PTR: T.Buffer((rows + 1,), "int32"),
             B: T.Buffer((o,), "float32"), Y: T.Buffer((n, o, pixels), "float32")):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(n * tiles * groups):
            for rr in range(per_group):
                b: T.int32 = t // (tiles * groups)
                p0: T.int32 = T.min(t % (tiles * groups) // groups * tile, pixels - tile)
                r: T.int32 = t % groups * per_group + rr
                if r < rows:
                    acc = T.decl_buffer((block, tile), "float32", scope="local")
                    for kk in T.unroll(block):
                        for v in T.vectorized(tile):
                            acc[kk, v] = B[r * block + kk]
                    for j in range(PTR[r], PTR[r + 1]):
                        for kk in T.unroll(block):
                            for v in T.vectorized(tile):
                                acc[kk, v] = acc[kk, v] + V[j, kk] * X[b, IDX[j], p0 + v]
                    for kk in T.unroll(block):
                        for v in T.vectorized(tile):
                            Y[b, r * block + kk, p0 + v] = acc[kk, v]

    return with_blocks(func)


def linear_kernel(m: int, k_in: int, rows: int, block: int, nnzb: int, groups: int):
    """The PrimFunc ``(X (m, k_in), V, IDX, PTR, B) -> Y (m, rows*block)``."""
    from tvm.script import tirx as T

    o = rows * block
    per_group = -(-rows // groups)

    @T.prim_func(private=True)
    def func(X: T.Buffer((m, k_in), "float32"), V: T.Buffer((nnzb, block), "float32"),
             IDX: T.Buffer((nnzb,), "int32"), PTR: T.Buffer((rows + 1,), "int32"),
             B: T.Buffer((o,), "float32"), Y: T.Buffer((m, o), "float32")):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(m * groups):
            for rr in range(per_group):
                b: T.int32 = t // groups
                r: T.int32 = t % groups * per_group + rr
                if r < rows:
                    # UNROLL independent partial sums: one chain of dependent FMAs would run
                    # at the FMA latency (4 cycles a kept block), not its throughput
                    acc = T.decl_buffer((UNROLL, block), "float32", scope="local")
                    start: T.int32 = PTR[r]
                    count: T.int32 = PTR[r + 1] - start
                    for u in T.unroll(UNROLL):
                        for kk in T.vectorized(block):
                            acc[u, kk] = T.float32(0)
                    for jo in range(count // UNROLL):
                        for u in T.unroll(UNROLL):
                            for kk in T.vectorized(block):
                                acc[u, kk] = acc[u, kk] + V[start + jo * UNROLL + u, kk] * X[
                                    b, IDX[start + jo * UNROLL + u]]
                    for j in range(start + count // UNROLL * UNROLL, start + count):
                        for kk in T.vectorized(block):
                            acc[0, kk] = acc[0, kk] + V[j, kk] * X[b, IDX[j]]
                    for kk in T.vectorized(block):
                        Y[b, r * block + kk] = B[r * block + kk] + ((acc[0, kk] + acc[1, kk])
                                                                    + (acc[2, kk] + acc[3, kk]))

    return with_blocks(func)
