"""fx.GraphModule -> Relax IRModule with the weights as parameters.

The import goes through ``torch.export`` and TVM's ``from_exported_program`` with
``keep_params_as_input=True``, so weights stay out of the compiled library (they travel as
``params.npz``, and the tuning cache sees the same workload whatever the weight values).

graphopt owns this step because the frontend does not cover everything graphopt emits
(quantized ops have no translation at all, design.md). Two hooks extend it:

* :func:`register_translation` (:mod:`.translations`) maps an ATen/custom op name to a function
  building Relax for it (TVM's ``custom_convert_map`` contract: ``fn(node, importer) -> relax.Var``);
* :func:`register_relax_rewrite` adds an ``IRModule -> IRModule`` rewrite applied after
  import (e.g. turning ``dequantize -> conv2d -> quantize`` into an integer conv).

graphopt's own translations are registered by this module, whatever else was imported, so a
graph lowers the same in every process: the int8 ops' (:mod:`graphopt.targets.int8`), and the
ATen ops' that keep int8 values in their blocked layout and fill in the max pooling arguments
the frontend mishandles (:mod:`graphopt.targets.int8.blocked`; on float values they are the
frontend's own).

Example:
    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 2)).eval())
    >>> low = lower(gm, (torch.randn(1, 4),))
    >>> [tuple(p.shape) for p in low.params], low.inputs[0].shape
    ([(2, 4), (2,)], (1, 4))
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from graphopt.errors import InputShapeError, TargetError

from . import aten  # noqa: F401  (register graphopt's translations of ATen ops)
from .coverage import check_ops, check_outputs, export
from .int8 import blocked, relax_lowering  # noqa: F401  (register graphopt's own translations)
from .translations import LoweringState, add_unique, convert_map, register_translation, translations

__all__ = ["LoweredModel", "LoweringState", "TensorSpec", "lower", "register_relax_rewrite",
           "register_translation", "translations", "relax_rewrites"]

log = logging.getLogger("graphopt.targets")

_REWRITES: Dict[str, Callable] = {}


def register_relax_rewrite(name: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(mod: IRModule) -> IRModule``, applied after import in registration order."""
    def deco(fn: Callable) -> Callable:
        add_unique(_REWRITES, "Relax rewrite", name, fn)
        return fn
    return deco


