"""Run a graph and compare its outputs: the numeric check every pass goes through."""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence

import torch
from torch.utils._pytree import tree_flatten


def flat_outputs(out: Any) -> List[torch.Tensor]:
    """The tensors of a (possibly nested) output, in a stable order."""
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def run(model: Any, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``model``'s output tensors on copies of ``inputs``: a forward that writes into its inputs
    (``x.relu_()``) must not change them for the next run."""
    with torch.no_grad():
        return [t.detach() for t in flat_outputs(model(*[_copy(t) for t in inputs]))]


def _copy(t: Any) -> Any:
    return t.clone() if isinstance(t, torch.Tensor) else t


def is_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf (integer tensors always are)."""
    return not t.is_floating_point() and not t.is_complex() or bool(torch.isfinite(t).all())


def first_nonfinite_node(gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Optional[torch.fx.Node]:
    """The first node (in execution order) whose output holds NaN or Inf while its inputs do not."""
    found: List[torch.fx.Node] = []

    class Finder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if not found and n.op not in ("placeholder", "output") and \
                    not all(is_finite(t) for t in flat_outputs(out)):
                found.append(n)
            return out

    with torch.no_grad():
        Finder(gm).run(*[_copy(t) for t in inputs])
    return found[0] if found else None


@dataclasses.dataclass
class OutputError:
    """Max absolute error, and relative error = max|a - b| / max|b| (worst output)."""

    max_abs: float
    rel: float
    finite: bool
    same_shapes: bool

    def describe(self) -> str:
        return f"max abs error {self.max_abs:.3g}, relative error {self.rel:.3g}"


def compare(reference: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> OutputError:
    """Compare outputs; shapes must agree and values must be finite to count as comparable."""
    same = len(reference) == len(actual) and all(a.shape == b.shape for a, b in zip(reference, actual))
    finite = all(bool(torch.isfinite(a).all()) for a in actual if a.is_floating_point())
    if not same:
        return OutputError(float("inf"), float("inf"), finite, False)
    max_abs, rel = 0.0, 0.0
    for b, a in zip(reference, actual):
        if a.numel() == 0:
            continue
        diff = float((a.double() - b.double()).abs().max())
        scale = float(b.double().abs().max())
        max_abs = max(max_abs, diff)
        rel = max(rel, diff / scale if scale > 0 else diff)
    return OutputError(max_abs, rel, finite, True)
