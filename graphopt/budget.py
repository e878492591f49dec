"""``graphopt.Budget``: compress to a latency measured on the target, within an accuracy budget.

``optimize(..., budget=Budget(...))`` runs the ``latency_search`` pass after the given passes
(docs/latency_search.md): step by step it shrinks the channel group whose cut costs the least
accuracy for the latency it saves, measured on the target, until the latency budget is met
(with ``int8=True``: until the int8 graph of the current graph meets it).
Every field is checked when the Budget is made; what depends on the rest of the call (a target
that can time, ``eval_fn`` for ``max_drop``, data to recover on) is checked by
:func:`check_budget`, which ``optimize`` calls before any work.

Example:
    >>> b = Budget(latency=0.5, max_drop=0.01)
    >>> b.latency, b.step, b.max_steps
    (0.5, 0.1, 20)
    >>> Budget(latency=1.5)
    Traceback (most recent call last):
    ...
    graphopt.errors.InvalidArgumentError: Budget: latency is a fraction of the starting latency, strictly between 0 and 1 (0.5: twice as fast), got 1.5; for milliseconds use latency_ms=
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Dict, Optional

from .errors import InvalidArgumentError

__all__ = ["Budget", "check_budget"]


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidArgumentError(f"Budget: {name} must be a finite number, got {value!r}")
    return float(value)


def _count(name: str, value: Any, minimum: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InvalidArgumentError(f"Budget: {name} must be an int >= {minimum} ({meaning}), got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the latency search must reach, and what it may spend getting there.

    Give exactly one of ``latency`` and ``latency_ms``.

    Attributes:
        latency: the latency to reach, as a fraction of the starting latency (measured on the
            target after the given passes), strictly between 0 and 1.
        latency_ms: the latency to reach in milliseconds, on the target.
        max_drop: the largest accuracy drop accepted (``eval_fn``'s units, e.g. 0.01 for one
            point of top-1 as a fraction), against the accuracy when the search starts. Needs
            ``eval_fn``. None: no accuracy limit (candidates are still ranked by accuracy, or by
            output error against the reference without ``eval_fn``).
        step: the fraction of the current latency each step tries to cut (0.1: each step aims
            at 90% of the latency before it), in (0, 1).
        max_steps: stop after this many steps even when the budget is not met.
        recovery_batches: distillation batches each candidate is recovered with before its
            accuracy is measured (0: none; candidates are judged as cut).
        recovery_lr: the Adam learning rate of that short recovery: small, because a few steps
            at ``distill``'s 1e-3 move every weight of a trained model by about that much
            (measured on the Fashion-MNIST model: 4 batches recovering a mild cut took it from
            92.0% to 89.1% at 1e-3, to 92.2% at 1e-4).
        final_recovery: distillation epochs over the calibration data after the last step
            (0: none).
        compare_uniform: also measure uniform-ratio pruning at the search's final latency and
            put it in the report and its plot (costs a few more builds and recoveries).
        compare_macs: also measure MAC-budget pruning (``prune_channels``' ``target_macs``,
            one global ranking across groups) at the search's final latency, the same way;
            a separate flag because each baseline costs its own builds and recoveries.
        int8: int8 allowed: at the start and after every step the current graph is also
            quantized (the ``quantize`` pass at its defaults) and that int8 graph timed and
            judged; the budget is met when it meets it within ``max_drop``, and the search then
            returns the int8 graph. ``quantize`` must come last, so int8 is not one of a step's
            candidates but a last move tried at every step. Needs calibration data and a target
            whose lowering takes graphopt's int8 ops.
    """

    latency: Optional[float] = None
    latency_ms: Optional[float] = None
    max_drop: Optional[float] = None
    step: float = 0.1
    max_steps: int = 20
    recovery_batches: int = 4
    recovery_lr: float = 1e-4
    final_recovery: int = 3
    compare_uniform: bool = False
    int8: bool = False
    compare_macs: bool = False

    def __post_init__(self):
        if (self.latency is None) == (self.latency_ms is None):
            raise InvalidArgumentError(
                "Budget: give the latency to reach, either latency= (a fraction of the starting "
                "latency, e.g. latency=0.5) or latency_ms= (milliseconds on the target), exactly one")
        if self.latency is not None:
            f = _number("latency", self.latency)
            if not 0 < f < 1:
                raise InvalidArgumentError(
                    "Budget: latency is a fraction of the starting latency, strictly between 0 and 1 "
                    f"(0.5: twice as fast), got {self.latency!r}; for milliseconds use latency_ms=")
        if self.latency_ms is not None and _number("latency_ms", self.latency_ms) <= 0:
            raise InvalidArgumentError(f"Budget: latency_ms must be > 0, got {self.latency_ms!r}")
        if self.max_drop is not None and _number("max_drop", self.max_drop) < 0:
            raise InvalidArgumentError(
                f"Budget: max_drop is the largest accuracy drop accepted, >= 0 (e.g. 0.01), got {self.max_drop!r}")
        if not 0 < _number("step", self.step) < 1:
            raise InvalidArgumentError(
                f"Budget: step is the fraction of the latency each step cuts, in (0, 1) (e.g. 0.1), got {self.step!r}")
        _count("max_steps", self.max_steps, 1, "steps of the search")
        _count("recovery_batches", self.recovery_batches, 0, "distillation batches per candidate, 0: none")
        if not _number("recovery_lr", self.recovery_lr) > 0:
            raise InvalidArgumentError(f"Budget: recovery_lr must be > 0 (e.g. 1e-4), got {self.recovery_lr!r}")
        _count("final_recovery", self.final_recovery, 0, "distillation epochs after the search, 0: none")
        if not isinstance(self.compare_uniform, bool):
            raise InvalidArgumentError(f"Budget: compare_uniform must be True or False, got {self.compare_uniform!r}")
        if not isinstance(self.compare_macs, bool):
            raise InvalidArgumentError(f"Budget: compare_macs must be True or False, got {self.compare_macs!r}")
        if not isinstance(self.int8, bool):
            raise InvalidArgumentError(f"Budget: int8 (int8 allowed) must be True or False, got {self.int8!r}")

    def target_ms(self, start_ms: float) -> float:
        """The latency to reach, in milliseconds, given the starting latency."""
        return self.latency_ms if self.latency_ms is not None else self.latency * start_ms

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def check_budget(budget: Any, capabilities: Any, eval_fn: Any, has_data: bool) -> Budget:
    """``budget`` when the rest of the call lets the search run, else a clear error.

    Args:
        budget: what was passed as ``budget=``.
        capabilities: the target's :class:`~graphopt.TargetCapabilities`, None without a target.
        eval_fn: ``optimize``'s eval_fn (None when not given).
        has_data: calibration data was given (recovery trains on it).
    """
    if not isinstance(budget, Budget):
        raise InvalidArgumentError(
            f"budget must be a graphopt.Budget (e.g. graphopt.Budget(latency=0.5, max_drop=0.01)), "
            f"got {type(budget).__name__}")
    if capabilities is None:
        raise InvalidArgumentError(
            "budget needs a target to measure latency on: pass target='x86' (this machine) or an ARM "
            "target with rpc= or tracker= (a board); see `graphopt targets`")
    if capabilities.emulated:
        raise InvalidArgumentError(
            f"target {capabilities.name!r} runs under qemu emulation on this machine: its timings say "
            "nothing about the device, so no latency budget can be searched on it. Give the target "
            "rpc= or tracker= to measure on a real board (latency tables measured on the device are "
            "not supported yet: docs/latency_search.md)")
    if not capabilities.can_measure_latency:
        raise InvalidArgumentError(
            f"target {capabilities.name!r} cannot measure latency (it has no measure_latency method): "
            "a latency budget needs a target that times graphs, e.g. target='x86'")
    if budget.max_drop is not None and eval_fn is None:
        raise InvalidArgumentError(
            f"Budget(max_drop={budget.max_drop}) needs eval_fn to measure accuracy: pass "
            "eval_fn=lambda model: accuracy_of(model) (higher is better), or leave max_drop out")
    if budget.int8 and not has_data:
        raise InvalidArgumentError(
            "Budget(int8=True) quantizes the searched graph, which calibrates on input batches: pass "
            "calibration_data=[batch, ...] (a few batches of real inputs), or leave int8 out")
    if (budget.recovery_batches or budget.final_recovery) and not has_data:
        raise InvalidArgumentError(
            "the latency search recovers each candidate by distillation, which needs input batches: "
            "pass calibration_data=[batch, ...], or Budget(..., recovery_batches=0, final_recovery=0)")
    return budget
