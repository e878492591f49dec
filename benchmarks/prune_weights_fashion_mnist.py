"""Weight-prune the bundled Fashion-MNIST model to 80% and 90% and recover; write the table to docs.

Issue 14's accuracy targets: 80% weight sparsity (gradual + distill) within 1 point of the fp32
model's test accuracy, 90% within 2 points, both on the 10,000 test images. Each configuration
runs ``fuse_conv_bn`` -> ``prune_weights`` (magnitude, the same sparsity in every layer: after
BN folding the layers' weight scales differ so much that one global threshold empties
``block2.conv2``; the classifier is pruned too, so that the sparsity is that of the whole
model's weights; only the 288-weight stem stays dense) -> ``distill`` from the unpruned model on the train split's images (labels unused). The
table counts the zeros in the result's conv and linear weights, so it says what was reached,
not what was asked.

Usage:
    python benchmarks/prune_weights_fashion_mnist.py [--epochs 2] [--threads 2] [--limit N] [--no-docs]

``--limit`` evaluates on the first N test images only (the docs table is only written for the
full test set). A few minutes per configuration on 2 CPU cores.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn as nn

import graphopt
from graphopt.data import calibration_batches, fashion_mnist_batches
from graphopt.models import default_example_inputs, evaluate_accuracy, load_default_model

from _docs import write_block
from _fashion import chosen, recovery_parser

#: (label, prune_weights options, target in points of accuracy lost)
CONFIGS = [
    ("80%, gradual + distill", {"sparsity": 0.8, "scope": "layer", "schedule": "gradual"}, 1.0),
    ("90%, gradual + distill", {"sparsity": 0.9, "scope": "layer", "schedule": "gradual"}, 2.0),
    ("90%, one-shot + distill", {"sparsity": 0.9, "scope": "layer"}, 2.0),
]


def weight_sparsity(gm: torch.nn.Module) -> tuple[int, int]:
    """(zeros, weights) over the conv and linear weights of ``gm``: what the pruning reached."""
    zeros = total = 0
    for m in gm.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros, total


def run(label, options, args, model, train, calib):
    t0 = time.perf_counter()
    prune = ("prune_weights", {"prune_last": True, "recovery_epochs": args.recovery_epochs, **options})
    distill = ("distill", {"epochs": args.epochs, "lr": args.lr, "temperature": 4.0, "train_data": train})
    opt = graphopt.optimize(
        model, ["fuse_conv_bn", prune, distill], example_inputs=default_example_inputs(),
        calibration_data=calib, eval_fn=lambda m: evaluate_accuracy(m, "test", limit=args.limit),
        on_error="raise", progress=not args.quiet, seed=0)
    pruned, dist = opt.report["prune_weights"], opt.report["distill"]
    zeros, total = weight_sparsity(opt.graph_module)
    return {
        "label": label, "acc_before": opt.report.records[0].accuracy_before,
        "acc_pruned": pruned.accuracy_after, "acc_distilled": dist.accuracy_after,
        "zeros": zeros, "weights": total, "status": (pruned.status, dist.status),
        "notes": [m for m in pruned.messages if m.startswith("gradual")], "seconds": time.perf_counter() - t0,
    }


def table(rows, targets) -> str:
    lines = ["| configuration | weights zero | accuracy before | after pruning | after distill | change "
             "| target | met |", "|---|---|---|---|---|---|---|---|"]
    for r, target in zip(rows, targets):
        change = 100 * (r["acc_distilled"] - r["acc_before"])
        lines.append(
            f"| {r['label']} | {100 * r['zeros'] / r['weights']:.1f}% of {r['weights'] / 1e3:.0f}k | "
            f"{100 * r['acc_before']:.2f}% | {100 * r['acc_pruned']:.2f}% | {100 * r['acc_distilled']:.2f}% | "
            f"{change:+.2f} pt | >= -{target:g} pt | {'yes' if change >= -target else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = recovery_parser(__doc__, "prune_weights.md")
    p.add_argument("--recovery-epochs", type=int, default=1, help="gradual: recovery epochs per step")
    p.add_argument("--calibration", type=int, default=64, help="batches of 64 train images for gradual recovery")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = chosen(CONFIGS, args.configs)
    model = load_default_model()
    train = fashion_mnist_batches("train", batch_size=128)  # (images, labels): labels are ignored
    calib = calibration_batches(args.calibration, batch_size=64)
    rows = []
    for label, options, target in configs:
        r = run(label, options, args, model, train, calib)
        rows.append(r)
        print(f"{label}: {100 * r['zeros'] / r['weights']:.1f}% of the weights zero, accuracy "
              f"{100 * r['acc_before']:.2f}% -> {100 * r['acc_pruned']:.2f}% pruned -> "
              f"{100 * r['acc_distilled']:.2f}% distilled ({r['seconds']:.0f} s) {r['status']}", flush=True)
        for note in r["notes"]:
            print("  " + note)
    text = table(rows, [c[2] for c in configs])
    print()
    print(text)
    if not args.no_docs and args.limit is None:
        note = (f"\nMeasured by `python benchmarks/prune_weights_fashion_mnist.py --threads {args.threads} "
                f"--epochs {args.epochs}` (torch {torch.__version__}, full 10,000-image test set; gradual: "
                f"4 steps along Zhu & Gupta's schedule, {args.recovery_epochs} recovery epoch(s) per step over "
                f"{args.calibration} x 64 train images; distill: {args.epochs} epoch(s) over the 60,000 train "
                f"images, batch 128, Adam lr {args.lr:g}, T=4, labels unused; 'after pruning' is after the "
                "gradual recovery, before distill). Seconds per configuration: "
                + ", ".join(f"{r['label']} {r['seconds']:.0f}" for r in rows) + ".")
        path = write_block("prune_weights.md", text + "\n" + note, marker="fashion-accuracy",
                           heading="## Accuracy on Fashion-MNIST")
        print(f"\nwrote the table to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
