"""Merge parallel convolutions summed on the same input into one convolution (RepVGG, MobileOne, ACNet).

conv_a(x) + conv_b(x) + BN(x) + c is one conv on x when the branches share stride, groups,
dilation and channels and their kernels are centred (padding (k-1)/2 * dilation): zero-pad every
kernel to the largest, write the identity as a centred delta (one per group), add the weights and
the biases. BatchNorms on the branches fold first, with the helpers ``fuse_conv_bn`` uses.
Only the graph is read: the pass works on any model, not only on classes that know how to
re-parameterize themselves.
"""
from __future__ import annotations

import copy
import dataclasses
import operator
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

import graphopt

from .batch_norms import (
    Norm, behind, drop_static_asserts, is_pass_through, is_shape_query, passes_through, read_norm, retire, source,
    value_users,
)

#: convs whose forward is the plain one (timm's Conv2dSame pads at run time: not centred)
_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


@dataclasses.dataclass
class Branch:
    """One term of a sum: ``conv(input) * scale + shift``, or ``input * scale + shift``."""

    operand: fx.Node  # the node the sum adds
    input: fx.Node
    nodes: List[fx.Node]  # what disappears with the branch
    conv: Optional[fx.Node] = None
    norm: Optional[Norm] = None
    why: Optional[str] = None  # why it cannot join the merge

    def label(self, gm) -> str:
        if self.conv is None:
            return "identity BN" if self.norm else "identity"
        return "x".join(map(str, gm.get_submodule(self.conv.target).kernel_size))

    def name(self) -> Optional[str]:
        if self.conv is not None:
            return self.conv.target
        return self.norm.owner if self.norm else None


def _is_add(n: fx.Node) -> bool:
    return ((n.op == "call_function" and n.target in (operator.add, torch.add))
            or (n.op == "call_method" and n.target == "add")) and len(n.args) == 2 and not n.kwargs


