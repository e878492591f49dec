"""Separable-conv substitution on the bundled Fashion-MNIST model: MACs, x86 latency, accuracy.

For each configuration: MACs cut, latency of the compiled model on x86 (TVM, batch 1, median
of interleaved runs, with the tuning budget given) and in PyTorch eager, and test accuracy
before substitution, after it, and after ``distill`` (from the model before the substitution,
on the train split's images, labels unused). Writes the table into docs/separable.md.

Usage:
    python benchmarks/separable_fashion_mnist.py [--epochs 2] [--trials 0] [--threads 2] [--limit N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import graphopt
from graphopt.data import calibration_batches, fashion_mnist_batches
from graphopt.models import default_example_inputs, evaluate_accuracy, load_default_model

from _docs import write_block

CONFIGS = [
    ("depthwise, max_error 0.5 (default)", {}),
    ("depthwise, max_error 0.3", {"max_error": 0.3}),
    ("spatial SVD, max_error 0.3", {"mode": "spatial", "max_error": 0.3}),
]


def eager_ms(model, x, repeat=200) -> float:
    times = []
    with torch.no_grad():
        for _ in range(10):
            model(x)
        for _ in range(repeat):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def compiled_ms(gm, x, trials) -> float:
    compiled = graphopt.get_target("x86").compile(gm, (x,), tune_trials=trials)
    try:
        return compiled.benchmark(repeat=200).median_ms
    finally:
        compiled.close()


def run(label, options, args, model, train, calib):
    x = default_example_inputs()[0]
    opt = graphopt.optimize(
        model, ["fuse_conv_bn", ("separable_conv", options),
                ("distill", {"epochs": args.epochs, "train_data": train})],
        example_inputs=(x,), calibration_data=calib, on_error="raise", progress=not args.quiet,
        eval_fn=lambda m: evaluate_accuracy(m, "test", limit=args.limit))
    fused, sep, dist = (opt.report[n] for n in ("fuse_conv_bn", "separable_conv", "distill"))
    before_gm = graphopt.optimize(model, ["fuse_conv_bn"], example_inputs=(x,), progress=False).graph_module
    return {
        "label": label, "macs_before": sep.macs_before, "macs_after": sep.macs_after,
        "acc_before": fused.accuracy_after, "acc_sep": sep.accuracy_after, "acc_distilled": dist.accuracy_after,
        "tvm_before": compiled_ms(before_gm, x, args.trials), "tvm_after": compiled_ms(opt.graph_module, x, args.trials),
        "eager_before": eager_ms(before_gm, x), "eager_after": eager_ms(opt.graph_module, x),
        "layers": [m for m in sep.messages],
    }


def table(rows) -> str:
    lines = ["| configuration | MACs | MACs cut | x86 TVM ms (before -> after) | eager ms (before -> after) "
             "| accuracy before | after substitution | after distill | change |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['macs_before'] / 1e6:.2f}M -> {r['macs_after'] / 1e6:.2f}M | "
            f"{100 * (1 - r['macs_after'] / r['macs_before']):.1f}% | {r['tvm_before']:.3f} -> {r['tvm_after']:.3f} | "
            f"{r['eager_before']:.3f} -> {r['eager_after']:.3f} | {100 * r['acc_before']:.2f}% | "
            f"{100 * r['acc_sep']:.2f}% | {100 * r['acc_distilled']:.2f}% | "
            f"{100 * (r['acc_distilled'] - r['acc_before']):+.2f} pt |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2, help="distillation epochs over the train split")
    p.add_argument("--trials", type=int, default=0, help="MetaSchedule trials per compiled model (0: untuned)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--configs", default=None, help="comma-separated indices into CONFIGS")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = CONFIGS if args.configs is None else [CONFIGS[int(i)] for i in args.configs.split(",")]
    model = load_default_model()
    train = fashion_mnist_batches("train", batch_size=128)
    calib = calibration_batches(8, batch_size=64)
    rows = []
    for label, options in configs:
        r = run(label, options, args, model, train, calib)
        rows.append(r)
        print(f"{label}:", *("  " + m for m in r["layers"]), sep="\n", flush=True)
    text = table(rows)
    print("\n" + text)
    if args.limit is None:
        note = (f"\nMeasured by `python benchmarks/separable_fashion_mnist.py --epochs {args.epochs} "
                f"--trials {args.trials} --threads {args.threads}` (torch {torch.__version__}; full 10,000-image "
                f"test set; distill {args.epochs} epoch(s) over the 60,000 train images; latency: batch 1, "
                f"median of 200 runs, TVM with {args.trials} MetaSchedule trials and {args.threads} threads).\n\n"
                + "\n".join(f"- {r['label']}: " + "; ".join(r["layers"]) for r in rows))
        print(f"\nwrote the table to {write_block('separable.md', text + chr(10) + note)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
