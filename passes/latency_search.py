"""Compression to a latency budget measured on the target (NetAdapt-style; docs/latency_search.md).

Reached from ``graphopt.optimize(..., budget=graphopt.Budget(...))``, which runs this pass after
the given passes, or named like any pass: ``("latency_search", {"budget": graphopt.Budget(...)})``.
Written on the public API alone: the channel analysis and its ``cut``, ``ctx.time`` (the target's
timing, shared with the report, reused by structure signature), ``ctx.eval_fn``, and the
``distill`` pass through the pass registry for recovery.

One step, from the current graph at latency ``L`` (measured), aiming at ``max(L * (1 - step),
budget)``:

1. for every prunable channel group, the smallest cut (kept channels a multiple of the target's
   ``preferred_channel_multiple``; L1 importance, least important channels first) predicted to
   reach the aim: from the latency each channel of that group saved when it was last measured,
   or, before any measurement, from its MACs; the candidate is built, cut and **timed on the
   target**; short of the aim, the prediction is corrected with that measurement and a deeper
   cut is tried (at most ``PROBES`` builds per group and step);
2. each candidate is recovered with ``recovery_batches`` distillation batches (teacher: the
   model before the lossy passes) and its accuracy measured with ``eval_fn`` (without one: the
   output error against that teacher on the calibration batches);
3. the candidate with the best accuracy per millisecond saved, among those within ``max_drop``,
   becomes the current graph.

It stops when the measured latency is at or under the budget, when every candidate would exceed
``max_drop``, when no group can shrink any more, or after ``max_steps``; then distills for
``final_recovery`` epochs (kept only when it does not lower accuracy). Every step goes into the
report record's ``data["search"]`` and its messages.

With ``Budget(int8=True)`` the current graph's int8 form is also timed and judged at the start
and after every step, and counts for the budget (passes/search_int8.py).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.fx as fx

import graphopt
from graphopt import Budget, ChannelGroup, Option, analyze_channels
from graphopt.analysis.channels import cut
from graphopt.context import no_progress
from graphopt.numerics import compare, run
from graphopt.passes.latency_batch import PROBES, checked, propose_all, propose_one  # noqa: F401 (PROBES)


# --------------------------------------------------------------------------------------------
# Candidates: one channel group cut to a given number of classes
# --------------------------------------------------------------------------------------------

def class_multiple(group: ChannelGroup, round_to: int) -> int:
    """Kept classes must be a multiple of this for every producer to keep a multiple of
    ``round_to`` channels (a class holds several channels of a grouped conv)."""
    step = 1
    for s in group.params("out"):
        per_class = len(group.index[s.key][0])
        step = math.lcm(step, round_to // math.gcd(round_to, per_class))
    return step


def kept_levels(group: ChannelGroup, round_to: int) -> List[int]:
    """The class counts a group may be cut to, largest first (empty: it cannot shrink)."""
    m = class_multiple(group, round_to)
    top = (group.size - 1) // m * m
    return list(range(top, 0, -m))


def l1_order(gm: fx.GraphModule, group: ChannelGroup) -> np.ndarray:
    """The group's classes, least important first: L1 norm of the conv/linear weight slices of
    each class (output and input side), each layer's scores divided by their mean."""
    total = np.zeros(group.size)
    for s in group.params():
        if s.param != "weight" or s.role not in ("out", "in"):
            continue
        t = getattr(gm.get_submodule(s.module), s.param).detach().double()
        per = t.movedim(s.dim, 0).reshape(t.shape[s.dim], -1).abs().sum(1).numpy()
        cls = np.array([per[idx].sum() for idx in group.index[s.key]])
        total += cls / cls.mean() if cls.mean() > 0 else cls
    return np.argsort(total, kind="stable")


def frozen_modules(gm: fx.GraphModule) -> Dict[str, str]:
    """Modules whose channels stay: tied weights (cutting one copy would untie it)."""
    return {m: f"{why}: cutting it would change every use"
            for m, why in graphopt.shared_weights(gm, calls=False).items() if m}


def channels_of(group: ChannelGroup, classes: int) -> int:
    return classes * group.width


def shrink(gm: fx.GraphModule, group_id: int, kept: int, example_inputs) -> fx.GraphModule:
    """A copy of ``gm`` with group ``group_id`` cut to ``kept`` classes (L1 importance)."""
    out = copy.deepcopy(gm)
    analysis = analyze_channels(out, example_inputs, frozen_modules=frozen_modules(out))
    group = analysis.groups[group_id]
    drop = l1_order(out, group)[:group.size - kept]
    removed = {k: np.unique(np.concatenate([group.index[k][c] for c in drop])) for k in group.spaces}
    cut(out, analysis, removed, example_inputs)
    return out


