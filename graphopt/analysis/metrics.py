"""Size and cost of a GraphModule: parameters, bytes and multiply-accumulates per node.

MAC counts come from the shapes in ``node.meta`` (run ``propagate_shapes`` first) and from the
``macs`` part of each layer's family (``graphopt.layer_registry``): the built-in counters live
with their families in ``graphopt.analysis.channels`` (conv, linear and matrix products in
``parametric``, pooling and means in ``pointwise``); plugins add theirs with
``@register_macs(nn.SomeModule)`` or ``graphopt.register_layer(..., macs=...)`` (e.g. quantized
ops).
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..layer_registry import LAYERS, register_macs
from ..sparsity import mask_tensors
from .shapes import output_shape

__all__ = ["count_macs", "count_params", "model_bytes", "node_macs", "register_macs"]


def node_macs(gm: fx.GraphModule, node: fx.Node) -> int:
    """Multiply-accumulates of one node (0 for ops without a counter, e.g. add or relu)."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return 0
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    counter = LAYERS.lookup(node, module, "macs")
    if counter is None or output_shape(node) is None:
        return 0
    return int(counter(node, module))


def count_macs(gm: fx.GraphModule) -> int:
    """Total MACs of one forward pass at the shapes recorded in ``node.meta``."""
    return sum(node_macs(gm, n) for n in gm.graph.nodes)


def count_params(module: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


def model_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (what a serialized model must store), stored dense.

    Weight masks (``graphopt.sparsity``) are left out: the zeros they mark are in the weights."""
    seen, total = {id(m) for m in mask_tensors(module)}, 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
