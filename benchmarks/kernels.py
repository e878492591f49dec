"""Where a tuned model's time goes: each kernel's best measured latency from the tuning cache.

Reads the records a tuning run left in the cache (run ``benchmarks/latency.py`` or
``benchmarks/mobile.py`` first, same target and thread count); tunes and runs nothing. For
each kernel worth tuning: calls per inference, MFLOP, the bytes it moves (its inputs, weights
and outputs), the best measured time, GFLOP/s and GB/s, and the sum over the model, which the
end-to-end median can be compared with (the difference is what the kernels do not account
for: the VM's dispatch, untuned views, caches colder than in a tuning loop).

Depthwise convolutions are memory-bound, so they get a table of their own in bytes per
second: the fraction of this machine's L2 bandwidth their bytes imply (measured at start by
``benchmarks/bandwidth.py``'s copy kernel, or given with ``--l2-gbps``), and the fraction of
their roofline, ``min(L2 bandwidth, FMA peak / (FLOP per byte))``: a 3x3 stride-1 depthwise
conv does 2.25 FLOP per byte moved, which the FMA units cannot sustain at the L2 rate of
this CPU.

Prints the tables and writes them into docs/performance.md (between the kernels markers).

Usage:
    python benchmarks/kernels.py [--models resnet18 mobilenet_v2] [--threads 2] [--top 12]
                                 [--l2-gbps 236 --peak-gflops 235] [--no-docs]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import numpy as np

import graphopt
from graphopt.targets.cache import TuningCache
from graphopt.targets.measure import load_cpu_intrinsics
from graphopt.targets.pipeline import prepare
from graphopt.targets.schedules import custom_rule
from graphopt.targets.tuning import tuning_tasks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import write_block  # noqa: E402
from models import MODELS  # noqa: E402


def kernel_bytes(mod) -> int:
    """Bytes of every buffer a kernel reads or writes (its parameters: inputs, weights, outputs)."""
    return sum(int(np.prod([int(d) for d in p.shape])) * np.dtype(str(p.dtype)).itemsize
               for p in mod["main"].params)


def kernel_rows(gm, inputs, threads: int, cache_dir: Optional[str] = None) -> List[dict]:
    """One row per kernel of ``gm`` worth tuning, slowest total first; ms is None where the cache
    (``cache_dir``, default the user's) has no record."""
    target = graphopt.get_target("x86").replace(num_threads=threads, cache_dir=cache_dir)
    tvm_target = target.tvm()
    load_cpu_intrinsics()
    prepared = prepare(target.lower(gm, inputs).mod, tvm_target, prepack=target.weight_prepack,
                       layout_block=target.layout_block)
    with tempfile.TemporaryDirectory() as tmp:
        database = TuningCache(target.cache_key(), root=target.cache_dir).snapshot(tmp).database
        rows = []
        for task in tuning_tasks(prepared, tvm_target):
            if task.skip:
                continue
            best = database.get_top_k(database.commit_workload(task.mod), 1) if database.has_workload(task.mod) else []
            secs = [float(s) for s in best[0].run_secs] if best else []
            ms = 1e3 * sum(secs) / len(secs) if secs else None
            nbytes = kernel_bytes(task.mod)
            rows.append({"kernel": task.name, "calls": task.weight, "mflop": task.flops / 1e6, "mb": nbytes / 1e6,
                         "ms": ms, "gflops": task.flops / ms / 1e6 if ms else None,
                         "gbps": nbytes / ms / 1e6 if ms else None, "rule": custom_rule(task.mod)})
    return sorted(rows, key=lambda r: -(r["ms"] or 0) * r["calls"])


def model_rows(name: str, threads: int, cache_dir: Optional[str] = None) -> List[dict]:
    model, inputs = MODELS[name]()
    gm = graphopt.optimize(model, example_inputs=inputs, progress=False).graph_module  # fuse_conv_bn, dce
    return kernel_rows(gm, inputs, threads, cache_dir)


def _family(row) -> str:
    rule = row["rule"] or ""
    return "depthwise" if "depthwise" in rule else "grouped" if "grouped" in rule else \
        "dense blocked" if rule else "other"


def depthwise_table(rows: List[dict], l2_gbps: float, peak_gflops: Optional[float]) -> List[str]:
    """Depthwise kernels in bytes per second, against the L2 bandwidth and their roofline."""
    timed = [r for r in rows if r["ms"] is not None and _family(r) == "depthwise"]
    if not timed:
        return []
    lines = ["", "| depthwise kernel | calls | MB moved | FLOP/byte | best ms | GB/s | of L2 bandwidth | "
             "of roofline |", "|---|---|---|---|---|---|---|---|"]
    fractions = []
    for r in sorted(timed, key=lambda r: -r["ms"] * r["calls"]):
        intensity = r["mflop"] / r["mb"]
        roof = min(l2_gbps, peak_gflops / intensity) if peak_gflops else l2_gbps
        fractions.append((r["gbps"] / l2_gbps, r["gbps"] / roof))
        lines.append(f"| {r['kernel']} | {r['calls']} | {r['mb']:.2f} | {intensity:.2f} | {r['ms']:.3f} | "
                     f"{r['gbps']:.0f} | {100 * r['gbps'] / l2_gbps:.0f}% | {100 * r['gbps'] / roof:.0f}% |")
    of_l2, of_roof = zip(*fractions)
    lines.append(f"\nDepthwise kernels: {min(r['gbps'] for r in timed):.0f}-{max(r['gbps'] for r in timed):.0f} GB/s, "
                 f"{100 * min(of_l2):.0f}-{100 * max(of_l2):.0f}% of the L2 bandwidth ({l2_gbps:.0f} GB/s), "
                 f"{100 * min(of_roof):.0f}-{100 * max(of_roof):.0f}% of their roofline"
                 + (f" (FMA peak {peak_gflops:.0f} GFLOP/s)." if peak_gflops else "."))
    return lines


def render(name: str, rows: List[dict], top: int, l2_gbps: Optional[float] = None,
           peak_gflops: Optional[float] = None) -> str:
    timed = [r for r in rows if r["ms"] is not None]
    total = sum(r["ms"] * r["calls"] for r in timed)
    lines = [f"**{name}**: {len(rows)} kernels worth tuning, {len(timed)} with records; their best times add up "
             f"to {total:.2f} ms per inference.", "",
             "| kernel | calls | MFLOP | MB moved | best ms | GFLOP/s | GB/s |", "|---|---|---|---|---|---|---|"]
    for r in timed[:top]:
        lines.append(f"| {r['kernel']} | {r['calls']} | {r['mflop']:.1f} | {r['mb']:.2f} | {r['ms']:.3f} | "
                     f"{r['gflops']:.0f} | {r['gbps']:.0f} |")
    for family in ("dense blocked", "grouped", "depthwise"):
        rates = [r["gflops"] for r in timed if _family(r) == family]
        if rates:
            lines.append(f"\nAll {family} convolution kernels: {min(rates):.0f}-{max(rates):.0f} GFLOP/s.")
    if l2_gbps:
        lines += depthwise_table(rows, l2_gbps, peak_gflops)
    return "\n".join(lines)


def machine_roofs(threads: int, l2_gbps: Optional[float], peak_gflops: Optional[float]):
    """(L2 GB/s, FMA GFLOP/s): the given ones, else measured now (benchmarks/bandwidth.py)."""
    from bandwidth import fma_peak, l2_bandwidth

    return l2_gbps or l2_bandwidth(threads), peak_gflops or fma_peak(threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"], choices=sorted(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--l2-gbps", type=float, help="the L2 bandwidth (default: measured now)")
    parser.add_argument("--peak-gflops", type=float, help="the FMA peak (default: measured now)")
    parser.add_argument("--cache-dir", help="the tuning cache to read (default: the user's)")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    l2, peak = machine_roofs(args.threads, args.l2_gbps, args.peak_gflops)
    text = "\n\n".join(render(name, model_rows(name, args.threads, args.cache_dir), args.top, l2, peak) for name in args.models)
    text += (f"\n\nRoofs ({args.threads} threads): L2 bandwidth {l2:.0f} GB/s (copy kernel, bytes read + written), "
             f"FMA peak {peak:.0f} GFLOP/s, measured by benchmarks/bandwidth.py.")
    print(text)
    if not args.no_docs:
        print(f"\nwritten to {write_block('performance.md', text, marker='kernels')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
