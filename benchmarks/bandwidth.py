"""This machine's cache bandwidth and FMA peak, measured with TVM kernels (the yardsticks for depthwise).

A depthwise convolution does 9 or 25 multiply-adds per value it reads: it is memory-bound, and
judged in bytes moved per second against what the caches deliver. This script measures that
with two kernels compiled by TVM for the host (LLVM, the same code generator as the models),
parallel over ``--threads`` threads, each thread streaming over its own buffer of a given
size ``--repeat`` times inside one call (so the call overhead is amortized):

* ``read``: 8 independent vector accumulators sum the buffer (16-float vectors, one 64-byte
  line per load): read bandwidth;
* ``copy``: ``b = a * 1.0001`` from one buffer to another: read + write bandwidth, counting
  both the bytes read and the bytes written, the traffic pattern of a depthwise conv (read the
  input, write the output).

A buffer of 64-512 KB per thread lives in L2 (1 MB per core on Zen 4; 32 KB L1d): the copy
kernel's best rate there is :func:`l2_bandwidth`, what ``benchmarks/kernels.py`` divides a
depthwise kernel's bytes per second by. :func:`fma_peak` is the other roof: 16 independent
vector multiply-add chains per thread, no memory traffic (on Zen 4, 2 x 256-bit FMA units per
core: 32 fp32 FLOP per cycle). A 3x3 stride-1 depthwise conv does 18 FLOP per 8 bytes moved,
so where ``fma_peak / 2.25`` is below the L2 bandwidth it is compute-bound before it is
L2-bound. Timings are minimums over ``--runs`` calls (the machine may be shared; the minimum
is what the hardware can do), with the median printed beside.

Usage:
    python benchmarks/bandwidth.py [--threads 2] [--sizes-kb 16 64 256 512 4096 65536] [--runs 40]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Dict, Sequence, Tuple

import numpy as np

LANES, UNROLL = 16, 8     # one 64-byte line per vector; 8 accumulators hide the add latency
L2_SIZES_KB = (64, 128, 256, 384)  # per thread: well inside a 1 MB L2, well outside a 32 KB L1


def _kernels(threads: int, lines: int, repeat: int):
    """(read, copy) TIR kernels over ``threads`` x ``lines`` x UNROLL x LANES floats."""
    from tvm.script import tirx as T

    shape = (threads, lines, UNROLL, LANES)

    @T.prim_func
    def read(a: T.Buffer(shape, "float32"), b: T.Buffer((threads, UNROLL, LANES), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for t in T.parallel(threads):
            acc = T.alloc_buffer((UNROLL, LANES), "float32", scope="local")
            for u in T.unroll(UNROLL):
                for v in T.vectorized(LANES):
                    acc[u, v] = T.float32(0)
            for r in range(repeat):
                for i in range(lines):
                    for u in T.unroll(UNROLL):
                        for v in T.vectorized(LANES):
                            acc[u, v] = acc[u, v] + a[t, i, u, v]
            for u in T.unroll(UNROLL):
                for v in T.vectorized(LANES):
                    b[t, u, v] = acc[u, v]

    @T.prim_func
    def copy(a: T.Buffer(shape, "float32"), b: T.Buffer(shape, "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for t in T.parallel(threads):
            for r in range(repeat):
                for i in range(lines):
                    for u in T.unroll(UNROLL):
                        for v in T.vectorized(LANES):
                            b[t, i, u, v] = a[t, i, u, v] * T.float32(1.0001)

    return read, copy


def measure(size_kb: int, threads: int = 2, runs: int = 40, total_mb: int = 64) -> Dict[str, Tuple[float, float]]:
    """``{"read"|"copy": (best GB/s, median GB/s)}`` streaming ``size_kb`` per thread."""
    import tvm

    import graphopt
    from graphopt.targets.runtime import set_runtime_threads

    set_runtime_threads(threads)
    target = graphopt.get_target("x86").tvm()
    lines = max(1, size_kb * 1024 // (UNROLL * LANES * 4))
    repeat = max(1, (total_mb << 20) // (lines * UNROLL * LANES * 4))
    read, copy = _kernels(threads, lines, repeat)
    dev = tvm.cpu()
    a = tvm.runtime.tensor(np.random.default_rng(0).random((threads, lines, UNROLL, LANES), "float32"), dev)
    out = {}
    for name, func, streams, out_shape in (("read", read, 1, (threads, UNROLL, LANES)),
                                           ("copy", copy, 2, a.shape)):
        lib = tvm.compile(tvm.IRModule({"main": func}), target=target).jit()
        b = tvm.runtime.tensor(np.zeros(out_shape, "float32"), dev)
        times = list(lib.time_evaluator("main", dev, number=1, repeat=runs)(a, b).results)
        moved = streams * repeat * threads * lines * UNROLL * LANES * 4
        out[name] = (moved / min(times) / 1e9, moved / statistics.median(times) / 1e9)
    return out


def _fma_kernel(threads: int, repeat: int):
    from tvm.script import tirx as T

    chains = 16

    @T.prim_func
    def fma(a: T.Buffer((threads, chains, LANES), "float32"), b: T.Buffer((threads, chains, LANES), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for t in T.parallel(threads):
            acc = T.alloc_buffer((chains, LANES), "float32", scope="local")
            for u in T.unroll(chains):
                for v in T.vectorized(LANES):
                    acc[u, v] = a[t, u, v]
            for r in range(repeat):
                for u in T.unroll(chains):
                    for v in T.vectorized(LANES):
                        acc[u, v] = acc[u, v] * T.float32(0.999) + T.float32(0.001)
            for u in T.unroll(chains):
                for v in T.vectorized(LANES):
                    b[t, u, v] = acc[u, v]

    return fma, chains


def fma_peak(threads: int = 2, runs: int = 20, repeat: int = 200_000) -> float:
    """GFLOP/s of ``threads`` threads doing nothing but independent vector multiply-adds (best run)."""
    import tvm

    import graphopt
    from graphopt.targets.runtime import set_runtime_threads

    set_runtime_threads(threads)
    func, chains = _fma_kernel(threads, repeat)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=graphopt.get_target("x86").tvm()).jit()
    a, b = (tvm.runtime.tensor(np.ones((threads, chains, LANES), "float32")) for _ in range(2))
    times = list(lib.time_evaluator("main", tvm.cpu(), number=1, repeat=runs)(a, b).results)
    return threads * repeat * chains * LANES * 2 / min(times) / 1e9


def l2_bandwidth(threads: int = 2, runs: int = 40) -> float:
    """GB/s (bytes read + written) of the copy kernel on L2-resident buffers: the best over sizes."""
    return max(measure(kb, threads, runs)["copy"][0] for kb in L2_SIZES_KB)


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes-kb", type=int, nargs="+", default=[16, 64, 128, 256, 384, 768, 4096, 65536])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args(argv)
    print(f"{args.threads} threads, best (median) GB/s over {args.runs} calls; KB per thread")
    for kb in args.sizes_kb:
        m = measure(kb, args.threads, args.runs)
        print(f"{kb:>7d} KB: " + "   ".join(f"{k} {b:6.1f} ({md:6.1f})" for k, (b, md) in m.items()), flush=True)
    print(f"FMA peak: {fma_peak(args.threads):.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
