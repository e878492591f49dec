"""Masked layers -> graphopt's sparse kernels: the fx rewrite before export, and its translations.

``torch.export`` drops the masks (unused buffers), so the choice is made on the fx graph,
before export, where :func:`graphopt.sparsity.masked_layers` still sees them. For each masked
``nn.Linear`` and 1x1 stride-1 ``nn.Conv2d`` (groups 1, no padding, fp32) the caller's policy
decides (see :mod:`.choice`: timed on the target); a layer going sparse has its call replaced
by one of the ops below, whose operands are its compressed weights (new parameters: they travel
in ``params.npz``), and the layer itself is removed, so its dense weight is stored nowhere.
Everything else stays dense, with the reason recorded.

The ops (``torch.ops.graphopt_sparse.*``) exist for the export only (their reference kernels
are the dense math on the decompressed weight); their translations, registered with
:func:`graphopt.targets.translations.register_translation`, emit the TIR of :mod:`.kernels`
through ``call_tir``:

* ``bsr_conv1x1(x (N, C, H, W), values, indices, indptr, bias, tile, groups) -> (N, O, H, W)``
* ``bsr_linear(x (..., K), values, indices, indptr, bias, groups) -> (..., O)``
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.sparsity import masked_layers, pattern_of

from ..translations import register_translation
from .kernels import compress, conv1x1_kernel, conv_tile, linear_kernel, row_groups

__all__ = ["LayerSpec", "SparsePlan", "SparseRecord", "rewrite"]

NAMESPACE = "graphopt_sparse"


def _dense(values, indices, indptr, rows: int, cols: int):
    """The ``(O, C)`` weight back from BSR (the ops' reference kernels)."""
    block = values.shape[1]
    counts = indptr[1:] - indptr[:-1]
    row_of = torch.repeat_interleave(torch.arange(counts.numel()), counts.long())
    w = torch.zeros(rows // block, cols, block, dtype=values.dtype)
    w.index_put_((row_of, indices.long()), values, accumulate=True)
    return w.permute(0, 2, 1).reshape(rows, cols)


def _op(name: str):
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())


if not hasattr(getattr(torch.ops, NAMESPACE), "bsr_linear"):  # a reloaded module defines nothing twice
    @_op("bsr_conv1x1")
    def bsr_conv1x1(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, indptr: torch.Tensor,
                    bias: torch.Tensor, tile: int, groups: int) -> torch.Tensor:
        w = _dense(values, indices, indptr, bias.numel(), x.shape[1])
        return torch.nn.functional.conv2d(x, w[:, :, None, None], bias)

    @bsr_conv1x1.register_fake
    def _(x, values, indices, indptr, bias, tile, groups):
        return x.new_empty((x.shape[0], bias.shape[0], *x.shape[2:]))

    @_op("bsr_linear")
    def bsr_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, indptr: torch.Tensor,
                   bias: torch.Tensor, groups: int) -> torch.Tensor:
        return torch.nn.functional.linear(x, _dense(values, indices, indptr, bias.numel(), x.shape[-1]), bias)

    @bsr_linear.register_fake
    def _(x, values, indices, indptr, bias, groups):
        return x.new_empty((*x.shape[:-1], bias.shape[0]))


# --- what is decided, per layer ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A masked layer a sparse kernel can run: what the policy decides on (and caches by)."""

    name: str
    kind: str                  # "conv1x1" or "linear"
    input_shape: Tuple[int, ...]
    weight_shape: Tuple[int, ...]
    block: int                 # the (k, 1) block the kernel uses
    blocks: int                # kept blocks
    sparsity: float            # zeros of the weight
    module: nn.Module = dataclasses.field(compare=False, repr=False)

    def key(self) -> Tuple:
        """Shape and pattern: what the timing depends on (not the weight values)."""
        return (self.kind, self.input_shape, self.weight_shape, self.block, self.blocks)


@dataclasses.dataclass
class SparseRecord:
    """One masked layer's outcome: which kernel runs it and why (the manifest's ``sparse_layers``)."""

    name: str
    kind: str
    sparsity: float
    block: int
    kernel: str                       # "sparse" or "dense"
    reason: str
    dense_ms: Optional[float] = None
    sparse_ms: Optional[float] = None
    dense_bytes: int = 0
    stored_bytes: int = 0             # what the artifact stores for the weight

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("dense_ms", "sparse_ms"):
            d[k] = None if d[k] is None else round(float(d[k]), 4)
        d["sparsity"] = round(float(d["sparsity"]), 4)
        return d


