"""Lightweight CNNs (issue 13): graphopt fp32 and int8 vs ONNX Runtime fp32 and int8 vs PyTorch eager.

torchvision's ``mobilenet_v2``, ``mobilenet_v3_large``, ``shufflenet_v2_x1_0``,
``efficientnet_b0`` and ``mnasnet1_0`` (random weights and BatchNorm statistics: latency does
not depend on them), 224x224, batch 1, ``--threads`` threads for every engine, all in one
process, interleaved (``benchmarks/_bench.py``):

* graphopt fp32: ``fuse_conv_bn``, tuned with ``--trials`` MetaSchedule trials;
* graphopt int8: ``fuse_conv_bn`` + ``quantize`` (calibrated on random images), tuned with the
  same budget (its depthwise convs have no integer kernel of their own yet: what exists is
  measured);
* ONNX Runtime fp32, and int8 (``quantize_static`` QDQ, per-channel int8 weights, uint8
  activations, on the same calibration batches);
* PyTorch eager.

For each model and precision it reports the tuning budget, the trials that ran and how long
tuning took (a fresh tune when the cache was empty: pass ``--cache-dir`` an empty directory to
measure one), and the kernels whose search found no working schedule. Then the per-kernel
breakdown of one model (``--kernels``, ``benchmarks/kernels.py``'s tables: depthwise kernels in
GB/s against the L2 bandwidth) and, with ``--curve``, the latency of one model after
increasing budgets (each step tunes only the difference, through the cache), timed
interleaved at the end. Writes the tables into docs/performance.md between the
``mobile-benchmark`` markers.

torchvision needs torch 2.14.1, not the 2.13 CPU build of graphopt's own venv; the
environment it runs in (any venv beside graphopt's own)::

    python3 -m venv venv-bench
    venv-bench/bin/pip install torch==2.14.1 torchvision==0.29.1   # a 5.5 GB CUDA build; runs on the CPU
    venv-bench/bin/pip install -e ".[test,bench]"                  # this checkout; torch stays 2.14.1
    venv-bench/bin/python benchmarks/mobile.py --trials 500

Usage:
    python benchmarks/mobile.py [--models mobilenet_v2 ...] [--trials 500] [--threads 2] [--rounds 20]
                                [--kernels mobilenet_v2] [--curve mobilenet_v2 --curve-trials 100 200 400 800]
                                [--cache-dir DIR] [--no-int8] [--no-docs]

``--trials 64 --rounds 3`` is a smoke run (minutes per model): it shows the script works, not
the speed; the speed claims need a quiet machine and budgets of hundreds of trials per model.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

import graphopt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (configure, eager_runner, graphopt_runner, interleaved, machine, onnx_bytes,  # noqa: E402
                    ort_int8_model, ort_runner, ort_session, quantile)
from _docs import write_block  # noqa: E402
from int8 import calibration_for  # noqa: E402
from kernels import kernel_rows, machine_roofs, render as render_kernels  # noqa: E402
from models import MODELS, TORCHVISION_MOBILE  # noqa: E402

log = logging.getLogger("graphopt.bench")

ENGINES = ("graphopt_fp32", "graphopt_int8", "ort_fp32", "ort_int8", "eager")


def compile_model(model, inputs, passes, target, trials: int, calibration=None, quiet: bool = True):
    """``graphopt.optimize`` and what its tuning cost: (result, tuning row)."""
    start = time.perf_counter()
    opt = graphopt.optimize(model, passes, target=target, example_inputs=inputs, calibration_data=calibration,
                            tune_trials=trials, measure_latency=False, progress=not quiet)
    info = opt.compiled.tuning
    return opt, {"trials": trials, "trials_run": info.trials_run, "tuning_s": round(info.seconds, 1),
                 "compile_s": round(time.perf_counter() - start, 1), "tasks": info.tasks - info.tasks_skipped,
                 "cache_hits": info.cache_hits, "fallbacks": list(info.fallbacks)}


def rel_error(out, ref) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def bench_model(name: str, target, args) -> dict:
    model, inputs = MODELS[f"tv_{name}"]()
    calib = calibration_for(name, inputs)
    row = {"model": name}
    fp32, row["fp32"] = compile_model(model, inputs, ["fuse_conv_bn"], target, args.trials, quiet=args.quiet)
    with torch.inference_mode():
        ref = model(*inputs)
    row["fp32_error"] = rel_error(fp32(*inputs), ref)
    onnx_fp32 = onnx_bytes(model, inputs)
    runners = {"graphopt_fp32": graphopt_runner(fp32.compiled, inputs),
               "ort_fp32": ort_runner(ort_session(onnx_fp32, args.threads), inputs),
               "eager": eager_runner(model, inputs)}
    int8 = None
    if not args.no_int8:
        int8, row["int8"] = compile_model(model, inputs, ["fuse_conv_bn", "quantize"], target, args.trials, calib,
                                          quiet=args.quiet)
        record = int8.report["quantize"]
        row["int8_status"] = record.status if record.status == "applied" else f"{record.status}: {record.reason}"
        runners["graphopt_int8"] = graphopt_runner(int8.compiled, inputs)
        runners["ort_int8"] = ort_runner(ort_session(ort_int8_model(onnx_fp32, calib), args.threads), inputs)
    times = interleaved({e: runners[e] for e in ENGINES if e in runners}, args.rounds)
    for engine, ms in times.items():
        row[engine] = (statistics.median(ms), quantile(ms, 0.1), quantile(ms, 0.9))
    if name == args.kernels:
        row["kernel_rows"] = kernel_rows(fp32.graph_module, inputs, args.threads, args.cache_dir)
    for opt in (fp32, int8):
        if opt is not None:
            opt.compiled.close()
    return row


def curve(name: str, target, args) -> List[dict]:
    """Latency after each budget of ``--curve-trials`` (ascending; each step tunes the difference)."""
    model, inputs = MODELS[f"tv_{name}"]()
    compiled, points = {}, []
    for trials in sorted(args.curve_trials):
        opt, tuning = compile_model(model, inputs, ["fuse_conv_bn"], target, trials, quiet=args.quiet)
        compiled[trials] = opt.compiled
        points.append({"trials": trials, **tuning})
    runners = {f"{t}": graphopt_runner(c, inputs) for t, c in compiled.items()}
    runners["ort_fp32"] = ort_runner(ort_session(onnx_bytes(model, inputs), args.threads), inputs)
    times = interleaved(runners, args.rounds)
    for p in points:
        p["ms"] = statistics.median(times[str(p["trials"])])
    best = min(p["ms"] for p in points)
    for p in points:
        p["of_best"] = best / p["ms"]
    points.append({"ort_ms": statistics.median(times["ort_fp32"])})
    for c in compiled.values():
        c.close()
    return points


def _cell(value) -> str:
    if value is None:
        return "-"
    median, p10, p90 = value
    return f"{median:.2f} ms ({p10:.2f}-{p90:.2f})"


def _ratio(rows_value, over) -> str:
    return f"{over[0] / rows_value[0]:.2f}x" if rows_value and over else "-"


def _tuning(t: Optional[dict]) -> str:
    if not t:
        return "-"
    if not t["trials"]:
        return "0 (untuned)"
    ran = f"{t['trials_run']} run, {t['tuning_s']:.0f} s" if t["trials_run"] else "cache hit"
    return f"{t['trials']} ({ran}; {t['tasks']} kernels)"


def render(rows: List[dict], info: dict, args, curve_points: Optional[List[dict]] = None,
           roofs=None) -> str:
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {info['cpu']} ({info['cores']} cores, LLVM mcpu "
        f"{info['mcpu']}; {info['features']}), {args.threads} threads for every engine, batch 1, 224x224, random "
        f"weights, {args.rounds} interleaved rounds of 5 runs per engine; load average at the end {info['load']}. "
        f"torch {info['torch']}, ONNX Runtime {info['onnxruntime']}, TVM {info['tvm']}. graphopt int8 is "
        "`fuse_conv_bn` + `quantize` (per-channel int8 weights, uint8 activations); ONNX Runtime int8 is "
        "`quantize_static` QDQ per-channel on the same calibration batches.",
        "",
        "| model | graphopt fp32 | graphopt int8 | ORT fp32 | ORT int8 | PyTorch eager | fp32 vs ORT fp32 | "
        "int8 vs ORT int8 | int8 vs fp32 | fp32 tuning: trials | int8 tuning: trials |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {_cell(r['graphopt_fp32'])} | {_cell(r.get('graphopt_int8'))} | {_cell(r['ort_fp32'])} "
            f"| {_cell(r.get('ort_int8'))} | {_cell(r['eager'])} | {_ratio(r['graphopt_fp32'], r['ort_fp32'])} | "
            f"{_ratio(r.get('graphopt_int8'), r.get('ort_int8'))} | {_ratio(r.get('graphopt_int8'), r['graphopt_fp32'])} "
            f"| {_tuning(r['fp32'])} | {_tuning(r.get('int8'))} |")
    lines += ["", "Cells: median (p10-p90) milliseconds; ratios above 1 mean graphopt is faster. graphopt fp32 "
              f"matched PyTorch within {max(r['fp32_error'] for r in rows):.1e} relative error."]
    notes = [f"{r['model']} int8: quantize {r['int8_status']}" for r in rows
             if r.get("int8_status", "applied") != "applied"]
    notes += [f"{r['model']} {p}: schedule fallback {f}" for r in rows for p in ("fp32", "int8")
              for f in (r.get(p) or {}).get("fallbacks", [])]
    lines += [f"- {n}" for n in notes]
    kernels = next((r for r in rows if "kernel_rows" in r), None)
    if kernels:
        lines += ["", "Per kernel (fp32, best measured times from the tuning cache, `benchmarks/kernels.py`):", "",
                  render_kernels(kernels["model"], kernels["kernel_rows"], args.top, *(roofs or (None, None)))]
        if roofs:
            lines.append(f"\nRoofs ({args.threads} threads): L2 bandwidth {roofs[0]:.0f} GB/s (copy kernel, bytes "
                         f"read + written), FMA peak {roofs[1]:.0f} GFLOP/s, measured by benchmarks/bandwidth.py.")
    if curve_points:
        ort = curve_points[-1]["ort_ms"]
        lines += ["", f"Latency vs tuning budget, {args.curve} fp32 (each budget tunes the difference through the "
                  f"cache; tuning time cumulative; ORT fp32 {ort:.2f} ms in the same rounds):", "",
                  "| trials | trials run | tuning s (cumulative) | latency | of best | vs ORT fp32 |",
                  "|---|---|---|---|---|---|"]
        total = 0.0
        for p in curve_points[:-1]:
            total += p["tuning_s"]
            lines.append(f"| {p['trials']} | {p['trials_run']} | {total:.0f} | {p['ms']:.2f} ms | "
                         f"{100 * p['of_best']:.0f}% | {ort / p['ms']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(TORCHVISION_MOBILE), choices=TORCHVISION_MOBILE)
    parser.add_argument("--trials", type=int, default=500, help="MetaSchedule trials per model and precision")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (5 timed runs each)")
    parser.add_argument("--kernels", default="mobilenet_v2", help="the model whose per-kernel table is shown")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--l2-gbps", type=float, help="the L2 bandwidth (default: measured after the runs)")
    parser.add_argument("--peak-gflops", type=float, help="the FMA peak (default: measured after the runs)")
    parser.add_argument("--curve", choices=TORCHVISION_MOBILE, help="also the latency-vs-trials curve of this model")
    parser.add_argument("--curve-trials", type=int, nargs="+", default=[50, 100, 200, 400, 800])
    parser.add_argument("--cache-dir", help="tuning cache root (an empty one measures fresh tunes)")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    configure(args.threads, args.quiet)
    target = graphopt.get_target("x86").replace(num_threads=args.threads, cache_dir=args.cache_dir)
    rows = [bench_model(name, target, args) for name in args.models]
    points = curve(args.curve, target, args) if args.curve else None
    roofs = machine_roofs(args.threads, args.l2_gbps, args.peak_gflops) if any("kernel_rows" in r for r in rows) \
        else None
    text = render(rows, machine(), args, points, roofs)
    print(text)
    if not args.no_docs:
        path = write_block("performance.md", text, marker="mobile-benchmark",
                           heading="## Lightweight CNNs (benchmarks/mobile.py)")
        print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
