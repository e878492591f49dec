"""Measure graphopt on timm's lightweight CNNs: the instrument behind issue 12's status table.

Why: users take their CNNs from timm, which writes them differently from torchvision
(``BatchNormAct2d`` traced into functional ``batch_norm``, "same" padding, uneven splits,
reparameterizable branches). This script runs every model of ``tests/timm_zoo.py`` through
what a user would try, on the code as it is, and says what happens:

- capture: ok, or the ``CaptureError`` (and whether its own advice, ``leaf_modules``, works);
- ``fuse_conv_bn``: BatchNorms (modules and ``F.batch_norm``) fed by a conv/linear, before
  and after; relative error;
- ``prune_channels`` ratio=0.3: MACs cut, status, whether the pruned model keeps its output
  shape, and the blockers (frozen channel groups by reason, weighted by the MACs they lock);
- x86, untuned: ``optimize(model, target="x86", tune_trials=0)`` compiles? relative error;
- ARM under qemu, for the models of ``timm_zoo.ARM_MODELS``: the same;
- int8: ``fuse_conv_bn`` + ``quantize`` on random calibration batches, compiled for x86;
  top-1 agreement of the simulated int8 graph and the compiled one on random inputs, and
  the layers left in float.

It writes a markdown table (model, capture, fuse, prune, x86, ARM, int8) and a JSON of the
details. Each model runs in its own subprocess with a timeout per step: a hang or a segfault
costs that step, and the suite goes on. Models run one at a time (the machines are shared).

Needs an environment with timm (``pip install torch==2.14.1 torchvision==0.29.1 timm``, then
``pip install -e ".[test,bench]"``):

    python scripts/timm_suite.py                          # every model -> docs/timm_suite.{md,json}
    python scripts/timm_suite.py --models resnet18,lcnet_050 --skip-arm   # merged into the JSON
    python scripts/timm_suite.py --quick                  # graph passes only, no compilation
    python scripts/timm_suite.py --outside --models hardcorenas_a,spnasnet_100 --out docs/timm_outside.md
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the model list is the test suite's

import timm_zoo  # noqa: E402

STEPS = ("capture", "fuse", "prune", "x86", "arm", "int8")
COMPILE_STEPS = ("x86", "arm", "int8")
#: Seconds a step may take before its worker is killed (untuned builds of 224x224 nets take
#: 20-120 s on 2 cores; qemu runs are about 10x slower than native).
TIMEOUTS = {"capture": 300, "fuse": 300, "prune": 900, "x86": 1200, "arm": 2400, "int8": 1800}
PRUNE_RATIO = 0.3
CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE = 4, 4
AGREEMENT_INPUTS = 32
EXACT = 1e-4


# --------------------------------------------------------------------------------------------
# Helpers on graphs and messages
# --------------------------------------------------------------------------------------------

def op_key(gm, node) -> str:
    """What a node computes: module class, ``Tensor.method`` or the function's name."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    fn = node.target
    mod = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__name__", str(fn))
    if mod.startswith("torch.nn.functional") or mod == "torch._C._nn":
        return f"F.{name}"
    return f"{mod.split('.')[0]}.{name}" if mod and mod not in ("_operator", "builtins") else name


def census(gm) -> Dict[str, int]:
    ops = collections.Counter(op_key(gm, n) for n in gm.graph.nodes
                              if n.op in ("call_module", "call_function", "call_method"))
    return dict(ops.most_common())


def pattern_of(message: str, names: set) -> str:
    """A message with the model's own node and module names (and counts) blanked, so that
    the same reason on fifty layers groups into one line."""
    def blank(m):
        tok = m.group(0)
        core = tok.rstrip(".,:;")
        if core in names:
            return "·" + tok[len(core):]
        return "N" + tok[len(core):] if core.isdigit() else tok
    text = re.sub(r"`[^`]*`", "`·`", message)
    return re.sub(r"[\w.]+", blank, text)


def graph_names(gm) -> set:
    nodes = [n for n in gm.graph.nodes if n.op != "output"]  # "output" is also a word of the messages
    names = {n.name for n in nodes} | {n.target for n in nodes if n.op in ("call_module", "get_attr")}
    return names | {k for k, _ in gm.named_modules() if k}