def macs_saved_per_class(gm: fx.GraphModule, group: ChannelGroup, levels: List[int], example_inputs) -> float:
    """MACs one class of the group costs, from its deepest cut: the cold-start guess, before any
    latency of this group was measured."""
    deepest = shrink(gm, group.id, levels[-1], example_inputs)
    return (graphopt.count_macs(gm) - graphopt.count_macs(deepest)) / max(group.size - levels[-1], 1)


# --------------------------------------------------------------------------------------------
# What a candidate is worth
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Candidate:
    group: int
    producers: List[str]
    classes_before: int
    classes_after: int
    channels_before: int
    channels_after: int
    gm: fx.GraphModule
    latency: Any  # graphopt.Latency
    probes: int
    short: bool = False  # its best probe fell short of the step's aim
    accuracy: Optional[float] = None
    error: Optional[float] = None

    @property
    def latency_ms(self) -> float:
        return self.latency.median_ms


def output_error(gm: fx.GraphModule, teacher: fx.GraphModule, batches) -> float:
    """Mean relative output error against the teacher over the batches (lower is better)."""
    with torch.no_grad():
        errs = [compare(run(teacher, b), run(gm, b)).rel for b in batches]
    return float(np.mean([e if math.isfinite(e) else 1e9 for e in errs]))


def recover(gm: fx.GraphModule, ctx: graphopt.PassContext, teacher: fx.GraphModule, batches,
            epochs: int, lr: Optional[float] = None) -> fx.GraphModule:
    """Distill ``gm`` from ``teacher`` in place with the registered ``distill`` pass, on a
    context of its own (its notes are not the search's, its bar stays silent)."""
    spec = graphopt.get_pass("distill")
    sub = dataclasses.replace(ctx, reference=teacher, calibration_data=list(batches), messages=[],
                              warnings=[], data={}, progress=no_progress)
    options = spec.resolve_options({"epochs": epochs, "train_data": list(batches),
                                    **({"lr": lr} if lr is not None else {})})
    return spec.instantiate(options)(gm, sub) or gm


class Judge:
    """Accuracy with ``eval_fn`` (higher is better), else minus the output error; both recorded."""

    def __init__(self, ctx: graphopt.PassContext, teacher: fx.GraphModule):
        self.ctx, self.teacher = ctx, teacher
        # the output error is what ranks candidates without eval_fn; with one it is only shown
        self.batches = ctx.data_batches()[:2 if ctx.eval_fn else 8]

    def __call__(self, gm: fx.GraphModule) -> Tuple[Optional[float], float]:
        accuracy = float(graphopt.arguments.check_eval_result(self.ctx.eval_fn(gm))) if self.ctx.eval_fn else None
        return accuracy, output_error(gm, self.teacher, self.batches)

    @staticmethod
    def score(accuracy: Optional[float], error: float) -> float:
        return accuracy if accuracy is not None else -error


def timed(ctx, gm) -> Any:
    """``ctx.time(gm)``, which the search cannot do without: a clear error when there is none."""
    return checked(ctx, ctx.time(gm))


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------

