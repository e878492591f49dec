"""Prune the bundled Fashion-MNIST model and recover with distillation; write the table to docs.

For each configuration: MACs and parameters cut, test accuracy before pruning, after pruning,
and after ``distill`` (knowledge distillation from the unpruned model on the train split's
images, labels unused). The goal (issue 4): half the MACs cut for at most 1 point of accuracy.

Usage:
    python benchmarks/prune_fashion_mnist.py [--epochs 2] [--threads 2] [--limit N] [--no-docs]

``--limit`` evaluates on the first N test images only (quick runs; the docs table is only
written for the full test set). Takes a few minutes per configuration on 2 CPU cores.
"""
from __future__ import annotations

import sys
import time

import torch

import graphopt
from graphopt.data import calibration_batches, fashion_mnist_batches
from graphopt.models import default_example_inputs, evaluate_accuracy, load_default_model

from _docs import write_block
from _fashion import chosen, recovery_parser

#: (label, pipeline before distill): fuse BN first (what a deployment pipeline does), then prune
CONFIGS = [
    ("50% MACs, taylor", ["fuse_conv_bn", ("prune_channels", {"target_macs": 0.5, "importance": "taylor"})]),
    ("50% MACs, l2", ["fuse_conv_bn", ("prune_channels", {"target_macs": 0.5, "importance": "l2"})]),
    ("ratio 0.5 (every group)", ["fuse_conv_bn", ("prune_channels", {"ratio": 0.5, "importance": "taylor"})]),
]


def run(label, passes, args, model, train, calib):
    t0 = time.perf_counter()
    distill = ("distill", {"epochs": args.epochs, "lr": args.lr, "temperature": 4.0, "train_data": train})
    opt = graphopt.optimize(
        model, passes + [distill], example_inputs=default_example_inputs(), calibration_data=calib,
        eval_fn=lambda m: evaluate_accuracy(m, "test", limit=args.limit), on_error="raise",
        progress=not args.quiet, seed=0)
    prune, dist = opt.report["prune_channels"], opt.report["distill"]
    first = opt.report.records[0]
    return {
        "label": label,
        "macs_before": first.macs_before, "macs_after": prune.macs_after,
        "params_before": first.params_before, "params_after": prune.params_after,
        "acc_before": first.accuracy_before, "acc_pruned": prune.accuracy_after,
        "acc_distilled": dist.accuracy_after,
        "widths": next((m for m in prune.messages if m.startswith("output channels")), ""),
        "distill": dist.messages[-1], "seconds": time.perf_counter() - t0,
    }


def table(rows, args) -> str:
    head = ("| configuration | MACs | MACs cut | params | accuracy before | after pruning | "
            "after distill | change |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        cut = 1 - r["macs_after"] / r["macs_before"]
        change = 100 * (r["acc_distilled"] - r["acc_before"])
        lines.append(
            f"| {r['label']} | {r['macs_before'] / 1e6:.2f}M -> {r['macs_after'] / 1e6:.2f}M | {100 * cut:.1f}% | "
            f"{r['params_before'] / 1e3:.0f}k -> {r['params_after'] / 1e3:.0f}k | {100 * r['acc_before']:.2f}% | "
            f"{100 * r['acc_pruned']:.2f}% | {100 * r['acc_distilled']:.2f}% | {change:+.2f} pt |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = recovery_parser(__doc__, "pruning.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = chosen(CONFIGS, args.configs)
    model = load_default_model()
    train = fashion_mnist_batches("train", batch_size=128)  # (images, labels): labels are ignored
    calib = calibration_batches(8, batch_size=64)  # for the taylor importance
    rows = []
    for label, passes in configs:
        r = run(label, passes, args, model, train, calib)
        rows.append(r)
        print(f"{label}: MACs cut {100 * (1 - r['macs_after'] / r['macs_before']):.1f}%, accuracy "
              f"{100 * r['acc_before']:.2f}% -> {100 * r['acc_pruned']:.2f}% pruned -> "
              f"{100 * r['acc_distilled']:.2f}% distilled ({r['seconds']:.0f} s)\n  {r['widths']}", flush=True)
    text = table(rows, args)
    print()
    print(text)
    if not args.no_docs and args.limit is None:
        note = (f"\nMeasured by `python benchmarks/prune_fashion_mnist.py --threads {args.threads} "
                f"--epochs {args.epochs}` (torch {torch.__version__}, full 10,000-image test set; "
                f"distill: {args.epochs} epoch(s) over the 60,000 train images, batch 128, Adam lr "
                f"{args.lr:g}, T=4, labels unused).\n\n")
        details = "\n".join(f"- {r['label']}: {r['widths']}" for r in rows)
        print(f"\nwrote the table to {write_block('pruning.md', text + chr(10) + note + details)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
