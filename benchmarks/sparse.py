"""graphopt's sparse kernels against graphopt's dense build and PyTorch eager, layer by layer.

For MobileNet-like 1x1 convolutions and a 1024 x 1000 classifier at batch 1, each weight pruned
by magnitude to 70 / 80 / 90 / 95 % (``--block`` 1: unstructured, or ``(k, 1)`` blocks), the layer
alone is built twice through graphopt's x86 pipeline, with the dense kernel (untuned: TVM's
default schedules, what ``tune_trials=0`` builds and what the lowering compares against) and
with the sparse one, and timed in this process; PyTorch eager runs the dense layer with the
same thread count and with one thread (the faster of the two is the ratio's base). Ratios > 1
mean the sparse kernel is faster.

Prints the table and writes it into docs/prune_weights.md (between the sparse-benchmark
markers). The machine it ran on is named in the table: re-measure on a quiet machine before
quoting the numbers.

Usage:
    python benchmarks/sparse.py [--repeat 10] [--threads 2] [--block 1] [--sparsities 0.7 0.8 0.9 0.95] [--no-docs]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import graphopt
from graphopt.sparsity import SparsityPattern, set_mask
from graphopt.targets.sparse.choice import time_layer
from graphopt.targets.sparse.kernels import compress
from graphopt.targets.sparse.lowering import LayerSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import write_block  # noqa: E402

#: (name, layer factory, input shape)
SHAPES = [
    ("conv 56x56 64->64", lambda: nn.Conv2d(64, 64, 1), (1, 64, 56, 56)),
    ("conv 28x28 128->128", lambda: nn.Conv2d(128, 128, 1), (1, 128, 28, 28)),
    ("conv 14x14 256->256", lambda: nn.Conv2d(256, 256, 1), (1, 256, 14, 14)),
    ("conv 7x7 512->1024", lambda: nn.Conv2d(512, 1024, 1), (1, 512, 7, 7)),
    ("linear 1024->1000", lambda: nn.Linear(1024, 1000), (1, 1024)),
]


def prune(layer: nn.Module, sparsity: float, block: int) -> nn.Module:
    """Magnitude pruning of ``layer`` to ``sparsity`` in ``(block, 1)`` blocks (as prune_weights does)."""
    w = layer.weight.detach()
    score = w.abs().reshape(w.shape[0] // block, block, -1).mean(1)
    k = int(round(sparsity * score.numel()))
    threshold = score.flatten().kthvalue(k).values if k else -1
    keep = (score > threshold).repeat_interleave(block, dim=0).reshape(w.shape)
    set_mask(layer, keep, SparsityPattern(block=(block, 1)))
    return layer


def spec_of(name: str, layer: nn.Module, shape, block: int) -> LayerSpec:
    w = layer.weight.detach()
    packed = compress(w.reshape(w.shape[0], -1).numpy(), block)
    kind = "linear" if isinstance(layer, nn.Linear) else "conv1x1"
    return LayerSpec(name, kind, tuple(shape), tuple(w.shape), block, packed.blocks,
                     float((w == 0).float().mean()), layer)


def torch_ms(layer: nn.Module, shape, repeat: int, threads: int) -> float:
    x = torch.randn(shape)
    torch.set_num_threads(threads)
    with torch.no_grad():
        for _ in range(2):
            layer(x)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(repeat: int, threads: int, block: int, sparsities) -> str:
    target = graphopt.get_target("x86").replace(num_threads=threads)
    rows = [f"| layer | sparsity | graphopt dense ms | graphopt sparse ms | PyTorch dense ms ({threads} / 1 threads) "
            "| dense / sparse | PyTorch / sparse |", "|---|---|---|---|---|---|---|"]
    for name, make, shape in SHAPES:
        torch.manual_seed(0)
        layer = make().eval()
        dense = time_layer(target, spec_of(name, layer, shape, 1), sparse=False, repeat=repeat)
        eager = torch_ms(layer, shape, repeat, threads)
        eager1 = torch_ms(layer, shape, repeat, 1)  # OpenMP threads on a loaded machine can be 100x slower
        for s in sparsities:
            pruned = prune(make().eval(), s, block)
            sparse = time_layer(target, spec_of(name, pruned, shape, block), sparse=True, repeat=repeat)
            rows.append(f"| {name} | {s:.0%} | {dense:.3f} | {sparse:.3f} | {eager:.3f} / {eager1:.3f} | "
                        f"{dense / sparse:.2f}x | {min(eager, eager1) / sparse:.2f}x |")
            print(rows[-1], flush=True)
    cpu = target.mcpu or "generic"
    note = (f"x86 ({cpu}), {threads} threads, batch 1, block ({block}, 1), median of {repeat} runs per "
            "variant, in one process. Measured on a busy shared 2-core machine (load average above "
            "the core count): the figures are indicative only; re-measure on a quiet machine with "
            "`python benchmarks/sparse.py --repeat 50`.")
    return note + "\n\n" + "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=1)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    table = run(args.repeat, args.threads, args.block, args.sparsities)
    print(table)
    if not args.no_docs:
        print("written to", write_block("prune_weights.md", table, marker="sparse-benchmark"))


if __name__ == "__main__":
    main()