def grouped(messages: List[str], gm, top: int = 8) -> List[Dict[str, Any]]:
    names = graph_names(gm)
    counts = collections.Counter(pattern_of(m, names) for m in messages)
    example = {}
    for m in messages:
        example.setdefault(pattern_of(m, names), m)
    return [{"count": c, "pattern": p, "example": example[p]} for p, c in counts.most_common(top)]


def layer_macs(gm) -> Dict[str, int]:
    """MACs per layer, keyed as channel spaces name modules (a functional conv by its weight's owner)."""
    import graphopt

    macs: Dict[str, int] = collections.Counter()
    for n in gm.graph.nodes:
        if n.op == "call_module":
            macs[n.target] += graphopt.node_macs(gm, n)
        elif n.op == "call_function" and len(n.args) > 1 and getattr(n.args[1], "op", None) == "get_attr":
            macs[n.args[1].target.rpartition(".")[0]] += graphopt.node_macs(gm, n)
    return macs


def blockers(gm, top: int = 6) -> Dict[str, Any]:
    """Why channels cannot be pruned: frozen groups by reason, with the MACs of the layers
    whose outputs they hold; and the ops the channel analysis does not understand."""
    import graphopt

    analysis = graphopt.analyze_channels(gm)
    macs, total = layer_macs(gm), max(graphopt.count_macs(gm), 1)
    names = graph_names(gm)
    frozen: Dict[str, Dict[str, Any]] = {}
    for g in analysis.groups:
        if g.prunable or not g.producers():
            continue
        e = frozen.setdefault(pattern_of(g.reason, names), {"groups": 0, "macs": 0, "example": g.describe()})
        e["groups"] += 1
        e["macs"] += sum(macs.get(p, 0) for p in g.producers())
    ranked = sorted(frozen.items(), key=lambda kv: -kv[1]["macs"])[:top]
    nodes = {n.name: n for n in gm.graph.nodes}
    unknown = collections.Counter(op_key(gm, nodes[n]) for n in analysis.unknown)
    return {
        "groups": len(analysis.groups), "prunable_groups": len(analysis.prunable_groups()),
        "frozen": [{"reason": r, "groups": e["groups"], "macs_share": e["macs"] / total, "example": e["example"]}
                   for r, e in ranked],
        "unknown_ops": dict(unknown.most_common(10)),
    }


def layers_in_float(gm) -> List[str]:
    """Conv/linear layers still computed in float (modules or functional calls)."""
    import torch.nn as nn

    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.modules.conv._ConvNd, nn.Linear)):
            out.append(n.target)
        elif n.op == "call_function" and n.target in timm_zoo._LAYER_FUNCTIONS:
            out.append(n.name)
    return out


def error_summary(e: BaseException) -> Dict[str, str]:
    """The exception's type and most telling line (TVM puts its C++ traceback first)."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    skip = ("Traceback", "File ", "File\"", "at ", "^", "File \"")
    telling = [ln for ln in lines if not ln.startswith(skip) and not re.match(r"^\d+: ", ln)]
    first = telling[0] if telling else (lines[0] if lines else "")
    if len(telling) > 1 and first.endswith(":"):
        first = f"{first} {telling[1]}"
    return {"error_type": type(e).__name__, "error": first[:400], "message": text[:3000]}


# --------------------------------------------------------------------------------------------
# The steps (run inside a worker process, one model at a time)
# --------------------------------------------------------------------------------------------

class State:
    """One model's objects, built lazily and shared by the steps of one worker."""

    def __init__(self, name: str):
        self.name = name
        self.leaf: List[type] = []  # set when capture needed the CaptureError's advised leaf_modules
        self._model = self._inputs = self._ref = self._gm = self._fused = None

    def _built(self, attr: str):
        if self._model is None:
            import torch

            self._model, self._inputs = timm_zoo.build(self.name)
            with torch.no_grad():
                self._ref = self._model(*self._inputs)
        return getattr(self, attr)

    model = property(lambda self: self._built("_model"))
    inputs = property(lambda self: self._built("_inputs"))
    ref = property(lambda self: self._built("_ref"))  # PyTorch's output on the inputs

    def captured(self):
        import graphopt

        if self._gm is None:
            self._gm = graphopt.capture(self.model, self.inputs, leaf_modules=self.leaf)
        return self._gm

    def optimize(self, passes, target=None, **kwargs):
        import graphopt

        return graphopt.optimize(self.model, passes, target, example_inputs=self.inputs,
                                 leaf_modules=self.leaf, progress=False, **kwargs)

    def fused(self):
        if self._fused is None:
            self._fused = self.optimize(["fuse_conv_bn"]).graph_module
        return self._fused