#: ``policy(spec) -> (sparse?, dense_ms, sparse_ms, reason)``
Policy = Callable[[LayerSpec], Tuple[bool, Optional[float], Optional[float], str]]


@dataclasses.dataclass(frozen=True)
class SparsePlan:
    """How one lowering treats masked layers: the policy choosing sparse or dense per layer, and
    the target facts the kernels are shaped by (fp32 vector lanes, runtime threads)."""

    policy: Policy
    lanes: int = 16
    threads: int = 1


def _input_shapes(module: nn.Module, inputs, names) -> Dict[str, Tuple[int, ...]]:
    """The input shape each of ``names`` is called with (one forward with hooks); a layer
    called with several shapes is left out."""
    shapes: Dict[str, set] = {n: set() for n in names}
    handles = [module.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: shapes[n].add(tuple(args[0].shape)) if args and isinstance(args[0], torch.Tensor)
        else None) for n in names]
    try:
        with torch.no_grad():
            module(*[x.clone() for x in inputs])
    finally:
        for h in handles:
            h.remove()
    return {n: next(iter(s)) for n, s in shapes.items() if len(s) == 1}


def _ineligible(layer: nn.Module, shape, calls: int, attr_refs: bool) -> Optional[str]:
    """Why a sparse kernel cannot run ``layer`` (None: it can)."""
    if type(layer) not in (nn.Linear, nn.Conv2d):
        return f"{type(layer).__name__}: graphopt's sparse kernels cover nn.Linear and 1x1 nn.Conv2d"
    if layer.weight.dtype != torch.float32:
        return f"weight is {layer.weight.dtype}: the sparse kernels are float32"
    if isinstance(layer, nn.Conv2d):
        if layer.kernel_size != (1, 1) or layer.stride != (1, 1) or layer.groups != 1 \
                or layer.padding not in ((0, 0), "valid") or layer.dilation != (1, 1):
            return ("only 1x1 stride-1 ungrouped unpadded convs have a sparse kernel (kernel "
                    f"{layer.kernel_size}, stride {layer.stride}, groups {layer.groups})")
    if calls != 1 or attr_refs:
        return "the layer is called more than once or its weight is read elsewhere"
    if shape is None or (isinstance(layer, nn.Conv2d) and len(shape) != 4):
        return "its input shape is not one fixed NCHW / (..., K) shape"
    return None


def _block(layer: nn.Module) -> int:
    """The pattern's output-channel block when it divides the channels, else 1 (CSR)."""
    k = (pattern_of(layer).block if pattern_of(layer) is not None else (1, 1))[0]
    return k if k >= 1 and layer.weight.shape[0] % k == 0 else 1


def rewrite(module: fx.GraphModule, inputs, plan: SparsePlan) -> List[SparseRecord]:
    """Replace the calls of masked layers ``plan.policy`` chooses by sparse ops (in place on
    ``module``, a private copy); the record of every masked layer."""
    layers = masked_layers(module)
    if not layers:
        return []
    shapes = _input_shapes(module, inputs, list(layers))
    calls: Dict[str, List[fx.Node]] = {name: [] for name in layers}
    attr_refs = set()
    for node in module.graph.nodes:
        if node.op == "call_module" and node.target in calls:
            calls[node.target].append(node)
        elif node.op == "get_attr":
            attr_refs.add(node.target.rpartition(".")[0])
    records = []
    for name, layer in layers.items():
        w = layer.weight.detach()
        sparsity = float((w == 0).float().mean())
        dense_bytes = int(w.numel() * w.element_size())
        why = _ineligible(layer, shapes.get(name), len(calls[name]), name in attr_refs)
        if why is not None:
            records.append(SparseRecord(name, "-", sparsity, 1, "dense", why, dense_bytes=dense_bytes,
                                        stored_bytes=dense_bytes))
            continue
        block = _block(layer)
        packed = compress(w.reshape(w.shape[0], -1).numpy(), block)
        kind = "conv1x1" if isinstance(layer, nn.Conv2d) else "linear"
        spec = LayerSpec(name, kind, shapes[name], tuple(w.shape), block, packed.blocks, sparsity, layer)
        sparse, dense_ms, sparse_ms, reason = plan.policy(spec)
        records.append(SparseRecord(name, kind, sparsity, block, "sparse" if sparse else "dense", reason,
                                    dense_ms, sparse_ms, dense_bytes, packed.nbytes if sparse else dense_bytes))
        if sparse:
            _replace(module, name, layer, calls[name][0], packed, spec, plan.lanes, plan.threads)
    module.graph.lint()
    module.recompile()
    return records


