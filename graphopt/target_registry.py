"""The targets registry: the core reaches backends only through it.

A target object must provide ``compile(gm, example_inputs, *, tune_trials, progress) ->
CompiledModel`` and may provide ``preferred_channel_multiple`` (passes round channel counts
to it) and ``measure_latency(gm, example_inputs) -> float`` (milliseconds, for reports).
"""
from __future__ import annotations

from typing import Any, List

from .registry import Registry, origin_of

TARGETS: Registry[Any] = Registry("target", "graphopt.targets")


def register_target(name: str, target: Any) -> Any:
    """Register a target object (or preset) under ``name``; returns it unchanged."""
    TARGETS.add(name, target, origin=f"{origin_of(type(target))}#{name}")
    return target


def get_target(target: Any) -> Any:
    """A registered name, or an object that already is a target, to a target object."""
    if isinstance(target, str):
        return TARGETS.get(target)
    if not callable(getattr(target, "compile", None)):
        raise TypeError(
            f"target must be a registered name ({', '.join(TARGETS.names())}) or an object "
            f"with a compile() method, not {type(target).__name__}"
        )
    return target


def list_targets() -> List[str]:
    """Names of every registered target, built-in and third-party."""
    return TARGETS.names()
