"""Latency of graphopt-compiled models vs PyTorch eager and ONNX Runtime, on this machine.

For each model (the bundled default, a MobileNetV2 and a ResNet-18 at 224x224), batch 1,
all in one process with the same thread count: PyTorch eager, ONNX Runtime (fp32,
all graph optimizations), graphopt untuned (TVM's default schedules) and graphopt tuned
(``tune_trials`` MetaSchedule trials through the persistent cache). Repetitions are
interleaved (one run of each engine per round), so a noisy neighbour slows every engine
alike; the table reports medians and the p10-p90 spread.

Prints the table and writes it into docs/performance.md (between the benchmark markers),
with the machine, thread count, tuning budget and tuning time.

Usage:
    python benchmarks/latency.py [--trials 2000] [--models mobilenet_v2 resnet18 default:256]
                                 [--threads 2] [--rounds 100] [--no-docs]

A model may carry its own budget (``default:256``); the others get ``--trials``.

Tuning time: roughly 1-2 s per trial on 2 cores. A second run with the same budget hits
the tuning cache (``$GRAPHOPT_CACHE_DIR``, default ``~/.cache/graphopt``) and tunes
nothing; the tuning time of the run that filled the cache is then reported from it.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

import graphopt
from graphopt.targets.hostcpu import host_cpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import write_block  # noqa: E402
from models import MODELS  # noqa: E402

log = logging.getLogger("graphopt.bench")
TUNING_RECORD = Path(__file__).resolve().parent / "latency_tuning.json"


def eager_runner(model, inputs) -> Callable[[], None]:
    def run():
        with torch.inference_mode():
            model(*inputs)
    return run


def ort_runner(model, inputs, threads: int) -> Callable[[], None]:
    import onnxruntime as ort

    buf = io.BytesIO()
    torch.onnx.export(model, inputs, buf, opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return lambda: session.run(None, feed)


def graphopt_runner(compiled, inputs) -> Callable[[], None]:
    return compiled.runner.bind([x.numpy() for x in inputs])


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


def check_outputs(model, compiled, inputs) -> float:
    with torch.inference_mode():
        ref = model(*inputs)
    out = compiled(*inputs)
    return float((out - ref).abs().max() / ref.abs().max())


def load_tuning_record() -> dict:
    try:
        return json.loads(TUNING_RECORD.read_text())
    except (OSError, ValueError):
        return {}


def model_budget(spec: str, default_trials: int):
    """``"resnet18"`` -> ("resnet18", default_trials); ``"default:256"`` -> ("default", 256)."""
    name, _, trials = spec.partition(":")
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return name, int(trials) if trials else default_trials


def bench_model(name: str, trials: int, args) -> dict:
    model, inputs = MODELS[name]()
    target = graphopt.get_target(args.target).replace(num_threads=args.threads)
    row = {"model": name, "input": "x".join(map(str, inputs[0].shape))}
    log.info("%s: compiling untuned", name)
    untuned = graphopt.optimize(model, target=target, example_inputs=inputs, tune_trials=0,
                                measure_latency=False, progress=False).compiled
    log.info("%s: compiling with %d trials", name, trials)
    tuned = graphopt.optimize(model, target=target, example_inputs=inputs, tune_trials=trials,
                              measure_latency=False, progress=not args.quiet).compiled
    info = tuned.tuning
    record = load_tuning_record()
    key = f"{name}/{target.cache_key()}/{trials}"
    if info.trials_run:  # this run filled (part of) the cache: remember what it cost
        record[key] = {"seconds": round(info.seconds, 1), "trials_run": info.trials_run,
                       "date": datetime.date.today().isoformat()}
        TUNING_RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    row.update(trials=trials, tasks=info.tasks - info.tasks_skipped, trials_run_now=info.trials_run,
               tuning_s_now=round(info.seconds, 1), cache_hits=info.cache_hits,
               tuning_s_recorded=record.get(key, {}).get("seconds"),
               err_tuned=check_outputs(model, tuned, inputs))
    runners = {"eager": eager_runner(model, inputs), "ort": ort_runner(model, inputs, args.threads),
               "untuned": graphopt_runner(untuned, inputs), "tuned": graphopt_runner(tuned, inputs)}
    rounds = args.rounds
    times = interleaved(runners, rounds)
    for engine, ms in times.items():
        row[f"{engine}_ms"] = statistics.median(ms)
        row[f"{engine}_p10"] = quantile(ms, 0.1)
        row[f"{engine}_p90"] = quantile(ms, 0.9)
    untuned.close()
    tuned.close()
    return row


def machine() -> dict:
    cpu = host_cpu()
    x86 = graphopt.get_target("x86")
    import onnxruntime
    import tvm

    return {"cpu": cpu.model_name or platform.processor(), "mcpu": x86.mcpu,
            "cores": os.cpu_count(), "features": ", ".join(x86.features),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "tvm": tvm.__version__,
            "load": ", ".join(f"{x:.1f}" for x in os.getloadavg())}


def render(rows: List[dict], info: dict, args) -> str:
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {info['cpu']} ({info['cores']} cores, LLVM mcpu "
        f"{info['mcpu']}; {info['features']}), {args.threads} threads for every engine, batch 1, "
        f"{args.rounds} interleaved rounds of 5 runs per engine (each block after 0.3 s of quiet and 50 ms of "
        f"untimed runs); load average at the end {info['load']}. "
        f"torch {info['torch']}, ONNX Runtime {info['onnxruntime']}, TVM {info['tvm']}.",
        "",
        "| model | input | PyTorch eager | ONNX Runtime | graphopt untuned | graphopt tuned | tuned vs eager | "
        "tuned vs ORT | tuning budget | tuning time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        def cell(engine):
            return f"{r[engine + '_ms']:.2f} ms ({r[engine + '_p10']:.2f}-{r[engine + '_p90']:.2f})"
        tuning = (f"{r['tuning_s_now']:.0f} s" if r["trials_run_now"] else
                  f"cache hit ({r['tuning_s_recorded']:.0f} s when tuned)" if r["tuning_s_recorded"]
                  else "cache hit")
        lines.append(
            f"| {r['model']} | {r['input']} | {cell('eager')} | {cell('ort')} | {cell('untuned')} | "
            f"{cell('tuned')} | {r['eager_ms'] / r['tuned_ms']:.2f}x | {r['ort_ms'] / r['tuned_ms']:.2f}x | "
            f"{r['trials']} trials over {r['tasks']} kernels | {tuning} |")
    lines += ["", "Cells: median (p10-p90) milliseconds. Ratios above 1 mean graphopt is faster. "
              "Compiled outputs matched PyTorch within "
              f"{max(r['err_tuned'] for r in rows):.1e} relative error."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18", "default:256"],
                        help=f"models, each optionally name:trials; from {sorted(MODELS)}")
    parser.add_argument("--trials", type=int, default=2000, help="MetaSchedule trials per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (5 timed runs each)")
    parser.add_argument("--target", default="x86")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/performance.md alone")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s")
    for noisy in ("torch", "tvm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = [bench_model(*model_budget(spec, args.trials), args) for spec in args.models]
    text = render(rows, machine(), args)
    print(text)
    if not args.no_docs:
        path = write_block("performance.md", text)
        print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
