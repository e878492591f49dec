"""int8 vs fp32 on x86: graphopt tuned int8, graphopt tuned fp32, ONNX Runtime fp32 and int8 (QDQ).

For each model, in one process with the same thread count and interleaved repetitions
(the helpers of ``benchmarks/latency.py``):

* graphopt fp32: ``fuse_conv_bn``, compiled and tuned with ``--trials`` MetaSchedule trials;
* graphopt int8: ``fuse_conv_bn`` + ``quantize`` (calibrated on real Fashion-MNIST training images
  for the default model, on random images otherwise), compiled and tuned with the same budget;
* ONNX Runtime fp32, and ONNX Runtime int8: ``quantize_static`` in QDQ format, per-channel int8
  weights, uint8 activations, calibrated on the same batches (what ORT users ship).

It also reads the instructions the compiled int8 code uses from the disassembly of the
library (``vpdpbusd`` = AVX-512 VNNI), and for the default model measures Fashion-MNIST test
accuracy of every variant and the top-1 agreement of compiled and simulated int8.

With ``--arm``, the int8 default model is also cross-compiled for ``arm-a55`` (dotprod) and
``arm-rpi4`` (NEON only), tuned through an emulated device farm on loopback, and the
disassembly counted for ``sdot`` / ``smull``+``saddlp``; their accuracy is measured under qemu
on ``--arm-images`` test images (emulated: no timings).

Prints a table and writes it into docs/performance.md between the int8 markers.

Usage:
    python benchmarks/int8.py [--models default convnet resnet18] [--trials 64] [--threads 2]
                              [--rounds 20] [--arm] [--no-docs]

Small ``--trials`` (tens) only show that the path works; the speed claims need budgets of
hundreds to thousands of trials per model (about 1-2 s per trial on 2 cores; cached).
"""
from __future__ import annotations

import argparse
import datetime
import io
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

import graphopt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import write_block  # noqa: E402
from latency import graphopt_runner, interleaved, machine, quantile  # noqa: E402
from models import MODELS, randomize_bn  # noqa: E402

log = logging.getLogger("graphopt.bench")


class ConvNet(nn.Module):
    """design.md's 3-block conv net: 3->32->64->128 channels, stride 2 each (126 M MACs at 224x224)."""

    def __init__(self):
        super().__init__()
        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 128))
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def _convnet():
    torch.manual_seed(0)
    return randomize_bn(ConvNet()), (torch.randn(1, 3, 224, 224),)


BENCH_MODELS = {**MODELS, "convnet": _convnet}


def calibration_for(name: str, inputs) -> List[torch.Tensor]:
    if name == "default":
        from graphopt.data import calibration_batches

        return calibration_batches(8, 64)
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, *inputs[0].shape[1:], generator=g) for _ in range(4)]


# --- ONNX Runtime ----------------------------------------------------------------------------------

def onnx_bytes(model, inputs, dynamic_batch: bool = False) -> bytes:
    buf = io.BytesIO()
    axes = {"x": {0: "n"}, "y": {0: "n"}} if dynamic_batch else None
    torch.onnx.export(model, inputs, buf, opset_version=17, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes=axes)
    return buf.getvalue()


def ort_int8_model(fp32_onnx: bytes, calibration: List[torch.Tensor]) -> bytes:
    """QDQ, per-channel int8 weights, uint8 activations, MinMax calibration on the same batches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": b[i:i + 1].numpy()} for b in calibration for i in range(len(b))][:256])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "fp32.onnx"), os.path.join(d, "int8.onnx")
        Path(src).write_bytes(fp32_onnx)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return Path(dst).read_bytes()


def ort_session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def ort_runner(session, inputs):
    feed = {session.get_inputs()[0].name: inputs[0].numpy()}
    return lambda: session.run(None, feed)


# --- the disassembly -----------------------------------------------------------------------------

X86_INSTRUCTIONS = ("vpdpbusd", "vpmaddubsw", "vpmaddwd", "vfmadd")
ARM_INSTRUCTIONS = ("sdot", "smull", "saddlp", "fmla")


def instruction_counts(compiled, names, objdump: str = "objdump") -> Dict[str, int]:
    """How often each instruction appears in the compiled library's disassembly."""
    with tempfile.TemporaryDirectory() as d:
        lib = compiled.save(Path(d) / "m") / "model.so"
        asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                             check=True).stdout
    mnemonics = re.findall(r"^\s*[0-9a-f]+:\s+(\S+)", asm, re.M)
    return {n: sum(1 for m in mnemonics if m.startswith(n)) for n in names}


