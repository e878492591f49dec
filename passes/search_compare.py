"""Uniform-ratio pruning at the latency the search reached, for the report's comparison.

The same budget of work as a fair baseline: ``prune_channels`` (through the pass registry, L1,
rounded to the target's multiple) cuts every prunable group by one ratio, the result is timed
on the target, recovered with ``recovery_batches`` batches and then ``final_recovery`` epochs of
distillation from the same teacher, and judged like the search's candidates. The ratio is
bisected (``PROBES`` builds) for the lowest latency at or under the search's final one; every
probe is a point of the plot. When the search returned an int8 graph (``Budget.int8``), each
recovered baseline is quantized the same way before it is timed and judged.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Dict, List

import graphopt
from graphopt.context import no_progress

#: Ratios tried: a bisection over (0, 1) towards the search's final latency.
PROBES = 4


def _uniform(search, ratio: float, int8: bool) -> Dict[str, Any]:
    ctx, budget = search.ctx, search.budget
    spec = graphopt.get_pass("prune_channels")
    gm = copy.deepcopy(search.start)
    sub = dataclasses.replace(ctx, messages=[], warnings=[], data={}, progress=no_progress)
    gm = spec.instantiate(spec.resolve_options({"ratio": ratio}))(gm, sub) or gm
    timing = None if int8 else ctx.time(gm)  # int8: its quantized form is timed instead
    from graphopt.passes.latency_search import recover  # the search's own recovery, shared

    if budget.recovery_batches:
        recover(gm, ctx, search.teacher, search.batches[:budget.recovery_batches], 1, budget.recovery_lr)
    if budget.final_recovery:
        recover(gm, ctx, search.teacher, search.batches, budget.final_recovery)
    if int8:  # the search returned its graph's int8 form: so does the baseline
        point = search.int8_of(gm)
        timing, accuracy, error = point.latency, point.accuracy, point.error
    else:
        accuracy, error = search.judge(gm)
    spread = timing.spread_ms
    return {"ratio": ratio, "latency_ms": timing.median_ms, "spread_ms": spread if math.isfinite(spread) else None,
            "accuracy": accuracy, "error": error}


def uniform_points(search, final_ms: float, int8: bool = False) -> List[Dict[str, Any]]:
    """Uniform pruning measured at ratios bisected towards ``final_ms``, sorted by ratio; with
    ``int8``, each pruned and recovered graph is quantized (as the search's result was)."""
    lo, hi, points = 0.0, 1.0, []
    for _ in range(PROBES):
        ratio = (lo + hi) / 2
        point = _uniform(search, ratio, int8)
        points.append(point)
        if point["latency_ms"] <= final_ms:
            hi = ratio
        else:
            lo = ratio
    return sorted(points, key=lambda p: p["ratio"])
