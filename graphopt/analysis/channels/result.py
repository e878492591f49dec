"""The result: channel groups, the analysis that holds them, and the cut that applies a removal."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from ...layer_registry import LAYERS
from ..shapes import propagate_shapes
from .spaces import Coupling, Resize, Space


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
    """The result of ``analyze_channels``.

    Attributes:
        gm: the analyzed graph module.
        groups: every channel group, in graph order.
        spaces: every space, by key.
        node_spaces: node name -> its output's channel space (None: no analyzable channels).
        graph: a networkx MultiGraph of spaces (nodes, with their attributes) and couplings
            (edges with ``kind``, ``node`` and ``detail``).
        unknown: node name -> why the analysis did not understand it (its channels are frozen).
        resizes: (node, fn) pairs: argument rewrites to apply when channel counts change.
        notes: what :func:`cut` rewrote that a reader should know (a shape assert on a channel
            count updated or removed), filled by the cut.
    """

    gm: fx.GraphModule
    groups: List[ChannelGroup]
    spaces: Dict[str, Space]
    node_spaces: Dict[str, Optional[Space]]
    graph: nx.MultiGraph
    unknown: Dict[str, str]
    resizes: List[Tuple[fx.Node, Resize]]
    notes: List[str] = dataclasses.field(default_factory=list)

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


#: Size attributes a family's ``resize`` receives as they were before the cut.
SIZE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
              "num_channels")


def _no_resize(module: nn.Module, old: Dict[str, int]) -> None:
    return None


def cut(gm: fx.GraphModule, analysis: ChannelAnalysis, removed: Dict[str, np.ndarray],
        example_inputs) -> Dict[str, int]:
    """Remove channels ``removed[space key]`` everywhere; returns each space's new size.

    Every module with a cut parameter gets sliced parameters and buffers, then its layer
    family's ``resize`` sets its size attributes (also for a module the graph only reads
    parameters of, such as timm's ``BatchNormAct2d`` traced into ``F.batch_norm``, so that its
    ``num_features`` says what it holds); argument rewrites (split sizes, literal view sizes,
    slice bounds, shape asserts) are applied, and what they report is added to
    ``analysis.notes``; then shapes are propagated again and every node's channel count is
    checked against the plan.

    Raises:
        TypeError: a called module lost channels but its layer family has no ``resize``.
        RuntimeError: a node's channel count after the cut is not the planned one (a channel
            rule is wrong for this graph).
    """
    new_size = {k: s.size - len(removed.get(k, ())) for k, s in analysis.spaces.items()}
    by_module: Dict[str, List[Tuple[str, int, np.ndarray]]] = {}
    for k, idx in removed.items():
        s = analysis.spaces[k]
        if s.is_param and len(idx):
            keep = np.setdiff1d(np.arange(s.size), idx)
            by_module.setdefault(s.module, []).append((s.param, s.dim, keep))
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name, cuts in by_module.items():
        m = gm.get_submodule(name)
        # a module the graph only reads parameters of (get_attr): the graph's own arguments
        # were rewritten; its attributes are fixed when its family knows how
        if name in called:
            resize = LAYERS.for_type(type(m), "resize")
        else:
            resize = LAYERS.for_type(type(m), "resize", called=False) or _no_resize
        if resize is None:
            raise TypeError(f"cannot resize `{name}` ({type(m).__name__}) after a cut: its layer family "
                            f"has no resize part; register one with graphopt.register_layer"
                            f"({type(m).__name__}, resize=...)")
        old = {a: getattr(m, a) for a in SIZE_ATTRS if hasattr(m, a)}
        for param, dim, keep in cuts:
            t = getattr(m, param)
            sliced = t.detach().index_select(dim, torch.as_tensor(keep, dtype=torch.long)).clone()
            if isinstance(t, nn.Parameter):
                setattr(m, param, nn.Parameter(sliced, requires_grad=t.requires_grad))
            else:
                setattr(m, param, sliced)
        resize(m, old)
    for node, fn in analysis.resizes:
        note = fn(node, lambda s: new_size[s.key])
        if isinstance(note, str):
            analysis.notes.append(note)
    gm.graph.lint()
    gm.recompile()
    propagate_shapes(gm, example_inputs)
    for node in gm.graph.nodes:
        s = analysis.node_spaces.get(node.name)
        if s is not None:
            shape = node.meta["tensor_meta"].shape
            if shape[s.dim] != new_size[s.key]:
                raise RuntimeError(
                    f"after the cut `{node.name}` has {shape[s.dim]} channels in dim {s.dim}, the "
                    f"plan said {new_size[s.key]}: a channel rule is wrong for this graph")
    return new_size
