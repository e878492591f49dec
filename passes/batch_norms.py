"""Inference batch norms as the graph holds them, and folding them into the layer before.

One reader for the three forms a batch norm takes in a traced model: a BatchNorm module, an
``F.batch_norm`` call on ``get_attr`` statistics (what fx makes of timm's ``BatchNormAct2d``, or
user code), and a leaf BatchNorm subclass that also applies ``drop`` and ``act`` submodules.
Each reads to one per-channel affine map y = x * scale + shift, which ``fuse_conv_bn`` folds into
the conv before it and ``merge_branches`` folds into merged kernels.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import operator
from collections import defaultdict
from typing import Dict, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

_BatchNorm = nn.modules.batchnorm._BatchNorm
_BN_SIGNATURE = inspect.signature(F.batch_norm)
#: forward of a timm-like BatchNorm subclass: batch_norm, then these submodules in this order.
TAIL = ("drop", "act")


@dataclasses.dataclass
class Norm:
    """One inference batch norm: ``node`` computes ``tail(input * scale + shift)`` per channel."""

    node: fx.Node
    input: fx.Node
    scale: torch.Tensor  # float64, per channel
    shift: torch.Tensor
    name: str  # for messages: the module, or the node and the module its statistics live in
    owner: str  # the module holding the statistics ("" for the root)
    stats: Tuple[str, ...] = ()  # get_attr targets read (functional form)
    tail: Tuple[str, ...] = ()  # submodules applied after the affine map (leaf form)


def _affine(mean, var, weight, bias, eps) -> Tuple[torch.Tensor, torch.Tensor]:
    var, mean = var.detach().double(), mean.detach().double()
    gamma = weight.detach().double() if weight is not None else torch.ones_like(var)
    beta = bias.detach().double() if bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + eps)
    return scale, beta - mean * scale


def _attr(gm: fx.GraphModule, node) -> Union[torch.Tensor, None, str]:
    """The tensor a get_attr argument names, None for None, else why it is not a constant."""
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return f"{getattr(node, 'name', node)} is computed in the graph, not a parameter or buffer"
    value = gm
    for atom in node.target.split("."):
        value = getattr(value, atom)
    return value if isinstance(value, torch.Tensor) else f"{node.target} is not a tensor"


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """``node`` for a message: its name and what it computes."""
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
    return f"{node.name} ({what})"


def read_norm(gm: fx.GraphModule, node: fx.Node) -> Union[Norm, str, None]:
    """``node`` as a :class:`Norm`; a string saying why, for a batch norm that is not an
    inference one; None when ``node`` is no batch norm at all."""
    if node.op == "call_function" and node.target is F.batch_norm:
        return _functional(gm, node)
    if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _BatchNorm):
        return None
    bn = gm.get_submodule(node.target)
    if len(node.args) != 1 or node.kwargs:
        return "it is not called on one positional input"
    if bn.training:
        return "it is in training mode (batch statistics)"
    if bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False uses batch statistics)"
    scale, shift = _affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    norm = Norm(node, node.args[0], scale, shift, node.target, node.target)
    if type(bn).forward is _BatchNorm.forward:
        return norm
    if not all(isinstance(getattr(bn, t, None), nn.Module) for t in TAIL):
        return f"{type(bn).__name__} overrides forward and has no {' and '.join(TAIL)} submodules to keep"
    why = _verify_tail(bn, node.args[0])
    return why or dataclasses.replace(norm, tail=tuple(f"{node.target}.{t}" for t in TAIL))


@torch.no_grad()
def _verify_tail(bn: nn.Module, src: fx.Node) -> Optional[str]:
    """None when ``bn``'s own forward is batch_norm then drop then act, on a random input."""
    meta = src.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return f"{type(bn).__name__} overrides forward and its input has no shape to verify it on"
    x = torch.randn(meta.shape, dtype=meta.dtype, generator=torch.Generator().manual_seed(0))
    want = bn(x.clone())
    got = x.clone()
    got = F.batch_norm(got, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    for t in TAIL:
        got = getattr(bn, t)(got)
    err = float((want - got).abs().max() / want.abs().max().clamp_min(1e-12))
    if not err <= 1e-5:
        return f"{type(bn).__name__}.forward is not batch_norm -> drop -> act (differs by {err:.2g})"
    return None


def _functional(gm: fx.GraphModule, node: fx.Node) -> Union[Norm, str]:
    try:
        bound = _BN_SIGNATURE.bind(*node.args, **node.kwargs)
    except TypeError as e:
        return f"its arguments do not bind to F.batch_norm: {e}"
    bound.apply_defaults()
    a = bound.arguments
    if a["training"] is not False:
        return f"training={a['training']} (batch statistics)"
    if not isinstance(a["eps"], (int, float)):
        return "its eps is computed in the graph"
    if a["running_mean"] is None or a["running_var"] is None:
        return "it has no running statistics"
    tensors = {k: _attr(gm, a[k]) for k in ("running_mean", "running_var", "weight", "bias")}
    why = next((v for v in tensors.values() if isinstance(v, str)), None)
    if why:
        return why
    stats = tuple(a[k].target for k in tensors if a[k] is not None)
    owners = {s.rpartition(".")[0] for s in stats}
    owner = owners.pop() if len(owners) == 1 else ""
    scale, shift = _affine(tensors["running_mean"], tensors["running_var"], tensors["weight"],
                           tensors["bias"], a["eps"])
    name = f"{node.name} ({owner})" if owner else node.name
    return Norm(node, a["input"], scale, shift, name, owner, stats)


def sharing(gm: fx.GraphModule, norm: Norm, shared: Dict[str, str]) -> Optional[str]:
    """Why the norm's statistics are shared with another use, else None (``shared`` is
    ``graphopt.shared_weights(gm)``)."""
    if norm.owner and norm.owner in shared:
        return shared[norm.owner]
    readers = defaultdict(list)
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            readers[n.target].extend(u.name for u in n.users)
    for s in norm.stats:
        others = [u for u in readers[s] if u != norm.node.name]
        if others:
            return f"{s} is also read by {', '.join(others)} (shared weights)"
    return None


def fold(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """A copy of conv/linear ``layer`` whose output is ``layer(x) * scale + shift`` per channel."""
    w = layer.weight.detach().double()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        # weight is (in, out/groups, *k): output channel o = g * (out/groups) + j
        g = layer.groups
        shaped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        s = scale.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        new_w = (shaped * s).reshape(w.shape)
    else:
        new_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    fused = copy.deepcopy(layer)
    fused.weight = nn.Parameter(new_w.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    fused.bias = nn.Parameter((bias * scale + shift).to(layer.weight.dtype))
    return fused


def remove_norm(gm: fx.GraphModule, norm: Norm, replacement: fx.Node) -> None:
    """Rewire ``norm``'s users to ``replacement`` (through its tail modules, if any) and delete
    the norm with the statistics nothing else reads."""
    node, out = norm.node, replacement
    with gm.graph.inserting_before(node):
        for t in norm.tail:
            out = gm.graph.call_module(t, (out,))
    node.replace_all_uses_with(out)
    stat_nodes = [a for a in node.all_input_nodes if a.op == "get_attr"]
    gm.graph.erase_node(node)
    for a in stat_nodes:
        if not a.users:
            gm.graph.erase_node(a)
    retire(gm, norm)


def retire(gm: fx.GraphModule, norm: Norm) -> None:
    """Drop statistics the graph no longer reads, so that parameter counts stay honest; a
    BatchNorm module whose children are still called (timm's act, drop) becomes their container."""
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    calls = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    owner = gm.get_submodule(norm.owner)
    if norm.owner and isinstance(owner, _BatchNorm) and norm.owner not in calls and \
            not any(t.rpartition(".")[0] == norm.owner for t in reads):
        gm.add_submodule(norm.owner, nn.ModuleDict(dict(owner.named_children())))
        return
    for s in dict.fromkeys(norm.stats):  # once each: one tensor may be both weight and bias
        parent, _, attr = s.rpartition(".")
        if s not in reads and not any(parent == c or parent.startswith(c + ".") for c in calls):
            delattr(gm.get_submodule(parent), attr)


# --- nodes that pass their input through ---------------------------------------------------------

def passes_through(m: nn.Module) -> bool:
    """Identity, or dropout in eval mode (timm's ``drop`` and an ``act`` that is off)."""
    return isinstance(m, nn.Identity) or (isinstance(m, nn.modules.dropout._DropoutNd) and not m.training)


def is_pass_through(gm: fx.GraphModule, n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_module" and passes_through(gm.get_submodule(n.target))


def behind(gm: fx.GraphModule, n: fx.Node) -> Tuple[fx.Node, list]:
    """The first node behind ``n`` that computes something, and the pass-through nodes on the
    way, each used only by the next."""
    chain = []
    while len(n.users) == 1 and is_pass_through(gm, n):
        chain.append(n)
        n = n.args[0]
    return n, chain


def source(gm: fx.GraphModule, n):
    """The node whose value ``n`` has, looking through pass-through nodes."""
    while is_pass_through(gm, n):
        n = n.args[0]
    return n


# --- shape queries and the shape assertions built on them ---------------------------------------

_QUERY_ATTRS = ("ndim", "shape", "dtype")
_QUERY_METHODS = ("size", "dim")
_STATIC_OPS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
               operator.getitem, operator.and_, operator.or_, operator.not_, operator.truth, len}
_UNKNOWN = object()


def is_shape_query(node: fx.Node) -> bool:
    """``x.ndim``/``x.shape``/``x.dtype``/``x.size()``/``x.dim()``: reads no values of x."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _QUERY_ATTRS
    return node.op == "call_method" and node.target in _QUERY_METHODS


def value_users(node: fx.Node) -> list:
    """The users of ``node`` that read its values (not only its shape)."""
    return [u for u in node.users if not (is_shape_query(u) and u.args[0] is node)]


def _static(value):
    """``value`` computed from the shapes in ``meta``, or _UNKNOWN."""
    if isinstance(value, (tuple, list)):
        parts = [_static(v) for v in value]
        return _UNKNOWN if any(p is _UNKNOWN for p in parts) else type(value)(parts)
    if not isinstance(value, fx.Node):
        return value
    if is_shape_query(value):
        meta = value.args[0].meta.get("tensor_meta") if isinstance(value.args[0], fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            return _UNKNOWN
        fake = torch.empty(meta.shape, dtype=meta.dtype, device="meta")
        if value.op == "call_function":
            return getattr(fake, value.args[1])
        args = _static(tuple(value.args[1:]))
        return _UNKNOWN if args is _UNKNOWN else getattr(fake, value.target)(*args)
    if value.op == "call_function" and value.target in _STATIC_OPS and not value.kwargs:
        args = _static(tuple(value.args))
        return _UNKNOWN if args is _UNKNOWN else value.target(*args)
    return _UNKNOWN


def drop_static_asserts(gm: fx.GraphModule, node: fx.Node) -> int:
    """Remove the ``torch._assert`` checks on ``node``'s shape that hold for the static shapes
    of the graph (timm's ``x.ndim == 4``), and the queries only they used; returns how many."""
    queries = [u for u in node.users if is_shape_query(u) and u.args[0] is node]
    reached, todo = [], list(queries)
    while todo:
        n = todo.pop()
        if n not in reached:
            reached.append(n)
            todo.extend(u for u in n.users if u.op == "call_function" and
                        (u.target in _STATIC_OPS or u.target is torch._assert))
    asserts = [n for n in reached if n.op == "call_function" and n.target is torch._assert
               and _static(n.args[0]) is True]
    for n in asserts:
        gm.graph.erase_node(n)
    for n in reversed(sorted(set(reached) - set(asserts), key=_position(gm))):
        if not n.users and not n.is_impure():
            gm.graph.erase_node(n)
    return len(asserts)


def _position(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return order.__getitem__
