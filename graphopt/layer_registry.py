"""Layer families: everything graphopt knows about one kind of layer, registered once.

A *layer family* describes a module type, a function or a Tensor method in up to three parts,
each optional (pooling has only a channel rule and a MAC counter; a quantized conv only MACs):

- ``channels(rc, node, module)``: how its channels couple, for the channel analysis
  (``graphopt.analysis.channels``; ``rc`` is a ``RuleContext``);
- ``resize(module, old)``: after a cut sliced its parameters, set its size attributes
  (``old``: ``in_channels``, ``groups``... as they were before);
- ``macs(node, module) -> int``: its multiply-accumulates at the recorded shapes
  (``graphopt.count_macs``).

Keys are module types, functions, Tensor method names (``"view"``), or qualified names of
functions (``"torchvision.ops.stochastic_depth.stochastic_depth"``) of packages the core does
not import. Every part is found by the same rule (:meth:`LayerRegistry.lookup`):

- ``call_module``: the module's class, then its bases in MRO order; the first that registered
  the part serves, unless a class below it overrides ``forward`` (a subclass with its own
  ``forward`` may compute anything, so it must be registered itself);
- ``call_function``: the function itself, then its qualified name;
- ``call_method``: the method name.

A part of a key is registered once. Registering it again from elsewhere raises
:class:`~graphopt.errors.RegistrationError` naming both origins (``module:qualname``), so two
plugins cannot silently fight over a layer; re-running the same registration (a reloaded
module) replaces it, as the pass and target registries do.

Example:
    >>> import math, torch.nn as nn
    >>> class Doubler(nn.Module):
    ...     def forward(self, x):
    ...         return 2 * x
    >>> @register_layer(Doubler)
    ... class DoublerFamily:
    ...     def channels(rc, node, module):  # output channel c is input channel c
    ...         rc.identity(rc.input(node.args[0]))
    ...     def macs(node, module):
    ...         return math.prod(node.meta["tensor_meta"].shape)
    >>> sorted(p for p in PARTS if getattr(LAYERS.family(Doubler), p))
    ['channels', 'macs']
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional

import torch.fx as fx
import torch.nn as nn

from .errors import RegistrationError
from .registry import origin_of

__all__ = [
    "LAYERS", "PARTS", "LayerFamily", "LayerRegistry", "qualified_name", "register_channel_rule",
    "register_layer", "register_macs", "unregister_layer",
]

#: The parts a family may have, in the order they are used by a pruning pass.
PARTS = ("channels", "resize", "macs")

#: ``rule(rc, node, module_or_None)``: declares the node's channels through ``rc``.
ChannelRule = Callable[[Any, fx.Node, Optional[nn.Module]], None]
#: ``resize(module, old_size_attributes)``: fix a module's attributes after a cut.
ModuleResize = Callable[[nn.Module, Dict[str, int]], None]
#: ``macs(node, module_or_None) -> int``.
MacCounter = Callable[[fx.Node, Optional[nn.Module]], int]


@dataclasses.dataclass
class LayerFamily:
    """The parts registered for one key, and where each came from (``origins[part]``)."""

    channels: Optional[ChannelRule] = None
    resize: Optional[ModuleResize] = None
    macs: Optional[MacCounter] = None
    origins: Dict[str, str] = dataclasses.field(default_factory=dict)


def qualified_name(fn: Any) -> str:
    """``torch.fft.fft``, ``torchvision.ops.stochastic_depth.stochastic_depth``: families may be
    keyed by this string, for functions of packages the core does not import."""
    name = getattr(fn, "__name__", None) or str(fn)
    mod = getattr(fn, "__module__", None) or ""
    if mod.startswith("torch._C._"):  # builtins of torch.fft, torch.linalg, torch.special...
        sub = mod[len("torch._C._"):]
        if sub == "nn":
            return f"torch.nn.functional.{name}"
        if name.startswith(sub + "_"):
            return f"torch.{sub}.{name[len(sub) + 1:]}"
    if not mod or mod == "torch" or mod.startswith("torch._"):
        return f"torch.{name}"
    return f"{mod}.{name}"


def describe_key(key: Any) -> str:
    """A key as a reader would name it: ``torch.nn.Conv2d``, ``torch.cat``, ``Tensor.view``."""
    if isinstance(key, type):
        return f"{key.__module__}.{key.__qualname__}"
    if isinstance(key, str):
        return key if "." in key else f"Tensor.{key}"
    return qualified_name(key)


def _check_key(key: Any) -> None:
    if isinstance(key, type):
        if not issubclass(key, nn.Module):
            raise TypeError(f"a layer family key must be an nn.Module type, a function or a name; "
                            f"got the class {describe_key(key)}")
    elif not (isinstance(key, str) or callable(key)):
        raise TypeError(f"a layer family key must be an nn.Module type, a function or a name; got {key!r}")


class LayerRegistry:
    """Key -> :class:`LayerFamily`, with one lookup rule for every part (module docstring)."""

    def __init__(self) -> None:
        self._families: Dict[Any, LayerFamily] = {}

    def add(self, keys: tuple, parts: Dict[str, Callable]) -> None:
        """Register ``parts`` (``{"channels": fn, ...}``) for every key, all or nothing.

        Raises:
            RegistrationError: a key already has one of these parts from another origin.
            TypeError: a key or a part is not something the registry can use.
        """
        if not keys:
            raise TypeError("register a layer family for at least one key")
        for part, fn in parts.items():
            if part not in PARTS:
                raise TypeError(f"unknown layer family part {part!r}: the parts are {', '.join(PARTS)}")
            if not callable(fn):
                raise TypeError(f"layer family part {part!r} must be callable, got {fn!r}")
        origins = {p: origin_of(fn) for p, fn in parts.items()}
        for key in keys:
            _check_key(key)
            fam = self._families.get(key)
            for part in parts:
                old = fam.origins.get(part) if fam is not None else None
                if old is not None and old != origins[part]:
                    raise RegistrationError(
                        f"{describe_key(key)}: its {part} part is already registered by {old}; "
                        f"{origins[part]} cannot register it again. Unregister the first "
                        f"(graphopt.layer_registry.unregister_layer) or key yours on a subclass.")
        for key in keys:
            fam = self._families.setdefault(key, LayerFamily())
            for part, fn in parts.items():
                setattr(fam, part, fn)
                fam.origins[part] = origins[part]

    def remove(self, key: Any, *parts: str) -> None:
        """Forget ``parts`` of ``key`` (every part when none are named)."""
        fam = self._families.get(key)
        if fam is None:
            return
        for part in parts or PARTS:
            setattr(fam, part, None)
            fam.origins.pop(part, None)
        if not fam.origins:
            del self._families[key]

    def family(self, key: Any) -> Optional[LayerFamily]:
        """What is registered for exactly ``key`` (no lookup rule applied)."""
        try:
            return self._families.get(key)
        except TypeError:  # an unhashable call target
            return None

    def keys(self, part: Optional[str] = None) -> List[Any]:
        """Every key (that has ``part``, when given)."""
        return [k for k, f in self._families.items() if part is None or getattr(f, part) is not None]

    def for_type(self, cls: type, part: str, called: bool = True) -> Optional[Callable]:
        """The ``part`` serving modules of class ``cls``: the MRO rule of the module docstring.

        ``called=False``: for a module the graph never calls, only reads parameters of (fx traced
        through its ``forward``, e.g. timm's ``BatchNormAct2d`` into ``F.batch_norm``): its own
        ``forward`` does not matter then, so the first base that registered the part serves.
        """
        for base in cls.__mro__:
            fam = self._families.get(base)
            if fam is not None and getattr(fam, part) is not None:
                # a subclass with its own forward may compute anything: not covered
                covered = not called or base is cls or cls.forward is base.forward
                return getattr(fam, part) if covered else None
        return None

    def lookup(self, node: fx.Node, module: Optional[nn.Module], part: str) -> Optional[Callable]:
        """The ``part`` serving ``node`` (``module``: the called module of a ``call_module``)."""
        if node.op == "call_module":
            return self.for_type(type(module), part)
        if node.op == "call_method":
            fam = self.family(node.target)
            return getattr(fam, part) if fam is not None else None
        if node.op == "call_function":
            for key in (node.target, qualified_name(node.target)):
                fam = self.family(key)
                if fam is not None and getattr(fam, part) is not None:
                    return getattr(fam, part)
        return None


#: The one registry of layer families; the built-in ones are registered by
#: ``graphopt.analysis.channels`` (channels, resize and MACs of each family in one place).
LAYERS = LayerRegistry()


def register_layer(*keys: Any, channels: Optional[ChannelRule] = None, resize: Optional[ModuleResize] = None,
                   macs: Optional[MacCounter] = None):
    """Register a layer family for ``keys``: its channel rule, its resize, its MAC counter.

    With parts given, registers them and returns None. With none, returns a class decorator
    that reads the parts from the class's ``channels`` / ``resize`` / ``macs`` attributes
    (plain functions, no ``self``) and returns the class unchanged (module docstring example).

    Raises:
        RegistrationError: a key already has one of these parts from somewhere else.

    Example:
        >>> import torch.nn as nn
        >>> class Gate(nn.Module):
        ...     def forward(self, x):
        ...         return x.sigmoid() * x
        >>> def gate_channels(rc, node, module):
        ...     rc.identity(rc.input(node.args[0]))
        >>> register_layer(Gate, channels=gate_channels)
        >>> LAYERS.family(Gate).origins["channels"]
        '...gate_channels'
    """
    given = {p: fn for p, fn in (("channels", channels), ("resize", resize), ("macs", macs)) if fn is not None}
    if given:
        LAYERS.add(keys, given)
        return None

    def decorate(family: Any) -> Any:
        parts = {p: getattr(family, p) for p in PARTS if getattr(family, p, None) is not None}
        if not parts:
            raise TypeError(f"{family!r} defines none of {', '.join(PARTS)}")
        LAYERS.add(keys, parts)
        return family

    return decorate


def unregister_layer(*keys: Any, parts: tuple = PARTS) -> None:
    """Forget ``parts`` (default: all) of ``keys``; e.g. to replace a built-in rule."""
    for key in keys:
        LAYERS.remove(key, *parts)


def register_channel_rule(*keys: Any) -> Callable[[ChannelRule], ChannelRule]:
    """Register the channel rule of module types, functions, method names (strings such as
    ``"view"``), or functions by qualified name: the ``channels`` part of their layer family.

    ``rule(rc, node, module)`` declares ``node``'s output space through ``rc`` (a
    ``RuleContext``); ``module`` is the called module for ``call_module`` nodes, else None. A
    module type's rule also serves subclasses that do not override ``forward``.

    A key that already has a channel rule from elsewhere raises
    :class:`~graphopt.errors.RegistrationError` naming both (before the layer registry, the
    later rule silently replaced the earlier); :func:`unregister_layer` it first to replace it.

    Example:
        >>> import torch.nn as nn
        >>> class Scale(nn.Module):
        ...     def forward(self, x):
        ...         return 2 * x
        >>> @register_channel_rule(Scale)
        ... def _scale(rc, node, module):
        ...     rc.identity(rc.input(node.args[0]))
    """

    def decorate(fn: ChannelRule) -> ChannelRule:
        register_layer(*keys, channels=fn)
        return fn

    return decorate


def register_macs(*keys: Any) -> Callable[[MacCounter], MacCounter]:
    """Register a MAC counter ``macs(node, module_or_None) -> int`` for module types, functions or
    method names: the ``macs`` part of their layer family.

    Module types are looked up by MRO (a subclass with its own ``forward`` is not covered), not,
    as before the layer registry, by the first ``isinstance`` match. A key that already has a
    MAC counter from elsewhere raises :class:`~graphopt.errors.RegistrationError` naming both
    (before, the later one replaced it).
    """

    def decorate(fn: MacCounter) -> MacCounter:
        register_layer(*keys, macs=fn)
        return fn

    return decorate