def step_capture(s: State) -> Dict[str, Any]:
    import graphopt

    shape = {"input": list(s.inputs[0].shape)}
    try:
        gm = s.captured()
    except graphopt.CaptureError as e:
        msg = str(e)
        where = re.search(r"module `([^`]*)` \((\w+)\) at (\S+:\d+)", msg)
        res = {"status": "error", **shape, **error_summary(e), "names_module_and_line": bool(where)}
        if where:
            res.update(module=where.group(1), module_class=where.group(2), line=os.path.basename(where.group(3)))
            res["leaf_retry"] = _leaf_retry(s, where.group(1))
        return res
    return {"status": "ok", **shape, "nodes": len(gm.graph.nodes), "ops": census(gm)}


def _leaf_retry(s: State, qualname: str) -> Dict[str, Any]:
    """Does the error's own advice work? Capture again with the failing module's class as a leaf
    (when it does, the later steps run with that leaf, to show what fails next)."""
    import graphopt

    if not qualname or qualname == "<root>":
        return {"status": "not applicable", "reason": "the failing line is in the root module"}
    cls = type(s.model.get_submodule(qualname))
    try:
        gm = graphopt.capture(s.model, s.inputs, leaf_modules=[cls])
    except Exception as e:  # noqa: BLE001 - any failure is the measurement
        return {"status": "error", "leaf": cls.__name__, **error_summary(e)}
    leaves = sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls))
    s.leaf, s._gm = [cls], gm
    return {"status": "ok", "leaf": cls.__name__, "leaf_calls": leaves, "nodes": len(gm.graph.nodes)}


def step_fuse(s: State) -> Dict[str, Any]:
    opt = s.optimize(["fuse_conv_bn"])
    s._fused = opt.graph_module
    rec = opt.report["fuse_conv_bn"]
    before, after = timm_zoo.batchnorms(s.captured()), timm_zoo.batchnorms(opt.graph_module)
    return {"status": rec.status, "reason": rec.reason, "rel_error": rec.rel_error_vs_original,
            "bn_before": before.total, "bn_after_layer_before": len(before.after_layer),
            "bn_after": after.total, "bn_after_layer": len(after.after_layer),
            "left_after_layer": after.after_layer[:8], "messages": grouped(rec.messages, s.captured())}


def step_prune(s: State) -> Dict[str, Any]:
    import torch

    opt = s.optimize(["fuse_conv_bn", ("prune_channels", {"ratio": PRUNE_RATIO})])
    rec = opt.report["prune_channels"]
    res = {"status": rec.status, "reason": rec.reason, "macs_before": rec.macs_before,
           "macs_after": rec.macs_after, "cut": 1 - rec.macs_after / max(rec.macs_before, 1),
           "messages": grouped(rec.messages, s.fused())}
    try:
        with torch.no_grad():
            out = opt.graph_module(*s.inputs)
        res["runs"], res["shape_kept"] = True, tuple(out.shape) == tuple(s.ref.shape)
    except Exception as e:  # noqa: BLE001
        res["runs"], res["shape_kept"], res["run_error"] = False, False, error_summary(e)["error"]
    res["blockers"] = blockers(s.fused())
    return res


def _compile(s: State, target: str) -> Dict[str, Any]:
    start = time.perf_counter()
    opt = s.optimize(None, target, tune_trials=0, measure_latency=False)
    built = time.perf_counter() - start
    err = timm_zoo.rel_error(opt(*s.inputs), s.ref)
    return {"status": "ok" if err <= EXACT else "inexact", "rel_error": err, "compile_s": built}