def _inner(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether ``n`` is an inner node of a larger sum (what :func:`_sum_terms` expands)."""
    while len(n.users) == 1:
        n = next(iter(n.users))
        if _is_add(n):
            return True
        if not is_pass_through(gm, n):
            return False
    return False


def _sum_terms(gm: fx.GraphModule, root: fx.Node):
    """The adds of the sum tree at ``root``, its tensor terms (node, pass-through chain) and constants."""
    adds, terms, consts, todo = [], [], [], [root]
    while todo:
        a = todo.pop()
        adds.append(a)
        for arg in a.args:
            if isinstance(arg, (int, float)) and not isinstance(arg, bool):
                consts.append(arg)
                continue
            head, chain = behind(gm, arg)
            if _is_add(head) and len(head.users) == 1:
                adds.extend(chain)
                todo.append(head)
            else:
                terms.append((arg, head, chain))
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    return adds, sorted(terms, key=lambda t: order[t[0]]), sum(consts)


def _branch(gm: fx.GraphModule, operand: fx.Node, head: fx.Node, chain: List[fx.Node]) -> Branch:
    norm = read_norm(gm, head) if len(value_users(head)) == 1 else None
    if isinstance(norm, Norm) and all(passes_through(gm.get_submodule(t)) for t in norm.tail):
        inner = norm.input
        if _plain_conv(gm, inner) and value_users(inner) == [head]:
            return Branch(operand, source(gm, inner.args[0]), chain + [head, inner], inner, norm)
        return Branch(operand, source(gm, inner), chain + [head], norm=norm)
    if _plain_conv(gm, head) and len(value_users(head)) == 1:
        return Branch(operand, source(gm, head.args[0]), chain + [head], head)
    return Branch(operand, source(gm, head), chain)


def _plain_conv(gm: fx.GraphModule, n) -> bool:
    return (isinstance(n, fx.Node) and n.op == "call_module" and len(n.args) == 1 and not n.kwargs
            and type(gm.get_submodule(n.target)).forward in _CONV_FORWARDS)


def _padding(conv: nn.Module) -> Optional[Tuple[int, ...]]:
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        return tuple((k - 1) // 2 * d for k, d in zip(conv.kernel_size, conv.dilation))
    return tuple(conv.padding)


def _own_problem(gm, b: Branch, shared: Dict[str, str]) -> Optional[str]:
    """Why conv branch ``b`` cannot merge with anything."""
    conv = gm.get_submodule(b.conv.target)
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if any(k % 2 == 0 for k in conv.kernel_size):
        return f"its {b.label(gm)} kernel has no centre"
    centred = tuple((k - 1) // 2 * d for k, d in zip(conv.kernel_size, conv.dilation))
    if _padding(conv) != centred:
        return f"its padding {_padding(conv)} does not centre its {b.label(gm)} kernel (needs {centred})"
    return shared.get(b.conv.target)


def _mismatch(gm, b: Branch, ref: nn.Module) -> Optional[str]:
    """Why branch ``b`` cannot merge with the conv ``ref``."""
    if b.conv is None:
        meta = b.input.meta.get("tensor_meta")
        if ref.in_channels != ref.out_channels or any(s != 1 for s in ref.stride):
            return f"the convs have stride {tuple(ref.stride)} and {ref.in_channels} -> {ref.out_channels} channels"
        if getattr(meta, "shape", None) is None or len(meta.shape) != len(ref.kernel_size) + 2:
            return "its shape is not the convs' output shape"
        return None
    conv = gm.get_submodule(b.conv.target)
    for attr in ("in_channels", "out_channels", "stride", "groups", "dilation"):
        if getattr(conv, attr) != getattr(ref, attr):
            return f"{attr} {getattr(conv, attr)} differs from {getattr(ref, attr)}"
    if type(conv) is not type(ref) or conv.weight.dtype != ref.weight.dtype:
        return f"it is a {conv.weight.dtype} {type(conv).__name__}, the others {ref.weight.dtype} {type(ref).__name__}"
    return None


def merged_conv(gm: fx.GraphModule, ref: nn.Module, branches: List[Branch], const: float) -> nn.Module:
    """One conv computing the sum of ``branches`` (plus ``const``), shaped like ``ref`` but with
    the largest kernel of them all."""
    convs = [gm.get_submodule(b.conv.target) for b in branches if b.conv is not None]
    size = tuple(max(ks) for ks in zip(*(c.kernel_size for c in convs)))
    cout, cin_g = ref.out_channels, ref.in_channels // ref.groups
    w = torch.zeros(cout, cin_g, *size, dtype=torch.float64)
    bias = torch.full((cout,), float(const), dtype=torch.float64)
    for b in branches:
        scale = b.norm.scale if b.norm else torch.ones(cout, dtype=torch.float64)
        shift = b.norm.shift if b.norm else torch.zeros(cout, dtype=torch.float64)
        if b.conv is None:  # x[o] sits at input channel o % cin_g of output o's group
            centre = tuple(k // 2 for k in size)
            w[(torch.arange(cout), torch.arange(cout) % cin_g, *centre)] += scale
            bias += shift
            continue
        conv = gm.get_submodule(b.conv.target)
        window = tuple(slice((s - k) // 2, (s - k) // 2 + k) for s, k in zip(size, conv.kernel_size))
        w[(slice(None), slice(None), *window)] += conv.weight.detach().double() * scale.view(-1, *[1] * (len(size) + 1))
        own = conv.bias.detach().double() if conv.bias is not None else torch.zeros(cout, dtype=torch.float64)
        bias += own * scale + shift
    out = copy.deepcopy(ref)
    out.kernel_size = size
    out.padding = tuple((k - 1) // 2 * d for k, d in zip(size, ref.dilation))
    out.weight = nn.Parameter(w.to(ref.weight.dtype))
    out.bias = nn.Parameter(bias.to(ref.weight.dtype))
    return out


def _block(root: fx.Node, names: List[Optional[str]]) -> str:
    """The module the sum is computed in (fx's module stack), else the longest common dotted
    prefix of the branches' module names."""
    stack = root.meta.get("nn_module_stack")
    if stack:
        where = list(stack.values())[-1]
        return where[0] if isinstance(where, tuple) else str(where)
    parts = [n.split(".")[:-1] for n in names if n]
    common = [atoms[0] for atoms in zip(*parts) if len(set(atoms)) == 1] if parts else []
    return ".".join(common) or root.name


def _describe(gm, branches: List[Branch]) -> str:
    """'3 x 3x3 + 1x1 + identity BN': largest kernels first, identities last."""
    def order(b):
        return (b.conv is None, -gm.get_submodule(b.conv.target).weight[0].numel() if b.conv else 0)
    counts = Counter(b.label(gm) for b in sorted(branches, key=order))
    return " + ".join(f"{k} x {label}" if k > 1 else label for label, k in counts.items())


def _erase(gm: fx.GraphModule, nodes: List[fx.Node], norms: List[Norm], merged: fx.Node) -> int:
    """Erase what the merge left unused; shape reads of erased nodes read the merged conv (same
    shape). Returns how many shape assertions went with them."""
    asserts = 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in sorted(set(nodes), key=order.__getitem__, reverse=True):
        asserts += drop_static_asserts(gm, n)
        for q in [u for u in n.users if is_shape_query(u) and u.args[0] is n]:
            q.replace_input_with(n, merged)
        if n.users:
            continue
        stats = [a for a in n.all_input_nodes if a.op == "get_attr"]
        gm.graph.erase_node(n)
        for a in stats:
            if not a.users:
                gm.graph.erase_node(a)
    for norm in norms:
        retire(gm, norm)
    return asserts


@graphopt.register_pass(
    "merge_branches",
    exact=True,
    description="Merge parallel convs summed on one input (RepVGG, MobileOne, ACNet) into one conv",
    runs_after=("fuse_conv_bn",),
    runs_before=("prune_channels", "separable_conv", "quantize", "dce"),
)
def merge_branches(gm: fx.GraphModule, ctx: graphopt.PassContext) -> fx.GraphModule:
    """Merge every sum of parallel conv / identity branches that one conv computes exactly."""
    shared = graphopt.shared_weights(gm)
    for root in [n for n in gm.graph.nodes if _is_add(n) and not _inner(gm, n)]:
        adds, terms, const = _sum_terms(gm, root)
        branches = [_branch(gm, *t) for t in terms]
        groups: Dict[fx.Node, List[Branch]] = {}
        for b in branches:
            groups.setdefault(b.input, []).append(b)
        plans = [p for p in (_plan(gm, ctx, root, g, shared) for g in groups.values()) if p]
        if plans:
            _rewrite(gm, ctx, root, adds, branches, plans, const)
    gm.delete_all_unused_submodules()
    return gm


def _plan(gm, ctx, root, group: List[Branch], shared) -> Optional[Tuple[str, Branch, List[Branch]]]:
    """(block name, the conv to keep, the branches it absorbs) for branches on one input; notes
    the branches that cannot join."""
    convs = [b for b in group if b.conv is not None]
    if not convs or len(group) < 2:
        return None
    for b in convs:
        b.why = _own_problem(gm, b, shared)
    ok = [b for b in convs if b.why is None]
    keep = max(ok, key=lambda b: gm.get_submodule(b.conv.target).weight[0].numel(), default=None)
    for b in group:
        if b.why is None and keep is not None:
            b.why = _mismatch(gm, b, gm.get_submodule(keep.conv.target))
    block = _block(root, [b.name() for b in group])
    for b in group:
        if b.why:
            ctx.note(f"{block}: {b.label(gm)} branch {b.name() or b.input.name} not merged: {b.why}")
    merging = [b for b in group if b.why is None]
    return (block, keep, merging) if keep is not None and len(merging) > 1 else None


def _rewrite(gm, ctx, root, adds, branches, plans, const) -> None:
    """Replace the sum at ``root`` by the merged convs plus the terms that stay."""
    absorbed = [b for _, _, merging in plans for b in merging]
    notes = [f"{block}: {_describe(gm, merging)} -> one " for block, _, merging in plans]
    for i, (_, keep, merging) in enumerate(plans):
        ref = gm.get_submodule(keep.conv.target)
        gm.add_submodule(keep.conv.target, merged_conv(gm, ref, merging, const if i == 0 else 0))
    terms = [keep.conv for _, keep, _ in plans] + [b.operand for b in branches if b not in absorbed]
    with gm.graph.inserting_before(root):
        out = terms[0]
        for t in terms[1:]:
            out = gm.graph.call_function(operator.add, (out, t))
    root.replace_all_uses_with(out)
    asserts = _erase(gm, adds, [], out)
    for note, (_, keep, merging) in zip(notes, plans):
        asserts += _erase(gm, [n for b in merging for n in b.nodes if n is not keep.conv],
                          [b.norm for b in merging if b.norm], keep.conv)
        asserts += sum(drop_static_asserts(gm, b.input) for b in merging if b.conv is None and b.norm)
        asserts += drop_static_asserts(gm, keep.conv) if keep.norm else 0
        folded = sum(b.norm is not None for b in merging)
        size = "x".join(map(str, gm.get_submodule(keep.conv.target).kernel_size))
        extra = ([f"folded {folded} batch norm(s)"] if folded else []) + \
                ([f"removed {asserts} static shape assertion(s)"] if asserts else [])
        ctx.note(note + f"{size} conv" + (f" ({', '.join(extra)})" if extra else ""))
        asserts = 0
