"""int8 in the latency search (``Budget(int8=True)``): the current graph's int8 form, timed and judged.

``quantize`` must run last: the channel analysis does not read int8 graphs, so a cut cannot come
after it. int8 is therefore not one of a step's candidates but the last move, tried at every
step: at the start and after each step the current fp32 graph is quantized on a copy with the
registered ``quantize`` pass (at its defaults, on a context of its own, as ``recover`` runs
``distill``), timed on the target through ``ctx.time`` (reused by structure like every timing)
and judged like a candidate. The budget is met when that int8 graph meets it within
``max_drop``, and the search returns it; the speed-up int8 gives on the current graph also tells
the fp32 cuts how far they still have to go (:meth:`Int8Point.fp32_goal`). Short of the budget,
the fastest int8 form within ``max_drop`` seen on the way is returned when it beats the last
fp32 graph (a later cut can leave int8 no room in the accuracy budget).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import torch.fx as fx

import graphopt
from graphopt.context import no_progress
from graphopt.passes.latency_search import timed


@dataclasses.dataclass
class Int8Point:
    """The int8 form of one fp32 graph (``source``, the search's graph after ``step``; 0: the
    start): the quantized graph, its latency and its accuracy."""

    source: fx.GraphModule
    step: int
    gm: fx.GraphModule
    latency: Any  # graphopt.Latency
    accuracy: Optional[float]
    error: float

    @property
    def latency_ms(self) -> float:
        return self.latency.median_ms

    def fits(self, floor: Optional[float]) -> bool:
        """Within the accuracy budget (always, without max_drop)."""
        return floor is None or (self.accuracy is not None and self.accuracy >= floor)

    def fp32_goal(self, fp32_ms: float, target_ms: float) -> float:
        """The fp32 latency at which the int8 graph would meet ``target_ms``, at the speed-up
        measured now (int8 slower than fp32 gives no credit)."""
        return target_ms * max(fp32_ms / self.latency_ms, 1.0)

    def to_dict(self) -> Dict[str, Any]:
        spread = self.latency.spread_ms
        return {"latency_ms": self.latency_ms, "spread_ms": spread if math.isfinite(spread) else None,
                "accuracy": self.accuracy, "error": self.error}


def quantized(gm: fx.GraphModule, ctx: graphopt.PassContext, **options) -> fx.GraphModule:
    """A quantized copy of ``gm`` from the registered ``quantize`` pass (its notes stay its own)."""
    spec = graphopt.get_pass("quantize")
    sub = dataclasses.replace(ctx, messages=[], warnings=[], data={}, progress=no_progress)
    out = copy.deepcopy(gm)
    return spec.instantiate(spec.resolve_options(options))(out, sub) or out


def measure(search, gm: fx.GraphModule, step: int) -> Int8Point:
    """``gm`` quantized, timed on the target and judged by the search's judge."""
    q = quantized(gm, search.ctx)
    accuracy, error = search.judge(q)
    return Int8Point(gm, step, q, timed(search.ctx, q), accuracy, error)


def check_int8(gm: fx.GraphModule, ctx: graphopt.PassContext) -> None:
    """Before any pass: the calibration data suits ``quantize`` (its own checks), and the target's
    lowering takes graphopt's int8 ops (its ``check_graph`` on the captured graph quantized with
    one calibration batch; a target without ``check_graph`` is taken on trust)."""
    spec = graphopt.get_pass("quantize")
    if spec.validate is not None:
        spec.validate(gm, ctx, **spec.resolve_options({}))
    check = getattr(ctx.target, "check_graph", None)
    if not callable(check):
        return
    try:
        check(quantized(gm, ctx, num_batches=1), ctx.example_inputs)
    except graphopt.TargetError as e:
        raise graphopt.TargetError(
            f"Budget(int8=True): target {ctx.capabilities.name!r} cannot lower graphopt's int8 ops "
            f"(torch.ops.graphopt.q8_*): {e}; leave int8 out, or use a target with int8 kernels "
            "(x86, arm)") from e


def decide(search) -> Tuple[Optional[Int8Point], str]:
    """The int8 form the search returns (None: its fp32 graph), and why: the current graph's
    when only it meets the budget; short of the budget, the fastest within max_drop seen on the
    way when it beats the fp32 graph; never when the fp32 graph meets the budget alone (int8
    would only lose accuracy)."""
    q, best, fp32_ms = search.int8, search.int8_best, search.latency.median_ms
    met = search.met()
    if met == "fp32":
        return None, f"the fp32 graph meets the budget without it ({fp32_ms:.4g} ms <= {search.target_ms:.4g} ms)"
    if best is None:
        acc = "" if q.accuracy is None else f", accuracy {q.accuracy:.4f}"
        return None, (f"every int8 form measured would lose more than max_drop (floor {search.floor:.4f}; "
                      f"the last: {q.latency_ms:.4g} ms{acc})")
    where = "the start" if best.step == 0 else f"step {best.step}"
    acc = "" if best.accuracy is None else f", accuracy {best.accuracy:.4f}"
    if met == "int8":
        return best, (f"the int8 form of {where} meets the budget: {best.latency_ms:.4g} ms <= "
                      f"{search.target_ms:.4g} ms (fp32 {fp32_ms:.4g} ms){acc}")
    if best.latency_ms < fp32_ms:
        return best, (f"short of the budget, the int8 form of {where} is the fastest within max_drop: "
                      f"{best.latency_ms:.4g} ms (fp32 {fp32_ms:.4g} ms){acc}")
    return None, (f"no int8 form within max_drop is faster than the fp32 graph ({best.latency_ms:.4g} ms, "
                  f"fp32 {fp32_ms:.4g} ms)")