class Search:
    """State of one run: the current graph, what each group saved per class, the steps so far."""

    def __init__(self, gm: fx.GraphModule, ctx: graphopt.PassContext, budget: Budget):
        self.ctx, self.budget = ctx, budget
        self.x = ctx.example_inputs
        self.round_to = ctx.capabilities.preferred_channel_multiple
        self.teacher = ctx.reference if ctx.reference is not None else copy.deepcopy(gm)
        self.batches = ctx.data_batches()
        self.judge = Judge(ctx, self.teacher)
        self.start = copy.deepcopy(gm)  # what uniform pruning starts from, for the comparison
        self.current = gm
        self.latency = timed(ctx, gm)
        self.start_ms = self.latency.median_ms
        self.target_ms = budget.target_ms(self.start_ms)
        self.accuracy, self.error = self.judge(gm)
        self.start_accuracy = self.accuracy
        self.floor = None if budget.max_drop is None else self.accuracy - budget.max_drop
        self.ms_per_class: Dict[Tuple[str, ...], float] = {}  # measured, per group (by producers)
        self.steps: List[Dict[str, Any]] = []
        # devices that time at once (an RPC tracker's servers): with several, the probes of a
        # step are timed as batches (passes/latency_batch.py); batch_sizes: each batch's graphs
        self.boards = ctx.capabilities.boards()
        self.batch_sizes: List[int] = []
        # Budget.int8 (passes/search_int8.py): the current graph's int8 form, and the fastest
        # int8 form within max_drop so far
        self.int8 = self.int8_best = None
        if budget.int8:
            self.measure_int8(gm, 0)
        self.int8_start = self.int8

    def int8_of(self, gm: fx.GraphModule, step: int = 0):
        from graphopt.passes.search_int8 import measure  # int8, apart (it imports this module)

        return measure(self, gm, step)

    def measure_int8(self, gm: fx.GraphModule, step: int) -> None:
        self.int8 = q = self.int8_of(gm, step)
        if q.fits(self.floor) and (self.int8_best is None or q.latency_ms < self.int8_best.latency_ms):
            self.int8_best = q

    def met(self) -> Optional[str]:
        """``"fp32"`` when the current graph meets the budget, ``"int8"`` when only its int8 form
        does (within max_drop), else None."""
        if self.latency.median_ms <= self.target_ms:
            return "fp32"
        if self.int8 is not None and self.int8.fits(self.floor) and self.int8.latency_ms <= self.target_ms:
            return "int8"
        return None

    def goal_ms(self) -> float:
        """The fp32 latency the cuts work towards: the budget, or with int8 (within max_drop) the
        latency at which the int8 form would meet it."""
        if self.int8 is not None and self.int8.fits(self.floor):
            return self.int8.fp32_goal(self.latency.median_ms, self.target_ms)
        return self.target_ms

    # one group: predict the cut, build it, time it, correct (passes/latency_batch.py) ---------
    def propose(self, group: ChannelGroup, aim_ms: float) -> Tuple[Optional[Candidate], str]:
        return propose_one(self, group, aim_ms)

    def evaluate(self, cand: Candidate) -> None:
        if self.budget.recovery_batches:
            recover(cand.gm, self.ctx, self.teacher, self.batches[:self.budget.recovery_batches], 1,
                    self.budget.recovery_lr)
        cand.accuracy, cand.error = self.judge(cand.gm)

    def choose(self, cands: List[Candidate]) -> Tuple[Optional[Candidate], List[Candidate]]:
        """The best accuracy per millisecond saved among candidates within max_drop; the rest."""
        here = Judge.score(self.accuracy, self.error)
        fit = [c for c in cands if self.floor is None or c.accuracy >= self.floor]
        if not fit:
            return None, cands

        def worth(c):
            saved = max(self.latency.median_ms - c.latency_ms, 1e-9)
            return (not c.short, (Judge.score(c.accuracy, c.error) - here) / saved, saved)

        best = max(fit, key=worth)
        return best, [c for c in cands if c is not best]

    def step(self, index: int, bar) -> Optional[str]:
        """One step; the reason to stop, or None to go on."""
        if self.met():
            return "budget"
        aim = max(self.latency.median_ms * (1 - self.budget.step), self.goal_ms())
        analysis = analyze_channels(self.current, self.x, frozen_modules=frozen_modules(self.current))
        groups = analysis.prunable_groups()
        cands, skipped = [], []
        if self.boards > 1:  # every group's probes together, the rounds timed on the boards at once
            bar.set_postfix_str(f"step {index}: {len(groups)} groups on {self.boards} boards")
            outcomes = iter(propose_all(self, groups, aim))
        for g in groups:
            bar.set_postfix_str(f"step {index}: {g.describe(limit=2)}")
            cand, why = next(outcomes) if self.boards > 1 else self.propose(g, aim)
            if cand is None:
                skipped.append(f"{g.describe(limit=2)}: {why}")
                continue
            self.evaluate(cand)
            cands.append(cand)
        best, rest = self.choose(cands)
        record = {
            "step": index, "latency_before_ms": self.latency.median_ms, "aim_ms": aim,
            "candidates": [self._cand_dict(c) for c in cands], "skipped": skipped,
        }
        if self.int8 is not None:
            record["int8"] = None  # the int8 form of the graph this step chose (none: unchanged)
        if best is None:
            record["chosen"] = None
            self.steps.append(record)
            if not cands:
                return "no group can shrink"
            return "max_drop"
        record["chosen"] = self._cand_dict(best)
        self.steps.append(record)
        self.current, self.latency = best.gm, best.latency
        self.accuracy, self.error = best.accuracy, best.error
        if self.int8 is not None:
            bar.set_postfix_str(f"step {index}: int8")
            self.measure_int8(best.gm, index)
            record["int8"] = self.int8.to_dict()
        return None

    @staticmethod
    def _cand_dict(c: Candidate) -> Dict[str, Any]:
        return {"group": c.group, "producers": c.producers, "channels_before": c.channels_before,
                "channels_after": c.channels_after, "latency_ms": c.latency_ms,
                "spread_ms": c.latency.spread_ms if math.isfinite(c.latency.spread_ms) else None,
                "accuracy": c.accuracy, "error": c.error, "probes": c.probes, "short": c.short}