def step_x86(s: State) -> Dict[str, Any]:
    return _compile(s, "x86")


def step_arm(s: State) -> Dict[str, Any]:
    return _compile(s, "arm")


def step_int8(s: State) -> Dict[str, Any]:
    import torch

    import graphopt

    g = torch.Generator().manual_seed(1)
    shape = s.inputs[0].shape[1:]
    calib = [torch.randn(CALIBRATION_BATCH_SIZE, *shape, generator=g) for _ in range(CALIBRATION_BATCHES)]
    opt = s.optimize(["fuse_conv_bn", "quantize"], calibration_data=calib)
    rec = opt.report["quantize"]
    gm = opt.graph_module
    res = {"status": rec.status, "reason": rec.reason, "rel_error_vs_fp32": rec.rel_error_vs_original,
           "summary": next((m for m in rec.messages if "layer(s) int8" in m), ""),
           "stays_float": [m for m in rec.messages if "stays float" in m][:20],
           "float_layers_in_graph": layers_in_float(gm)[:40],
           "n_float_layers_in_graph": len(layers_in_float(gm)),
           "ops": census(gm),
           "messages": grouped(rec.messages, gm)}
    if rec.status != "applied":
        res["compile"] = {"status": "skipped", "reason": f"quantize {rec.status}"}
        return res
    start = time.perf_counter()
    try:
        compiled = graphopt.get_target("x86").compile(gm, s.inputs, tune_trials=0)
    except Exception as e:  # noqa: BLE001 - the failure is the measurement; the pass result stays
        res["compile"] = {"status": "error", **error_summary(e)}
        return res
    xs = [torch.randn(1, *shape, generator=g) for _ in range(AGREEMENT_INPUTS)]
    with torch.no_grad():
        sim = [gm(x) for x in xs]
        fp32 = [s.model(x) for x in xs]
    comp = [compiled(x) for x in xs]
    top1 = lambda a, b: sum(int(x.argmax() == y.argmax()) for x, y in zip(a, b)) / len(xs)  # noqa: E731
    res["compile"] = {"status": "ok", "compile_s": time.perf_counter() - start,
                      "agreement_sim_compiled": top1(sim, comp),
                      "agreement_fp32_sim": top1(fp32, sim),
                      "rel_error_sim_compiled": max(timm_zoo.rel_error(c, r) for c, r in zip(comp, sim))}
    return res


STEP_FUNCTIONS: Dict[str, Callable[[State], Dict[str, Any]]] = {
    "capture": step_capture, "fuse": step_fuse, "prune": step_prune,
    "x86": step_x86, "arm": step_arm, "int8": step_int8,
}


