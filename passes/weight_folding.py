"""Weights computed from parameters, folded into one constant weight for inference.

Weight standardization (timm's ``StdConv2d`` / ``ScaledStdConv2d`` in NF-Nets and BiT:
``F.batch_norm`` over the raw weight, times a gain), weight normalization (``g * v / ||v||``)
and similar reparameterizations compute a conv's or linear's weight from parameters on every
call. At inference that computation depends on nothing but parameters, so it is a constant:
the layer is then an ordinary functional conv on one parameter, which fusion, the channel
analysis (pruning) and lowering understand. Exact: the constant is the same float32 tensor the
computation yields. Training afterwards (``distill``) trains the folded weight directly.
"""
from __future__ import annotations

import operator
from typing import Dict, List

import torch
import torch.fx as fx
import torch.nn.functional as F

#: functional layers whose ``weight`` (argument 1) and ``bias`` (argument 2) are folded when computed
LAYERS = (F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d, torch.conv3d)
_ARG_NAMES = {1: "weight", 2: "bias"}


def _weight_only(nodes: List[fx.Node]) -> Dict[fx.Node, bool]:
    """Which nodes depend on parameters and constants alone (no input, no in-place op)."""
    only: Dict[fx.Node, bool] = {}
    for n in nodes:
        if n.op == "get_attr":
            only[n] = True
        elif n.op in ("call_function", "call_method"):
            name = getattr(n.target, "__name__", str(n.target))
            only[n] = (not name.endswith("_") and bool(n.all_input_nodes)
                       and all(only.get(a, False) for a in n.all_input_nodes))
        else:
            only[n] = False
    return only


def _evaluate(gm: fx.GraphModule, node: fx.Node, cache: Dict[fx.Node, torch.Tensor]):
    if node in cache:
        return cache[node]
    if node.op == "get_attr":
        value = operator.attrgetter(node.target)(gm)
    else:
        args = fx.node.map_arg(node.args, lambda a: _evaluate(gm, a, cache))
        kwargs = fx.node.map_arg(node.kwargs, lambda a: _evaluate(gm, a, cache))
        if node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            value = node.target(*args, **kwargs)
    cache[node] = value
    return value


def fold_computed_weights(gm: fx.GraphModule) -> int:
    """Replace each computed weight or bias of a functional conv/linear by a parameter holding
    its value: as the ``weight``/``bias`` of the module whose parameters it was computed from
    (replacing the raw one), and drop the parameters nothing reads any more. Returns how many."""
    nodes = list(gm.graph.nodes)
    only = _weight_only(nodes)
    cache: Dict[fx.Node, torch.Tensor] = {}
    folded, sources = 0, set()
    for node in nodes:
        if node.op != "call_function" or node.target not in LAYERS:
            continue
        for index, role in _ARG_NAMES.items():
            src = node.args[index] if len(node.args) > index else node.kwargs.get(role)
            if not isinstance(src, fx.Node) or src.op == "get_attr" or not only.get(src):
                continue
            with torch.no_grad():
                value = _evaluate(gm, src, cache).detach().clone()
            reads = [a for a in _leaves(src) if a.op == "get_attr"]
            owner = reads[0].target.rpartition(".")[0]
            name = _free_name(gm, owner, role, src, reads)
            module_path, _, attr_name = name.rpartition(".")
            module = gm.get_submodule(module_path) if module_path else gm
            module._parameters.pop(attr_name, None)
            module.register_parameter(attr_name, torch.nn.Parameter(value, requires_grad=value.is_floating_point()))
            sources.update(a.target for a in reads)
            with gm.graph.inserting_before(node):
                attr = gm.graph.get_attr(name)
            attr.meta = dict(src.meta)
            src.replace_all_uses_with(attr, delete_user_cb=lambda user: user is node)
            folded += 1
    if folded:
        gm.graph.eliminate_dead_code()
        _drop_unread(gm, sources)
        gm.graph.lint()
        gm.recompile()
    return folded


def _free_name(gm: fx.GraphModule, owner: str, role: str, src: fx.Node, reads: List[fx.Node]) -> str:
    """``owner.role`` when that is free or only this computation reads it, else a new name."""
    name = f"{owner}.{role}" if owner else role
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name]
    if not _exists(gm, name) or all(n in reads for n in readers) and not _called(gm, owner):
        return name
    k = 0
    while _exists(gm, f"{name}_folded{k or ''}"):
        k += 1
    return f"{name}_folded{k or ''}"


def _exists(gm: fx.GraphModule, target: str) -> bool:
    try:
        operator.attrgetter(target)(gm)
        return True
    except AttributeError:
        return False


def _called(gm: fx.GraphModule, owner: str) -> bool:
    return any(n.op == "call_module" and n.target == owner for n in gm.graph.nodes)


def _drop_unread(gm: fx.GraphModule, targets) -> None:
    """Remove the raw parameters and buffers the folded computations read and nothing else does
    (a module that is still called keeps all of its own)."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in targets - read:
        path, _, attr = target.rpartition(".")
        module = gm.get_submodule(path) if path else gm
        if _called(gm, path) or not hasattr(module, attr):
            continue
        module._parameters.pop(attr, None)
        module._buffers.pop(attr, None)


def _leaves(node: fx.Node) -> List[fx.Node]:
    """The nodes ``node`` is computed from, depth first (get_attr first reached first)."""
    seen, order, stack = set(), [], [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        order.append(n)
        stack.extend(reversed(n.all_input_nodes))
    return order
