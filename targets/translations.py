"""The registry of Relax translations, and the state graphopt's translations share in one lowering.

:func:`register_translation` maps an exported op name (``"add.Tensor"``, ``"my_qconv.default"``)
to a function building Relax for it, passed to TVM's ``from_exported_program`` as its
``custom_convert_map``. The contract is TVM's: ``fn(node, importer) -> relax.Expr``.

A translation that must remember something across nodes of one lowering (graphopt's int8
translations remember which values have a blocked copy) registers with ``with_state=True`` and
is called as ``fn(node, importer, state)``, with the :class:`LoweringState` that
:func:`graphopt.targets.lowering.lower` creates for that call (bound into the convert map it
hands the frontend): nothing is stored on TVM's importer, and nothing outlives the call.

Example:
    >>> from graphopt.targets import lowering  # registers graphopt's own translations
    >>> "q8_conv.default" in translations() and "max_pool2d.default" in translations()
    True
    >>> LoweringState()  # what one lower() call hands its stateful translations
    LoweringState(blocked={}, quantized={})
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ["LoweringState", "convert_map", "register_translation", "translations"]

_TRANSLATIONS: Dict[str, Callable] = {}
_WITH_STATE: Dict[str, bool] = {}


def register_translation(op_name: str, *, with_state: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: translate the exported op ``op_name`` (e.g. ``"my_qconv.default"``) to Relax.

    The function receives ``(node, importer)`` and returns a Relax expression; use
    ``importer.env[arg]`` for translated arguments and ``importer.block_builder.emit``.
    With ``with_state=True`` it receives ``(node, importer, state)``: the lowering's
    :class:`LoweringState`. A name registered twice by different functions is an error.
    """
    def deco(fn: Callable) -> Callable:
        add_unique(_TRANSLATIONS, "translation", op_name, fn)
        _WITH_STATE[op_name] = with_state
        return fn
    return deco


def translations() -> Dict[str, Callable]:
    """Op name -> the registered translation (as registered: some take a state, see above)."""
    return dict(_TRANSLATIONS)


def add_unique(table: Dict[str, Callable], kind: str, name: str, fn: Callable) -> None:
    """``table[name] = fn``; another function (by module and qualified name) under ``name`` is an error."""
    old = table.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
        raise ValueError(f"{kind} {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    table[name] = fn


@dataclasses.dataclass
class LoweringState:
    """What graphopt's translations remember during one lowering (one object per ``lower()`` call).

    Attributes:
        blocked: NC(H)W Relax value -> its blocked copy (a ``graphopt.targets.int8.blocked.Blocked``).
        quantized: quantized NCHW value -> ``(the float value it quantizes, (scale, zero point,
            qmin, qmax, dtype))``, so a conv can quantize its float input while laying it out.
    """

    blocked: Dict[Any, Any] = dataclasses.field(default_factory=dict)
    quantized: Dict[Any, Tuple[Any, tuple]] = dataclasses.field(default_factory=dict)
    _frontend: Optional[Dict[str, Callable]] = dataclasses.field(default=None, repr=False)

    def frontend(self, importer, op_name: str) -> Callable:
        """The Relax frontend's own translation of ``op_name`` (which a registered one shadows)."""
        if self._frontend is None:
            self._frontend = importer.create_convert_map()
        return self._frontend[op_name]


def convert_map(state: LoweringState) -> Dict[str, Callable]:
    """The registered translations as TVM's ``custom_convert_map`` (``fn(node, importer)``),
    the stateful ones bound to ``state``."""
    def bind(fn: Callable) -> Callable:
        return lambda node, importer: fn(node, importer, state)

    return {name: bind(fn) if _WITH_STATE.get(name) else fn for name, fn in _TRANSLATIONS.items()}
