"""What the lowering can take, said before any work: supported ops and tensor outputs.

The Relax frontend stops at the first op it has no translation for, deep inside the import,
with a bare list of op names; a graph returning an int next to its logits fails there too.
This module answers both questions up front:

* :func:`check_outputs` refuses outputs that are not tensors (an int, None, a shape), naming
  where in the output structure they are;
* :func:`unsupported_ops` scans the exported program (after the core ATen decomposition the
  frontend runs) against the frontend's convert map plus graphopt's translations, and
  :func:`check_ops` raises one :class:`UnsupportedOpsError` listing every missing op with the
  fx nodes and module paths that use it.

:func:`check_graph` runs both; it is what ``Target.check_graph`` (the target protocol's
optional capability, which ``graphopt.optimize`` calls before the passes) and
:func:`graphopt.targets.lowering.lower` use.

Example:
    >>> import torch
    >>> class Pool(torch.nn.Module):
    ...     def forward(self, x):
    ...         return torch.nn.functional.adaptive_max_pool3d(x, 1), 3
    >>> gm = torch.fx.symbolic_trace(Pool())
    >>> check_outputs(gm)
    Traceback (most recent call last):
    ...
    graphopt.errors.TargetError: the graph returns output[1] = 3 (int): compiled models return tensors only; return the tensors alone (compute other values outside the model)
    >>> gm = torch.fx.symbolic_trace(lambda x: torch.nn.functional.adaptive_max_pool3d(x, 1))
    >>> check_graph(gm, (torch.randn(1, 2, 4, 4, 4),))
    Traceback (most recent call last):
    ...
    graphopt.targets.coverage.UnsupportedOpsError: the graph uses 1 op(s) that neither TVM's Relax frontend nor graphopt can translate:
      adaptive_max_pool3d.default: `adaptive_max_pool3d`
    write the model with supported ops, or add a translation with ...
"""
from __future__ import annotations

import functools
from typing import Dict, FrozenSet, List, Optional, Sequence

from graphopt.errors import TargetError

from .translations import translations

__all__ = ["UnsupportedOpsError", "check_graph", "check_ops", "check_outputs", "export",
           "frontend_ops", "unsupported_ops"]


class UnsupportedOpsError(TargetError):
    """The graph uses ops neither TVM's frontend nor graphopt can translate.

    Attributes:
        ops: op name (``"amax.default"``) -> the nodes using it, as described in the message.
    """

    def __init__(self, message: str, ops: Dict[str, List[str]]):
        super().__init__(message)
        self.ops = ops


def _path(keys) -> str:
    return "output" + "".join(f"[{k!r}]" if isinstance(k, str) else f"[{k}]" for k in keys)


def check_outputs(gm, example_inputs: Optional[Sequence] = None) -> None:
    """Raise TargetError when an output of ``gm`` is not a tensor (ints, None, sizes...).

    Uses what graphopt's capture propagated (``tensor_meta``, or ``type`` for a node whose value
    holds no tensor); when an output node has neither and ``example_inputs`` are given, ``gm``
    is run once on them; without inputs, such a node is taken on trust (the lowering checks
    again on the exported program).
    """
    import torch
    import torch.fx as fx

    out = next(n for n in gm.graph.nodes if n.op == "output")
    bad: List[str] = []
    unknown: List[fx.Node] = []

    def visit(value, keys, node=None):
        """``node``: the fx node whose propagated value ``value`` is part of, if any."""
        named = f"{_path(keys)} = `{node.name}`" if node is not None else _path(keys)
        if isinstance(value, torch.Tensor) or _is_tensor_meta(value):
            return
        if isinstance(value, fx.Node):
            meta = value.meta
            if value.op == "call_function" and value.target is getattr and value.args[1:] == ("shape",):
                bad.append(f"{_path(keys)} = `{value.name}` (a shape)")
            elif "tensor_meta" in meta:
                visit(meta["tensor_meta"], keys, value)
            elif "type" in meta:  # shape propagation ran and found no tensor in the value
                bad.append(f"{_path(keys)} = `{value.name}` ({_kind(meta['type'])})")
            elif not isinstance(meta.get("val"), torch.Tensor):
                unknown.append(value)
        elif isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
            for i, v in enumerate(value):
                visit(v, keys + [i], node)
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(v, keys + [k], node)
        else:
            bad.append(f"{named} ({_kind(type(value))})" if node is not None
                       else f"{named} = {value!r} ({_kind(type(value))})")

    visit(out.args[0], [])
    if unknown and example_inputs is not None and not bad:
        with torch.no_grad():
            visit(gm(*[x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs]), [])
    if bad:
        raise TargetError(f"the graph returns {', '.join(bad)}: compiled models return tensors only; "
                          "return the tensors alone (compute other values outside the model)")


