"""The targets registry: the core reaches backends only through it.

What a target object must and may provide is :mod:`graphopt.target_protocol`.
"""
from __future__ import annotations

from typing import Any, List

from .registry import Registry, origin_of
from .errors import InvalidArgumentError
from .target_protocol import check_target

TARGETS: Registry[Any] = Registry("target", "graphopt.targets")


def register_target(name: str, target: Any) -> Any:
    """Register a target object (or preset) under ``name``; returns it unchanged."""
    TARGETS.add(name, target, origin=f"{origin_of(type(target))}#{name}")
    return target


def get_target(target: Any) -> Any:
    """A registered name, or an object that already is a target, to a target object."""
    if isinstance(target, str):
        return TARGETS.get(target)
    try:
        return check_target(target)
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"{e} (registered names: {', '.join(TARGETS.names())})") from None


def list_targets() -> List[str]:
    """Names of every registered target, built-in and third-party."""
    return TARGETS.names()