# --- the benchmark ---------------------------------------------------------------------------------

def build(model, inputs, passes, target, trials, calibration=None, quiet=True):
    return graphopt.optimize(model, passes, target=target, example_inputs=inputs, calibration_data=calibration,
                             tune_trials=trials, measure_latency=False, progress=not quiet, on_error="raise")


def bench_model(name: str, args) -> dict:
    model, inputs = BENCH_MODELS[name]()
    model = model.eval()
    target = graphopt.get_target("x86").replace(num_threads=args.threads)
    calib = calibration_for(name, inputs)
    row = {"model": name, "input": "x".join(map(str, inputs[0].shape)), "trials": args.trials}
    t0 = time.perf_counter()
    fp32 = build(model, inputs, ["fuse_conv_bn"], target, args.trials, quiet=args.quiet)
    row["fp32_tuning_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    int8 = build(model, inputs, ["fuse_conv_bn", "quantize"], target, args.trials, calib, quiet=args.quiet)
    row["int8_tuning_s"] = round(time.perf_counter() - t0, 1)
    row["int8_exact"] = bool(torch.equal(int8(*inputs), int8.graph_module(*inputs)))
    row["int8_layers"] = int8.report["quantize"].messages[-1].split(":")[0]
    row.update(instruction_counts(int8.compiled, X86_INSTRUCTIONS))
    onnx_fp32 = onnx_bytes(model, inputs)
    onnx_int8 = ort_int8_model(onnx_fp32, calib)
    runners = {
        "graphopt_fp32": graphopt_runner(fp32.compiled, inputs),
        "graphopt_int8": graphopt_runner(int8.compiled, inputs),
        "ort_fp32": ort_runner(ort_session(onnx_fp32, args.threads), inputs),
        "ort_int8": ort_runner(ort_session(onnx_int8, args.threads), inputs),
    }
    times = interleaved(runners, args.rounds)
    for engine, ms in times.items():
        row[f"{engine}_ms"] = statistics.median(ms)
        row[f"{engine}_p10"], row[f"{engine}_p90"] = quantile(ms, 0.1), quantile(ms, 0.9)
    if name == "default":
        row.update(accuracy(model, int8, onnx_int8, calib, args))
        if args.arm:
            row.update(arm(model, calib, args))
    fp32.compiled.close()
    int8.compiled.close()
    return row


def accuracy(model, int8, onnx_int8: bytes, calib, args) -> dict:
    """Fashion-MNIST test accuracy of fp32, simulated int8, compiled int8 and ORT int8."""
    from graphopt.models.fashion_cnn import evaluate_accuracy
    from graphopt.data import fashion_mnist_batches

    batch = 500
    images, _ = fashion_mnist_batches("test", batch_size=batch)[0]
    compiled = build(model, (images,), ["fuse_conv_bn", "quantize"], "x86", 0, calib).compiled  # same numerics
    session = ort_session(ort_int8_model(onnx_bytes(model, (images[:1],), dynamic_batch=True), calib), args.threads)
    ort_fn = lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])  # noqa: E731
    agree = [float((int8.graph_module(x).argmax(1) == compiled(x).argmax(1)).float().mean())
             for x, _ in fashion_mnist_batches("test", batch)]
    out = {"acc_fp32": evaluate_accuracy(model, batch_size=batch),
           "acc_int8_simulated": evaluate_accuracy(int8.graph_module, batch_size=batch),
           "acc_int8_compiled": evaluate_accuracy(compiled, batch_size=batch),
           "acc_ort_int8": evaluate_accuracy(ort_fn, batch_size=batch),
           "agreement_compiled_simulated": float(np.mean(agree))}
    compiled.close()
    return out


