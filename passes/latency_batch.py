"""The latency search's probes, one group or all groups of a step at once (docs/latency_search.md).

:func:`probes` is one group's probing (the first prediction, then up to ``PROBES - 1``
corrections from what was measured) written as a generator: it yields each graph to time and is
sent its timing back, so the same code serves both drivers:

* :func:`propose_one`: one group, each probe timed as it comes (one board, or a local target:
  runs in parallel on one machine would disturb each other);
* :func:`propose_all`: every group of a step together: the first probe of every group is timed
  as one batch (``ctx.time_many``: on a target with several boards, measured on several at
  once), then the groups still short of the aim send their next probe, again as one batch.

A group's probes depend only on its own measurements, so both give the same candidates for
the same timings.
"""
from __future__ import annotations

import math
from typing import Callable, Generator, List, Optional, Sequence, Tuple

import graphopt
from graphopt import ChannelGroup

#: Builds per group and step: the first prediction, then corrections from what was measured.
PROBES = 3

Outcome = Tuple[Optional["Candidate"], str]  # noqa: F821 (latency_search.Candidate)


def probes(search, group: ChannelGroup, aim_ms: float) -> Generator:
    """Yields the graphs of group ``group``'s cuts towards ``aim_ms``, is sent each one's timing;
    returns ``(candidate or None, why not)``."""
    from graphopt.passes.latency_search import (Candidate, channels_of, kept_levels,
                                                macs_saved_per_class, shrink)

    levels = kept_levels(group, search.round_to)
    if not levels:
        return None, f"{channels_of(group, group.size)} channels, cannot keep fewer multiples of {search.round_to}"
    key = tuple(group.producers())
    need_ms = search.latency.median_ms - aim_ms
    per_class = search.ms_per_class.get(key)
    if per_class is None or per_class <= 0:  # cold start: the group's MAC share of the latency
        macs = graphopt.count_macs(search.current)
        per_class = macs_saved_per_class(search.current, group, levels, search.x) / max(macs, 1) \
            * search.latency.median_ms
    best, tried = None, 0
    while tried < PROBES:
        want = group.size - need_ms / max(per_class, 1e-12)
        kept = next((k for k in levels if k <= want), levels[-1])
        if best is not None and kept >= best.classes_after:  # no deeper cut left to try
            kept = next((k for k in levels if k < best.classes_after), None)
            if kept is None:
                break
        gm = shrink(search.current, group.id, kept, search.x)
        timing = yield gm
        tried += 1
        saved = search.latency.median_ms - timing.median_ms
        if saved > 0:
            per_class = saved / (group.size - kept)
            search.ms_per_class[key] = per_class
        cand = Candidate(group.id, list(key), group.size, kept, channels_of(group, group.size),
                         channels_of(group, kept), gm, timing, tried)
        if best is None or timing.median_ms < best.latency_ms:
            best = cand
        if timing.median_ms <= aim_ms or kept == levels[-1]:
            break
        if saved <= 0:
            per_class = search.latency.median_ms / group.size / 4  # saw nothing: go deeper
    if best is None:
        return None, "no cut to try"
    best.probes = tried
    noise = max(search.latency.spread_ms if math.isfinite(search.latency.spread_ms) else 0.0,
                best.latency.spread_ms if math.isfinite(best.latency.spread_ms) else 0.0)
    saved = search.latency.median_ms - best.latency_ms
    if best.latency_ms > aim_ms:
        if saved <= noise or saved <= 0:
            return None, (f"cutting to {best.channels_after} channels saved {saved:.3g} ms, within "
                          f"the noise ({noise:.3g} ms)")
        best.short = True
    return best, ""


def drive(gens: Sequence[Generator], time_batch: Callable[[List], List]) -> List[Outcome]:
    """Run the generators in lockstep: each round, the graph every unfinished one waits on is
    timed in one ``time_batch`` call; their outcomes, in order."""
    out: List[Outcome] = [(None, "")] * len(gens)
    waiting = {}
    for i, g in enumerate(gens):
        try:
            waiting[i] = next(g)
        except StopIteration as stop:
            out[i] = stop.value
    while waiting:
        order = list(waiting)
        timings = time_batch([waiting[i] for i in order])
        waiting = {}
        for i, timing in zip(order, timings):
            try:
                waiting[i] = gens[i].send(timing)
            except StopIteration as stop:
                out[i] = stop.value
    return out


def checked(ctx, timing):
    """A timing the search can use, or a clear error (``timed``'s check)."""
    if timing is None or not math.isfinite(timing.median_ms):
        raise graphopt.TargetError(f"{ctx.capabilities.name} returned no latency for a candidate")
    return timing


def propose_one(search, group: ChannelGroup, aim_ms: float) -> Outcome:
    """One group's candidate, each probe timed as it comes."""
    return drive([probes(search, group, aim_ms)],
                 lambda gms: [checked(search.ctx, search.ctx.time(gm)) for gm in gms])[0]


def propose_all(search, groups: Sequence[ChannelGroup], aim_ms: float) -> List[Outcome]:
    """Every group's candidate, the probes of one round timed together (``ctx.time_many``)."""
    def time_batch(gms):
        search.batch_sizes.append(len(gms))
        return [checked(search.ctx, t) for t in search.ctx.time_many(gms)]

    return drive([probes(search, g, aim_ms) for g in groups], time_batch)
