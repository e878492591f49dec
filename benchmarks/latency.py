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
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import List

import torch

import graphopt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (configure, eager_runner, graphopt_runner, interleaved, machine, onnx_bytes,  # noqa: E402
                    ort_runner, ort_session, quantile)
from _docs import write_block  # noqa: E402
from models import MODELS  # noqa: E402

log = logging.getLogger("graphopt.bench")
TUNING_RECORD = Path(__file__).resolve().parent / "latency_tuning.json"


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
    runners = {"eager": eager_runner(model, inputs),
               "ort": ort_runner(ort_session(onnx_bytes(model, inputs), args.threads), inputs),
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
    configure(args.threads, args.quiet)
    rows = [bench_model(*model_budget(spec, args.trials), args) for spec in args.models]
    text = render(rows, machine(), args)
    print(text)
    if not args.no_docs:
        path = write_block("performance.md", text)
        print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
