"""The walk: visit every node in graph order and run its channel rule, or freeze what it touches.

A rule runs as a transaction: if it raises :class:`Unsupported`, whatever it declared is undone
and the node is treated as unknown (its inputs frozen, its output opaque, the reason recorded).
Non-tensor nodes that compute shapes (``x.size(1) // 2``) are evaluated from the recorded shapes
so that rules can read their values.
"""
from __future__ import annotations

import builtins
import dataclasses
import math
import operator
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import networkx as nx
import torch
import torch.fx as fx

from ...errors import did_you_mean
from ...layer_registry import LAYERS
from ..shapes import propagate_shapes
from .context import RuleContext
from .fxutil import arg, describe, is_tensor, is_tensor_tuple, resolve, tensor_inputs
from .result import ChannelAnalysis
from .solver import solve
from .spaces import Opaque, Space, Unsupported

#: Calls that read a tensor's size or type, never its values: they do not constrain channels.
_SIZE_QUERIES_FN = {builtins.getattr, builtins.len}
_SIZE_QUERIES_METHOD = {"size", "dim", "numel", "nelement", "ndimension", "get_device"}
_SIZE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"}
#: Pure functions on Python values (shape arithmetic) that may be evaluated from the metadata.
_VALUE_FNS = {getattr(operator, n) for n in (
    "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "getitem", "eq", "ne",
    "lt", "le", "gt", "ge")} | {builtins.getattr, builtins.len, builtins.int, math.prod,
                                math.ceil, math.floor, builtins.max, builtins.min}


class _NoValue(Exception):
    """A node whose value cannot be computed from shapes alone."""


_NOT_STATIC = (_NoValue, Unsupported, TypeError, ValueError, IndexError, KeyError, ZeroDivisionError)
#: asserts on sizes: rechecked after a cut
_ASSERTS = {torch._assert}


def _compute(node: fx.Node, shape: Callable[[fx.Node], Tuple[int, ...]], value: Callable[[Any], Any]) -> Any:
    """The value of a non-tensor node from tensor shapes (``shape``) and argument values."""
    tgt, args = node.target, node.args
    if node.op == "call_function" and tgt is builtins.getattr and is_tensor(args[0]):
        if args[1] == "shape":
            return torch.Size(shape(args[0]))
        if args[1] == "ndim":
            return len(shape(args[0]))
    elif node.op == "call_method" and tgt == "size" and is_tensor(args[0]):
        size = torch.Size(shape(args[0]))
        d = arg(node, 1, "dim")
        return size if d is None else size[value(d)]
    elif node.op == "call_method" and tgt == "dim" and is_tensor(args[0]):
        return len(shape(args[0]))
    elif node.op == "call_function" and tgt in _VALUE_FNS and not tensor_inputs(node):
        return tgt(*value(node.args), **value(node.kwargs))
    raise _NoValue(node.name)


def _reads_one_size(a: Any) -> bool:
    """``x.shape[d]``, ``x.size(d)`` or ``x.size()[d]``: one size of a tensor, as it is."""
    if not isinstance(a, fx.Node):
        return False
    if a.op == "call_method" and a.target == "size":
        return arg(a, 1, "dim") is not None
    if a.op == "call_function" and a.target is operator.getitem and isinstance(a.args[0], fx.Node):
        src = a.args[0]
        return type(a.args[1]) is int and (
            (src.op == "call_function" and src.target is builtins.getattr and src.args[1] == "shape")
            or (src.op == "call_method" and src.target == "size" and arg(src, 1, "dim") is None))
    return False


