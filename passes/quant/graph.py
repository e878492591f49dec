"""Where the quantize pass acts in an fx graph: quantizable layers, fused activations, the integer
domain, observers, and the rewrite into graphopt's quantized ops.

Three tables are the whole pattern language (data, not if-chains):

* :data:`QUANTIZABLE`: what becomes integer compute (Conv1d/Conv2d, Linear, their functional
  forms with weights held by the model, and ``matmul`` of two activations);
* :data:`FUSED_ACTIVATIONS`: what folds into the requantization's clip (ReLU, ReLU6);
* :data:`TRANSPARENT`: shape and order ops that run on int8/uint8 tensors unchanged (max pooling,
  flatten, reshape, view, permute, dropout in eval...), so a value stays integer between two
  quantized layers instead of being dequantized and quantized again with the same parameters.

Everything else stays float: a ``q8_dequantize`` goes in where an integer value meets a float op,
a ``q8_quantize`` where a float value meets an integer one.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import operator
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.analysis.sharing import shared_weights
from graphopt.sparsity import copy_mask

from .modules import QuantizedConv, QuantizedLinear
from .observers import Observer, QParams

__all__ = ["Plan", "Site", "convert", "insert_observers", "plan"]

Q = torch.ops.graphopt


@dataclasses.dataclass
class Site:
    """One layer that can become integer compute.

    Attributes:
        name: what users call it (the module's qualified name, else the node's name); ``skip``
            matches it.
        node: the conv / linear / matmul node.
        kind: ``"conv"``, ``"linear"`` or ``"matmul"``.
        inputs: the activation inputs (one, or two for a matmul).
        act: the ReLU/ReLU6 node folded into it, if any; ``act_kind`` says which.
        layer: a module with ``weight``, ``bias``, ``stride``... (None for matmul).
    """

    name: str
    node: fx.Node
    kind: str
    inputs: Tuple[fx.Node, ...]
    act: Optional[fx.Node] = None
    act_kind: Optional[str] = None
    layer: Optional[nn.Module] = None

    @property
    def output(self) -> fx.Node:
        """The value the quantized op produces (after the folded activation)."""
        return self.act if self.act is not None else self.node


@dataclasses.dataclass
class Plan:
    """The quantizable layers of a graph (topological order) and why others were left alone."""

    sites: List[Site]
    skipped: List[str]

    def by_name(self) -> Dict[str, Site]:
        return {s.name: s for s in self.sites}

    def observed_values(self) -> List[fx.Node]:
        """Every value whose range calibration must learn: layer inputs (traced back through
        transparent ops to where they are computed) and layer outputs."""
        seen: Dict[fx.Node, None] = {}
        for s in self.sites:
            for v in s.inputs:
                seen.setdefault(source(v))
            seen.setdefault(s.output)
        return list(seen)


# --- the tables -------------------------------------------------------------------------------

def _module_of(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


class _FunctionalConv(nn.Module):
    """The weights and hyper-parameters of ``F.conv1d/2d`` / ``F.linear`` called on model attributes."""

    def __init__(self, weight, bias, stride=1, padding=0, dilation=1, groups=1):
        super().__init__()
        self.weight, self.bias = weight, bias
        dims = weight.dim() - 2
        expand = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims)
        self.stride, self.padding, self.dilation, self.groups = expand(stride), padding, expand(dilation), groups
        if not isinstance(padding, str):
            self.padding = expand(padding)


def _attr(gm: fx.GraphModule, node) -> Optional[torch.Tensor]:
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise _NotHere("its weight is computed in the graph, not a model attribute")
    return operator.attrgetter(node.target)(gm)


class _NotHere(Exception):
    """Why a candidate layer is left in float (recorded, never raised to the user)."""


def _call_args(node: fx.Node, names: Sequence[str]) -> Dict[str, object]:
    """A functional call's arguments by name (F.conv2d / F.linear signatures)."""
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _conv_layer(gm, node) -> nn.Module:
    m = _module_of(gm, node)
    if m is None:
        a = _call_args(node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
        m = _FunctionalConv(_attr(gm, a["weight"]), _attr(gm, a.get("bias")), a.get("stride", 1),
                            a.get("padding", 0), a.get("dilation", 1), a.get("groups", 1))
    elif getattr(m, "padding_mode", "zeros") != "zeros":
        raise _NotHere(f"padding_mode={m.padding_mode!r} (only zero padding is quantized)")
    padding = m.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * (m.weight.dim() - 2)
        else:  # 'same': symmetric only when every dilated kernel extent is odd
            total = [d * (k - 1) for d, k in zip(m.dilation, m.weight.shape[2:])]
            if any(t % 2 for t in total):
                raise _NotHere("padding='same' with an even kernel is asymmetric")
            padding = tuple(t // 2 for t in total)
    out = copy.copy(m) if isinstance(m, _FunctionalConv) else _FunctionalConv(
        m.weight, m.bias, m.stride, padding, m.dilation, m.groups)
    out.padding = tuple(padding)
    return out


def _linear_layer(gm, node) -> nn.Module:
    m = _module_of(gm, node)
    if m is not None:
        return m
    a = _call_args(node, ("input", "weight", "bias"))
    return _FunctionalConv(_attr(gm, a["weight"]), _attr(gm, a.get("bias")))


def _is_matmul(gm, node) -> bool:
    return (node.op == "call_function" and node.target in (torch.matmul, operator.matmul, torch.bmm)) or \
        (node.op == "call_method" and node.target in ("matmul", "bmm"))


#: kind -> (matches(gm, node), layer(gm, node) or None)
QUANTIZABLE: Dict[str, Tuple[Callable, Optional[Callable]]] = {
    "conv": (lambda gm, n: isinstance(_module_of(gm, n), (nn.Conv1d, nn.Conv2d))
             or (n.op == "call_function" and n.target in (F.conv1d, F.conv2d)), _conv_layer),
    "linear": (lambda gm, n: isinstance(_module_of(gm, n), nn.Linear)
               or (n.op == "call_function" and n.target is F.linear), _linear_layer),
    "matmul": (_is_matmul, None),
}

#: activations folded into the clip: (module types, functions, method names) -> kind
FUSED_ACTIVATIONS = {
    "relu": ((nn.ReLU,), (F.relu, torch.relu, torch.relu_), ("relu", "relu_")),
    "relu6": ((nn.ReLU6,), (F.relu6,), ()),
}

#: ops that move or select int8 values without computing new ones: the integer domain flows through
TRANSPARENT_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
TRANSPARENT_FUNCTIONS = (F.max_pool2d, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                         torch.permute, torch.transpose, F.dropout)
TRANSPARENT_METHODS = ("view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "permute", "transpose")


def _tensor_args_beyond_first(node: fx.Node) -> bool:
    return any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values()))


def is_transparent(node: fx.Node, gm: Optional[fx.GraphModule] = None) -> bool:
    """A single-input op that only moves, selects or reshapes values (int8-safe in PyTorch)."""
    if not node.args or not isinstance(node.args[0], fx.Node) or _tensor_args_beyond_first(node):
        return False
    if node.op == "call_module":
        m = node.graph.owning_module.get_submodule(node.target) if gm is None else gm.get_submodule(node.target)
        if isinstance(m, nn.MaxPool2d) and m.return_indices:
            return False
        return isinstance(m, TRANSPARENT_MODULES)
    if node.op == "call_function":
        if node.target is F.max_pool2d and node.kwargs.get("return_indices", False):
            return False
        return node.target in TRANSPARENT_FUNCTIONS
    return node.op == "call_method" and node.target in TRANSPARENT_METHODS


def source(v: fx.Node) -> fx.Node:
    """The value ``v`` is a reshaped / pooled view of: where its range is observed."""
    while is_transparent(v):
        v = v.args[0]
    return v


def _activation_kind(gm, node: fx.Node) -> Optional[str]:
    for kind, (mods, fns, methods) in FUSED_ACTIVATIONS.items():
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), mods):
            return kind
        if node.op == "call_function" and node.target in fns:
            return kind
        if node.op == "call_method" and node.target in methods:
            return kind
    return None


