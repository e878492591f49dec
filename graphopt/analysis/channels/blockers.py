"""Why channels cannot be cut, weighed by what they lock: the few reasons that matter most.

A channel group that must stay as it is locks the MACs of the layers producing its channels.
Reasons differ only by node names when one op blocks many groups (every functional
``batch_norm`` of a timm model, say), so they are counted together: a pass that cuts far less
than asked can then name the two or three blockers that hold most of the model, and what would
unblock each.

Example:
    >>> import torch, torch.nn as nn, torch.fx as fx
    >>> from graphopt.analysis.channels import analyze_channels
    >>> from graphopt.analysis.shapes import propagate_shapes
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)))
    >>> propagate_shapes(gm, (torch.randn(1, 3, 12, 12),))
    >>> [(b.reason, b.layers) for b in blockers(analyze_channels(gm))]
    [('reaches the model output', ['1'])]
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List

from ..metrics import node_macs
from .result import ChannelAnalysis

__all__ = ["Blocker", "blockers"]

#: reason pattern -> what would unblock it (first match wins)
REMEDIES = (
    ("no channel rule", "register a channel rule for that op (graphopt.register_layer / "
                        "register_channel_rule), or keep the module calling it opaque with leaf_modules=[...]"),
    ("not understood", "register a channel rule for that op (graphopt.register_layer / register_channel_rule)"),
    ("reaches the model output", "none needed: the model's output channels are fixed by design"),
    ("in ignore", "remove the module from the pass's ignore option"),
    ("tied weights", "untie the weights (give each module its own tensor) if they need not be shared"),
    ("model input", "none needed: the channels of the model's inputs are fixed"),
    ("no layer produces", "none needed: nothing upstream can shrink"),
)


@dataclasses.dataclass(frozen=True)
class Blocker:
    """One reason channels are locked, across every group it freezes.

    Attributes:
        reason: the reason, with node names left out (``used by `…` (torch.nn.functional.batch_norm)...``).
        macs: MACs of the layers whose output channels it locks.
        layers: those layers.
        groups: how many channel groups it freezes.
        remedy: what would unblock it.
    """

    reason: str
    macs: int
    layers: List[str]
    groups: int
    remedy: str

    def describe(self) -> str:
        return (f"{self.reason}: locks {len(self.layers)} layer(s) ({', '.join(self.layers[:3])}"
                f"{', ...' if len(self.layers) > 3 else ''}) in {self.groups} group(s); to unblock: {self.remedy}")


def _pattern(reason: str) -> str:
    return re.sub(r"`[^`]*`", "`…`", reason)


def blockers(analysis: ChannelAnalysis) -> List[Blocker]:
    """The reasons channel groups are frozen, the heaviest (most MACs locked) first."""
    gm = analysis.gm
    macs: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            macs[node.target] = macs.get(node.target, 0) + node_macs(gm, node)
    by_reason: Dict[str, Dict] = {}
    for g in analysis.groups:
        if g.prunable or not g.producers():
            continue
        entry = by_reason.setdefault(_pattern(g.reason), {"layers": {}, "groups": 0})
        entry["groups"] += 1
        for layer in g.producers():
            entry["layers"][layer] = None
    out = []
    for reason, entry in by_reason.items():
        layers = list(entry["layers"])
        remedy = next((r for key, r in REMEDIES if key in reason), "see the reason")
        out.append(Blocker(reason, sum(macs.get(m, 0) for m in layers), layers, entry["groups"], remedy))
    return sorted(out, key=lambda b: (-b.macs, b.reason))