class _Walk(RuleContext):
    """The rule context plus what only the walk does: visiting, undoing a refused rule."""

    def _snapshot(self):
        d = self.declared
        return (len(d.spaces), d.n, len(d.pairs), len(d.frozen), len(d.history), len(d.resizes),
                dict(self._pre))

    def _restore(self, snap) -> None:
        ns, n, npairs, nfrozen, nhist, nres, pre = snap
        d = self.declared
        for s in d.spaces[ns:]:
            del d.by_key[s.key]
        del d.spaces[ns:]
        d.n = n
        del d.pairs[npairs:], d.frozen[nfrozen:], d.history[nhist:], d.resizes[nres:]
        self._pre = pre
        self._out.pop(self.node.name, None)

    def _unknown(self, node: fx.Node, why: str) -> None:
        self.unknown[node.name] = why
        for a in tensor_inputs(node):
            self.freeze_input(a, f"used by {why}")
        self._out[node.name] = Opaque(f"output of {why}")

    def _value_node(self, node: fx.Node) -> None:
        """Evaluate non-tensor nodes (``x.shape[1] // 2``) from the recorded shapes."""
        if node.op == "call_function" and node.target in _ASSERTS:
            self._check_after_cut(node)
            return
        try:
            self._values[node.name] = _compute(node, self.shape, self.value)
        except _NOT_STATIC:
            pass

    def _check_after_cut(self, node: fx.Node) -> None:
        """A shape assert (``_assert(x.shape[1] == 32)``) reads sizes, not values: it does not
        constrain channels, but a cut may make it fail. After the cut it is evaluated again on
        the new sizes; one that would fail is updated (``size == literal``: the literal becomes
        the new size) or removed, and the cut's notes say which."""
        cond = arg(node, 0, "condition")
        if not isinstance(cond, fx.Node) or cond.name not in self._values:
            return

        def recheck(n: fx.Node, new_size: Callable[[Space], int]) -> Optional[str]:
            memo: Dict[str, Any] = {}

            def shape(t: fx.Node) -> Tuple[int, ...]:
                dims, s = list(self.shape(t)), self.channels_of(t)
                if isinstance(s, Space):
                    dims[s.dim] = int(new_size(s))
                return tuple(dims)

            def after(a: Any) -> Any:
                def lookup(v: fx.Node) -> Any:
                    if v.name not in memo:
                        memo[v.name] = _compute(v, shape, after)
                    return memo[v.name]

                return resolve(a, lookup)

            try:
                if after(cond):
                    return None
                literal = [i for i, v in enumerate(cond.args) if type(v) is int]
                if cond.target is operator.eq and len(cond.args) == 2 and len(literal) == 1 \
                        and _reads_one_size(cond.args[1 - literal[0]]):
                    i = literal[0]
                    was, now = cond.args[i], after(cond.args[1 - i])
                    cond.args = (now, cond.args[1]) if i == 0 else (cond.args[0], now)
                    return f"shape assert `{n.name}` updated: it compares a size with {now} now (was {was})"
            except _NOT_STATIC:
                pass
            n.graph.erase_node(n)
            return f"shape assert `{n.name}` removed: the sizes it checks change with the cut"

        self.on_resize(recheck, node)

    def _is_size_query(self, node: fx.Node) -> bool:
        if node.op == "call_method":
            return node.target in _SIZE_QUERIES_METHOD
        if node.op == "call_function":
            if node.target is builtins.getattr:
                return len(node.args) > 1 and node.args[1] in _SIZE_ATTRS
            return node.target in _SIZE_QUERIES_FN or not tensor_inputs(node)
        return False

    def visit(self, node: fx.Node) -> None:
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
        if not (is_tensor(node) or is_tensor_tuple(node)):
            if self._is_size_query(node):
                self._value_node(node)
                return
            if not tensor_inputs(node):
                return
        module = self.modules.get(node.target) if node.op == "call_module" else None
        rule = LAYERS.lookup(node, module, "channels")
        if rule is None:
            self._unknown(node, f"{describe(node, module)}, which has no channel rule")
            return
        snap = self._snapshot()
        try:
            rule(self, node, module)
        except Unsupported as e:
            self._restore(snap)
            self._unknown(node, f"{describe(node, module)}: {e}")
            return
        if node.name not in self._out and (is_tensor(node) or is_tensor_tuple(node)):
            self._out[node.name] = Opaque(f"output of {describe(node, module)}")

    def freeze_modules(self, frozen: Dict[str, str]) -> None:
        """The channels of these modules (and of every module inside them) stay as they are."""
        if not frozen:
            return

        def reason_for(target: str) -> Optional[str]:
            for name, why in frozen.items():
                if target == name or target.startswith(name + ".") or name == "":
                    return why
            return None

        for s in list(self.declared.spaces):
            if s.module is not None and (why := reason_for(s.module)):
                self.freeze(s, why)
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and (why := reason_for(node.target)):
                for a in [node] + tensor_inputs(node):
                    self.freeze_input(a, why)


def analyze_channels(
    gm: fx.GraphModule,
    example_inputs: Optional[Sequence[torch.Tensor]] = None,
    *,
    frozen_modules: Optional[Mapping[str, str]] = None,
) -> ChannelAnalysis:
    """Work out the channel groups of ``gm`` (see ``graphopt.analysis.channels``).

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
    walk = _Walk(gm)
    for name in frozen_modules or {}:
        if name not in walk.modules:
            raise KeyError(f"no module named {name!r} in the graph"
                           + did_you_mean(name, walk.modules, sentence=False))
    for node in gm.graph.nodes:
        walk.visit(node)
    walk.freeze_modules(dict(frozen_modules or {}))
    d = walk.declared
    graph = nx.MultiGraph()
    for s in d.spaces:
        graph.add_node(s.key, **dataclasses.asdict(s))
    for c in d.history:
        graph.add_edge(c.a, c.b, kind=c.kind, node=c.node, detail=c.detail)
    node_spaces = {}
    for node in gm.graph.nodes:
        got = walk.channels_of(node)
        node_spaces[node.name] = got if isinstance(got, Space) else None
        node.meta["channel_space"] = node_spaces[node.name]
    return ChannelAnalysis(gm=gm, groups=solve(d), spaces=dict(d.by_key), node_spaces=node_spaces,
                           graph=graph, unknown=dict(walk.unknown), resizes=list(d.resizes))
