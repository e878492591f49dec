"""The pass-level diff report: one PassRecord per pass, and the Report that holds them."""
from __future__ import annotations

import dataclasses
import json
import math
import platform
from typing import Any, Dict, List, Optional

SCHEMA_VERSION = "1.6"  # 1.1: records carry warnings; 1.2: latency noise bands and schedules;
#                        1.3: masked params; 1.4: records carry `data` (the latency search's steps under "search");
#                        1.5: `capture` notes (what tracing had to do to the model)
#                        1.6: the latency search's optional `int8` fields


@dataclasses.dataclass
class GraphSnapshot:
    """A drawable, serializable copy of a graph's structure."""

    nodes: List[Dict[str, Any]]  # {name, label, op, target, shape, inputs}


@dataclasses.dataclass
class ModelSummary:
    params: int
    macs: int
    bytes: int
    nodes: int
    accuracy: Optional[float] = None
    latency_ms: Optional[float] = None
    latency_spread_ms: Optional[float] = None  # p90 - p10 of the runs: the machine's noise
    params_masked: int = 0  # of params, held at zero by weight masks (graphopt.sparsity)


@dataclasses.dataclass
class PassRecord:
    """What one pass did. Errors are relative to the graph before the pass and to the original.

    ``rel_error`` is max|after - before| / max|before| over the outputs on the example inputs.
    ``params_masked_*`` count the parameters held at zero by weight masks (``graphopt.sparsity``):
    ``params - params_masked`` are the nonzeros a compressed format would store.
    """

    name: str
    options: Dict[str, Any]
    status: str  # applied | no-op | rolled back | failed | skipped
    reason: str
    exact: bool
    seconds: float
    nodes_added: List[str]
    nodes_removed: List[str]
    nodes_changed: List[str]
    nodes_rewired: List[str]
    params_before: int
    params_after: int
    params_masked_before: int
    params_masked_after: int
    macs_before: int
    macs_after: int
    bytes_before: int
    bytes_after: int
    max_abs_error: Optional[float]
    rel_error: Optional[float]
    max_abs_error_vs_original: Optional[float]
    rel_error_vs_original: Optional[float]
    accuracy_before: Optional[float]
    accuracy_after: Optional[float]
    latency_ms_before: Optional[float]
    latency_ms_after: Optional[float]
    messages: List[str]
    warnings: List[str]
    code_diff: str
    graph_before: GraphSnapshot
    graph_after: GraphSnapshot
    latency_spread_ms_before: Optional[float] = None  # p90 - p10 of the runs (noise band)
    latency_spread_ms_after: Optional[float] = None
    data: Dict[str, Any] = dataclasses.field(default_factory=dict)  # structured results (ctx.data)


@dataclasses.dataclass
class Report:
    """All passes of one optimize() run, renderable as text, JSON and HTML."""

    model: str
    target: Optional[str]
    original: ModelSummary
    records: List[PassRecord] = dataclasses.field(default_factory=list)
    final: Optional[ModelSummary] = None
    compile: Optional[Dict[str, Any]] = None  # filled by the target: tuning trials, cache hits...
    latency_schedules: Optional[str] = None  # which schedules every latency was timed with
    environment: Dict[str, str] = dataclasses.field(default_factory=dict)
    capture: List[str] = dataclasses.field(default_factory=list)  # what tracing changed, e.g. static padding

    def __getitem__(self, name: str) -> PassRecord:
        """The record of the pass called ``name`` (the last one when it ran twice)."""
        for r in reversed(self.records):
            if r.name == name:
                return r
        raise KeyError(f"no pass {name!r} in this report; passes: {[r.name for r in self.records]}")

    def to_dict(self) -> Dict[str, Any]:
        d = json_safe(dataclasses.asdict(self))
        d["schema_version"] = SCHEMA_VERSION
        return d

    def to_json(self, path: Optional[str] = None, indent: int = 1) -> str:
        """The report as JSON (schema in docs/report.md and graphopt/report/schema.json)."""
        text = json.dumps(self.to_dict(), indent=indent, default=_jsonable)
        if path:
            with open(path, "w") as f:
                f.write(text)
        return text

    def to_text(self, diffs: bool = False) -> str:
        from .text import render_text

        return render_text(self, diffs=diffs)

    def to_html(self, path: Optional[str] = None) -> str:
        """One self-contained HTML page; written to ``path`` when given."""
        from .html import render_html

        page = render_html(self)
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        return page

    def __str__(self) -> str:
        return self.to_text()


def json_safe(obj: Any) -> Any:
    """NaN and Inf (e.g. the error of a rolled-back pass that changed shapes) become null: valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def environment() -> Dict[str, str]:
    import torch

    from .. import __version__

    return {"graphopt": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine()}
