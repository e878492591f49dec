"""What a graph's speed depends on, as one hash: its code, tensor shapes and dtypes, and zeros.

Two graphs with the same signature run the same kernels on the same shapes, so they have the
same latency: a pass that only changes weight values (``distill``) keeps it, and a latency
measured once is reused instead of timed again (which would report the machine's noise as the
pass's effect). Weight values are left out on purpose; what of them can change speed is kept:
each tensor's count of exact zeros (sparse kernels run where weights are zero).

Example:
    >>> import torch, torch.fx as fx
    >>> a, b = fx.symbolic_trace(torch.nn.Linear(4, 2)), fx.symbolic_trace(torch.nn.Linear(4, 2))
    >>> structure_signature(a) == structure_signature(b)   # other weights, same structure
    True
    >>> with torch.no_grad():
    ...     b.weight[0] = 0
    >>> structure_signature(a) == structure_signature(b)   # zeros count
    False
"""
from __future__ import annotations

import hashlib
from typing import Dict, Iterable, Optional

import torch
import torch.fx as fx

__all__ = ["graph_tensors", "structure_signature"]


def graph_tensors(gm: fx.GraphModule) -> Dict[str, torch.Tensor]:
    """Every tensor the graph reads: its state dict and tensors a pass attached as attributes."""
    tensors = dict(gm.state_dict(keep_vars=False))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in tensors:
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part, None)
            if isinstance(value, torch.Tensor):
                tensors[node.target] = value
    return tensors


def structure_signature(gm: fx.GraphModule, example_inputs: Optional[Iterable] = None,
                        extra: str = "") -> str:
    """sha256 of the code, every tensor's name, shape, dtype and zero count, the input specs and
    ``extra`` (e.g. the target and the schedules timed)."""
    h = hashlib.sha256(extra.encode())
    h.update(gm.code.encode())
    for name, t in sorted(graph_tensors(gm).items()):
        zeros = int((t.detach() == 0).sum()) if t.numel() else 0
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{zeros};".encode())
    for x in example_inputs or ():
        h.update(str((tuple(x.shape), x.dtype)).encode())
    return h.hexdigest()
