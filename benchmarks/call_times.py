"""Where a compiled model's time goes outside its tuned kernels, call by call.

``benchmarks/kernels.py`` adds up the tuned kernels' best times from the tuning cache; the
model takes longer (MobileNetV2 fp32: 3.08 ms of kernels, 5.2 ms end to end). This script
times every call the Relax VM makes inside the model (``VirtualMachine.set_instrument``:
TVM 0.27 has no VM profiler), keeps each call's minimum over ``--runs`` inferences (so a
shared machine's preemptions drop out), and sets them beside the tuning loop's times. With
``--launch`` it also measures the VM's cost per instruction and the thread pool's cost per
parallel kernel, on chains of tiny kernels.

Usage:
    python benchmarks/call_times.py [--model mobilenet_v2] [--trials 500] [--cache-dir DIR]
                                    [--threads 2] [--runs 200] [--launch]
"""
from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import graphopt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import kernel_rows  # noqa: E402
from models import MODELS  # noqa: E402


def call_minima(compiled, inputs, runs: int) -> dict:
    """{VM call name: (calls per inference, minimum seconds of one call)}."""
    runner = compiled.runner
    call = runner.bind([x.numpy() for x in inputs])
    call()  # creates this thread's VM
    times = collections.defaultdict(list)
    started = {}

    def instrument(func, name, before, ret, *args):
        now = time.perf_counter()
        if before:
            started["t"] = now
        else:
            times[str(name)].append(now - started["t"])
        return 0

    runner._local.vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            call()
    finally:
        runner._local.vm.set_instrument(None)
    return {name: (len(ts) / runs, min(ts)) for name, ts in times.items()}


def parallel_regions(ir: str, calls: dict) -> float:
    """Parallel loops run per inference: each kernel's ``T.parallel`` count times its calls."""
    per_kernel = {m.group(1): body.count("T.parallel(")
                  for body in ir.split("@T.prim_func") for m in [re.search(r"def (\w+)\(", body)] if m}
    return sum(per_kernel.get(name, 0) * n for name, (n, _) in calls.items())


def launch_costs(threads: int, length: int = 110) -> dict:
    """Microseconds per VM instruction of a chain of ``length`` tiny kernels, serial and parallel."""
    import tvm
    from tvm import relax, te

    def chain(n, parallel):
        a = te.placeholder((2, 16), "float32", name="a")
        sch = tvm.s_tir.Schedule(te.create_prim_func([a, te.compute((2, 16), lambda i, j: a[i, j] + 1.0, name="b")]))
        i, j = sch.get_loops(sch.get_sblock("b"))
        if parallel:
            sch.parallel(i)
        sch.vectorize(j)
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((2, 16), "float32"))
        kernel = bb.add_func(sch.mod["main"].with_attr("global_symbol", "k"), "k")
        with bb.function("main", [x]):
            with bb.dataflow():
                v = x
                for _ in range(n):
                    v = bb.emit(relax.call_tir(kernel, [v], relax.TensorType((2, 16), "float32")))
                out = bb.emit_output(v)
            bb.emit_func_output(out)
        return relax.VirtualMachine(tvm.compile(bb.get(), tvm.target.Target({"kind": "llvm"})), tvm.cpu())["main"]

    from graphopt.targets.runtime import set_runtime_threads

    set_runtime_threads(threads)
    x = tvm.runtime.tensor(np.zeros((2, 16), "float32"))
    costs = {}
    for parallel in (False, True):
        per_n = {}
        for n in (1, length + 1):
            f = chain(n, parallel)
            ts = []
            for _ in range(3000):
                start = time.perf_counter()
                f(x)
                ts.append(time.perf_counter() - start)
            per_n[n] = (min(ts), statistics.median(ts))
        costs["parallel" if parallel else "serial"] = [1e6 * (per_n[length + 1][k] - per_n[1][k]) / length
                                                       for k in (0, 1)]
    return costs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2", choices=sorted(MODELS))
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--launch", action="store_true", help="also the VM's and the thread pool's cost per call")
    args = parser.parse_args(argv)
    model, inputs = MODELS[args.model]()
    target = graphopt.get_target("x86").replace(num_threads=args.threads, cache_dir=args.cache_dir)
    opt = graphopt.optimize(model, ["fuse_conv_bn"], target=target, example_inputs=inputs,
                            tune_trials=args.trials, measure_latency=False, progress=False)
    with opt.compiled as compiled:
        calls = call_minima(compiled, inputs, args.runs)
        regions = parallel_regions(compiled.ir(), calls)
        wall = compiled.benchmark(repeat=args.runs)
    tuned = {r["kernel"]: r for r in kernel_rows(opt.graph_module, inputs, args.threads, args.cache_dir) if r["ms"]}
    ms = {name: 1e3 * n * t for name, (n, t) in calls.items()}
    in_loop = sum(tuned[k]["ms"] * tuned[k]["calls"] for k in ms if k in tuned)
    in_model = sum(v for k, v in ms.items() if k in tuned)
    print(f"{args.model}: {sum(n for n, _ in calls.values()):.0f} VM calls per inference; end to end {wall}, best {wall.min_ms:.3f} ms")
    print(f"tuned kernels: {in_loop:.3f} ms in the tuning loop, {in_model:.3f} ms in the model (sums of minima)")
    print(f"parallel regions per inference: {regions:.0f}")
    for name, v in sorted(((k, v) for k, v in ms.items() if k not in tuned), key=lambda kv: -kv[1]):
        print(f"  not tuned: {v:.3f} ms  x{calls[name][0]:.0f}  {name}")
    for name in sorted((k for k in ms if k in tuned), key=lambda k: tuned[k]["ms"] * tuned[k]["calls"] - ms[k])[:8]:
        print(f"  slower in the model: {tuned[name]['ms'] * tuned[name]['calls']:.3f} -> {ms[name]:.3f} ms  {name}")
    if args.launch:
        for kind, (low, median) in launch_costs(args.threads).items():
            print(f"{kind} kernel call: {low:.2f} us (min), {median:.2f} us (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