def _is_float_tensor(node) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def _site_name(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def freeze_dtype_reads(gm: fx.GraphModule) -> int:
    """Replace every ``x.dtype`` read in ``gm`` by the dtype it has now; returns how many.

    Quantized layers hold int8 weights, so code that casts to a layer's weight dtype (timm's
    ``pos.to(self.token_projection.weight.dtype)`` in EdgeNeXt) would cast its float input to
    int8 once the layer is quantized. The float graph's dtypes are what the code meant.
    """
    frozen = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is getattr and node.args[1:] == ("dtype",)):
            continue
        src = node.args[0]
        if src.op == "get_attr":
            value = gm
            for part in src.target.split("."):
                value = getattr(value, part)
            dtype = getattr(value, "dtype", None)
        else:
            dtype = getattr(src.meta.get("tensor_meta"), "dtype", None)
        if not isinstance(dtype, torch.dtype):
            continue
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: dtype if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: dtype if a is node else a)
        gm.graph.erase_node(node)
        frozen += 1
    if frozen:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return frozen


def plan(gm: fx.GraphModule) -> Plan:
    """Find every quantizable layer of ``gm`` (shapes must be in ``node.meta``) and its fused
    activation; list what was left alone and why."""
    sites, skipped = [], []
    shared = shared_weights(gm)  # quantizing one use of a shared tensor would untie it
    for node in gm.graph.nodes:
        kind = next((k for k, (match, _) in QUANTIZABLE.items() if match(gm, node)), None)
        if kind is None:
            continue
        name = _site_name(node)
        try:
            if node.op == "call_module" and node.target in shared:
                raise _NotHere(shared[node.target])
            if kind == "matmul":
                inputs = tuple(a for a in node.args[:2])
                if len(inputs) != 2 or not all(isinstance(a, fx.Node) and _is_float_tensor(a) for a in inputs):
                    raise _NotHere("its operands are not two float tensors computed in the graph")
                if any(len(a.meta["tensor_meta"].shape) < 2 for a in inputs):
                    raise _NotHere("a 1-d operand (only matrix products are quantized)")
                layer = None
            else:
                layer = QUANTIZABLE[kind][1](gm, node)
                x = node.args[0] if node.args else node.kwargs.get("input")
                if not isinstance(x, fx.Node) or not _is_float_tensor(x):
                    raise _NotHere("its input is not a float tensor")
                inputs = (x,)
            if not _is_float_tensor(node):
                raise _NotHere("its output is not a float tensor")
        except _NotHere as e:
            if f"{name} stays float: {e}" not in skipped:  # a module called twice: said once
                skipped.append(f"{name} stays float: {e}")
            continue
        act = next(iter(node.users)) if len(node.users) == 1 else None
        act_kind = _activation_kind(gm, act) if act is not None else None
        sites.append(Site(name, node, kind, inputs, act if act_kind else None, act_kind, layer))
    return Plan(sites, skipped)