def _replace(module: fx.GraphModule, name: str, layer: nn.Module, node: fx.Node, packed, spec: LayerSpec,
             lanes: int, threads: int) -> None:
    """``node`` (the layer's one call) -> the sparse op on new parameters; the layer removed."""
    prefix = "graphopt_sparse_" + name.replace(".", "_")
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(layer.weight.shape[0])
    tensors = {"values": packed.values, "indices": packed.indices, "indptr": packed.indptr}
    with module.graph.inserting_before(node):
        args = [node.args[0]]
        for attr, value in [*tensors.items(), ("bias", bias)]:
            t = torch.as_tensor(value).clone()
            module.register_parameter(f"{prefix}_{attr}", nn.Parameter(t, requires_grad=False))
            args.append(module.graph.get_attr(f"{prefix}_{attr}"))
        if spec.kind == "conv1x1":
            n, _, h, w = spec.input_shape
            tile = conv_tile(h * w, spec.block, lanes)
            groups = row_groups(spec.weight_shape[0] // spec.block, n * -(-(h * w) // tile), threads)
            new = module.graph.call_function(torch.ops.graphopt_sparse.bsr_conv1x1.default, (*args, tile, groups))
        else:
            m = math.prod(spec.input_shape[:-1])
            groups = row_groups(spec.weight_shape[0] // spec.block, m, threads)
            new = module.graph.call_function(torch.ops.graphopt_sparse.bsr_linear.default, (*args, groups))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    module.graph.erase_node(node)
    module.delete_submodule(name)


# --- Relax translations ----------------------------------------------------------------------

def _shape(expr) -> List[int]:
    return [int(s) for s in expr.ty.shape]


def _emit_kernel(bb, name: str, func, args, out_shape):
    from tvm import relax

    func = func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)  # scheduled, opaque
    gv = bb.add_func(func, name)
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))


def _operands(node, importer):
    return [importer.env[a] if isinstance(a, fx.Node) else a for a in node.args]


@register_translation("bsr_conv1x1.default")
def translate_conv1x1(node, importer):
    from tvm.relax import op as R

    bb = importer.block_builder
    x, values, indices, indptr, bias, tile, groups = _operands(node, importer)
    n, c, h, w = _shape(x)
    nnzb, block = _shape(values)
    rows = _shape(indptr)[0] - 1
    flat = bb.emit(R.reshape(x, [n, c, h * w]))
    kernel = conv1x1_kernel(n, c, h * w, rows, block, nnzb, tile, groups)
    y = _emit_kernel(bb, "bsr_conv1x1", kernel, [flat, values, indices, indptr, bias], [n, rows * block, h * w])
    return bb.emit(R.reshape(y, [n, rows * block, h, w]))


@register_translation("bsr_linear.default")
def translate_linear(node, importer):
    from tvm.relax import op as R

    bb = importer.block_builder
    x, values, indices, indptr, bias, groups = _operands(node, importer)
    *lead, k = _shape(x)
    nnzb, block = _shape(values)
    rows = _shape(indptr)[0] - 1
    m = int(np.prod(lead)) if lead else 1
    flat = x if len(lead) == 1 else bb.emit(R.reshape(x, [m, k]))
    kernel = linear_kernel(m, k, rows, block, nnzb, groups)
    y = _emit_kernel(bb, "bsr_linear", kernel, [flat, values, indices, indptr, bias], [m, rows * block])
    return y if len(lead) == 1 else bb.emit(R.reshape(y, [*lead, rows * block]))