def worker(name: str, steps: List[str], events: Path) -> None:
    """Run ``steps`` of one model, appending one JSON line per step start and end to ``events``."""
    import torch

    torch.set_num_threads(2)
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    s = State(name)

    def emit(**event):
        with open(events, "a") as f:
            f.write(json.dumps(_finite(event), default=str) + "\n")

    traceable = None if "capture" in steps else _traceable(s, step_capture(s))  # a restarted worker
    for step in steps:
        if step != "capture" and traceable is False:
            emit(step=step, event="end", result={"status": "skipped", "reason": "not traceable"})
            continue
        emit(step=step, event="start")
        start = time.perf_counter()
        try:
            result = STEP_FUNCTIONS[step](s)
        except Exception as e:  # noqa: BLE001 - a failing step is a measurement, not a crash
            result = {"status": "error", **error_summary(e), "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.perf_counter() - start, 2)
        if step == "capture":
            traceable = _traceable(s, result)
        elif s.leaf:
            result["leaf_modules"] = [c.__name__ for c in s.leaf]
        emit(step=step, event="end", result=result)


#: where timm and torch live in this environment: messages name files relative to it
SITE_PACKAGES = sysconfig.get_paths()["purelib"] + "/"


def _traceable(s: State, capture: Dict[str, Any]) -> bool:
    return capture["status"] == "ok" or bool(s.leaf)


def _finite(obj: Any) -> Any:
    """JSON-safe (NaN/Inf as null), with this machine's site-packages path left out of messages."""
    from graphopt.report.record import json_safe

    def local(v: Any) -> Any:
        if isinstance(v, str):
            return v.replace(SITE_PACKAGES, "<site-packages>/")
        if isinstance(v, dict):
            return {k: local(x) for k, x in v.items()}
        if isinstance(v, list):
            return [local(x) for x in v]
        return v

    return local(json_safe(obj))


# --------------------------------------------------------------------------------------------
# The driver: one subprocess per model, a deadline per step
# --------------------------------------------------------------------------------------------

def _events(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_model(name: str, steps: List[str], log_dir: Path, args: argparse.Namespace) -> Dict[str, Any]:
    """Every step's result; a step that hangs or kills its worker is recorded as such and the
    remaining steps run in a fresh worker."""
    results: Dict[str, Any] = {}
    pending = list(steps)
    log = log_dir / f"{name}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TVM_NUM_THREADS=os.environ.get("TVM_NUM_THREADS", "2"))
    while pending:
        events = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".jsonl", dir=log_dir)[1])
        cmd = [sys.executable, __file__, "--worker", name, "--steps", ",".join(pending), "--events", str(events)]
        with open(log, "a") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        current, started, seen = None, time.monotonic(), 0
        while True:
            done = proc.poll() is not None
            evs = _events(events)
            for ev in evs[seen:]:
                if ev["event"] == "start":
                    current, started = ev["step"], time.monotonic()
                else:
                    results[ev["step"]], current, started = ev["result"], None, time.monotonic()
                    print(f"  {name} {ev['step']}: {_cell(ev['step'], ev['result'])}", flush=True)
            seen = len(evs)
            if done:
                break
            # between steps (start-up, model build, exit) the next step's clock runs
            step = current or next((p for p in pending if p not in results), None)
            limit = TIMEOUTS.get(step or "capture", 300) * args.timeout_scale
            if time.monotonic() - started > limit:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if step is not None:
                    results[step] = {"status": "timeout", "error": f"killed after {limit:.0f} s",
                                     "seconds": round(limit, 1)}
                break
            time.sleep(0.5)
        events.unlink(missing_ok=True)
        if proc.returncode not in (0, -signal.SIGKILL) or (current and current not in results):
            rc = proc.returncode
            why = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
            step = current or next((p for p in pending if p not in results), None)
            if step is not None and step not in results:
                results[step] = {"status": "crash", "error": f"worker died ({why})", "log_tail": _tail(log)}
        left = [p for p in pending if p not in results]
        if left == pending:  # no progress at all: do not loop
            for p in left:
                results[p] = {"status": "crash", "error": "worker made no progress", "log_tail": _tail(log)}
            left = []
        capture = results.get("capture", {})
        if capture.get("status") not in (None, "ok") and capture.get("leaf_retry", {}).get("status") != "ok":
            for p in left:
                results.setdefault(p, {"status": "skipped", "reason": "not traceable"})
            left = []
        pending = left
    return results


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

def _short(text: str, n: int = 70) -> str:
    text = re.sub(r"\s+", " ", text or "").replace("|", "/")
    return text if len(text) <= n else text[: n - 1] + "…"


def _failure(r: Dict[str, Any]) -> Optional[str]:
    if r.get("status") in ("timeout", "crash"):
        return f"{r['status']}: {_short(r.get('error', ''), 40)}"
    if r.get("status") == "error":
        return f"error: {_short(r.get('error_type', '') + ': ' + r.get('error', ''))}"
    if r.get("status") == "skipped":
        return "—"
    return None


def _cell(step: str, r: Optional[Dict[str, Any]]) -> str:
    if r is None:
        return "not run"
    text = _text(step, r)
    return text + " †" if r.get("leaf_modules") else text