def select(sites: Sequence[Site], patterns: Iterable[str]) -> List[Site]:
    """Sites whose name matches any of the glob ``patterns``."""
    pats = list(patterns)
    return [s for s in sites if any(fnmatch.fnmatchcase(s.name, p) for p in pats)]


# --- calibration ------------------------------------------------------------------------------

def describe(v: fx.Node) -> str:
    """How messages name a value."""
    if v.op == "placeholder":
        return f"model input `{v.name}`"
    if v.op == "call_module":
        return f"output of `{v.target}`"
    return f"`{v.name}` ({v.op} {getattr(v.target, '__name__', v.target)})"


OBSERVER_PREFIX = "_graphopt_observer"


def insert_observers(gm: fx.GraphModule, values: Sequence[fx.Node],
                     make: Callable[[str], Observer]) -> Tuple[fx.GraphModule, Dict[str, Observer]]:
    """A copy of ``gm`` with an observer after each of ``values``; observers keyed by value name."""
    observed = copy.deepcopy(gm)
    nodes = {n.name: n for n in observed.graph.nodes}
    last_placeholder = [n for n in observed.graph.nodes if n.op == "placeholder"][-1]
    observers: Dict[str, Observer] = {}
    for i, value in enumerate(values):
        v = nodes[value.name]
        obs = make(describe(value))
        observers[value.name] = obs
        name = f"{OBSERVER_PREFIX}_{i}"
        observed.add_submodule(name, obs)
        with observed.graph.inserting_after(last_placeholder if v.op == "placeholder" else v):
            o = observed.graph.call_module(name, (v,))
        v.replace_all_uses_with(o, delete_user_cb=lambda user: user is not o)
    observed.recompile()
    return observed, observers


# --- the rewrite ------------------------------------------------------------------------------

def _int_demand(gm: fx.GraphModule, active: Dict[fx.Node, Site]) -> Set[fx.Node]:
    """Values that some consumer takes as an integer tensor."""
    member = {s.act: s for s in active.values() if s.act is not None}
    demand: Set[fx.Node] = set()
    for node in reversed(list(gm.graph.nodes)):
        for user in node.users:
            site = active.get(user)
            if site is not None and node in site.inputs:
                demand.add(node)
            elif user not in member and user not in active and user in demand and is_transparent(user, gm):
                demand.add(node)
    return demand


