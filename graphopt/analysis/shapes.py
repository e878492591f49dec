"""Shape propagation: every node gets ``meta["tensor_meta"]`` (fx ShapeProp's typed result)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    """Run ``gm`` once on copies of ``inputs`` (a forward may write into them) and store shapes
    and dtypes in ``node.meta``."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*[t.clone() if isinstance(t, torch.Tensor) else t for t in inputs])


def output_shape(node: fx.Node):
    """The tensor shape of ``node``'s output, or None when it is not a single tensor."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
