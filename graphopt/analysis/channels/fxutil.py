"""Small questions about fx nodes that channel rules and MAC counters ask (public: a plugin's
rules may use them too)."""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ...layer_registry import qualified_name
from ..shapes import output_shape
from .spaces import Unsupported


def is_tensor(node: Any) -> bool:
    """Whether ``node`` is an fx node that produces one tensor."""
    if not isinstance(node, fx.Node):
        return False
    t = node.meta.get("type")
    if isinstance(t, type) and issubclass(t, torch.Tensor):
        return True
    return hasattr(node.meta.get("tensor_meta"), "shape")


def is_tensor_tuple(node: fx.Node) -> bool:
    """Whether ``node`` produces several tensors (split, chunk, unbind...)."""
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, (tuple, list)) and any(hasattr(m, "shape") for m in meta)


def tensor_inputs(node: fx.Node) -> List[fx.Node]:
    return [a for a in node.all_input_nodes if is_tensor(a) or is_tensor_tuple(a)]


def norm_dim(d: int, ndim: int) -> int:
    """``d`` in ``[0, ndim)``; Unsupported when out of range (the rule cannot follow it)."""
    if not -ndim <= d < max(ndim, 1):
        raise Unsupported(f"dim {d} out of range for a {ndim}-d tensor")
    return d % ndim if ndim else 0


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` of the call, given positionally or as keyword ``name``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def arg_shape(node: fx.Node, i: int = 0):
    """The shape of tensor argument ``i``, or None."""
    a = node.args[i] if len(node.args) > i else None
    return output_shape(a) if isinstance(a, fx.Node) else None


def resolve(a: Any, lookup: Callable[[fx.Node], Any]) -> Any:
    """The concrete value of an argument: literals as they are, nodes through ``lookup``, inside
    lists, tuples, slices and dicts too."""
    if isinstance(a, fx.Node):
        return lookup(a)
    if isinstance(a, (list, tuple)):
        return type(a)(resolve(v, lookup) for v in a)
    if isinstance(a, slice):
        return slice(resolve(a.start, lookup), resolve(a.stop, lookup), resolve(a.step, lookup))
    if isinstance(a, dict):
        return {k: resolve(v, lookup) for k, v in a.items()}
    return a


def describe(node: fx.Node, module: Optional[nn.Module] = None) -> str:
    """How reports name a node: `layer1.0.conv1` (Conv2d), `view_1` (Tensor.view)..."""
    if node.op == "call_module":
        return f"`{node.target}` ({type(module).__name__})"
    if node.op == "call_method":
        return f"`{node.name}` (Tensor.{node.target})"
    return f"`{node.name}` ({qualified_name(node.target)})"
