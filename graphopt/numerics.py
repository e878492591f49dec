"""Run a graph and compare its outputs: the numeric check every pass goes through."""
from __future__ import annotations

import dataclasses
from typing import Any, List, Sequence

import torch
from torch.utils._pytree import tree_flatten


def flat_outputs(out: Any) -> List[torch.Tensor]:
    """The tensors of a (possibly nested) output, in a stable order."""
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def run(model: Any, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    with torch.no_grad():
        return [t.detach() for t in flat_outputs(model(*inputs))]


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
