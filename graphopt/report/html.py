"""The report as one self-contained HTML page: summary table, then per pass its metrics,
messages, code diff and the graph before and after with changed nodes highlighted."""
from __future__ import annotations

import html
from typing import Dict, List, Set

from .record import GraphSnapshot, PassRecord, Report
from .search import search_html
from .text import _acc, change, human, latency_change, params_change

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px}h2{font-size:16px;margin:0}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f0f0f0}.applied{color:#17622b}.rolled-back,.failed{color:#a11}.no-op,.skipped{color:#777}
.warning{color:#8a4b00;font-weight:bold}
details{background:#fff;border:1px solid #ddd;border-radius:6px;margin:12px 0;padding:8px 12px}
summary{cursor:pointer}pre{background:#f6f8fa;padding:8px;overflow:auto;font-size:12px}
.add{color:#17622b}.del{color:#a11}.graphs{display:flex;gap:24px;overflow:auto}
.graphs figure{margin:0}.legend span{display:inline-block;padding:0 6px;margin-right:6px;border-radius:3px}
"""
_FILL = {"added": "#c8f0cf", "removed": "#f7c9c9", "changed": "#fde4b3", "": "#eef2f7"}
_STROKE = {"added": "#17622b", "removed": "#a11", "changed": "#b36b00", "": "#8898aa"}
_BOX_W, _BOX_H, _GAP_X, _GAP_Y = 150, 34, 16, 22


def _layers(nodes: List[Dict]) -> Dict[str, int]:
    """Depth of each node: longest path from an input (nodes arrive in topological order)."""
    depth: Dict[str, int] = {}
    for n in nodes:
        depth[n["name"]] = 1 + max((depth.get(i, 0) for i in n["inputs"]), default=-1)
    return depth


def render_graph(snap: GraphSnapshot, marks: Dict[str, str], title: str) -> str:
    """An SVG drawing of a graph, layered top to bottom; ``marks`` maps name -> added/removed/changed."""
    depth = _layers(snap.nodes)
    rows: Dict[int, List[str]] = {}
    for n in snap.nodes:
        rows.setdefault(depth[n["name"]], []).append(n["name"])
    pos = {}
    for d, names in rows.items():
        for i, name in enumerate(names):
            pos[name] = (8 + i * (_BOX_W + _GAP_X), 8 + d * (_BOX_H + _GAP_Y))
    width = 16 + max(len(v) for v in rows.values()) * (_BOX_W + _GAP_X)
    height = 16 + (max(rows) + 1) * (_BOX_H + _GAP_Y)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="monospace" font-size="10"><title>{html.escape(title)}</title>']
    for n in snap.nodes:
        x2, y2 = pos[n["name"]]
        for i in n["inputs"]:
            if i in pos:
                x1, y1 = pos[i]
                parts.append(f'<line x1="{x1 + _BOX_W / 2}" y1="{y1 + _BOX_H}" x2="{x2 + _BOX_W / 2}" '
                             f'y2="{y2}" stroke="#99a" stroke-width="1"/>')
    for n in snap.nodes:
        x, y = pos[n["name"]]
        mark = marks.get(n["name"], "")
        shape = "x".join(map(str, n["shape"])) if n["shape"] else ""
        tip = f'{n["name"]}: {n["op"]} {n["target"]} {shape} {mark}'
        parts.append(
            f'<g class="node {mark}"><title>{html.escape(tip)}</title>'
            f'<rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="4" fill="{_FILL[mark]}" '
            f'stroke="{_STROKE[mark]}" stroke-width="{2 if mark else 1}"/>'
            f'<text x="{x + 4}" y="{y + 13}">{html.escape(n["name"][:22])}</text>'
            f'<text x="{x + 4}" y="{y + 26}" fill="#555">{html.escape((n["label"] + " " + shape)[:24])}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _diff_html(diff: str) -> str:
    out = []
    for line in diff.splitlines():
        cls = "add" if line.startswith("+") and not line.startswith("+++") else \
              "del" if line.startswith("-") and not line.startswith("---") else ""
        out.append(f'<span class="{cls}">{html.escape(line)}</span>')
    return "<pre>" + "\n".join(out) + "</pre>"


def _pass_section(i: int, r: PassRecord) -> str:
    changed: Set[str] = set(r.nodes_changed)
    before_marks = {**{n: "removed" for n in r.nodes_removed}, **{n: "changed" for n in changed}}
    after_marks = {**{n: "added" for n in r.nodes_added}, **{n: "changed" for n in changed}}
    cls = r.status.replace(" ", "-")
    metrics = [
        ("status", r.status + (f": {r.reason}" if r.reason else "")),
        ("options", ", ".join(f"{k}={v!r}" for k, v in r.options.items()) or "-"),
        ("time", f"{r.seconds:.3f} s"),
        ("nodes", f"{len(r.nodes_added)} added, {len(r.nodes_removed)} removed, "
                  f"{len(r.nodes_changed)} changed ({len(r.nodes_rewired)} rewired)"),
        ("params", f"{human(r.params_before)} -> {params_change(r.params_before, r.params_after, r.params_masked_after)}"),
        ("MACs", f"{human(r.macs_before)} -> {change(r.macs_before, r.macs_after)}"),
        ("size", f"{human(r.bytes_before, 'B')} -> {change(r.bytes_before, r.bytes_after, 'B')}"),
        ("error vs before", "-" if r.rel_error is None else f"max abs {r.max_abs_error:.3g}, relative {r.rel_error:.3g}"),
        ("error vs original", "-" if r.rel_error_vs_original is None
         else f"max abs {r.max_abs_error_vs_original:.3g}, relative {r.rel_error_vs_original:.3g}"),
        ("accuracy", _acc(r.accuracy_before, r.accuracy_after)),
        ("latency", latency_change(r.latency_ms_before, r.latency_ms_after, r.latency_spread_ms_before,
                                   r.latency_spread_ms_after)
         + ("" if r.latency_spread_ms_after is None else f", noise band {human(r.latency_spread_ms_after, 'ms')}")),
    ]
    rows = "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in metrics)
    msgs = "".join(f"<li>{html.escape(m)}</li>" for m in r.messages)
    warns = "".join(f'<li class="warning">{html.escape(w)}</li>' for w in r.warnings)
    graphs = "" if r.status == "skipped" else (
        '<div class="graphs">'
        f"<figure><figcaption>before</figcaption>{render_graph(r.graph_before, before_marks, 'before ' + r.name)}</figure>"
        f"<figure><figcaption>after</figcaption>{render_graph(r.graph_after, after_marks, 'after ' + r.name)}</figure>"
        "</div>")
    return (f'<details id="pass-{i}" {"open" if r.status == "applied" else ""}>'
            f'<summary><h2 style="display:inline">[{i}] {html.escape(r.name)} '
            f'<span class="{cls}">{html.escape(r.status)}</span></h2></summary>'
            f"<table>{rows}</table>"
            + (f'<h3 class="warning">warnings</h3><ul>{warns}</ul>' if warns else "")
            + (search_html(r.data["search"]) if r.data.get("search") else "")
            + (f"<h3>messages</h3><ul>{msgs}</ul>" if msgs else "")
            + (f"<h3>code diff</h3>{_diff_html(r.code_diff)}" if r.code_diff else "")
            + '<h3>graph</h3><p class="legend"><span style="background:#c8f0cf">added</span>'
              '<span style="background:#f7c9c9">removed</span><span style="background:#fde4b3">changed</span></p>'
            + graphs + "</details>")


_WARNED = ' <span class="warning" title="see its warnings">(!)</span>'


def render_html(report: Report) -> str:
    o, f = report.original, report.final
    summary_rows = "".join(
        f'<tr><td><a href="#pass-{i}">{i}</a></td><td>{html.escape(r.name)}</td>'
        f'<td class="{r.status.replace(" ", "-")}">{html.escape(r.status)}'
        f'{_WARNED if r.warnings else ""}</td><td>{r.seconds:.2f}s</td>'
        f"<td>+{len(r.nodes_added)} / -{len(r.nodes_removed)} / ~{len(r.nodes_changed)}</td>"
        f"<td>{params_change(r.params_before, r.params_after, r.params_masked_after)}</td>"
        f"<td>{change(r.macs_before, r.macs_after)}</td>"
        f"<td>{change(r.bytes_before, r.bytes_after, 'B')}</td>"
        f"<td>{'-' if r.rel_error is None else f'{r.rel_error:.2g}'}</td>"
        f"<td>{_acc(r.accuracy_before, r.accuracy_after)}</td>"
        f"<td>{html.escape(latency_change(r.latency_ms_before, r.latency_ms_after, r.latency_spread_ms_before, r.latency_spread_ms_after))}</td></tr>"
        for i, r in enumerate(report.records, 1))
    final = "" if f is None else (
        f"<p>final: {params_change(o.params, f.params, f.params_masked)} params, {change(o.macs, f.macs)} MACs, "
        f"{change(o.bytes, f.bytes, 'B')}" + (f", accuracy {f.accuracy:.4f}" if f.accuracy is not None else "") + "</p>")
    compiled = "" if not report.compile else "<p>compiled: " + html.escape(
        ", ".join(f"{k}={v}" for k, v in report.compile.items() if not isinstance(v, (dict, list)))) + "</p>"
    schedules = "" if not report.latency_schedules else f"<p>latency: {html.escape(report.latency_schedules)}</p>"
    env = ", ".join(f"{k} {v}" for k, v in report.environment.items())
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>graphopt report: {html.escape(report.model)}</title><style>{_CSS}</style></head><body>"
        f"<h1>graphopt report: {html.escape(report.model)}"
        + (f" &rarr; {html.escape(report.target)}" if report.target else "") + "</h1>"
        f"<p>original: {human(o.params)} params, {human(o.macs)} MACs, {human(o.bytes, 'B')}"
        + (f", accuracy {o.accuracy:.4f}" if o.accuracy is not None else "") + "</p>"
        + "".join(f"<p>capture: {html.escape(note)}</p>" for note in report.capture) +
        "<table id='summary'><tr><th>#</th><th>pass</th><th>status</th><th>time</th><th>nodes +/-/~</th>"
        "<th>params</th><th>MACs</th><th>size</th><th>rel err</th><th>accuracy</th><th>latency</th></tr>"
        f"{summary_rows}</table>{schedules}{final}{compiled}"
        + "".join(_pass_section(i, r) for i, r in enumerate(report.records, 1))
        + f"<footer><p style='color:#888'>{html.escape(env)}</p></footer></body></html>"
    )
