"""Baselines at the latency the search reached, for the report's comparison.

The same budget of work as a fair baseline: ``prune_channels`` (through the pass registry, L1,
rounded to the target's multiple) with one option bisected, the result timed on the target,
recovered with ``recovery_batches`` batches and then ``final_recovery`` epochs of distillation
from the same teacher, and judged like the search's candidates. Two baselines, one option each
(``KNOBS``):

- ``uniform`` (``Budget.compare_uniform``): ``ratio``, the same fraction of every group's
  channels cut;
- ``macs`` (``Budget.compare_macs``): ``target_macs``, the fraction of the model's MACs kept,
  reached by ``prune_channels``' one global ranking across groups.

The option is bisected over (0, 1) (``PROBES`` builds) for the lowest latency at or under the
search's final one; every probe is a point of the plot. When the search returned an int8 graph
(``Budget.int8``), each recovered baseline is quantized the same way before it is timed and
judged.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Dict, List

import graphopt
from graphopt.context import no_progress

#: Values tried: a bisection over (0, 1) towards the search's final latency.
PROBES = 4

#: The bisected ``prune_channels`` option of each baseline (its key in ``data["search"]``), and
#: whether a larger value cuts more (ratio: the fraction cut) or less (target_macs below 1: the
#: fraction of MACs kept).
KNOBS = {"uniform": ("ratio", True), "macs": ("target_macs", False)}


def _measure(search, options: Dict[str, Any], int8: bool) -> Dict[str, Any]:
    """``prune_channels`` with ``options`` from the search's start, recovered, timed and judged."""
    ctx, budget = search.ctx, search.budget
    spec = graphopt.get_pass("prune_channels")
    gm = copy.deepcopy(search.start)
    sub = dataclasses.replace(ctx, messages=[], warnings=[], data={}, progress=no_progress)
    gm = spec.instantiate(spec.resolve_options(options))(gm, sub) or gm
    macs = graphopt.count_macs(gm)
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
    return {**options, "macs": macs, "latency_ms": timing.median_ms,
            "spread_ms": spread if math.isfinite(spread) else None, "accuracy": accuracy, "error": error}


def baseline_points(search, final_ms: float, baseline: str = "uniform", int8: bool = False) -> List[Dict[str, Any]]:
    """The ``baseline`` (a key of ``KNOBS``) measured at values of its option bisected towards
    ``final_ms``, sorted by that value; with ``int8``, each pruned and recovered graph is
    quantized (as the search's result was)."""
    option, cuts_more = KNOBS[baseline]
    lo, hi, points = 0.0, 1.0, []
    for _ in range(PROBES):
        value = (lo + hi) / 2
        point = _measure(search, {option: value}, int8)
        points.append(point)
        if (point["latency_ms"] <= final_ms) == cuts_more:  # fast enough: cut less, else more
            hi = value
        else:
            lo = value
    return sorted(points, key=lambda p: p[option])
