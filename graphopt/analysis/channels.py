"""Channel dependency analysis: which channels of which layers must change together, and how.

A pass that removes, reorders or pads channels (pruning, channel padding for a target's vector
width...) cannot touch one layer alone: a residual add ties the channels of every branch, a
concat maps each input to an offset range of its output, a depthwise conv ties its input to its
output, a flatten turns one channel into ``H*W`` features of the next Linear. This module works
those couplings out once, over the fx graph, and returns them as inspectable groups.

The model. Every tensor a node produces has a *channel space*: its channel dim (dim 1 for conv
activations, the last dim for Linear activations) with one *element* per channel. Every
channel-indexed dim of a parameter is a space too (``conv.weight`` dim 0 is the conv's output
channels, dim 1 its input channels). A *rule*, one per op kind, declares which elements are
coupled: identity (BatchNorm, ReLU, pooling, add), offsets (concat, split), blocks (flatten
into Linear, pixel shuffle), permutations (channel shuffle), parameter dims (conv, linear).
Coupled elements form *classes* (union-find): the atoms a pass may remove, each holding every
element that must go with it. Classes that touch the same spaces form a :class:`ChannelGroup`.

Conservative by construction: an op no rule understands *freezes* every channel it touches
(they are never cut) and the reason is recorded; so do the model's inputs and outputs.

Rules live in one dict keyed by module type, function, or method name (a string), added with
``@register_channel_rule``. A rule receives a :class:`RuleContext` (``rc``), the node and its
module (or None) and declares the node's output channel space and its couplings; it raises
:class:`Unsupported` for a case it does not handle, which undoes whatever it declared and freezes
the node's inputs instead.

Example:
    >>> import torch, torch.nn as nn, torch.fx as fx
    >>> from graphopt.analysis.shapes import propagate_shapes
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    ...         self.head = nn.Conv2d(8, 2, 1)
    ...     def forward(self, x):
    ...         y = self.a(x)
    ...         return self.head(y + self.b(y))
    >>> gm = fx.symbolic_trace(Block())
    >>> propagate_shapes(gm, (torch.randn(1, 3, 8, 8),))
    >>> groups = analyze_channels(gm).prunable_groups()
    >>> [(g.producers(), g.consumers(), g.size) for g in groups]
    [(['a', 'b'], ['b', 'head'], 8)]
"""
from __future__ import annotations

import builtins
import dataclasses
import difflib
import math
import operator
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .shapes import output_shape, propagate_shapes

__all__ = [
    "ChannelAnalysis", "ChannelGroup", "Coupling", "Opaque", "RuleContext", "Space", "Unsupported",
    "analyze_channels", "register_channel_rule",
]


class Unsupported(Exception):
    """Raised by a channel rule for a case it does not handle; the node is then left alone."""


@dataclasses.dataclass(frozen=True)
class Space:
    """A channel-indexed dimension: a node's channel dim, or a parameter's channel-indexed dim.

    Attributes:
        key: unique name, ``"node:<node>"`` or ``"param:<module>.<param>:<dim>"``.
        size: number of channels (elements).
        base: id of its first element (elements are numbered across all spaces).
        dim: the tensor dim that holds the channels.
        node: the fx node whose output this is (node spaces), or whose parameters (param spaces).
        module, param: the module and parameter name (param spaces; ``module`` is also set on
            node spaces of ``call_module`` nodes).
        role: for param spaces: ``"out"`` (a layer's output channels: conv/linear weight dim 0),
            ``"in"`` (a layer's input channels) or ``"channel"`` (per-channel parameters of
            norm layers, PReLU); None for node spaces.
    """

    key: str
    size: int
    base: int
    dim: Optional[int]
    node: Optional[str] = None
    module: Optional[str] = None
    param: Optional[str] = None
    role: Optional[str] = None

    @property
    def is_param(self) -> bool:
        return self.param is not None

    def ids(self, index: Union[Sequence[int], np.ndarray, None] = None) -> np.ndarray:
        """Global element ids of channels ``index`` (all channels when None)."""
        if index is None:
            return np.arange(self.base, self.base + self.size, dtype=np.int64)
        return self.base + np.asarray(index, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Opaque:
    """A tensor without analyzable channels (a model input, a constant, an unknown op's output)."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Coupling:
    """One declared coupling between two spaces (an edge of ``ChannelAnalysis.graph``)."""

    a: str
    b: str
    kind: str  # identity | permutation | offset | block | param | group | depthwise | fixed-dim
    node: str  # the node whose rule declared it
    detail: str = ""


@dataclasses.dataclass
class _Chain:
    """A tensor whose channels are spread over several dims (inside a view/transpose/reshape
    sequence such as a channel shuffle): ``probe`` holds, at every position, the channel of
    ``start`` found there; ``adapts[d]`` says whether dim ``d``'s size follows the channel count
    (computed at run time) or is fixed (a literal in the code)."""

    start: Space
    probe: torch.Tensor
    adapts: Tuple[bool, ...]


Resize = Callable[[fx.Node, Callable[[Space], int]], None]


# --------------------------------------------------------------------------------------------
# The rule table
# --------------------------------------------------------------------------------------------

ChannelRule = Callable[["RuleContext", fx.Node, Optional[nn.Module]], None]
_RULES: Dict[Any, ChannelRule] = {}


def register_channel_rule(*keys: Any) -> Callable[[ChannelRule], ChannelRule]:
    """Register the channel rule of module types, functions, method names (strings such as
    ``"view"``), or functions by qualified name (``"torchvision.ops.stochastic_depth.stochastic_depth"``).

    ``rule(rc, node, module)`` declares ``node``'s output space through ``rc`` (a
    :class:`RuleContext`); ``module`` is the called module for ``call_module`` nodes, else None.
    A module type's rule also serves subclasses that do not override ``forward``. A later
    registration for the same key replaces the earlier one (plugins may refine a rule).

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
        for k in keys:
            _RULES[k] = fn
        return fn

    return decorate


def _rule_for(node: fx.Node, module: Optional[nn.Module]) -> Optional[ChannelRule]:
    if node.op == "call_module":
        cls = type(module)
        for base in cls.__mro__:
            if base in _RULES:
                # a subclass with its own forward may compute anything: not covered
                return _RULES[base] if base is cls or cls.forward is base.forward else None
        return None
    if node.op == "call_method":
        return _RULES.get(node.target)
    if node.op == "call_function":
        try:
            rule = _RULES.get(node.target)
        except TypeError:  # unhashable target
            rule = None
        return rule or _RULES.get(_qualified_name(node.target))
    return None


