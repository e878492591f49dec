"""What the benchmark scripts share: engines as zero-argument runners, interleaved timing, the machine.

Every engine is turned into a callable that runs the model once on inputs staged beforehand
(PyTorch eager, ONNX Runtime fp32 or int8 QDQ, a graphopt ``CompiledModel``), and
:func:`interleaved` times them in turns so that a noisy neighbour slows every engine alike.
"""
from __future__ import annotations

import io
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

import graphopt
from graphopt.targets.hostcpu import host_cpu


def eager_runner(model, inputs) -> Callable[[], None]:
    def run():
        with torch.inference_mode():
            model(*inputs)
    return run


def graphopt_runner(compiled, inputs) -> Callable[[], None]:
    return compiled.runner.bind([x.numpy() for x in inputs])


def onnx_bytes(model, inputs, dynamic_batch: bool = False) -> bytes:
    """The model exported to ONNX (opset 17, TorchScript exporter), input ``x``, output ``y``."""
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


def ort_runner(session, inputs) -> Callable[[], None]:
    feed = {session.get_inputs()[0].name: inputs[0].numpy()}
    return lambda: session.run(None, feed)


def interleaved(runners: Dict[str, Callable[[], None]], rounds: int, per_round: int = 5,
                settle_s: float = 0.3, warmup_s: float = 0.05) -> Dict[str, List[float]]:
    """Milliseconds per run: every round runs each engine ``per_round`` times in turn.

    Each engine's thread pool spins after its last run (TVM's workers yield for about
    300,000 iterations, OpenMP and ONNX Runtime spin too), stealing the cores from the
    engine timed next. So each block starts after ``settle_s`` of quiet, then runs untimed
    for ``warmup_s`` (at least once): after the quiet, one run is not enough to wake an
    engine's threads and caches for sub-millisecond models (their next runs were up to 2x
    slower, more so for engines with many small parallel kernels).
    """
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            time.sleep(settle_s)
            warm_until = time.perf_counter() + warmup_s
            run()
            while time.perf_counter() < warm_until:
                run()
            for _ in range(per_round):
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def quantile(values: List[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def machine() -> dict:
    cpu = host_cpu()
    x86 = graphopt.get_target("x86")
    import onnxruntime
    import tvm

    return {"cpu": cpu.model_name or platform.processor(), "mcpu": x86.mcpu,
            "cores": os.cpu_count(), "features": ", ".join(x86.features),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "tvm": tvm.__version__,
            "load": ", ".join(f"{x:.1f}" for x in os.getloadavg())}


def configure(threads: int, quiet: bool) -> None:
    """What every benchmark's ``main`` does first: logging (graphopt's progress unless
    ``quiet``; torch's and TVM's warnings only) and torch's thread count."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("torch", "tvm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(threads)
