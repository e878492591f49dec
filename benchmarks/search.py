"""The latency-budget search on the bundled Fashion-MNIST model, next to uniform and MAC-budget pruning.

For each budget (a fraction of the fused fp32 latency on the target): the search's measured
latency, accuracy and time, uniform-ratio ``prune_channels`` measured at ratios bisected towards
the search's final latency (``Budget(compare_uniform=True)``: the same recovery), and
``prune_channels`` with ``target_macs`` (the fraction of MACs kept) bisected the same way
(``Budget(compare_macs=True)``). Each baseline's column is its most accurate point at or under
the search's latency.

Usage:
    python benchmarks/search.py [--budgets 0.5,0.3] [--threads 2] [--tune-trials 0] [--limit N]
        [--calib 16] [--step 0.1] [--int8] [--no-docs]

``--int8``: int8 allowed (``Budget(int8=True)``): the search returns the int8 graph when it meets
the budget, and both baselines are quantized too.

Untuned timings (the default) on a busy machine are noisy; the issue's benchmark wants tuned
timings (``--tune-trials``) on a quiet one. The docs table is written only for the full test set.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import graphopt
from graphopt.data import calibration_batches
from graphopt.models import default_example_inputs, evaluate_accuracy, load_default_model

from _docs import write_block


def run(budget: float, args) -> dict:
    target = graphopt.get_target("x86").replace(num_threads=args.threads)
    t0 = time.perf_counter()
    opt = graphopt.optimize(
        load_default_model(), ["fuse_conv_bn"], target, example_inputs=default_example_inputs(),
        calibration_data=calibration_batches(args.calib, batch_size=64),
        eval_fn=lambda m: evaluate_accuracy(m, "test", limit=args.limit), tune_trials=args.tune_trials,
        progress=not args.quiet, on_error="raise",
        budget=graphopt.Budget(latency=budget, max_drop=args.max_drop, step=args.step,
                               recovery_batches=args.recovery_batches, recovery_lr=args.recovery_lr,
                               final_recovery=args.final_recovery,
                               compare_uniform=True, compare_macs=True, int8=args.int8))
    s = opt.report["latency_search"].data["search"]
    opt.compiled.close()
    best = {key: max((u for u in s.get(key) or () if u["latency_ms"] <= s["final"]["latency_ms"]),
                     key=lambda u: u["accuracy"], default=None) for key in ("uniform", "macs")}
    return {"budget": budget, "int8": bool(s.get("int8", {}).get("taken")), "s": s, **best,
            "seconds": time.perf_counter() - t0,
            "widths": [f"{c['producers'][0]} {c['channels_before']}->{c['channels_after']}"
                       for c in (st["chosen"] for st in s["steps"]) if c]}


def _baseline(s, u, option: str) -> str:
    """A baseline's three cells: its point, its accuracy, the search's accuracy minus it."""
    if u is None:
        return "- | - | -"
    return (f"{option} {u[option]:.3g}: {u['latency_ms']:.3f} ms | {100 * u['accuracy']:.2f}% | "
            f"{100 * (s['final']['accuracy'] - u['accuracy']):+.2f} pt")


def table(rows) -> str:
    lines = ["| budget | start | search: latency | accuracy | steps | int8 | stopped | uniform at <= that latency | "
             "accuracy | search - uniform | target_macs at <= that latency | accuracy | search - macs | search time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["s"]
        lines.append(
            f"| {r['budget']:g}x | {s['start']['latency_ms']:.3f} ms, {100 * s['start']['accuracy']:.2f}% | "
            f"{s['final']['latency_ms']:.3f} ms | {100 * s['final']['accuracy']:.2f}% | "
            f"{sum(1 for st in s['steps'] if st['chosen'])} | {'yes' if r['int8'] else 'no'} | {s['stopped']} | "
            f"{_baseline(s, r['uniform'], 'ratio')} | {_baseline(s, r['macs'], 'target_macs')} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="0.5,0.3", help="fractions of the starting latency")
    p.add_argument("--threads", type=int, default=2, help="torch and TVM runtime threads")
    p.add_argument("--tune-trials", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--calib", type=int, default=16, help="calibration batches of 64 train images (recovery)")
    p.add_argument("--step", type=float, default=0.1)
    p.add_argument("--max-drop", type=float, default=0.02)
    p.add_argument("--recovery-batches", type=int, default=4)
    p.add_argument("--recovery-lr", type=float, default=1e-4)
    p.add_argument("--final-recovery", type=int, default=3)
    p.add_argument("--int8", action="store_true", help="int8 allowed: Budget(int8=True)")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for b in (float(v) for v in args.budgets.split(",")):
        r = run(b, args)
        rows.append(r)
        print(f"budget {b:g}x: {r['s']['start']['latency_ms']:.3f} -> {r['s']['final']['latency_ms']:.3f} ms, "
              f"accuracy {r['s']['start']['accuracy']:.4f} -> {r['s']['final']['accuracy']:.4f}, stopped "
              f"{r['s']['stopped']} ({r['seconds']:.0f} s); {', '.join(r['widths'])}", flush=True)
    text = table(rows)
    print()
    print(text)
    if not args.no_docs and args.limit is None:
        note = (f"\nMeasured by `python benchmarks/search.py --budgets {args.budgets} --threads {args.threads} "
                f"--tune-trials {args.tune_trials}{' --int8' if args.int8 else ''}` "
                f"(x86, {'untuned' if not args.tune_trials else 'tuned'}; "
                f"full 10,000-image test set; recovery on {args.calib} x 64 train images, labels unused).\n")
        print(f"\nwrote the table to {write_block('latency_search.md', text + chr(10) + note, heading='## Benchmark')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
