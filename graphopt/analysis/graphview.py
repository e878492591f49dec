"""A networkx view of an fx graph, for analyses that want graph algorithms."""
from __future__ import annotations

import networkx as nx
import torch.fx as fx

from .shapes import output_shape


def node_label(gm: fx.GraphModule, node: fx.Node) -> str:
    """Short human label: module class or function name."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """DiGraph keyed by node name, with ``op``, ``target``, ``label`` and ``shape`` attributes.

    Example:
        >>> import torch, torch.fx as fx
        >>> g = to_networkx(fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU())))
        >>> list(g.edges)
        [('input_1', '_0'), ('_0', 'output')]
    """
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name, op=n.op, target=str(n.target), label=node_label(gm, n),
                   shape=output_shape(n))
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    return g