def arm(model, calib, args) -> dict:
    """Cross-compile the int8 default model for ARM, tune through an emulated farm, count instructions."""
    from graphopt.data import fashion_mnist_batches
    from graphopt.models.fashion_cnn import evaluate_accuracy
    from graphopt.targets.testing import LoopbackDeviceFarm

    out = {}
    batch = 250
    images, _ = fashion_mnist_batches("test", batch_size=batch)[0]
    for name in ("arm-a55", "arm-rpi4"):
        base = graphopt.get_target(name)
        with LoopbackDeviceFarm(cpu=base.qemu_cpu, key=f"int8-{name}") as farm:
            target = base.replace(tracker=farm.tracker, key=farm.key)
            opt = build(model, (images,), ["fuse_conv_bn", "quantize"], target, args.arm_trials, calib)
            # the compiled model runs on the farm's (emulated) device: evaluate before the farm goes away
            counts = instruction_counts(opt.compiled, ARM_INSTRUCTIONS, "aarch64-linux-gnu-objdump")
            limit = args.arm_images
            agree = [float((opt.graph_module(x).argmax(1) == opt.compiled(x).argmax(1)).float().mean())
                     for x, _ in fashion_mnist_batches("test", batch, limit)]
            out[name] = {**counts, "accuracy": evaluate_accuracy(opt.compiled, batch_size=batch, limit=limit),
                         "fp32_accuracy": evaluate_accuracy(model, batch_size=batch, limit=limit),
                         "agreement": float(np.mean(agree)), "images": limit, "trials": args.arm_trials}
            opt.compiled.close()
    return {"arm": out}


def render(rows: List[dict], info: dict, args) -> str:
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {info['cpu']} ({info['cores']} cores, LLVM mcpu "
        f"{info['mcpu']}; {info['features']}), {args.threads} threads for every engine, batch 1, {args.rounds} "
        "interleaved rounds of 5 runs per engine (each block after 0.3 s of quiet and 50 ms of untimed runs); "
        f"load average at the end {info['load']}. torch {info['torch']}, "
        f"ONNX Runtime {info['onnxruntime']}, TVM {info['tvm']}. graphopt int8 is per-channel int8 weights, uint8 "
        "activations (the `quantize` defaults), ONNX Runtime int8 is `quantize_static` QDQ per-channel (uint8 "
        "activations, int8 weights) on the same calibration batches.",
        "",
        "| model | input | graphopt fp32 tuned | graphopt int8 tuned | ORT fp32 | ORT int8 QDQ | int8 vs fp32 | "
        "int8 vs ORT int8 | trials (each) | vpdpbusd in int8 code |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r, e):
        return f"{r[e + '_ms']:.3f} ms ({r[e + '_p10']:.3f}-{r[e + '_p90']:.3f})"

    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} | {cell(r, 'graphopt_fp32')} | {cell(r, 'graphopt_int8')} | "
            f"{cell(r, 'ort_fp32')} | {cell(r, 'ort_int8')} | {r['graphopt_fp32_ms'] / r['graphopt_int8_ms']:.2f}x | "
            f"{r['ort_int8_ms'] / r['graphopt_int8_ms']:.2f}x | {r['trials']} | {r['vpdpbusd']} |")
    lines += ["", "Cells: median (p10-p90) milliseconds; ratios above 1 mean graphopt int8 is faster. "
              "Compiled int8 outputs equal the simulated (PyTorch) int8 graph bit for bit: "
              f"{all(r['int8_exact'] for r in rows)}."]
    acc = next((r for r in rows if "acc_fp32" in r), None)
    if acc:
        lines += ["", "Fashion-MNIST test accuracy (10,000 images): "
                  f"fp32 {acc['acc_fp32']:.4f}, graphopt int8 simulated {acc['acc_int8_simulated']:.4f}, "
                  f"graphopt int8 compiled (x86) {acc['acc_int8_compiled']:.4f}, ONNX Runtime int8 "
                  f"{acc['acc_ort_int8']:.4f}; compiled and simulated int8 agree on "
                  f"{100 * acc['agreement_compiled_simulated']:.2f}% of top-1 predictions."]
        for name, a in acc.get("arm", {}).items():
            lines.append(f"- {name} (int8, cross-compiled, run under qemu, {a['trials']} tuning trials): "
                         f"{a['sdot']} `sdot`, {a['smull']} `smull`, {a['saddlp']} `saddlp` in the code; accuracy "
                         f"{a['accuracy']:.4f} vs fp32 {a['fp32_accuracy']:.4f} on the first {a['images']} test "
                         f"images, agreement with the simulation {100 * a['agreement']:.2f}%.")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["default", "convnet", "resnet18"], choices=sorted(BENCH_MODELS))
    parser.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per model and precision")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--arm", action="store_true", help="also build the default model for ARM (qemu)")
    parser.add_argument("--arm-trials", type=int, default=16)
    parser.add_argument("--arm-images", type=int, default=1000)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("torch", "tvm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = [bench_model(name, args) for name in args.models]
    text = render(rows, machine(), args)
    print(text)
    if not args.no_docs:
        path = write_block("performance.md", text, marker="int8-benchmark", heading="## int8 (benchmarks/int8.py)")
        print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