STOPS = {
    "budget": "the measured latency is at or under the budget",
    "max_drop": "every candidate of the next step would lose more than max_drop accuracy",
    "no group can shrink": "no channel group can shrink further (or a cut saves nothing beyond noise)",
    "max_steps": "max_steps reached before the budget",
}


def validate_options(gm: fx.GraphModule, ctx: graphopt.PassContext, budget=None, **_) -> None:
    """The budget, the target and the data, before any pass runs (as ``optimize`` checks them)."""
    if budget is None:
        raise graphopt.PassOptionError("latency_search: give budget=graphopt.Budget(latency=..., ...)")
    graphopt.budget.check_budget(budget, ctx.capabilities, ctx.eval_fn, bool(ctx.calibration_data))
    if budget.int8:  # quantize's own checks, and a target whose lowering takes the int8 ops
        from graphopt.passes.search_int8 import check_int8

        check_int8(gm, ctx)


@graphopt.register_pass(
    "latency_search",
    exact=False,
    description="Shrink channel groups, measuring every candidate on the target, to a latency budget",
    options={"budget": Option(None, Budget, help="a graphopt.Budget: the latency to reach and the accuracy to keep")},
    runs_after=("fuse_conv_bn", "merge_branches", "dce", "prune_channels", "separable_conv", "distill"),
    runs_before=("quantize",),
    needs=("example_inputs", "target"),
    validate=validate_options,
)
def latency_search(gm: fx.GraphModule, ctx: graphopt.PassContext, budget: Budget):
    """Step by step, the channel cut with the best accuracy per measured millisecond saved."""
    search = Search(gm, ctx, budget)
    stop = None
    bar = ctx.progress(total=budget.max_steps, desc="latency search", unit="step")
    try:
        for i in range(1, budget.max_steps + 1):
            stop = search.step(i, bar)
            if stop is not None:
                break
            bar.update(1)
        else:
            stop = "budget" if search.met() else "max_steps"
    finally:
        bar.close()
    int8 = None  # (the int8 form returned or None, why) with Budget.int8
    if search.int8 is not None:
        from graphopt.passes.search_int8 import decide

        int8 = decide(search)
    taken = int8[0] if int8 else None
    final = taken.gm if taken else search.current
    if taken:  # from here on the search's point is the int8 form's
        search.accuracy, search.error = taken.accuracy, taken.error
    before_final = (search.accuracy, search.error)
    source = taken.source if taken else search.current
    cut = taken.step > 0 if taken else any(s["chosen"] for s in search.steps)  # else nothing to repair
    if budget.final_recovery and cut:
        trial = copy.deepcopy(source)
        recover(trial, ctx, search.teacher, search.batches, budget.final_recovery)
        if taken:  # int8 calibrated again on the recovered weights
            point = search.int8_of(trial)
            trial, acc, err = point.gm, point.accuracy, point.error
        else:
            acc, err = search.judge(trial)
        if Judge.score(acc, err) >= Judge.score(*before_final):
            final, (search.accuracy, search.error) = trial, (acc, err)
        else:
            ctx.note(f"final recovery ({budget.final_recovery} epochs) lowered the score "
                     f"({Judge.score(*before_final):.4g} -> {Judge.score(acc, err):.4g}): not kept")
    final_latency = timed(ctx, final)
    # and once more, outside the cache: does the budget hold on a fresh timing, not only on the
    # one the search chose by (the difference is the machine's noise)
    changed = bool(search.steps) or taken is not None
    retimed = ctx.capabilities.time(final, ctx.example_inputs, ctx.tune_trials) if changed else None
    baselines = {}  # the comparison (passes/search_compare.py): "uniform", "macs" when asked
    if changed and (budget.compare_uniform or budget.compare_macs):
        from graphopt.passes.search_compare import baseline_points

        for key, asked in (("uniform", budget.compare_uniform), ("macs", budget.compare_macs)):
            if asked:
                baselines[key] = baseline_points(search, final_latency.median_ms, key, int8=taken is not None)
    _report(ctx, search, stop, final_latency, retimed, baselines, int8)
    return final