def _text(step: str, r: Dict[str, Any]) -> str:
    if step == "capture":
        if r["status"] == "ok":
            return "ok"
        if r.get("error_type") != "CaptureError":
            return _failure(r)
        named = " (module + line)" if r.get("names_module_and_line") else ""
        leaf = "; with it as leaf: ok" if r.get("leaf_retry", {}).get("status") == "ok" else ""
        return f"CaptureError in {r.get('module_class', '?')}{named}{leaf}"
    fail = _failure(r)
    if fail:
        return fail
    if step == "fuse":
        left = f"{r['bn_after_layer']} of {r['bn_after_layer_before']} left"
        return left + ("" if r["status"] in ("applied", "no-op") else f", {r['status']}")
    if step == "prune":
        shape = "" if r.get("shape_kept") else (", output shape changed" if r.get("runs") else ", does not run")
        return f"{100 * r['cut']:.1f}% ({r['status']}{shape})"
    if step in ("x86", "arm"):
        return f"{r['status']} ({r['rel_error']:.1e})"
    if step == "int8":
        c = r.get("compile", {})
        if r["status"] != "applied":
            return f"quantize {r['status']}: {_short(r.get('reason', ''), 40)}"
        if c.get("status") != "ok":
            return f"compile {_failure(c) or c.get('status')}"
        return f"{100 * c['agreement_sim_compiled']:.0f}% top-1, {r['n_float_layers_in_graph']} float layers"
    return r.get("status", "?")


def criteria(models: Dict[str, Any]) -> List[str]:
    """Issue 12's 'Done when', counted on this run over the models that should trace: one whose
    capture fails (or that ran only with a leaf module) fails every criterion."""
    should = {n: m["steps"] for n, m in models.items() if n not in timm_zoo.UNTRACEABLE}  # and --outside ones
    untraced = {n: m["steps"] for n, m in models.items() if n in timm_zoo.UNTRACEABLE}

    def count(step, ok):
        ran = [st.get(step, {}) for st in should.values() if step in st]
        return sum(1 for r in ran if not r.get("leaf_modules") and ok(r)), len(ran)

    fuse = count("fuse", lambda r: r.get("bn_after_layer") == 0 and (r.get("rel_error") or 0) <= EXACT
                 and r.get("status") in ("applied", "no-op"))
    prune = count("prune", lambda r: r.get("cut", 0) >= 0.15 and r.get("shape_kept"))
    x86 = count("x86", lambda r: r.get("status") == "ok")
    arm = count("arm", lambda r: r.get("status") == "ok")
    int8 = count("int8", lambda r: r.get("compile", {}).get("agreement_sim_compiled", 0) >= 0.95)
    capture_ok = sum(1 for st in untraced.values() if st.get("capture", {}).get("names_module_and_line"))
    return [
        f"- fuse_conv_bn leaves no BatchNorm after a conv/linear (rel. error <= 1e-4): {fuse[0]} of {fuse[1]} models",
        f"- prune_channels ratio=0.3 cuts >= 15% of MACs, output shape kept: {prune[0]} of {prune[1]} (goal: 90%)",
        f"- x86 untuned compile, rel. error <= 1e-4: {x86[0]} of {x86[1]} (goal: all)",
        f"- ARM under qemu, rel. error <= 1e-4: {arm[0]} of {arm[1]} run (goal: at least 6)",
        f"- int8 compiled for x86, top-1 agreement >= 95% with the simulated graph: {int8[0]} of {int8[1]} (goal: at least 8)",
        f"- untraceable models with a CaptureError naming module and line: {capture_ok} of {len(untraced)}",
    ]


