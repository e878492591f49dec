"""One registry per plugin kind (passes, targets), filled by decorators and by entry points.

Built-in passes and targets are found through the same entry-point groups as third-party
packages (``graphopt.passes``, ``graphopt.targets``), so the core never imports them by name.
"""
from __future__ import annotations

import logging
import warnings
from importlib.metadata import entry_points
from typing import Callable, Dict, Generic, Iterator, List, TypeVar

from .errors import RegistrationError, UnknownNameError, did_you_mean

T = TypeVar("T")
log = logging.getLogger("graphopt")


class Registry(Generic[T]):
    """Name -> plugin object, with lazy entry-point discovery.

    Args:
        kind: what is registered ("pass", "target"), used in error messages.
        group: the entry-point group scanned on first lookup.
    """

    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._items: Dict[str, T] = {}
        self._origin: Dict[str, str] = {}
        self._discovered = False

    def add(self, name: str, item: T, origin: str) -> None:
        """Register ``item``; a second, different plugin claiming the same name is an error."""
        if name in self._items and self._origin[name] != origin:
            raise RegistrationError(
                f"{self.kind} {name!r} is already registered by {self._origin[name]}; "
                f"{origin} cannot register it again. Pick another name."
            )
        self._items[name] = item
        self._origin[name] = origin

    def discover(self) -> None:
        """Import every plugin module advertised in the entry-point group (once)."""
        if self._discovered:
            return
        self._discovered = True
        for ep in entry_points(group=self.group):
            try:
                ep.load()  # importing the module runs its register_* decorators
            except Exception as e:  # a broken plugin must not break graphopt
                warnings.warn(
                    f"graphopt: could not load {self.kind} plugin {ep.name!r} ({ep.value}): "
                    f"{type(e).__name__}: {e}",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def get(self, name: str) -> T:
        """Look ``name`` up; an unknown name raises an error listing the known ones."""
        if name not in self._items:
            self.discover()
        if name not in self._items:
            known = sorted(self._items)
            plural = self.kind + ("es" if self.kind.endswith("s") else "s")
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{did_you_mean(name, known, n=1)} "
                f"Known {plural}: {', '.join(known) or '(none)'}."
            )
        return self._items[name]

    def names(self) -> List[str]:
        self.discover()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


#: Entry-point group of objects plugins add to the ``graphopt`` namespace (``graphopt.Target``...).
EXPORTS_GROUP = "graphopt.exports"


def exported(name: str):
    """The object a plugin exports as ``graphopt.<name>`` (entry-point group ``graphopt.exports``).

    Raises:
        AttributeError: no installed plugin exports ``name``.
    """
    for ep in entry_points(group=EXPORTS_GROUP):
        if ep.name == name:
            return ep.load()
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")


def origin_of(obj: Callable) -> str:
    """A stable identity for a plugin object: where it was defined."""
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"