def relax_rewrites() -> Dict[str, Callable]:
    return dict(_REWRITES)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one input, output or weight (dtype as a numpy name)."""

    name: str
    shape: Tuple[int, ...]
    dtype: str

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TensorSpec":
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))


@dataclasses.dataclass
class LoweredModel:
    """The Relax module and what is needed to call it like the torch graph.

    Attributes:
        mod: IRModule whose ``main`` takes ``(*inputs, *params)`` and returns a flat tuple.
        params: the weights, in ``main``'s parameter order.
        param_specs: their names (the exported names), shapes and dtypes.
        inputs: the user inputs' specs, as the library takes them.
        outputs: the flat outputs' specs, as the library returns them.
        out_tree: ``torch.utils._pytree`` spec (serialized) rebuilding the output structure.
        io_dtypes: ``{"inputs": [...], "outputs": [...]}``, the caller's dtypes, when the library
            computes in others (a float16 model compiled in float32); None when they are the same.
        notes: what the lowering changed that a user should know (for the compile summary).
    """

    mod: Any
    params: List[np.ndarray]
    param_specs: List[TensorSpec]
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    out_tree: str
    io_dtypes: Optional[Dict[str, List[str]]] = None
    notes: List[str] = dataclasses.field(default_factory=list)


def _var_name(var) -> str:
    # TVM 0.27 Relax vars expose ``name``; older releases had ``name_hint``.
    return str(getattr(var, "name_hint", None) or getattr(var, "name", None) or var)


def _np_dtype(torch_dtype) -> str:
    import torch

    return str(torch.empty((), dtype=torch_dtype).numpy().dtype)


def weights_as_parameters(gm):
    """A copy of ``gm`` whose floating-point buffers and plain tensor attributes are Parameters.

    ``keep_params_as_input`` keeps only parameters as inputs; buffers (BatchNorm statistics,
    tensors a pass attached) would be baked into the library as constants.
    """
    import torch

    gm = copy.deepcopy(gm)
    owners = dict(gm.named_modules())
    targets = {name for name, b in gm.named_buffers() if b.is_floating_point()}
    targets |= {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in sorted(targets):
        prefix, _, attr = target.rpartition(".")
        owner = owners.get(prefix)
        value = getattr(owner, attr, None) if owner is not None else None
        if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter):
            continue
        if not value.is_floating_point():
            continue
        if attr in owner._buffers:
            del owner._buffers[attr]
        elif hasattr(owner, attr):
            delattr(owner, attr)
        owner.register_parameter(attr, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
    return gm


def lower(gm, example_inputs: Sequence) -> LoweredModel:
    """Translate ``gm`` for ``example_inputs``' shapes into a Relax module plus weights.

    Raises:
        InputShapeError: an example input is not a tensor.
        TargetError: an output is not a tensor, torch.export or the Relax frontend cannot
            handle the graph (:class:`~graphopt.targets.coverage.UnsupportedOpsError` lists
            every op without a translation and the nodes using it).
    """
    import torch
    import torch.utils._pytree as pytree
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise InputShapeError("example_inputs must be a non-empty tuple of torch tensors, got "
                              + ", ".join(type(x).__name__ for x in inputs))
    check_outputs(gm, inputs)
    ep, inputs, io_dtypes, notes = exported(gm, inputs)
    check_ops(ep)  # every untranslatable op at once, before the frontend stops at the first
    state = LoweringState()  # what graphopt's translations remember during this lowering only
    try:
        with warnings.catch_warnings():
            # torch 2.13 warns about its own pytree internals while the frontend copies the
            # exported program: nothing a user can act on, and once per lowering
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            # export() ran the decomposition already (check_ops needs the decomposed program)
            mod = from_exported_program(ep, keep_params_as_input=True, run_ep_decomposition=False,
                                        custom_convert_map=convert_map(state) or None)
    except Exception as e:
        msg = str(e)
        hint = ("; add one with @graphopt.targets.lowering.register_translation('<op>')"
                if "nsupported" in msg or "KeyError" in type(e).__name__ else "")
        raise TargetError(f"the Relax frontend could not translate the graph: {type(e).__name__}: "
                          f"{msg.strip()[:2000]}{hint}") from e
    for name, rewrite in _REWRITES.items():
        try:
            mod = rewrite(mod)
        except Exception as e:
            raise TargetError(f"Relax rewrite {name!r} failed: {type(e).__name__}: {e}") from e
    mod, detached = relax.frontend.detach_params(mod)
    params = [p.numpy() for p in detached.get("main", [])]
    main = mod["main"]
    n_in = len(main.params) - len(params)
    param_specs = [TensorSpec(_var_name(v), tuple(p.shape), str(p.dtype))
                   for v, p in zip(main.params[n_in:], params)]
    input_specs = [TensorSpec(_var_name(v), tuple(x.shape), _np_dtype(x.dtype))
                   for v, x in zip(main.params[:n_in], inputs)]
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    user_outputs = set(ep.graph_signature.user_outputs)
    out_vals = [n for n in pytree.tree_leaves(out_node.args[0])
                if getattr(n, "name", None) in user_outputs]
    outputs = []
    for i, node in enumerate(out_vals):
        val = node.meta.get("val") if hasattr(node, "meta") else None
        if not isinstance(val, torch.Tensor):
            raise TargetError(f"output {i} of the graph is {type(val).__name__}, not a tensor: "
                              "compiled models return tensors only")
        outputs.append(TensorSpec(f"output{i}", tuple(val.shape), _np_dtype(val.dtype)))
    out_spec = ep.call_spec.out_spec
    if io_dtypes is not None:
        io_dtypes["outputs"] = [io_dtypes["outputs"][i] if i < len(io_dtypes["outputs"]) else o.dtype
                                for i, o in enumerate(outputs)]
    return LoweredModel(mod=mod, params=params, param_specs=param_specs, inputs=input_specs,
                        outputs=outputs, out_tree=pytree.treespec_dumps(out_spec), io_dtypes=io_dtypes,
                        notes=notes)


def exported(gm, inputs: Tuple) -> Tuple[Any, Tuple, Optional[Dict[str, List[str]]], List[str]]:
    """``(program, inputs, io_dtypes, notes)``: ``gm`` exported as the frontend will translate it
    (weights as parameters, half precision in float32, the core ATen decomposition run)."""
    module = weights_as_parameters(gm).eval()
    module, inputs, io_dtypes, notes = _in_float32_if_half(module, inputs)
    return export(module, inputs), inputs, io_dtypes, notes


#: Float dtypes graphopt's CPU lowering computes in float32 (the frontend and TOPI's CPU
#: schedules do not handle them; x86 and most ARM cores have no fast fp16/bf16 arithmetic).
_HALF = ("float16", "bfloat16")


def _in_float32_if_half(module, inputs):
    """A half-precision model as float32: weights and inputs converted, the caller's dtypes kept
    for the artifact's boundary (inputs accepted and outputs returned in them)."""
    import torch

    def name(dtype) -> str:
        return str(dtype).replace("torch.", "")

    found = {name(t.dtype) for t in [*module.parameters(), *module.buffers(), *inputs]} & set(_HALF)
    if not found:
        return module, inputs, None, []
    with torch.no_grad():
        outputs = [t for t in pytree_leaves(module(*[x.clone() for x in inputs])) if isinstance(t, torch.Tensor)]
    io = {"inputs": [name(x.dtype) for x in inputs], "outputs": [name(t.dtype) for t in outputs]}
    module = module.float()
    inputs = tuple(x.float() if name(x.dtype) in _HALF else x for x in inputs)
    note = (f"compiled in float32: the model is {' and '.join(sorted(found))}, which graphopt's CPU "
            "targets compute in float32 (inputs and outputs keep the model's dtypes)")
    log.info(note)
    return module, inputs, io, [note]


def pytree_leaves(value) -> list:
    import torch.utils._pytree as pytree

    return pytree.tree_leaves(value)
