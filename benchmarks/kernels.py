"""Where a tuned model's time goes: each kernel's best measured latency from the tuning cache.

Reads the records a tuning run left in the cache (run ``benchmarks/latency.py`` first, same
target and thread count); tunes and runs nothing. For each kernel worth tuning: calls per
inference, MFLOP, the best measured time and GFLOP/s, and the sum over the model, which
``benchmarks/latency.py``'s end-to-end median can be compared with (the difference is what
the kernels do not account for: the VM's dispatch, untuned views).

Prints the tables and writes them into docs/performance.md (between the kernels markers).

Usage:
    python benchmarks/kernels.py [--models resnet18 mobilenet_v2] [--threads 2] [--top 12] [--no-docs]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List

import graphopt
from graphopt.targets.cache import TuningCache
from graphopt.targets.measure import load_cpu_intrinsics
from graphopt.targets.pipeline import prepare
from graphopt.targets.tuning import tuning_tasks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import write_block  # noqa: E402
from models import MODELS  # noqa: E402


def kernel_rows(name: str, threads: int) -> List[dict]:
    """One row per kernel worth tuning, slowest total first; ms is None where the cache has no record."""
    model, inputs = MODELS[name]()
    target = graphopt.get_target("x86").replace(num_threads=threads)
    gm = graphopt.optimize(model, example_inputs=inputs, progress=False).graph_module  # fuse_conv_bn, dce
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
            rows.append({"kernel": task.name, "calls": task.weight, "mflop": task.flops / 1e6, "ms": ms,
                         "gflops": task.flops / ms / 1e6 if ms else None})
    return sorted(rows, key=lambda r: -(r["ms"] or 0) * r["calls"])


def render(name: str, rows: List[dict], top: int) -> str:
    timed = [r for r in rows if r["ms"] is not None]
    total = sum(r["ms"] * r["calls"] for r in timed)
    lines = [f"**{name}**: {len(rows)} kernels worth tuning, {len(timed)} with records; their best times add up "
             f"to {total:.2f} ms per inference.", "",
             "| kernel | calls | MFLOP | best ms | GFLOP/s |", "|---|---|---|---|---|"]
    for r in timed[:top]:
        lines.append(f"| {r['kernel']} | {r['calls']} | {r['mflop']:.1f} | {r['ms']:.3f} | {r['gflops']:.0f} |")
    depthwise = [r["gflops"] for r in timed if "depthwise" in r["kernel"]]
    dense = [r["gflops"] for r in timed if "conv2d_NCHWc" in r["kernel"] and "depthwise" not in r["kernel"]]
    for label, rates in (("dense blocked", dense), ("depthwise", depthwise)):
        if rates:
            lines.append(f"\nAll {label} convolution kernels: {min(rates):.0f}-{max(rates):.0f} GFLOP/s.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"], choices=sorted(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    text = "\n\n".join(render(name, kernel_rows(name, args.threads), args.top) for name in args.models)
    print(text)
    if not args.no_docs:
        print(f"\nwritten to {write_block('performance.md', text, marker='kernels')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