def convert(gm: fx.GraphModule, plan_: Plan, qparams: Callable[[fx.Node], QParams],
            float_sites: Iterable[str] = (), per_channel: bool = True) -> fx.GraphModule:
    """A new GraphModule where every site not in ``float_sites`` is integer compute.

    Args:
        gm: the float graph ``plan_`` was made from (not modified).
        qparams: the activation quantization of an observed value (a node of ``gm``).
        float_sites: site names kept in float (skip, first/last, mixed precision).
        per_channel: one weight scale per output channel (else one per layer).
    """
    keep_float = set(float_sites)
    active = {s.node: s for s in plan_.sites if s.name not in keep_float}
    fused = {s.act: s for s in active.values() if s.act is not None}
    demand = _int_demand(gm, active)
    root = copy.deepcopy(gm)
    graph = fx.Graph()
    fenv: Dict[fx.Node, fx.Node] = {}  # old value -> new float value
    ienv: Dict[fx.Node, fx.Node] = {}  # old value -> new integer value
    iqp: Dict[fx.Node, QParams] = {}  # old value -> its integer value's parameters

    def as_int(v: fx.Node) -> fx.Node:
        if v not in ienv:
            qp = qparams(v)
            ienv[v] = graph.create_node("call_function", Q.q8_quantize.default,
                                        (as_float(v), qp.scale, qp.zero_point, qp.qmin, qp.qmax, qp.dtype),
                                        name=f"{v.name}_q")
            iqp[v] = qp
        return ienv[v]

    def as_float(v: fx.Node) -> fx.Node:
        if v not in fenv:
            qp = iqp[v]
            fenv[v] = graph.create_node("call_function", Q.q8_dequantize.default,
                                        (ienv[v], qp.scale, qp.zero_point), name=f"{v.name}_dq")
        return fenv[v]

    def copy_node(node: fx.Node, env_arg: Callable[[fx.Node], fx.Node]) -> fx.Node:
        return graph.node_copy(node, env_arg)

    for node in gm.graph.nodes:
        if node in fused:
            continue  # emitted with its layer
        site = active.get(node)
        if site is not None:
            xs = [as_int(v) for v in site.inputs]
            x_qp = [iqp[v] for v in site.inputs]
            out_qp = qparams(site.output) if site.output in demand else None
            new = _emit_site(root, graph, site, xs, x_qp, out_qp, per_channel)
            if out_qp is None:
                fenv[site.output] = new
            else:
                ienv[site.output], iqp[site.output] = new, out_qp
            continue
        if node in demand and is_transparent(node, gm):
            if _is_dropout(gm, node):  # identity in eval: drop it, the integer value flows on
                ienv[node] = as_int(node.args[0])
            else:
                ienv[node] = copy_node(node, lambda a: as_int(a) if a is node.args[0] else as_float(a))
            iqp[node] = iqp[node.args[0]]
            continue
        if node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], as_float))
            continue
        fenv[node] = copy_node(node, as_float)
    _drop_unused_attributes(root, graph)
    new_gm = fx.GraphModule(root, graph, gm.__class__.__name__)
    new_gm.delete_all_unused_submodules()
    return new_gm


def _drop_unused_attributes(root: nn.Module, graph: fx.Graph) -> None:
    """Float weights of functional layers that became integer: no node reads them any more, and
    left on the module they would travel with the model (and into the lowering) for nothing."""
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        target = node.target
        graph.erase_node(node)
        if any(n.op == "get_attr" and n.target == target for n in graph.nodes):
            continue
        owner_name, _, attr = target.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]


def _is_dropout(gm, node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity))
    return node.op == "call_function" and node.target is F.dropout


def _emit_site(root: fx.GraphModule, graph: fx.Graph, site: Site, xs, x_qp, out_qp, per_channel) -> fx.Node:
    if site.kind == "matmul":
        a, b = x_qp
        mult, out_zp, lo, hi, dtype = _matmul_spec(a, b, out_qp, site.act_kind)
        return graph.create_node("call_function", Q.q8_matmul.default,
                                 (xs[0], xs[1], a.zero_point, b.zero_point, mult, out_zp, lo, hi, dtype),
                                 name=site.node.name)
    layer = site.layer
    if site.kind == "conv":
        q = QuantizedConv(layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups,
                          x_qp[0], out_qp, site.act_kind, per_channel)
    else:
        q = QuantizedLinear(layer.weight, layer.bias, x_qp[0], out_qp, site.act_kind, per_channel)
    if site.node.op == "call_module":  # a pruned layer's zeros quantize to 0: its mask still holds
        copy_mask(root.get_submodule(site.node.target), q)  # (graphopt.sparsity)
    target = site.node.target if site.node.op == "call_module" else f"{site.node.name}_int8"
    root.add_submodule(target, q)
    return graph.create_node("call_module", target, (xs[0],), name=site.node.name)


def _matmul_spec(a: QParams, b: QParams, out: Optional[QParams], act: Optional[str]):
    from .modules import output_spec

    mult, out_zp, lo, hi, dtype = output_spec(a.scale, torch.tensor([b.scale], dtype=torch.float32), out, act)
    return float(mult[0]), out_zp, lo, hi, dtype
