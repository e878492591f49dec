"""Which modules share their weights: a pass that rewrites one use of shared weights changes the others.

Weights are shared when a module is called from more than one node (a block applied twice), or
when one Parameter object is held by several modules (tied weights). Passes that rewrite or
resize a module refuse such modules, with the reason this returns, rather than silently untying.

Example:
    >>> import torch.nn as nn, torch.fx as fx
    >>> class Twice(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
    ...         self.b.weight = self.a.weight
    ...         self.c = nn.Conv2d(4, 4, 1)
    ...     def forward(self, x):
    ...         return self.c(self.c(self.b(self.a(x))))
    >>> shared = shared_weights(fx.symbolic_trace(Twice()))
    >>> sorted(shared), shared["c"]
    (['a', 'b', 'c'], 'c is called more than once (2 calls: shared weights)')
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List

import torch.fx as fx

__all__ = ["shared_weights"]


def shared_weights(gm: fx.GraphModule, *, calls: bool = True) -> Dict[str, str]:
    """Module name -> why its weights are shared (only modules whose weights are shared).

    ``calls=False`` leaves out modules called from several nodes (passes that treat every call
    alike, as the channel analysis does, need only the tied tensors).
    """
    reasons: Dict[str, str] = {}
    if calls:
        counts = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        reasons = {name: f"{name} is called more than once ({k} calls: shared weights)"
                   for name, k in counts.items() if k > 1}
    holders: Dict[int, List[str]] = {}
    for name, module in gm.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    for names in holders.values():
        if len(names) < 2:
            continue
        for full in names:
            module = full.rpartition(".")[0]
            others = ", ".join(n for n in names if n != full)
            reasons.setdefault(module, f"{full} is the same tensor as {others} (tied weights)")
    return reasons
