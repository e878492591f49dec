"""Capture: the user's nn.Module to a shape-annotated torch.fx GraphModule, or a clear CaptureError.

The user's model is deep-copied first and the copy is put in eval mode: graphopt optimizes
for inference, and no pass may touch the caller's object.
"""
from __future__ import annotations

import copy
import inspect
import linecache
import os
import traceback
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx

from .analysis.shapes import propagate_shapes
from .errors import CaptureError, InputShapeError, InvalidModelError
from .numerics import first_nonfinite_node, is_finite, run
from .static_padding import base_layer, make_static

_TORCH_DIR = os.path.dirname(torch.__file__)


class _PathTracer(fx.Tracer):
    """A symbolic tracer that knows which submodule it is inside, and extra leaf modules."""

    def __init__(self, leaf_modules: Iterable[Union[str, type]] = ()):
        super().__init__()
        leaves = list(leaf_modules)
        self._leaf_names = {x for x in leaves if isinstance(x, str)}
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._inside: List[Tuple[str, str]] = []
        self.failed_in: Optional[Tuple[str, str]] = None  # innermost module when tracing failed

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if qualname in self._leaf_names or (self._leaf_types and isinstance(m, self._leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self._inside.append((qualname, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._inside[-1]
            raise
        finally:
            self._inside.pop()


def _user_frame(tb) -> Optional[traceback.FrameSummary]:
    """The innermost traceback frame that is not inside torch: the user's line."""
    frames = [f for f in traceback.extract_tb(tb) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if os.path.basename(os.path.dirname(f.filename)) != "graphopt"
              or "tests" in f.filename]
    return frames[-1] if frames else None


def _explain(e: Exception) -> str:
    text = str(e)
    if "control flow" in text or "bool" in text.lower():
        return ("data-dependent control flow (an `if`/`while`, or a comparison such as `max`/`min`, "
                "on a traced tensor value or size) cannot be traced")
    if "iterate" in text or "len(" in text:
        return "iterating over or taking len() of a traced tensor cannot be traced"
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def trace(
    model: torch.nn.Module,
    *,
    leaf_modules: Sequence[Union[str, type]] = (),
    concrete_args: Optional[Dict[str, Any]] = None,
) -> fx.GraphModule:
    """Symbolically trace ``model`` (not copied here) or raise CaptureError naming module and line.

    A torch layer subclass whose own forward cannot be traced (the "same" padding of TF ports)
    is retried as a leaf; the classes so kept are in ``gm.meta["graphopt_auto_leaves"]`` for
    :func:`graphopt.static_padding.make_static`."""
    auto: List[type] = []
    while True:
        tracer = _PathTracer(list(leaf_modules) + auto)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
            break
        except Exception as e:  # any tracing failure becomes one actionable error
            failed = model.get_submodule(tracer.failed_in[0]) if tracer.failed_in else None
            if failed is not None and base_layer(failed) is not None and type(failed) not in auto:
                auto.append(type(failed))
                continue
            _raise_capture_error(model, tracer, e)
    if concrete_args:
        _bake_concrete_args(graph, concrete_args, list(inspect.signature(model.forward).parameters))
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["graphopt_auto_leaves"] = auto
    return gm


def _raise_capture_error(model: torch.nn.Module, tracer: _PathTracer, e: Exception) -> None:
    """One actionable CaptureError for a tracing failure: module, line, why and what to do."""
    frame = _user_frame(e.__traceback__)
    where = f"{frame.filename}:{frame.lineno}" if frame else "an unknown line"
    code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip() if frame else ""
    if tracer.failed_in:
        qual, cls = tracer.failed_in
        module = f"module `{qual or '<root>'}` ({cls})"
        leaf_hint = f"leaf_modules=[{qual!r}]" if qual else "leaf_modules=[...]"
    else:
        module = f"module `<root>` ({type(model).__name__})"
        leaf_hint = "leaf_modules=['name.of.submodule']"
    raise CaptureError(
        f"cannot trace {module} at {where}: `{code}`\n"
        f"  why: {_explain(e)}\n"
        f"  what to do: keep that submodule opaque with {leaf_hint} (graphopt then leaves it "
        f"untouched), or fix the value that drives the branch with concrete_args={{'flag': True}}, "
        f"or rewrite the line without tensor-dependent Python control flow."
    ) from e


def _bake_concrete_args(graph: fx.Graph, concrete_args: Dict[str, Any], params: List[str]) -> None:
    """fx keeps a placeholder (and a runtime assert) per non-tensor concrete arg; inline the value
    instead, so the graph takes exactly the tensor inputs and later passes and lowering see constants."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for name, node in zip(params, placeholders):  # fx may rename them (double -> double_1)
        if name in concrete_args:
            value = concrete_args[name]
            if isinstance(value, (bool, int, float, str, type(None))):
                node.replace_all_uses_with(value)
                graph.erase_node(node)
    for node in list(graph.nodes):
        cond = node.args[0] if node.target is torch._assert and node.args else None
        if isinstance(cond, fx.Node) and cond.op == "call_function" and not cond.all_input_nodes:
            if cond.target(*cond.args, **cond.kwargs):
                graph.erase_node(node)
                graph.erase_node(cond)


def check_finite_weights(model: torch.nn.Module) -> None:
    """NaN/Inf in parameters or buffers makes every numeric check meaningless: refuse early."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for n, t in items:
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise InvalidModelError(
                    f"{kind} `{n}` holds {bad} NaN/Inf value(s) of {t.numel()}: fix or retrain the "
                    f"model before optimizing (graphopt cannot check numerics against NaN outputs)."
                )


def normalize_inputs(example_inputs: Any) -> Tuple[torch.Tensor, ...]:
    """Accept one tensor or a tuple/list of tensors."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise InputShapeError(
        "example_inputs must be a tensor or a tuple of tensors, e.g. (torch.randn(1, 3, 224, 224),); "
        f"got {type(example_inputs).__name__}"
    )


def _describe(inputs: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs)


def capture(
    model: torch.nn.Module,
    example_inputs: Tuple[torch.Tensor, ...],
    *,
    leaf_modules: Sequence[Union[str, type]] = (),
    concrete_args: Optional[Dict[str, Any]] = None,
) -> fx.GraphModule:
    """Copy, check, trace and shape-annotate ``model``.

    Example:
        >>> import torch, graphopt
        >>> gm = graphopt.capture(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()),
        ...                (torch.randn(1, 3, 8, 8),))
        >>> [n.meta["tensor_meta"].shape for n in gm.graph.nodes if n.op == "call_module"][0]
        torch.Size([1, 4, 6, 6])
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"graphopt optimizes torch.nn.Module objects, got {type(model).__name__}")
    check_finite_weights(model)
    try:
        model = copy.deepcopy(model).eval()
    except Exception as e:  # noqa: BLE001: tensors that cannot be copied (non-leaf attributes)
        raise CaptureError(
            f"cannot copy the model ({type(e).__name__}: {str(e).splitlines()[0]}): graphopt works on a "
            "deep copy so that the caller's model is never modified. A common cause is the deprecated "
            "torch.nn.utils.weight_norm: use torch.nn.utils.parametrizations.weight_norm, or call "
            "torch.nn.utils.remove_weight_norm(module) before optimizing") from e
    if fx.Tracer().is_leaf_module(model, ""):
        model = torch.nn.Sequential(model)  # a bare torch.nn layer: trace it as a call, not its internals
    with torch.no_grad():
        try:
            model(*[t.clone() for t in example_inputs])  # copies: a forward may write into its inputs
        except Exception as e:
            raise InputShapeError(
                f"the model fails on example_inputs of shape {_describe(example_inputs)}: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                "Pass inputs shaped and typed as the model's forward() expects."
            ) from e
    gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
    propagate_shapes(gm, example_inputs)
    if gm.meta["graphopt_auto_leaves"]:
        gm.meta["graphopt_capture_notes"] = make_static(gm, gm.meta["graphopt_auto_leaves"])
        propagate_shapes(gm, example_inputs)
    check_finite_outputs(gm, example_inputs)
    return gm


def check_finite_outputs(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """A model whose own output is NaN/Inf would make every pass look broken: refuse it, naming
    the first node that produces a non-finite value."""
    if all(is_finite(t) for t in run(gm, example_inputs)):
        return
    node = first_nonfinite_node(gm, example_inputs)
    if node is None:
        where = "its output"
    elif node.op == "call_module":
        module = gm.get_submodule(node.target)
        where = f"module `{node.target}` ({type(module).__name__})"
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_var is not None \
                and module.eps == 0 and bool((module.running_var == 0).any()):
            where += " (running_var has zeros and eps is 0)"
    else:
        where = f"node `{node.name}` ({getattr(node.target, '__name__', node.target)})"
    raise InvalidModelError(
        f"the model itself outputs NaN/Inf on example_inputs; the first layer that produces it is {where}. "
        "Fix the model or its weights (or pass inputs it handles): graphopt cannot check passes "
        "against a non-finite reference")