def render(doc: Dict[str, Any]) -> str:
    env = doc["environment"]
    lines = [
        "# graphopt on timm's lightweight CNNs",
        "",
        f"Produced by `python scripts/timm_suite.py` on {env['date']} (graphopt {env['commit']}, torch {env['torch']}, "
        f"timm {env['timm']}, TVM {env['tvm']}; {env['cpu']}). Random weights, batch 1, 224x224 or the model's "
        f"smaller default. Details per model in the JSON beside this file.",
        "",
        "Columns: fuse = BatchNorms fed directly by a conv/linear left after `fuse_conv_bn`; prune = MACs cut "
        f"by `prune_channels` ratio={PRUNE_RATIO} (status); x86 / ARM = untuned compile of the default passes "
        "(relative error vs PyTorch); int8 = `fuse_conv_bn` + `quantize` compiled for x86: top-1 agreement "
        f"with the simulated int8 graph on {AGREEMENT_INPUTS} random inputs, conv/linear layers left in float.",
        "",
        "| model | capture | fuse | prune 0.3 | x86 | ARM | int8 | graphopt |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in doc["models"].items():  # --models runs merge: each row says which commit it measured
        st = m["steps"]
        cells = [_cell(step, st.get(step)) if step in st else "—" for step in STEPS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m.get('commit', '?')} |")
    lines += ["", "† run with the `leaf_modules` the CaptureError advises (the model does not trace as it is).",
              "", "Against issue 12's 'Done when':", "", *criteria(doc["models"]), ""]
    return "\n".join(lines)


def _environment() -> Dict[str, str]:
    import timm
    import torch
    import tvm

    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"date": datetime.date.today().isoformat(), "commit": commit, "torch": torch.__version__,
            "timm": timm.__version__, "tvm": tvm.__version__, "cpu": f"{cpu}, {os.cpu_count()} cores"}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="comma-separated names (default: all of tests/timm_zoo.py); merged into an existing JSON")
    p.add_argument("--out", default=str(ROOT / "docs" / "timm_suite.md"), help="markdown table; the JSON goes beside it")
    p.add_argument("--outside", action="store_true",
                   help="--models may name any timm model, not only those of tests/timm_zoo.py (write with --out elsewhere)")
    p.add_argument("--skip-arm", action="store_true", help="no ARM builds")
    p.add_argument("--skip-int8", action="store_true", help="no int8")
    p.add_argument("--quick", action="store_true", help="graph passes only (capture, fuse, prune): no compilation")
    p.add_argument("--arm-models", help=f"comma-separated models built for ARM, or 'all' (default: {','.join(timm_zoo.ARM_MODELS)})")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every step's timeout")
    p.add_argument("--log-dir", help="worker logs (default: a new temporary directory)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--steps", help=argparse.SUPPRESS)
    p.add_argument("--events", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps.split(","), Path(args.events))
        return 0

    known = list(timm_zoo.MODELS) + list(timm_zoo.UNTRACEABLE)
    names = args.models.split(",") if args.models else known
    unknown = [n for n in names if n not in known]
    if unknown and args.outside:  # models the test suite does not list: any timm name
        import timm

        unknown = [n for n in unknown if not timm.is_model(n)]
    if unknown:
        p.error(f"not in tests/timm_zoo.py: {', '.join(unknown)} (known: {', '.join(known)})")
    arm = set(known if args.arm_models == "all" else (args.arm_models.split(",") if args.arm_models else timm_zoo.ARM_MODELS))
    out_md = Path(args.out)
    out_json = out_md.with_suffix(".json")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="timm_suite-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"worker logs in {log_dir}", flush=True)

    previous = json.loads(out_json.read_text())["models"] if args.models and out_json.exists() else {}
    env = _environment()
    models: Dict[str, Any] = dict(previous)
    for name in names:
        steps = [s for s in STEPS if not (s in COMPILE_STEPS and args.quick) and not (s == "arm" and (args.skip_arm or name not in arm))
                 and not (s == "int8" and args.skip_int8)]
        start = time.perf_counter()
        print(f"{name}: {', '.join(steps)}", flush=True)
        results = run_model(name, steps, log_dir, args)
        models[name] = {"pattern": timm_zoo.MODELS.get(name) or (f"untraceable ({timm_zoo.UNTRACEABLE[name]})"
                                                                 if name in timm_zoo.UNTRACEABLE else "outside the test suite"),
                        "commit": env["commit"], "seconds": round(time.perf_counter() - start, 1),
                        "steps": {s: results[s] for s in steps if s in results}}
        doc = {"environment": env, "options": {"prune_ratio": PRUNE_RATIO, "calibration": [CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE],
                                                "agreement_inputs": AGREEMENT_INPUTS, "timeouts": TIMEOUTS},
               "models": {n: models[n] for n in known + sorted(set(models) - set(known)) if n in models}}
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(_finite(doc), indent=1, default=str) + "\n")  # after every model: a partial run is kept
        out_md.write_text(render(doc))
    print(f"wrote {out_md} and {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
