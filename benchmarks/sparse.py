"""graphopt's sparse kernels against graphopt's tuned dense build, ONNX Runtime and PyTorch eager.

Two parts, both in one process, batch 1, ``--threads`` threads for every engine (issue 14):

* **Layers**: the real 1x1 convolution shapes of MobileNetV2 and ResNet-50 (and a 1024 x 1000
  classifier), each weight pruned by magnitude to ``--sparsities`` (``--block`` 1: unstructured,
  or ``(k, 1)`` blocks). The layer alone is built through graphopt's x86 pipeline with the dense
  kernel, **tuned** with ``--trials`` MetaSchedule trials (through the cache, as the lowering's
  own sparse-or-dense choice does; ``--trials 0``: TVM's untuned defaults), and with the sparse
  kernel (pre-scheduled); ONNX Runtime and PyTorch eager (the faster of ``--threads`` and one
  thread: oneDNN's OpenMP threads are erratic on a shared machine) run the dense layer.
* **Whole model** (``--model``): the reference MobileNetV2 (224x224, random weights),
  ``fuse_conv_bn`` + ``prune_weights`` at ``--model-sparsity`` (per layer, first conv,
  depthwise convs and classifier dense, as in the sparse-MobileNet work) compiled tuned with
  ``--model-trials`` (each masked layer sparse only where measured faster than its tuned dense
  kernel, then the whole-model check), against the same model dense (``fuse_conv_bn``, same
  budget, same cache) and ONNX Runtime fp32 of the dense model; timed interleaved; the saved
  artifacts' sizes on disk, at ``--model-sparsity`` and at 90%.

Ratios > 1 mean the sparse build is faster. Writes the tables into docs/prune_weights.md
between the ``sparse-benchmark`` markers. Tuning wants a quiet machine (and a fresh
``--cache-dir`` for a benchmark: a busy machine leaves worse records in the cache).

Usage:
    python benchmarks/sparse.py [--trials 64] [--repeat 20] [--threads 2] [--block 1]
                                [--sparsities 0.5 0.7 0.8 0.9 0.95] [--model] [--model-trials 200]
                                [--model-sparsity 0.85] [--cache-dir DIR] [--no-layers] [--no-docs]
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
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
from _bench import (configure, graphopt_runner, interleaved, machine, onnx_bytes, ort_runner,  # noqa: E402
                    ort_session, quantile)
from _docs import write_block  # noqa: E402
from models import MODELS  # noqa: E402

#: (network, Cin -> Cout, spatial size): 1x1 conv shapes of torchvision's MobileNetV2 (expand and
#: project convs of several stages) and ResNet-50 (bottleneck reduce / expand)
CONVS = [
    ("MobileNetV2", 24, 144, 56), ("MobileNetV2", 144, 24, 56), ("MobileNetV2", 64, 384, 14),
    ("MobileNetV2", 384, 64, 14), ("MobileNetV2", 960, 160, 7), ("MobileNetV2", 320, 1280, 7),
    ("ResNet-50", 256, 64, 56), ("ResNet-50", 128, 512, 28), ("ResNet-50", 1024, 256, 14),
    ("ResNet-50", 512, 2048, 7),
]


def shapes():
    """(name, layer factory, input shape) for every benchmarked layer."""
    out = [(f"{net} {c_in}->{c_out} @{hw}x{hw}", (lambda i=c_in, o=c_out: nn.Conv2d(i, o, 1)), (1, c_in, hw, hw))
           for net, c_in, c_out, hw in CONVS]
    return out + [("linear 1024->1000", lambda: nn.Linear(1024, 1000), (1, 1024))]


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


def median_ms(run, repeat: int) -> float:
    for _ in range(2):
        run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def torch_ms(layer: nn.Module, shape, repeat: int, threads: int) -> float:
    x = torch.randn(shape)
    torch.set_num_threads(threads)
    with torch.inference_mode():
        return median_ms(lambda: layer(x), repeat)


def ort_ms(layer: nn.Module, shape, repeat: int, threads: int) -> float:
    x = torch.randn(shape)
    run = ort_runner(ort_session(onnx_bytes(layer, (x,)), threads), (x,))
    return median_ms(run, repeat)


def layer_table(target, args) -> str:
    dense_kind = f"tuned, {args.trials} trials" if args.trials else "untuned"
    rows = [f"| layer | sparsity | graphopt dense ms ({dense_kind}) | graphopt sparse ms | ONNX Runtime ms "
            "| PyTorch ms | sparse vs graphopt dense | sparse vs ORT | GFLOP/s dense -> effective sparse |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, make, shape in shapes():
        torch.manual_seed(0)
        layer = make().eval()
        dense = time_layer(target, spec_of(name, layer, shape, 1), sparse=False, repeat=args.repeat,
                           tune_trials=args.trials)
        ort = ort_ms(layer, shape, args.repeat, args.threads)
        eager = min(torch_ms(layer, shape, args.repeat, args.threads), torch_ms(layer, shape, args.repeat, 1))
        torch.set_num_threads(args.threads)
        gflop = 2 * layer.weight.numel() * (shape[2] * shape[3] if len(shape) == 4 else 1) / 1e9
        for s in args.sparsities:
            pruned = prune(make().eval(), s, args.block)
            sparse = time_layer(target, spec_of(name, pruned, shape, args.block), sparse=True, repeat=args.repeat)
            rows.append(f"| {name} | {s:.0%} | {dense:.3f} | {sparse:.3f} | {ort:.3f} | {eager:.3f} | "
                        f"{dense / sparse:.2f}x | {ort / sparse:.2f}x | {gflop / dense * 1e3:.0f} -> "
                        f"{gflop / sparse * 1e3:.0f} |")
            print(rows[-1], flush=True)
    return "\n".join(rows)


def artifact_bytes(compiled) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = compiled.save(Path(d) / "model")
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def compile_pruned(model, inputs, target, sparsity: float, trials: int):
    prune_opts = {"sparsity": sparsity, "scope": "layer"}
    passes = ["fuse_conv_bn"] + ([("prune_weights", prune_opts)] if sparsity else [])
    return graphopt.optimize(model, passes, target=target, example_inputs=inputs, tune_trials=trials,
                             measure_latency=False, progress=False)


def model_table(target, args) -> str:
    model, inputs = MODELS["mobilenet_v2"]()
    started = time.perf_counter()
    dense = compile_pruned(model, inputs, target, 0.0, args.model_trials)
    dense_s = time.perf_counter() - started
    started = time.perf_counter()
    sparse = compile_pruned(model, inputs, target, args.model_sparsity, args.model_trials)
    sparse_s = time.perf_counter() - started
    with torch.inference_mode():
        ref = sparse.graph_module(*inputs)
        err = float((torch.as_tensor(sparse(*inputs)) - ref).abs().max() / ref.abs().max())
    layers = sparse.compiled.manifest.get("sparse_layers") or []
    on_sparse = sum(r["kernel"] == "sparse" for r in layers)
    runners = {"sparse": graphopt_runner(sparse.compiled, inputs), "dense": graphopt_runner(dense.compiled, inputs),
               "ort": ort_runner(ort_session(onnx_bytes(dense.graph_module, inputs), args.threads), inputs)}
    times = interleaved(runners, args.rounds)
    cell = {k: f"{statistics.median(v):.2f} ms ({quantile(v, 0.1):.2f}-{quantile(v, 0.9):.2f})" for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    sizes = {"dense": artifact_bytes(dense.compiled), f"{args.model_sparsity:.0%}": artifact_bytes(sparse.compiled)}
    if abs(args.model_sparsity - 0.9) > 1e-9:
        p90 = compile_pruned(model, inputs, target, 0.9, args.model_trials)
        sizes["90%"] = artifact_bytes(p90.compiled)
        n90 = sum(r["kernel"] == "sparse" for r in p90.compiled.manifest.get("sparse_layers") or [])
        p90.compiled.close()
    else:
        n90 = on_sparse
    reasons = [f"  - {r['name']}: {r['kernel']}: {r['reason']}" for r in layers]
    print("\n".join(reasons))
    lines = [
        f"| MobileNetV2 224x224 | graphopt dense | graphopt sparse ({args.model_sparsity:.0%} of the masked layers' "
        "weights) | ONNX Runtime fp32 (dense) | sparse vs graphopt dense | sparse vs ORT |", "|---|---|---|---|---|---|",
        f"| latency | {cell['dense']} | {cell['sparse']} | {cell['ort']} | {med['dense'] / med['sparse']:.2f}x | "
        f"{med['ort'] / med['sparse']:.2f}x |",
        "",
        f"{on_sparse} of {len(layers)} masked layers run sparse at {args.model_sparsity:.0%} ({n90} at 90%); "
        f"compile (tuning included, {args.model_trials} trials): dense {dense_s:.0f} s, sparse {sparse_s:.0f} s; "
        f"sparse build vs its PyTorch graph: {err:.1e} relative error.",
        "",
        "Artifact on disk: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items())
        + " (" + ", ".join(f"{k} {v / sizes['dense']:.2f}x dense" for k, v in sizes.items() if k != "dense") + ").",
    ]
    for c in (dense, sparse):
        c.compiled.close()
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=64, help="tuning trials of each dense layer (0: untuned)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=1)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--no-layers", action="store_true", help="skip the layer table")
    ap.add_argument("--model", action="store_true", help="also the whole MobileNetV2")
    ap.add_argument("--model-trials", type=int, default=200)
    ap.add_argument("--model-sparsity", type=float, default=0.85)
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds of the whole-model timing")
    ap.add_argument("--cache-dir", help="tuning cache root (a fresh one for a benchmark)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args(argv)
    configure(args.threads, args.quiet)
    target = graphopt.get_target("x86").replace(num_threads=args.threads, cache_dir=args.cache_dir)
    started = time.perf_counter()
    parts = {}  # docs marker -> table: the layer and whole-model tables can be re-measured apart
    if not args.no_layers:
        parts["sparse-benchmark"] = layer_table(target, args)
    if args.model:
        parts["sparse-model-benchmark"] = model_table(target, args)
    info = machine()  # after the work: its load average says how quiet the run was
    note = (f"Measured {datetime.date.today()} on {info['cpu']} ({info['cores']} cores, LLVM mcpu {info['mcpu']}), "
            f"{args.threads} threads for every engine, batch 1, block ({args.block}, 1), median of {args.repeat} "
            f"runs per layer variant, in one process; torch {info['torch']}, ONNX Runtime {info['onnxruntime']}, "
            f"TVM {info['tvm']}; load average at the end {info['load']}; {time.perf_counter() - started:.0f} s in all. "
            "Effective GFLOP/s of the sparse kernel count the dense layer's FLOPs.")
    for marker, table in parts.items():
        text = note + "\n\n" + table
        print(text)
        if not args.no_docs:
            print("written to", write_block("prune_weights.md", text, marker=marker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