def _finite(v: float) -> Optional[float]:
    return v if v is not None and math.isfinite(v) else None


def _report(ctx, search: Search, stop: str, final_latency, retimed, baselines, int8) -> None:
    b = search.budget
    chosen = [s["chosen"] for s in search.steps if s["chosen"]]
    ctx.note(f"latency search on {ctx.capabilities.name}: {search.start_ms:.4g} ms -> budget "
             f"{search.target_ms:.4g} ms ({b.target_ms(1.0) if b.latency else b.latency_ms:.3g}"
             f"{'x' if b.latency else ' ms'}), step {b.step:g}, {len(search.steps)} step(s), "
             f"{len(chosen)} applied")
    for s in search.steps:
        c = s["chosen"]
        if c is None:
            ctx.note(f"step {s['step']}: no candidate kept ({len(s['candidates'])} measured)")
            continue
        acc = "-" if c["accuracy"] is None else f"{c['accuracy']:.4f}"
        q = s.get("int8")
        q = "" if not q else (f"; int8: {q['latency_ms']:.4g} ms, accuracy "
                              + ("-" if q["accuracy"] is None else f"{q['accuracy']:.4f}"))
        ctx.note(f"step {s['step']}: group {c['group']} [{', '.join(c['producers'][:3])}] "
                 f"{c['channels_before']} -> {c['channels_after']} channels, {s['latency_before_ms']:.4g} -> "
                 f"{c['latency_ms']:.4g} ms (aim {s['aim_ms']:.4g}), accuracy {acc}, "
                 f"{len(s['candidates'])} candidate(s){q}")
    if int8 is not None:
        ctx.note(f"int8 {'taken' if int8[0] else 'not taken'}: {int8[1]}")
    ctx.note(f"stopped: {STOPS[stop]}; final {final_latency.median_ms:.4g} ms"
             + (f", accuracy {search.accuracy:.4f} (started at {search.start_accuracy:.4f})"
                if search.accuracy is not None else f", output error {search.error:.3g}")
             + f"; timings measured {ctx.timings.measured}, reused {ctx.timings.reused}")
    if search.boards > 1:
        ctx.note(f"{search.boards} boards measured the candidates: {len(search.batch_sizes)} batch(es) of probes "
                 f"(graphs per batch: {', '.join(map(str, search.batch_sizes)) or '-'}), the new structures "
                 f"of each timed on the boards at once")
    if stop != "budget":
        ctx.warn(f"latency budget {search.target_ms:.4g} ms not reached ({final_latency.median_ms:.4g} ms): "
                 f"{STOPS[stop]}")
    if retimed is not None:
        ctx.note(f"final graph timed again: {retimed.median_ms:.4g} ms (search: {final_latency.median_ms:.4g} ms)")
        if stop == "budget" and retimed.median_ms > search.target_ms:
            ctx.warn(f"timed again, the result takes {retimed.median_ms:.4g} ms, over the budget of "
                     f"{search.target_ms:.4g} ms (the search measured {final_latency.median_ms:.4g} ms, noise band "
                     f"{max(_finite(retimed.spread_ms) or 0, _finite(final_latency.spread_ms) or 0):.3g} ms)")
    ctx.data["search"] = {
        "budget": b.to_dict(),
        "start": {"latency_ms": search.start_ms, "accuracy": search.start_accuracy},
        "target_ms": search.target_ms,
        "stopped": stop,
        "stop_reason": STOPS[stop],
        "steps": search.steps,
        "final": {"latency_ms": final_latency.median_ms, "spread_ms": _finite(final_latency.spread_ms),
                  "accuracy": search.accuracy, "error": search.error,
                  "retimed_ms": None if retimed is None else retimed.median_ms,
                  "retimed_spread_ms": None if retimed is None else _finite(retimed.spread_ms)},
        "timings": {"measured": ctx.timings.measured, "reused": ctx.timings.reused},
        "boards": search.boards,
        "uniform": baselines.get("uniform", []),
    }
    if search.boards > 1:
        ctx.data["search"]["batches"] = list(search.batch_sizes)
    if "macs" in baselines:
        ctx.data["search"]["macs"] = baselines["macs"]
    if int8 is not None:
        ctx.data["search"]["int8"] = {"start": search.int8_start.to_dict(), "taken": int8[0] is not None,
                                      "step": None if int8[0] is None else int8[0].step, "why": int8[1]}
