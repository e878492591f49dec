"""What a pass did to a graph: nodes added, removed and changed, matched by node name.

The manager gives every pass a deep copy, which keeps node names; so a name present on both
sides is the same node, and a name on one side only was added or removed. A node is
*changed* when it was rewired (different inputs), retargeted, or its module's configuration
or weights changed.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Dict, List, Tuple

import torch
import torch.fx as fx


@dataclasses.dataclass
class GraphDiff:
    added: List[str]
    removed: List[str]
    changed: List[str]
    rewired: List[str]


def _signature(gm: fx.GraphModule, n: fx.Node) -> Tuple[str, str]:
    """(wiring, definition): inputs by name, and the op, target and module configuration."""
    wiring = repr(fx.node.map_arg((n.args, n.kwargs), lambda a: a.name))
    definition = f"{n.op}|{n.target}"
    if n.op == "call_module":
        definition += "|" + repr(gm.get_submodule(n.target))
    return wiring, definition


def _weights(gm: fx.GraphModule, n: fx.Node) -> Dict[str, torch.Tensor]:
    if n.op == "call_module":
        return gm.get_submodule(n.target).state_dict()
    if n.op == "get_attr":
        obj = gm
        for part in n.target.split("."):
            obj = getattr(obj, part, None)
        return {"": obj} if isinstance(obj, torch.Tensor) else {}
    return {}


def _same_weights(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def diff_graphs(before: fx.GraphModule, after: fx.GraphModule) -> GraphDiff:
    """Compare two graphs node by node (see module docstring)."""
    b_nodes = {n.name: n for n in before.graph.nodes}
    a_nodes = {n.name: n for n in after.graph.nodes}
    added = [k for k in a_nodes if k not in b_nodes]
    removed = [k for k in b_nodes if k not in a_nodes]
    changed, rewired = [], []
    for name in (k for k in a_nodes if k in b_nodes):
        (bw, bd), (aw, ad) = _signature(before, b_nodes[name]), _signature(after, a_nodes[name])
        if bw != aw:
            rewired.append(name)
        if bw != aw or bd != ad or not _same_weights(_weights(before, b_nodes[name]), _weights(after, a_nodes[name])):
            changed.append(name)
    return GraphDiff(added, removed, changed, rewired)


def code_diff(before: fx.GraphModule, after: fx.GraphModule, name: str = "pass") -> str:
    """A unified diff of the generated forward() code."""
    lines = difflib.unified_diff(
        before.code.strip().splitlines(), after.code.strip().splitlines(),
        fromfile=f"before {name}", tofile=f"after {name}", lineterm="", n=2,
    )
    return "\n".join(lines)