def _is_tensor_meta(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "stride")


def _kind(cls) -> str:
    import torch

    return "a shape" if issubclass(cls, torch.Size) else cls.__name__


@functools.lru_cache(maxsize=1)
def frontend_ops() -> FrozenSet[str]:
    """The exported op names TVM's ``from_exported_program`` translates itself."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return frozenset(ExportedProgramImporter().create_convert_map())


def export(module, inputs: Sequence):
    """``torch.export`` then the core ATen decomposition: the program the frontend translates.

    Raises:
        TargetError: torch.export cannot handle the graph.
    """
    import warnings

    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch warns about its own pytree internals while it copies the program: nothing a
            # user can act on (the frontend's translation filters the same warning)
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            return torch.export.export(module, tuple(inputs)).run_decompositions()
    except Exception as e:  # torch.export raises many unrelated types
        raise TargetError(f"torch.export could not export the graph for lowering: {type(e).__name__}: {e}") from e


def _describe(node) -> str:
    """The user's name for an exported node: the fx node it came from, and its module path."""
    name, sources = None, node.meta.get("from_node") or []
    while sources:  # export's provenance chain: its root is the node of the graph given to export
        name, sources = getattr(sources[0], "name", None), getattr(sources[0], "from_node", None) or []
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    where = f" in `{path}`" if path else ""
    return f"`{name or node.name}`{where}"


def unsupported_ops(ep) -> Dict[str, List[str]]:
    """Op name -> the nodes of ``ep`` using it, for every op without a translation."""
    from . import lowering  # noqa: F401  (registers graphopt's translations)

    known = frontend_ops() | set(translations())
    found: Dict[str, List[str]] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name not in known:
            found.setdefault(name, []).append(_describe(node))
    return found


def check_ops(ep) -> None:
    """Raise one :class:`UnsupportedOpsError` naming every untranslatable op and its users."""
    found = unsupported_ops(ep)
    if not found:
        return
    lines = []
    for op, users in sorted(found.items()):
        shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        lines.append(f"  {op}: {shown}")
    raise UnsupportedOpsError(
        f"the graph uses {len(found)} op(s) that neither TVM's Relax frontend nor graphopt can translate:\n"
        + "\n".join(lines) + "\nwrite the model with supported ops, or add a translation with "
        "@graphopt.targets.lowering.register_translation('<op>') (see docs/targets.md)", found)


def check_graph(gm, example_inputs: Sequence) -> None:
    """Everything the lowering can check before building: tensor outputs and supported ops.

    Exports ``gm`` as :func:`~graphopt.targets.lowering.lower` does (seconds, not the minutes
    of passes and a build).

    Raises:
        TargetError: an output is not a tensor, or torch.export cannot handle the graph.
        UnsupportedOpsError: ops without a translation (all of them, with their nodes).
    """
    from .lowering import exported

    inputs = tuple(example_inputs)
    check_outputs(gm, inputs)
    check_ops(exported(gm, inputs)[0])