def _qualified_name(fn: Any) -> str:
    """``torch.fft.fft``, ``torchvision.ops.stochastic_depth.stochastic_depth``: rules may be
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


def _describe(node: fx.Node, module: Optional[nn.Module] = None) -> str:
    if node.op == "call_module":
        return f"`{node.target}` ({type(module).__name__})"
    if node.op == "call_method":
        return f"`{node.name}` (Tensor.{node.target})"
    return f"`{node.name}` ({_qualified_name(node.target)})"


# --------------------------------------------------------------------------------------------
# Small helpers on fx nodes
# --------------------------------------------------------------------------------------------

def _is_tensor(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    t = node.meta.get("type")
    if isinstance(t, type) and issubclass(t, torch.Tensor):
        return True
    return hasattr(node.meta.get("tensor_meta"), "shape")


def _is_tensor_tuple(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, (tuple, list)) and any(hasattr(m, "shape") for m in meta)


def _tensor_inputs(node: fx.Node) -> List[fx.Node]:
    return [a for a in node.all_input_nodes if _is_tensor(a) or _is_tensor_tuple(a)]


def _norm_dim(d: int, ndim: int) -> int:
    if not -ndim <= d < max(ndim, 1):
        raise Unsupported(f"dim {d} out of range for a {ndim}-d tensor")
    return d % ndim if ndim else 0


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _varies(p: torch.Tensor, d: int) -> bool:
    return p.shape[d] > 1 and bool((p != p.narrow(d, 0, 1)).any())


def _along(p: torch.Tensor, d: int) -> np.ndarray:
    """Values of ``p`` along dim ``d`` (at index 0 of every other dim)."""
    return p.movedim(d, 0).reshape(p.shape[d], -1)[:, 0].numpy().astype(np.int64)


def _index_probe(shape: Sequence[int], dim: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return torch.arange(shape[dim], dtype=torch.int64).view(view).expand(*shape).contiguous()


#: Calls that read a tensor's size or type, never its values: they do not constrain channels.
_SIZE_QUERIES_FN = {builtins.getattr, builtins.len}
_SIZE_QUERIES_METHOD = {"size", "dim", "numel", "nelement", "ndimension", "get_device"}
_SIZE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"}
#: Pure functions on Python values (shape arithmetic) that may be evaluated from the metadata.
_VALUE_FNS = {getattr(operator, n) for n in (
    "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "getitem", "eq", "ne",
    "lt", "le", "gt", "ge")} | {builtins.getattr, builtins.len, builtins.int, math.prod,
                                math.ceil, math.floor, builtins.max, builtins.min}


# --------------------------------------------------------------------------------------------
# The context rules write to
# --------------------------------------------------------------------------------------------

class RuleContext:
    """What a channel rule may read and declare while the analysis walks the graph.

    Reading: :meth:`input` (the channel space of a node: a :class:`Space`, or None when the
    tensor has no analyzable channels), :meth:`shape`, :meth:`value` (the concrete value of a
    non-tensor argument such as ``x.size(1) // 2``), ``modules`` (name -> module).

    Declaring: :meth:`new_space` / :meth:`identity` / :meth:`opaque` give the current node its
    output; :meth:`param` names a parameter dim as a space; :meth:`couple` ties elements of two
    spaces; :meth:`freeze` marks channels that must never change; :meth:`on_resize` registers
    how to rewrite the node's arguments when channel counts change (e.g. split sizes).
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules: Dict[str, nn.Module] = dict(gm.named_modules())
        self.node: Optional[fx.Node] = None
        self._spaces: List[Space] = []
        self._by_key: Dict[str, Space] = {}
        self._out: Dict[str, Union[Space, Opaque, _Chain]] = {}
        self._pre: Dict[str, Union[Space, Opaque]] = {}
        self._values: Dict[str, Any] = {}
        self._pairs: List[Tuple[np.ndarray, np.ndarray]] = []
        self._frozen: List[Tuple[np.ndarray, str]] = []
        self._history: List[Coupling] = []
        self._resizes: List[Tuple[fx.Node, Resize]] = []
        self._n = 0
        self.unknown: Dict[str, str] = {}

    # ---- reading ------------------------------------------------------------------------
    def shape(self, x: Any) -> Optional[Tuple[int, ...]]:
        """The tensor shape of node ``x`` (from shape propagation), or None."""
        return output_shape(x) if isinstance(x, fx.Node) else None

    def input(self, x: Any) -> Optional[Space]:
        """The channel space of tensor node ``x``; None if it has no analyzable channels.

        Raises:
            Unsupported: ``x``'s channels are spread over several dims (mid channel-shuffle).
        """
        got = self._out.get(x.name) if isinstance(x, fx.Node) else None
        if isinstance(got, _Chain):
            raise Unsupported(f"its input `{x.name}` has its channels spread over several dims")
        return got if isinstance(got, Space) else None

    def reason(self, x: Any) -> str:
        """Why node ``x`` has no analyzable channels."""
        got = self._out.get(x.name) if isinstance(x, fx.Node) else None
        return got.reason if isinstance(got, Opaque) else "not a tensor with channels"

    def value(self, a: Any) -> Any:
        """The concrete value of an argument: literals as they are, shape arithmetic evaluated."""
        if isinstance(a, fx.Node):
            if a.name not in self._values:
                raise Unsupported(f"the value of `{a.name}` is not known statically")
            return self._values[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(self.value(v) for v in a)
        if isinstance(a, slice):
            return slice(self.value(a.start), self.value(a.stop), self.value(a.step))
        if isinstance(a, dict):
            return {k: self.value(v) for k, v in a.items()}
        return a

    # ---- declaring ----------------------------------------------------------------------
    def _add_space(self, key: str, size: int, dim: Optional[int], **kw) -> Space:
        s = Space(key=key, size=int(size), base=self._n, dim=dim, **kw)
        self._n += s.size
        self._spaces.append(s)
        self._by_key[key] = s
        return s

    def new_space(self, dim: int, node: Optional[fx.Node] = None) -> Space:
        """Create the channel space of ``node`` (default: the current node) along ``dim``."""
        node = node or self.node
        shape = self.shape(node)
        if shape is None:
            raise Unsupported(f"`{node.name}` has no recorded shape")
        dim = _norm_dim(dim, len(shape))
        mod = node.target if node.op == "call_module" else None
        s = self._add_space(f"node:{node.name}", shape[dim], dim, node=node.name, module=mod)
        if node is self.node:
            self._out[node.name] = s
        else:
            self._pre[node.name] = s
        return s

    def piece_space(self, key: str, size: int, dim: int) -> Space:
        """A space with no node of its own (e.g. an unused output of a split)."""
        return self._add_space(f"piece:{self.node.name}:{key}", size, dim, node=self.node.name)

    def param(self, module: str, param: str, dim: int, role: str) -> Space:
        """The space of dim ``dim`` of parameter (or buffer) ``module.param``; created once."""
        key = f"param:{module}.{param}:{dim}"
        if key not in self._by_key:
            t = getattr(self.modules[module], param)
            self._add_space(key, t.shape[dim], dim, node=self.node.name, module=module,
                            param=param, role=role)
        return self._by_key[key]

    def opaque(self, reason: str) -> None:
        """The current node's output has no analyzable channels."""
        self._out[self.node.name] = Opaque(reason)

    def couple(self, a: Space, ia: Any, b: Space, ib: Any, kind: str, detail: str = "") -> None:
        """Tie channel ``ia[k]`` of ``a`` to channel ``ib[k]`` of ``b`` for every k (broadcast)."""
        ia, ib = np.broadcast_arrays(np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64))
        if ia.size == 0:
            return
        if ia.min() < 0 or ia.max() >= a.size or ib.min() < 0 or ib.max() >= b.size:
            raise Unsupported(f"channel index out of range coupling {a.key} with {b.key}")
        self._pairs.append((a.base + ia.ravel(), b.base + ib.ravel()))
        self._history.append(Coupling(a.key, b.key, kind, self.node.name if self.node else "", detail))

    def identity(self, src: Space, kind: str = "identity") -> Space:
        """The current node's output has the same channels as ``src``, in the same dim."""
        shape = self.shape(self.node)
        if shape is None or len(shape) <= src.dim or shape[src.dim] != src.size:
            raise Unsupported("its output does not keep the input's channel dim")
        out = self.new_space(src.dim)
        self.couple(src, np.arange(src.size), out, np.arange(src.size), kind)
        return out

    def freeze(self, space: Space, reason: str, index: Any = None) -> None:
        """Channels ``index`` (all when None) of ``space`` must never change."""
        self._frozen.append((space.ids(index), reason))

    def freeze_input(self, x: Any, reason: str) -> None:
        """Freeze every channel of tensor node ``x``, whatever form its channels are in."""
        got = self._out.get(x.name) if isinstance(x, fx.Node) else None
        if isinstance(got, Space):
            self.freeze(got, reason)
        elif isinstance(got, _Chain):
            self.freeze(got.start, reason, np.unique(got.probe.numpy()))

    def on_resize(self, fn: Resize, node: Optional[fx.Node] = None) -> None:
        """``fn(node, new_size)`` rewrites ``node``'s arguments when channel counts change;
        ``new_size(space)`` is the space's new channel count."""
        self._resizes.append((node or self.node, fn))

    def set_chain(self, chain: _Chain) -> None:
        self._out[self.node.name] = chain

    # ---- the walk -----------------------------------------------------------------------
    def _snapshot(self):
        return (len(self._spaces), self._n, len(self._pairs), len(self._frozen),
                len(self._history), len(self._resizes), dict(self._pre))

    def _restore(self, snap) -> None:
        ns, n, npairs, nfrozen, nhist, nres, pre = snap
        for s in self._spaces[ns:]:
            del self._by_key[s.key]
        del self._spaces[ns:]
        self._n = n
        del self._pairs[npairs:], self._frozen[nfrozen:], self._history[nhist:], self._resizes[nres:]
        self._pre = pre
        self._out.pop(self.node.name, None)

    def _unknown(self, node: fx.Node, why: str) -> None:
        self.unknown[node.name] = why
        for a in _tensor_inputs(node):
            self.freeze_input(a, f"used by {why}")
        self._out[node.name] = Opaque(f"output of {why}")

    def _value_node(self, node: fx.Node) -> None:
        """Evaluate non-tensor nodes (``x.shape[1] // 2``) from the recorded shapes."""
        tgt, args = node.target, node.args
        try:
            if node.op == "call_function" and tgt is builtins.getattr and _is_tensor(args[0]):
                if args[1] == "shape":
                    self._values[node.name] = torch.Size(self.shape(args[0]))
                elif args[1] == "ndim":
                    self._values[node.name] = len(self.shape(args[0]))
                return
            if node.op == "call_method" and tgt == "size" and _is_tensor(args[0]):
                size = torch.Size(self.shape(args[0]))
                d = _arg(node, 1, "dim")
                self._values[node.name] = size if d is None else size[self.value(d)]
                return
            if node.op == "call_method" and tgt == "dim" and _is_tensor(args[0]):
                self._values[node.name] = len(self.shape(args[0]))
                return
            if node.op == "call_function" and tgt in _VALUE_FNS and not _tensor_inputs(node):
                self._values[node.name] = tgt(*self.value(node.args), **self.value(node.kwargs))
        except (Unsupported, TypeError, ValueError, IndexError, KeyError, ZeroDivisionError):
            pass

    def _is_size_query(self, node: fx.Node) -> bool:
        if node.op == "call_method":
            return node.target in _SIZE_QUERIES_METHOD
        if node.op == "call_function":
            if node.target is builtins.getattr:
                return len(node.args) > 1 and node.args[1] in _SIZE_ATTRS
            return node.target in _SIZE_QUERIES_FN or not _tensor_inputs(node)
        return False

    def _visit(self, node: fx.Node) -> None:
        self.node = node
        if node.name in self._pre:
            self._out[node.name] = self._pre.pop(node.name)
            return
        if node.op == "placeholder":
            self.opaque(f"model input `{node.name}`")
            return
        if node.op == "get_attr":
            self.opaque(f"constant tensor `{node.target}`")
            return
        if node.op == "output":
            for a in node.all_input_nodes:
                self.freeze_input(a, "reaches the model output")
            return
        if not (_is_tensor(node) or _is_tensor_tuple(node)):
            if self._is_size_query(node):
                self._value_node(node)
                return
            if not _tensor_inputs(node):
                return
        module = self.modules.get(node.target) if node.op == "call_module" else None
        rule = _rule_for(node, module)
        if rule is None:
            self._unknown(node, f"{_describe(node, module)}, which has no channel rule")
            return
        snap = self._snapshot()
        try:
            rule(self, node, module)
        except Unsupported as e:
            self._restore(snap)
            self._unknown(node, f"{_describe(node, module)}: {e}")
            return
        if node.name not in self._out and (_is_tensor(node) or _is_tensor_tuple(node)):
            self._out[node.name] = Opaque(f"output of {_describe(node, module)}")


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ChannelGroup:
    """Channels that must change together, as ``size`` interchangeable classes.

    A class is one unit of change (for pruning: one "channel" of the group): cutting class
    ``k`` cuts channels ``index[key][k]`` of every space ``key`` of the group, e.g. output
    channel 3 of ``conv1``, channel 3 of ``bn1``, input channel 3 of ``conv2`` and feature
    columns ``3*49 .. 3*49+48`` of a Linear after a flatten.

    Attributes:
        id: position in ``ChannelAnalysis.groups``.
        size: number of classes.
        spaces: the spaces touched, by key.
        index: ``{space key: [indices of class 0, indices of class 1, ...]}`` (numpy arrays).
        prunable: False when any channel is frozen (then ``reason`` says why).
        reason: why the group must stay as it is ('' when prunable).
        history: the couplings that formed the group (which rule tied which spaces).
    """

    id: int
    size: int
    spaces: Dict[str, Space]
    index: Dict[str, List[np.ndarray]]
    prunable: bool
    reason: str
    history: List[Coupling]

    def params(self, role: Optional[str] = None) -> List[Space]:
        """The parameter spaces of the group (optionally only one role: out, in, channel)."""
        return [s for s in self.spaces.values() if s.is_param and (role is None or s.role == role)]

    def _modules(self, role: str) -> List[str]:
        seen: Dict[str, None] = {}
        for s in self.params(role):
            seen.setdefault(s.module, None)
        return list(seen)

    def producers(self) -> List[str]:
        """Modules whose output channels are in the group."""
        return self._modules("out")

    def consumers(self) -> List[str]:
        """Modules whose input channels are in the group."""
        return self._modules("in")

    def channelwise(self) -> List[str]:
        """Modules with per-channel parameters in the group (BatchNorm, GroupNorm, PReLU...)."""
        return self._modules("channel")

    def nodes(self) -> List[str]:
        """The fx nodes whose outputs carry the group's channels."""
        return [s.node for s in self.spaces.values() if s.key.startswith("node:")]

    @property
    def width(self) -> int:
        """Channels per class in the widest producer (e.g. ``groups`` for a grouped conv)."""
        return max((len(self.index[s.key][0]) for s in self.params("out")), default=1) if self.size else 1

    def describe(self, limit: int = 4) -> str:
        """One line: producers -> consumers and the size."""
        def names(xs):
            return ", ".join(xs[:limit]) + (f" (+{len(xs) - limit})" if len(xs) > limit else "")

        prod, cons = self.producers(), self.consumers()
        text = f"group {self.id} [{names(prod) or 'no producer'} -> {names(cons) or 'no consumer'}]"
        kinds = sorted({c.kind for c in self.history} - {"identity", "param"})
        return text + (f" via {'/'.join(kinds)}" if kinds else "")


@dataclasses.dataclass
class ChannelAnalysis:
    """The result of :func:`analyze_channels`.

    Attributes:
        gm: the analyzed graph module.
        groups: every channel group, in graph order.
        spaces: every space, by key.
        node_spaces: node name -> its output's channel space (None: no analyzable channels).
        graph: a networkx MultiGraph of spaces (nodes, with their attributes) and couplings
            (edges with ``kind``, ``node`` and ``detail``).
        unknown: node name -> why the analysis did not understand it (its channels are frozen).
        resizes: (node, fn) pairs: argument rewrites to apply when channel counts change.
    """

    gm: fx.GraphModule
    groups: List[ChannelGroup]
    spaces: Dict[str, Space]
    node_spaces: Dict[str, Optional[Space]]
    graph: nx.MultiGraph
    unknown: Dict[str, str]
    resizes: List[Tuple[fx.Node, Resize]]

    def prunable_groups(self) -> List[ChannelGroup]:
        return [g for g in self.groups if g.prunable and g.size > 1]

    def groups_of(self, name: str) -> List[ChannelGroup]:
        """Groups touching module or node ``name``."""
        return [g for g in self.groups
                if any(s.module == name or s.node == name for s in g.spaces.values())]

    def summary(self) -> str:
        lines = []
        for g in self.groups:
            if g.params("out") or not g.prunable:
                state = f"{g.size} classes" + ("" if g.prunable else f", frozen: {g.reason}")
                lines.append(f"{g.describe()}: {state}")
        lines += [f"unknown `{n}`: {why}" for n, why in self.unknown.items()]
        return "\n".join(lines)


def _components(n: int, pairs: List[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected components of the element graph (union-find over every declared coupling)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if pairs:
        a = np.concatenate([p[0] for p in pairs])
        b = np.concatenate([p[1] for p in pairs])
    else:
        a = b = np.zeros(0, dtype=np.int64)
    m = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    return connected_components(m, directed=False)[1].astype(np.int64)


def analyze_channels(
    gm: fx.GraphModule,
    example_inputs: Optional[Sequence[torch.Tensor]] = None,
    *,
    frozen_modules: Optional[Mapping[str, str]] = None,
) -> ChannelAnalysis:
    """Work out the channel groups of ``gm`` (see the module docstring).

    Args:
        gm: the graph; its nodes need shapes (``propagate_shapes``), or give ``example_inputs``.
        example_inputs: used to propagate shapes when they are missing.
        frozen_modules: ``{module name: reason}``: the channels of these modules (and of every
            module inside them) must stay as they are, on both their inputs and outputs.

    Returns:
        A :class:`ChannelAnalysis`; it also stores each node's space in
        ``node.meta["channel_space"]``.

    Raises:
        ValueError: shapes are missing and no example inputs were given.
        KeyError: a frozen module name is not a module of ``gm`` (the message lists close names).
    """
    if any(n.op != "output" and "tensor_meta" not in n.meta and n.meta.get("type") is None
           for n in gm.graph.nodes):
        if example_inputs is None:
            raise ValueError("analyze_channels needs shapes: run propagate_shapes(gm, inputs) "
                             "first or pass example_inputs")
        propagate_shapes(gm, example_inputs)
    rc = RuleContext(gm)
    for name in frozen_modules or {}:
        if name not in rc.modules:
            close = difflib.get_close_matches(name, list(rc.modules), n=3)
            raise KeyError(f"no module named {name!r} in the graph"
                           + (f"; did you mean {', '.join(map(repr, close))}?" if close else ""))
    for node in gm.graph.nodes:
        rc._visit(node)
    _freeze_modules(rc, dict(frozen_modules or {}))
    return _build(gm, rc)


def _freeze_modules(rc: RuleContext, frozen: Dict[str, str]) -> None:
    if not frozen:
        return

    def reason_for(target: str) -> Optional[str]:
        for name, why in frozen.items():
            if target == name or target.startswith(name + ".") or name == "":
                return why
        return None

    for s in list(rc._spaces):
        if s.module is not None and (why := reason_for(s.module)):
            rc.freeze(s, why)
    for node in rc.gm.graph.nodes:
        if node.op == "call_module" and (why := reason_for(node.target)):
            for a in [node] + _tensor_inputs(node):
                rc.freeze_input(a, why)


def _build(gm: fx.GraphModule, rc: RuleContext) -> ChannelAnalysis:
    spaces = rc._spaces
    labels = _components(rc._n, rc._pairs)
    sizes = np.array([s.size for s in spaces], dtype=np.int64)
    elem_space = np.repeat(np.arange(len(spaces)), sizes)
    elem_index = np.arange(rc._n) - np.repeat(np.array([s.base for s in spaces], dtype=np.int64), sizes)

    frozen: Dict[int, str] = {}
    for ids, why in rc._frozen:
        for lab in np.unique(labels[ids]):
            frozen.setdefault(int(lab), why)
    # classes no layer produces (e.g. only the input channels of a conv fed by the model input)
    # cannot be cut: nothing upstream would shrink
    produced = np.zeros(rc._n, dtype=bool)
    for s in spaces:
        if s.role == "out":
            produced[s.base:s.base + s.size] = True
    has_producer = np.zeros(labels.max() + 1 if rc._n else 0, dtype=bool)
    has_producer[labels[produced]] = True

    order = np.lexsort((elem_index, elem_space, labels))
    labs_sorted = labels[order]
    starts = np.flatnonzero(np.r_[True, labs_sorted[1:] != labs_sorted[:-1]]) if rc._n else np.zeros(0, int)
    ends = np.r_[starts[1:], len(order)] if rc._n else np.zeros(0, int)
    by_sig: Dict[Tuple, List[np.ndarray]] = {}
    for s0, e0 in zip(starts, ends):
        members = order[s0:e0]
        lab = int(labels[members[0]])
        if lab not in frozen and not has_producer[lab]:
            frozen[lab] = "no layer produces these channels"
        sig = (tuple(np.unique(elem_space[members])), lab in frozen)
        by_sig.setdefault(sig, []).append(members)

    edges_by_space: Dict[str, List[Coupling]] = {}
    for c in rc._history:
        edges_by_space.setdefault(c.a, []).append(c)
        if c.b != c.a:
            edges_by_space.setdefault(c.b, []).append(c)

    groups = []
    for (space_ids, is_frozen), classes in by_sig.items():
        classes.sort(key=lambda m: int(m.min()))
        gspaces = {spaces[i].key: spaces[i] for i in space_ids}
        index = {k: [] for k in gspaces}
        for members in classes:  # sorted by space, then index
            sp = elem_space[members]
            for i in space_ids:
                index[spaces[i].key].append(elem_index[members[sp == i]])
        reasons = [frozen[int(labels[m[0]])] for m in classes] if is_frozen else []
        reason = ""
        if reasons:
            reason = max(set(reasons), key=reasons.count)
        seen, history = set(), []
        for k in gspaces:
            for c in edges_by_space.get(k, []):
                if id(c) not in seen and c.a in gspaces and c.b in gspaces:
                    seen.add(id(c))
                    history.append(c)
        groups.append(ChannelGroup(id=0, size=len(classes), spaces=gspaces, index=index,
                                   prunable=not is_frozen, reason=reason, history=history))
    groups.sort(key=lambda g: min(s.base for s in g.spaces.values()))
    for i, g in enumerate(groups):
        g.id = i

    graph = nx.MultiGraph()
    for s in spaces:
        graph.add_node(s.key, **dataclasses.asdict(s))
    for c in rc._history:
        graph.add_edge(c.a, c.b, kind=c.kind, node=c.node, detail=c.detail)
    node_spaces = {}
    for node in gm.graph.nodes:
        got = rc._out.get(node.name)
        node_spaces[node.name] = got if isinstance(got, Space) else None
        node.meta["channel_space"] = node_spaces[node.name]
    return ChannelAnalysis(gm=gm, groups=groups, spaces=dict(rc._by_key), node_spaces=node_spaces,
                           graph=graph, unknown=dict(rc.unknown), resizes=list(rc._resizes))


# --------------------------------------------------------------------------------------------
# Rules: layers with channel-indexed parameters
# --------------------------------------------------------------------------------------------

def _require_dim(rc: RuleContext, src: Optional[Space], dim: int, what: str) -> None:
    if src is not None and src.dim != dim:
        raise Unsupported(f"{what} expects its channels in dim {dim}, its input has them in dim {src.dim}")


def _feed(rc: RuleContext, x: fx.Node, src: Optional[Space], w: Space, mapping: np.ndarray) -> None:
    """Tie the input channels ``mapping[c]`` of weight space ``w`` to channel c of the input."""
    if src is None:
        rc.freeze(w, f"its input channels come from {rc.reason(x)}")
    else:
        rc.couple(src, np.arange(src.size), w, mapping, "param")


@register_channel_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(rc: RuleContext, node: fx.Node, conv: nn.Module) -> None:
    x = node.args[0]
    src = rc.input(x)
    _require_dim(rc, src, 1, "a conv")
    name, g = node.target, conv.groups
    cin_g, cout_g = conv.in_channels // g, conv.out_channels // g
    out = rc.new_space(1)
    w0 = rc.param(name, "weight", 0, "out")
    rc.couple(out, np.arange(out.size), w0, np.arange(out.size), "param")
    if conv.bias is not None:
        rc.couple(out, np.arange(out.size), rc.param(name, "bias", 0, "out"), np.arange(out.size), "param")
    if g == 1:
        _feed(rc, x, src, rc.param(name, "weight", 1, "in"), np.arange(conv.in_channels))
        return
    if cin_g == 1:
        # depthwise (with channel multiplier cout_g): input c feeds outputs c*m .. c*m+m-1
        if src is None:
            rc.freeze(out, f"a depthwise conv whose input comes from {rc.reason(x)}")
            return
        c = np.arange(src.size)
        for j in range(cout_g):
            rc.couple(src, c, out, c * cout_g + j, "depthwise", f"groups={g}")
        return
    # grouped: the same input offsets and output offsets in every group (same count per group)
    _feed(rc, x, src, rc.param(name, "weight", 1, "in"), np.arange(conv.in_channels) % cin_g)
    c = np.arange(out.size)
    rc.couple(out, c, out, c % cout_g, "group", f"groups={g}")


@register_channel_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose(rc: RuleContext, node: fx.Node, conv: nn.Module) -> None:
    if len(node.args) > 1 or node.kwargs:
        raise Unsupported("called with an explicit output_size")
    x = node.args[0]
    src = rc.input(x)
    _require_dim(rc, src, 1, "a transposed conv")
    name, g = node.target, conv.groups
    cin_g, cout_g = conv.in_channels // g, conv.out_channels // g
    out = rc.new_space(1)  # weight is (in, out / groups, *kernel)
    if conv.bias is not None:
        rc.couple(out, np.arange(out.size), rc.param(name, "bias", 0, "out"), np.arange(out.size), "param")
    w0 = rc.param(name, "weight", 0, "in")
    _feed(rc, x, src, w0, np.arange(conv.in_channels))
    if g > 1 and cin_g == 1:
        if src is None:
            rc.freeze(out, f"a depthwise transposed conv whose input comes from {rc.reason(x)}")
            return
        c = np.arange(src.size)
        for j in range(cout_g):
            rc.couple(src, c, out, c * cout_g + j, "depthwise", f"groups={g}")
        return
    w1 = rc.param(name, "weight", 1, "out")
    rc.couple(out, np.arange(out.size), w1, np.arange(out.size) % cout_g, "param")
    if g > 1 and src is not None:
        c = np.arange(src.size)
        rc.couple(src, c, src, c % cin_g, "group", f"groups={g}")


@register_channel_rule(nn.Linear)
def _linear(rc: RuleContext, node: fx.Node, lin: nn.Linear) -> None:
    x = node.args[0]
    src = rc.input(x)
    ndim = len(rc.shape(node))
    _require_dim(rc, src, ndim - 1, "a Linear")
    out = rc.new_space(ndim - 1)
    name = node.target
    rc.couple(out, np.arange(out.size), rc.param(name, "weight", 0, "out"), np.arange(out.size), "param")
    if lin.bias is not None:
        rc.couple(out, np.arange(out.size), rc.param(name, "bias", 0, "out"), np.arange(out.size), "param")
    _feed(rc, x, src, rc.param(name, "weight", 1, "in"), np.arange(lin.in_features))


def _channel_params(rc: RuleContext, node: fx.Node, module: nn.Module, out: Space, names: Iterable[str]) -> None:
    for p in names:
        if getattr(module, p, None) is not None:
            rc.couple(out, np.arange(out.size), rc.param(node.target, p, 0, "channel"),
                      np.arange(out.size), "param")


_NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")


@register_channel_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
                       nn.InstanceNorm2d, nn.InstanceNorm3d, nn.SyncBatchNorm)
def _batchnorm(rc: RuleContext, node: fx.Node, bn: nn.Module) -> None:
    x = node.args[0]
    src = rc.input(x)
    if src is None:  # channels that cannot change: its parameters stay as they are
        rc.opaque(rc.reason(x))
        return
    _require_dim(rc, src, 1, type(bn).__name__)
    _channel_params(rc, node, bn, rc.identity(src), _NORM_PARAMS)


@register_channel_rule(nn.GroupNorm)
def _groupnorm(rc: RuleContext, node: fx.Node, gn: nn.GroupNorm) -> None:
    src = rc.input(node.args[0])
    if src is None:
        raise Unsupported("its input has no analyzable channels")
    _require_dim(rc, src, 1, "GroupNorm")
    out = rc.identity(src)
    c = np.arange(out.size)
    rc.couple(out, c, out, c % (gn.num_channels // gn.num_groups), "group", f"num_groups={gn.num_groups}")
    _channel_params(rc, node, gn, out, ("weight", "bias"))


@register_channel_rule(nn.LayerNorm)
def _layernorm(rc: RuleContext, node: fx.Node, ln: nn.LayerNorm) -> None:
    src = rc.input(node.args[0])
    ndim = len(rc.shape(node))
    if src is None or len(ln.normalized_shape) != 1 or src.dim != ndim - 1:
        raise Unsupported("normalizes over more than the channel dim")
    _channel_params(rc, node, ln, rc.identity(src), ("weight", "bias"))


def _attr_space(rc: RuleContext, a: Any, dim: int, role: str) -> Optional[Space]:
    """The param space of a tensor read with ``get_attr`` (functional code: ConvNeXt's
    layer_scale, LayerNorm2d's weight), along ``dim``; None unless this read is its only use
    (then slicing it cannot break another op) and no module call owns it."""
    if not (isinstance(a, fx.Node) and a.op == "get_attr") or len(a.users) != 1:
        return None
    reads = [n for n in rc.gm.graph.nodes if n.op == "get_attr" and n.target == a.target]
    module, _, param = a.target.rpartition(".")
    called = any(n.op == "call_module" and n.target == module for n in rc.gm.graph.nodes)
    if len(reads) != 1 or called or module not in rc.modules:
        return None
    if not isinstance(getattr(rc.modules[module], param, None), torch.Tensor):
        return None
    return rc.param(module, param, dim, role)


def _attr_param(rc: RuleContext, a: Any, out: Space, role: str) -> None:
    """Couple a per-channel parameter read with ``get_attr`` to the channels of ``out``."""
    if a is None:
        return
    w = _attr_space(rc, a, 0, role)
    if w is None:
        raise Unsupported("its per-channel parameters are not module attributes it alone reads")
    rc.couple(out, np.arange(out.size), w, np.arange(out.size), "param")


@register_channel_rule(F.layer_norm)
def _layer_norm_fn(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    """``F.layer_norm(x, (C,), weight, bias)`` over the channel dim (ConvNeXt's LayerNorm2d
    permutes to channels-last first); the literal ``(C,)`` is rewritten after a cut."""
    src = rc.input(node.args[0])
    shape = rc.value(_arg(node, 1, "normalized_shape"))
    if src is None or src.dim != len(rc.shape(node)) - 1 or tuple(shape) != (src.size,):
        raise Unsupported("normalizes over more than the channel dim")
    out = rc.identity(src)
    _attr_param(rc, _arg(node, 2, "weight"), out, "channel")
    _attr_param(rc, _arg(node, 3, "bias"), out, "channel")

    def resize(n: fx.Node, new_size: Callable[[Space], int]) -> None:
        if len(n.args) > 1:
            n.args = (n.args[0], (int(new_size(out)),), *n.args[2:])
        else:
            n.kwargs = {**n.kwargs, "normalized_shape": (int(new_size(out)),)}

    rc.on_resize(resize)


@register_channel_rule(nn.PReLU)
def _prelu(rc: RuleContext, node: fx.Node, m: nn.PReLU) -> None:
    src = rc.input(node.args[0])
    if m.num_parameters == 1:
        return rc.identity(src) if src is not None else rc.opaque(rc.reason(node.args[0]))
    if src is None:
        raise Unsupported("its input has no analyzable channels")
    _require_dim(rc, src, 1, "PReLU")
    _channel_params(rc, node, m, rc.identity(src), ("weight",))


# --------------------------------------------------------------------------------------------
# Rules: channel-preserving ops (activations, pooling, resampling, normalization without params)
# --------------------------------------------------------------------------------------------

def _same_channels(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    """Output channel c is computed from input channel c only (or is input channel c)."""
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    got = rc._out.get(x.name) if isinstance(x, fx.Node) else None
    if isinstance(got, _Chain):
        if rc.shape(node) != rc.shape(x):
            raise Unsupported("its input has its channels spread over several dims")
        # e.g. .contiguous() between the transpose and the view of a channel shuffle
        rc.set_chain(_Chain(got.start, got.probe.contiguous(), got.adapts))
        return
    src = rc.input(x)
    if src is None:
        rc.opaque(rc.reason(x))
        return
    rc.identity(src)


register_channel_rule(
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Softmax2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d,
    nn.ReplicationPad2d, nn.ReplicationPad3d, nn.LocalResponseNorm,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.sigmoid, F.tanh,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.logsigmoid, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.softmax, F.log_softmax,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d, F.lp_pool2d, F.interpolate,
    F.upsample, F.upsample_nearest, F.upsample_bilinear, F.pad,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs, torch.sqrt, torch.rsqrt,
    torch.neg, torch.square, torch.erf, torch.clamp, torch.clip, torch.softmax, torch.log_softmax,
    torch.nn.functional.relu_, torch.relu_, torch.max_pool2d, torch.avg_pool1d,
    torch.adaptive_avg_pool1d, torch.nan_to_num, torch.sign, torch.reciprocal,
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "sqrt", "rsqrt",
    "neg", "square", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "softmax", "log_softmax",
    "float", "double", "half", "bfloat16", "to", "type", "type_as", "cpu", "detach", "clone",
    "contiguous", "requires_grad_", "sign", "reciprocal", "nan_to_num", "erf",
    # by qualified name: packages the core does not import (identity in eval, a per-sample
    # or per-element mask in training: never mixes channels)
    "torchvision.ops.stochastic_depth.stochastic_depth",
)(_same_channels)


# --------------------------------------------------------------------------------------------
# Rules: element-wise ops with several tensors (residual add, SE gating, masks)
# --------------------------------------------------------------------------------------------

@register_channel_rule(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, operator.pow, operator.floordiv,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.maximum, torch.minimum, torch.where, torch.pow, torch.addcmul,
    torch.lerp, torch.fmax, torch.fmin,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum",
    "where", "masked_fill", "lerp", "addcmul",
)
def _elementwise(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    out_shape = rc.shape(node)
    if out_shape is None:
        raise Unsupported("no recorded output shape")
    n = len(out_shape)
    inputs = [a for a in (*node.args, *node.kwargs.values()) if _is_tensor(a)]
    aligned = []  # (node, space or None, offset)
    for a in inputs:
        got = rc._out.get(a.name)
        if isinstance(got, _Chain):
            raise Unsupported(f"its input `{a.name}` has its channels spread over several dims")
        aligned.append((a, got if isinstance(got, Space) else None, n - len(rc.shape(a))))
    dims = {s.dim + off for a, s, off in aligned
            if s is not None and rc.shape(a)[s.dim] == out_shape[s.dim + off]}
    if len(dims) > 1:
        raise Unsupported(f"its inputs have their channels in different dims {sorted(dims)}")
    if not dims:
        first = next((a for a, _, _ in aligned), None)
        rc.opaque(rc.reason(first) if first is not None else "no tensor input")
        return
    dc = dims.pop()
    out = rc.new_space(dc)
    frozen_by = []
    for a, s, off in aligned:
        shape = rc.shape(a)
        d = dc - off
        if d < 0 or shape[d] == 1:
            continue  # broadcast along the channels: any channel count works
        if s is not None and s.dim == d:
            rc.couple(s, np.arange(s.size), out, np.arange(out.size), "identity")
        elif (w := _attr_space(rc, a, d, "channel")) is not None:  # e.g. layer_scale * x
            rc.couple(out, np.arange(out.size), w, np.arange(out.size), "param")
        else:
            frozen_by.append(a)
    for a in frozen_by:
        rc.freeze(out, f"combined element-wise with `{a.name}` ({rc.reason(a)})")


# --------------------------------------------------------------------------------------------
# Rules: reductions, concat, split
# --------------------------------------------------------------------------------------------

@register_channel_rule(torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var,
                       torch.prod, torch.logsumexp, torch.norm,
                       "mean", "sum", "amax", "amin", "std", "var", "prod", "logsumexp", "norm")
def _reduce(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    x = node.args[0]
    src = rc.input(x)
    if src is None:
        rc.opaque(rc.reason(x))
        return
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dim_pos = 2 if name == "norm" else 1
    dims = rc.value(_arg(node, dim_pos, "dim"))
    ndim = len(rc.shape(x))
    if dims is None:
        rc.opaque("a full reduction")
        return
    dims = {_norm_dim(d, ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    keepdim = len(rc.shape(node)) == ndim  # read from the shapes: positional flags vary by op
    if src.dim in dims:
        # reducing over the channels: the result has no channels of its own, and the input's
        # channels may still be cut (fewer terms in the reduction)
        rc.opaque("a reduction over the channels")
        return
    dim = src.dim if keepdim else src.dim - sum(d < src.dim for d in dims)
    out = rc.new_space(dim)
    rc.couple(src, np.arange(src.size), out, np.arange(out.size), "identity")


@register_channel_rule(torch.cat, torch.concat, torch.concatenate)
def _cat(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    tensors = _arg(node, 0, "tensors")
    if tensors is None:
        tensors = node.kwargs.get("tensors")
    ndim = len(rc.shape(node))
    dim = _norm_dim(rc.value(_arg(node, 1, "dim", 0)), ndim)
    srcs = [rc.input(t) for t in tensors]
    dims = {s.dim for s in srcs if s is not None}
    if len(dims) > 1:
        raise Unsupported(f"concatenates tensors with their channels in different dims {sorted(dims)}")
    if not dims:
        rc.opaque(rc.reason(tensors[0]))
        return
    dc = dims.pop()
    out = rc.new_space(dc)
    if dim == dc:
        offset = 0
        for t, s in zip(tensors, srcs):
            size = rc.shape(t)[dc]
            if s is None:
                rc.freeze(out, f"concatenated with `{t.name}` ({rc.reason(t)})", np.arange(offset, offset + size))
            else:
                rc.couple(s, np.arange(size), out, offset + np.arange(size), "offset", f"offset {offset}")
            offset += size
        return
    for t, s in zip(tensors, srcs):
        if s is None:
            rc.freeze(out, f"concatenated with `{t.name}` ({rc.reason(t)})")
        else:
            rc.couple(s, np.arange(s.size), out, np.arange(out.size), "identity")


@register_channel_rule(torch.split, torch.chunk, torch.tensor_split, torch.unbind,
                       "split", "chunk", "tensor_split", "unbind", "split_with_sizes")
def _split(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    x = node.args[0]
    src = rc.input(x)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name in ("unbind", "tensor_split") and src is not None:
        if _norm_dim(rc.value(_arg(node, 1 if name == "unbind" else 2, "dim", 0)), len(rc.shape(x))) == src.dim:
            raise Unsupported(f"{name} along the channel dim")
    metas = node.meta.get("tensor_meta")
    shapes = [tuple(m.shape) for m in metas]
    users: Dict[int, List[fx.Node]] = {}
    for u in node.users:
        if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int):
            users.setdefault(u.args[1] % len(shapes), []).append(u)
        else:
            raise Unsupported(f"its result is used as a whole by `{u.name}`")
    if src is None:
        for us in users.values():
            for u in us:
                rc._pre[u.name] = Opaque(rc.reason(x))
        return
    dim = _norm_dim(rc.value(_arg(node, 1 if name == "unbind" else 2, "dim", 0)), len(rc.shape(x)))
    if name in ("unbind", "tensor_split") or dim != src.dim:
        for us in users.values():
            for u in us:
                out = rc.new_space(src.dim, node=u)
                rc.couple(src, np.arange(src.size), out, np.arange(out.size), "identity")
        return
    pieces, offset = [], 0
    for i, shape in enumerate(shapes):
        size = shape[dim]
        space = None
        for u in users.get(i, []):
            s = rc.new_space(dim, node=u)
            space = space or s
            rc.couple(src, offset + np.arange(size), s, np.arange(size), "offset", f"offset {offset}")
        if space is None:
            space = rc.piece_space(str(i), size, dim)
            rc.couple(src, offset + np.arange(size), space, np.arange(size), "offset", f"offset {offset}")
        pieces.append(space)
        offset += size

    def resize(n: fx.Node, new_size: Callable[[Space], int]) -> None:
        # chunk(n) / split(k) would re-split the smaller tensor differently: give explicit sizes
        sizes = [int(new_size(p)) for p in pieces]
        n.args = (n.args[0], sizes)
        n.kwargs = {"dim": dim}
        if n.op == "call_method":
            n.target = "split"
        else:
            n.target = torch.split

    rc.on_resize(resize)


# --------------------------------------------------------------------------------------------
# Rules: data movement (view, reshape, flatten, transpose, permute, getitem, channel shuffle)
# --------------------------------------------------------------------------------------------

#: ops whose shape arguments (positional after the tensor) give the output size per dim
_EXPLICIT = {"view", "reshape", "expand", torch.reshape}
#: ops whose output shape is computed from the input's
_COMPUTED = {
    "flatten", "transpose", "permute", "movedim", "moveaxis", "swapaxes", "swapdims", "t", "squeeze",
    "unsqueeze", "repeat", "flip", "roll", "view_as", "reshape_as", "expand_as", "__getitem__", "narrow",
    torch.flatten, torch.transpose, torch.permute, torch.movedim, torch.moveaxis, torch.swapaxes,
    torch.swapdims, torch.t, torch.squeeze, torch.unsqueeze, torch.flip, torch.roll, torch.narrow,
    operator.getitem, nn.Flatten,
}
#: ops that select along a dim: they must leave every channel dim whole
_SELECTING = {"__getitem__", "narrow", "roll", operator.getitem, torch.narrow, torch.roll}


_UNFLATTEN = {"unflatten", torch.unflatten, nn.Unflatten}


def _unflatten_adapts(rc, node, module, in_shape, adapts_in):
    """unflatten(dim, sizes): the new dims have the sizes given (literals are fixed)."""
    if module is not None:
        dim, sizes, locs = module.dim, list(module.unflattened_size), [None] * len(module.unflattened_size)
    else:
        dim, sizes = rc.value(_arg(node, 1, "dim")), _arg(node, 2, "sizes")
        if not isinstance(sizes, (list, tuple)):
            raise Unsupported("its sizes are not a literal list")
        locs = [("args", 2, i) for i in range(len(sizes))] if len(node.args) > 2 else [None] * len(sizes)
    dim = _norm_dim(dim, len(in_shape))
    adapts = list(adapts_in[:dim]) + [s == -1 or not isinstance(s, int) for s in sizes] + list(adapts_in[dim + 1:])
    locations = [None] * dim + locs + [None] * (len(in_shape) - dim - 1)
    return tuple(adapts), locations


def _shape_args(rc: RuleContext, node: fx.Node) -> Tuple[List[Any], List[Optional[tuple]]]:
    """(sizes, locations) of an explicit-shape op's size arguments: ``view(n, -1)``,
    ``view((n, -1))``, ``torch.reshape(x, shape)``."""
    args = list(node.args[1:])
    base: tuple = ("args",)
    start = 1
    if node.op == "call_function":  # torch.reshape(x, shape)
        args = [node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return list(args[0]), [base + (start, i) for i in range(len(args[0]))]
    if len(args) == 1 and isinstance(args[0], fx.Node):
        v = rc.value(args[0])
        if isinstance(v, (tuple, list, torch.Size)):
            return [args[0]] * len(v), [None] * len(v)  # a whole shape from elsewhere: adapts
    return args, [base + (start + i,) for i in range(len(args))]


def _set_arg(node: fx.Node, loc: tuple, value: int) -> None:
    args = list(node.args)
    if len(loc) == 2:
        args[loc[1]] = value
    else:
        inner = list(args[loc[1]])
        inner[loc[2]] = value
        args[loc[1]] = type(node.args[loc[1]])(inner)
    node.args = tuple(args)


def _run_movement(rc: RuleContext, node: fx.Node, module: Optional[nn.Module], probe: torch.Tensor) -> torch.Tensor:
    x = node.args[0]

    def sub(a):
        if a is x:
            return probe
        if isinstance(a, fx.Node) and _is_tensor(a):
            return torch.empty(rc.shape(a))  # view_as / expand_as read only its shape
        return rc.value(a)

    args = [sub(a) for a in node.args]
    kwargs = {k: sub(v) for k, v in node.kwargs.items()}
    try:
        if node.op == "call_module":
            return module(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise Unsupported(f"could not replay it on a channel map: {e}") from None


def _computed_adapts(rc, node, module, shape_in, adapts_in, check_identity_dims=()) -> Tuple[bool, ...]:
    """Which output dims follow the input's channel count, found by replaying the op on one
    probe per input dim; also checks that the op keeps ``check_identity_dims`` whole."""
    out_shape = rc.shape(node)
    images: Dict[int, List[int]] = {}
    for k, size in enumerate(shape_in):
        if size == 1:
            continue
        p = _run_movement(rc, node, module, _index_probe(shape_in, k))
        images[k] = [d for d in range(p.dim()) if _varies(p, d)]
        if k in check_identity_dims:
            d = images[k]
            if len(d) != 1 or p.shape[d[0]] != size or not np.array_equal(_along(p, d[0]), np.arange(size)):
                raise Unsupported("it selects or reorders along a channel dim")
    adapts = []
    for d in range(len(out_shape)):
        pre = [k for k, ds in images.items() if d in ds]
        adapts.append(any(adapts_in[k] for k in pre) if pre else True)
    return tuple(adapts)


def _movement(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    x = node.args[0]
    got = rc._out.get(x.name) if isinstance(x, fx.Node) else None
    in_shape = rc.shape(x)
    if isinstance(got, _Chain):
        start, probe_in, adapts_in = got.start, got.probe, got.adapts
    elif isinstance(got, Space):
        start, probe_in, adapts_in = got, _index_probe(in_shape, got.dim), (True,) * len(in_shape)
    else:
        rc.opaque(rc.reason(x))
        return
    p = _run_movement(rc, node, module, probe_in)
    if tuple(p.shape) != tuple(rc.shape(node) or ()):
        raise Unsupported(f"replayed shape {tuple(p.shape)} differs from the recorded one")
    key = node.target if node.op != "call_module" else type(module)
    locations: List[Optional[tuple]] = [None] * p.dim()
    if key in _EXPLICIT:
        sizes, locations = _shape_args(rc, node)
        if len(sizes) != p.dim():
            raise Unsupported("its shape arguments could not be matched to its output dims")
        lead = p.dim() - len(in_shape)
        adapts = tuple(
            (adapts_in[d - lead] if key == "expand" and d >= lead else True) if s == -1
            else not isinstance(s, int) for d, s in enumerate(sizes))
    elif key in _UNFLATTEN:
        adapts, locations = _unflatten_adapts(rc, node, module, in_shape, adapts_in)
    else:
        channel_dims = [k for k in range(len(in_shape)) if _varies(probe_in, k)]
        check = channel_dims if key in _SELECTING else ()
        adapts = _computed_adapts(rc, node, module, in_shape, adapts_in, check)
    dims = [d for d in range(p.dim()) if _varies(p, d)]
    if not dims:
        if start.size > 1:
            raise Unsupported("its output has no channel structure left")
        rc.opaque("a single channel")
        return
    if len(dims) == 1:
        d = dims[0]
        if d == 0 and p.dim() > 1:
            raise Unsupported("it moves the channels into dim 0 (the batch dim)")
        out = rc.new_space(d)
        ids = _along(p, d)
        kind = "identity" if np.array_equal(ids, np.arange(start.size)) else (
            "permutation" if len(ids) == start.size else "block")
        rc.couple(out, np.arange(out.size), start, ids, kind,
                  f"{out.size} features from {start.size} channels" if kind == "block" else "")
        if not adapts[d]:
            loc = locations[d]
            if loc is None:
                raise Unsupported(f"it gives the channel dim {d} a fixed size that cannot be rewritten")

            def resize(n: fx.Node, new_size: Callable[[Space], int], loc=loc, out=out) -> None:
                _set_arg(n, loc, int(new_size(out)))

            rc.on_resize(resize)
        return
    # channels spread over several dims (e.g. (n, groups, c // groups, h, w) in a channel shuffle):
    # only one of them may follow the channel count; every fixed one must stay whole, so the
    # channels at the same position along the others are cut together
    moving = [d for d in dims if adapts[d]]
    if len(moving) != 1:
        raise Unsupported(f"it spreads the channels over dims {dims} of which "
                          f"{'none' if not moving else 'several'} can change size")
    for d in dims:
        if not adapts[d]:
            first = p.narrow(d, 0, 1).numpy().ravel()
            for i in range(1, p.shape[d]):
                rc.couple(start, first, start, p.narrow(d, i, 1).numpy().ravel(), "fixed-dim",
                          f"dim {d} of `{node.name}` has fixed size {p.shape[d]}")
    rc.set_chain(_Chain(start, p, tuple(adapts)))


register_channel_rule(*_EXPLICIT, *_COMPUTED, *_UNFLATTEN)(_movement)


@register_channel_rule(torch.channel_shuffle, torch.native_channel_shuffle, nn.ChannelShuffle)
def _channel_shuffle(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    src = rc.input(node.args[0])
    if src is None:
        rc.opaque(rc.reason(node.args[0]))
        return
    _require_dim(rc, src, 1, "channel_shuffle")
    g = module.groups if module is not None else rc.value(_arg(node, 1, "groups"))
    per = src.size // g
    c = np.arange(src.size)
    rc.couple(src, c, src, c % per, "fixed-dim", f"channel shuffle with {g} groups")
    out = rc.new_space(1)
    j = np.arange(src.size)  # output j = a * g + b takes input b * per + a
    rc.couple(out, j, src, (j % g) * per + j // g, "permutation", f"channel shuffle, {g} groups")


@register_channel_rule(nn.PixelShuffle, nn.PixelUnshuffle, F.pixel_shuffle, F.pixel_unshuffle,
                       torch.pixel_shuffle, torch.pixel_unshuffle)
def _pixel_shuffle(rc: RuleContext, node: fx.Node, module: Optional[nn.Module]) -> None:
    src = rc.input(node.args[0])
    if src is None:
        rc.opaque(rc.reason(node.args[0]))
        return
    _require_dim(rc, src, 1, "pixel shuffle")
    out = rc.new_space(1)
    if module is not None:
        up = isinstance(module, nn.PixelShuffle)
        r = module.upscale_factor if up else module.downscale_factor
    else:
        up = "unshuffle" not in node.target.__name__
        r = rc.value(_arg(node, 1, "upscale_factor" if up else "downscale_factor"))
    coarse, fine = (out, src) if up else (src, out)  # each coarse channel is r*r fine ones
    c = np.arange(coarse.size)
    for k in range(r * r):
        rc.couple(coarse, c, fine, c * r * r + k, "block", f"pixel shuffle, factor {r}")
