"""Builds the Report from the manager's hook calls; passes never touch the report."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch.fx as fx

from ..analysis.diff import code_diff
from ..analysis.graphview import node_label
from ..analysis.metrics import count_macs, count_params, model_bytes
from ..analysis.signature import structure_signature
from ..analysis.shapes import output_shape
from ..sparsity import count_masked
from ..manager import PassInstrument, PassResult
from .record import GraphSnapshot, ModelSummary, PassRecord, Report, environment


def snapshot(gm: fx.GraphModule) -> GraphSnapshot:
    nodes = [
        {"name": n.name, "label": node_label(gm, n), "op": n.op, "target": str(n.target),
         "shape": list(output_shape(n)) if output_shape(n) is not None else None,
         "inputs": [a.name for a in n.all_input_nodes]}
        for n in gm.graph.nodes
    ]
    return GraphSnapshot(nodes)


class ReportInstrument(PassInstrument):
    """Records a PassRecord after every pass.

    Args:
        model_name: shown at the top of the report.
        target_name: the target, if any.
        latency_fn: ``latency_fn(gm)`` -> milliseconds, or an object with ``median_ms`` and
            ``spread_ms`` (the noise band); when given, latency is measured before and after
            each applied pass. A graph with the structure of one timed before (same code,
            shapes, dtypes and zeros: ``distill``'s output) gets that timing, not a new one, so
            a pass that changes no structure shows no change, rather than the machine's noise.
    """

    def __init__(self, model_name: str, target_name: Optional[str] = None,
                 latency_fn: Optional[Callable[[fx.GraphModule], float]] = None):
        self.model_name = model_name
        self.target_name = target_name
        self.latency_fn = latency_fn
        self.latency_schedules: Optional[str] = None  # said in the report next to the timings
        self.report: Optional[Report] = None
        self._memo: Dict[int, dict] = {}
        self._timings: Dict[str, tuple] = {}  # structure signature -> (median ms, spread ms)

    def _facts(self, gm: fx.GraphModule, want_latency: bool = True) -> dict:
        key = id(gm)
        if key not in self._memo:
            self._memo[key] = {"gm": gm, "params": count_params(gm), "macs": count_macs(gm),
                               "bytes": model_bytes(gm), "masked": count_masked(gm),
                               "snapshot": snapshot(gm), "latency": None, "spread": None}
        facts = self._memo[key]
        if want_latency and self.latency_fn is not None and facts["latency"] is None:
            facts["latency"], facts["spread"] = self._time(gm)
        return facts

    def _time(self, gm: fx.GraphModule) -> tuple:
        signature = structure_signature(gm)
        if signature not in self._timings:
            timing = self.latency_fn(gm)
            median = getattr(timing, "median_ms", timing)
            spread = getattr(timing, "spread_ms", None)
            self._timings[signature] = (None if median is None else float(median),
                                        None if spread is None or spread != spread else float(spread))
        return self._timings[signature]

    def enter_pipeline(self, gm, ctx):
        f = self._facts(gm)
        self.report = Report(
            model=self.model_name, target=self.target_name,
            original=ModelSummary(f["params"], f["macs"], f["bytes"], len(gm.graph.nodes),
                                  latency_ms=f["latency"], latency_spread_ms=f["spread"],
                                  params_masked=f["masked"]),
            environment=environment(),
            latency_schedules=self.latency_schedules if self.latency_fn is not None else None,
            capture=list(getattr(gm, "meta", {}).get("graphopt_capture_notes", [])),
        )

    def run_after_pass(self, result: PassResult, ctx):
        b = self._facts(result.before)
        # metrics describe what the pass produced, even when it was rolled back (status says so)
        shown = result.candidate if result.candidate is not None else result.after
        a = self._facts(shown, want_latency=result.status == "applied")
        d = result.diff
        eb, eo = result.error_vs_before, result.error_vs_original
        self.report.records.append(PassRecord(
            name=result.step.spec.name,
            options=dict(result.step.options),
            status=result.status,
            reason=result.reason,
            exact=result.step.spec.exact,
            seconds=round(result.seconds, 4),
            nodes_added=d.added if d else [],
            nodes_removed=d.removed if d else [],
            nodes_changed=d.changed if d else [],
            nodes_rewired=d.rewired if d else [],
            params_before=b["params"], params_after=a["params"],
            params_masked_before=b["masked"], params_masked_after=a["masked"],
            macs_before=b["macs"], macs_after=a["macs"],
            bytes_before=b["bytes"], bytes_after=a["bytes"],
            max_abs_error=eb.max_abs if eb else None,
            rel_error=eb.rel if eb else None,
            max_abs_error_vs_original=eo.max_abs if eo else None,
            rel_error_vs_original=eo.rel if eo else None,
            accuracy_before=result.accuracy_before,
            accuracy_after=result.accuracy_after,
            latency_ms_before=b["latency"],
            latency_ms_after=a["latency"],
            latency_spread_ms_before=b["spread"],
            latency_spread_ms_after=a["spread"],
            messages=list(result.messages),
            warnings=list(result.warnings),
            code_diff=code_diff(result.before, shown, result.step.spec.name),
            graph_before=b["snapshot"],
            graph_after=a["snapshot"],
            data=dict(result.data),
        ))

    def exit_pipeline(self, gm, ctx):
        f = self._facts(gm)
        last_acc = self.report.records[-1].accuracy_after if self.report.records else None
        self.report.original.accuracy = (self.report.records[0].accuracy_before
                                         if self.report.records else last_acc)
        self.report.final = ModelSummary(f["params"], f["macs"], f["bytes"], len(gm.graph.nodes),
                                         accuracy=last_acc, latency_ms=f["latency"],
                                         latency_spread_ms=f["spread"], params_masked=f["masked"])
