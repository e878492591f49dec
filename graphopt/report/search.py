"""How a record's latency search (``data["search"]``, from the ``latency_search`` pass) is shown:
a table of its steps in text, and in HTML an inline SVG of accuracy against measured latency
(the search path, the final point, uniform-ratio and MAC-budget pruning when they were
measured, and the int8 form of each graph on the path when int8 was allowed).

Example:
    >>> s = {"start": {"latency_ms": 10.0, "accuracy": 1.0}, "target_ms": 5.0, "stopped": "budget",
    ...      "stop_reason": "reached", "final": {"latency_ms": 4.8, "accuracy": 0.98, "spread_ms": 0.1},
    ...      "steps": [{"step": 1, "latency_before_ms": 10.0, "aim_ms": 9.0, "candidates": [], "skipped": [],
    ...                 "chosen": {"group": 0, "producers": ["conv1"], "channels_before": 32,
    ...                            "channels_after": 16, "latency_ms": 4.8, "spread_ms": 0.1,
    ...                            "accuracy": 0.97, "error": 0.1}}], "uniform": []}
    >>> print(search_lines(s)[1])
      step  group  producers  channels  latency ms    accuracy  candidates
    >>> search_svg(s).startswith("<svg")
    True
"""
from __future__ import annotations

import html
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["search_lines", "search_svg", "search_points"]

#: The baselines a search may hold (``data["search"][key]``) and the ``prune_channels`` option
#: each point records.
BASELINES = (("uniform", "ratio"), ("macs", "target_macs"))


def _f(v: Optional[float], fmt: str = ".4g") -> str:
    return "-" if v is None else format(v, fmt)


def search_lines(s: Dict[str, Any]) -> List[str]:
    """The search as text lines: the budget, one row per step, why it stopped, the final point."""
    start, final = s["start"], s["final"]
    lines = [f"latency search: {_f(start['latency_ms'])} ms -> budget {_f(s['target_ms'])} ms; "
             f"final {_f(final['latency_ms'])} ms (noise {_f(final.get('spread_ms'), '.2g')} ms"
             + (f", timed again {_f(final['retimed_ms'])} ms" if final.get("retimed_ms") is not None else "")
             + "), "
             f"accuracy {_f(start.get('accuracy'))} -> {_f(final.get('accuracy'))}; stopped: {s['stop_reason']}"]
    int8 = s.get("int8")
    rows = [["step", "group", "producers", "channels", "latency ms", "accuracy", "candidates"]
            + (["int8 ms", "int8 accuracy"] if int8 else [])]
    for st in s["steps"]:
        c, q = st["chosen"], st.get("int8")
        tail = ([_f(q["latency_ms"]), _f(q.get("accuracy"))] if q else ["-", "-"]) if int8 else []
        if c is None:
            rows.append([str(st["step"]), "-", "(none kept)", "-", f"{_f(st['latency_before_ms'])}",
                         "-", str(len(st["candidates"]))] + tail)
            continue
        noise = f" ±{c['spread_ms']:.2g}" if c.get("spread_ms") is not None else ""
        rows.append([str(st["step"]), str(c["group"]), ", ".join(c["producers"][:2])
                     + (" ..." if len(c["producers"]) > 2 else ""),
                     f"{c['channels_before']}->{c['channels_after']}",
                     f"{_f(st['latency_before_ms'])}->{_f(c['latency_ms'])}{noise}",
                     _f(c["accuracy"]) if c["accuracy"] is not None else f"err {_f(c['error'], '.2g')}",
                     str(len(st["candidates"]))] + tail)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for key, option in BASELINES:
        for u in s.get(key) or ():
            lines.append(f"  {'uniform ratio' if key == 'uniform' else option} {u[option]:.3g}: "
                         f"{_f(u['latency_ms'])} ms, accuracy {_f(u.get('accuracy'))}")
    if int8:
        lines.append(f"  int8 at the start: {_f(int8['start']['latency_ms'])} ms, accuracy "
                     f"{_f(int8['start'].get('accuracy'))}; {'taken' if int8['taken'] else 'not taken'}: {int8['why']}")
    return lines


def search_points(s: Dict[str, Any]) -> Tuple[List[Tuple[float, float]], Optional[Tuple[float, float]],
                                               List[Tuple[float, float]], List[Tuple[float, float]],
                                               List[Tuple[float, float]]]:
    """(latency ms, score) of the path (start, each kept step), the final point, uniform
    pruning, the int8 forms of the path's graphs, and MAC-budget pruning; score is the accuracy,
    or minus the output error when there was no eval_fn."""
    def score(d):
        if d.get("accuracy") is not None:
            return d["accuracy"]
        return -d["error"] if d.get("error") is not None else None

    path = [(s["start"]["latency_ms"], score(s["start"]))]
    path += [(st["chosen"]["latency_ms"], score(st["chosen"])) for st in s["steps"] if st["chosen"]]
    path = [p for p in path if p[1] is not None]
    final = (s["final"]["latency_ms"], score(s["final"]))
    uniform, macs = ([(u["latency_ms"], score(u)) for u in s.get(key) or () if score(u) is not None]
                     for key in ("uniform", "macs"))
    int8 = [s["int8"]["start"]] + [st["int8"] for st in s["steps"] if st.get("int8")] if s.get("int8") else []
    int8 = [(q["latency_ms"], score(q)) for q in int8 if score(q) is not None]
    return path, (final if final[1] is not None else None), uniform, int8, macs


def search_svg(s: Dict[str, Any], width: int = 420, height: int = 260) -> str:
    """Accuracy (y) against measured latency (x): the path as a line, the final point circled,
    uniform pruning as squares, MAC-budget pruning as triangles, int8 forms as diamonds, the
    budget as a dashed vertical line."""
    path, final, uniform, int8, macs = search_points(s)
    pts = path + ([final] if final else []) + uniform + int8 + macs
    if not pts:
        return ""
    xs = [p[0] for p in pts] + [s["target_ms"]]
    ys = [p[1] for p in pts]
    x0, x1 = min(xs) * 0.95, max(xs) * 1.05
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.1 or max(abs(y1) * 0.05, 1e-3)
    y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = 56, 12, 12, 36

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    ylabel = "accuracy" if s["start"].get("accuracy") is not None else "-output error"
    out = [f'<svg class="search-plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11"><title>accuracy against measured latency</title>',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           'fill="#fff" stroke="#ccc"/>']
    for v in _ticks(x0, x1):
        out.append(f'<text x="{px(v):.1f}" y="{height - bottom + 14}" text-anchor="middle">{v:.3g}</text>')
    for v in _ticks(y0, y1):
        out.append(f'<text x="{left - 4}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">measured latency (ms)</text>')
    out.append(f'<text x="12" y="{(top + height - bottom) / 2}" transform="rotate(-90 12 {(top + height - bottom) / 2})" '
               f'text-anchor="middle">{ylabel}</text>')
    bx = px(s["target_ms"])
    out.append(f'<line class="budget" x1="{bx:.1f}" y1="{top}" x2="{bx:.1f}" y2="{height - bottom}" '
               'stroke="#a11" stroke-dasharray="4 3"><title>budget</title></line>')
    if len(path) > 1:
        out.append('<polyline class="path" fill="none" stroke="#2a6fb0" stroke-width="1.5" points="'
                   + " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in path) + '"/>')
    for i, (x, y) in enumerate(path):
        out.append(f'<circle class="step" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="#2a6fb0">'
                   f'<title>{"start" if i == 0 else f"step {i}"}: {x:.4g} ms, {y:.4g}</title></circle>')
    for x, y in uniform:
        out.append(f'<rect class="uniform" x="{px(x) - 3.5:.1f}" y="{py(y) - 3.5:.1f}" width="7" height="7" '
                   f'fill="#b36b00"><title>uniform pruning: {x:.4g} ms, {y:.4g}</title></rect>')
    for x, y in macs:
        out.append(f'<path class="macs" d="M{px(x):.1f},{py(y) - 4.5:.1f} l4.5,8 l-9,0 z" '
                   f'fill="#0f8a8a"><title>target_macs pruning: {x:.4g} ms, {y:.4g}</title></path>')
    for x, y in int8:
        out.append(f'<path class="int8" d="M{px(x):.1f},{py(y) - 4.5:.1f} l4.5,4.5 l-4.5,4.5 l-4.5,-4.5 z" '
                   f'fill="#7a3fb0"><title>int8: {x:.4g} ms, {y:.4g}</title></path>')
    if final:
        x, y = final
        out.append(f'<circle class="final" cx="{px(x):.1f}" cy="{py(y):.1f}" r="5.5" fill="none" stroke="#17622b" '
                   f'stroke-width="2"><title>final (after recovery): {x:.4g} ms, {y:.4g}</title></circle>')
    out.append("</svg>")
    return "".join(out)


def _ticks(lo: float, hi: float, n: int = 4) -> Sequence[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    return [lo + (hi - lo) * i / n for i in range(1, n)]


def search_html(s: Dict[str, Any]) -> str:
    """The plot and the step table for a pass section of the HTML report."""
    legend = ('<p class="legend"><span style="color:#2a6fb0">&#9679; search path</span> '
              '<span style="color:#17622b">&#9675; final</span> '
              + ('<span style="color:#b36b00">&#9632; uniform pruning</span> ' if s.get("uniform") else "")
              + ('<span style="color:#0f8a8a">&#9650; target_macs pruning</span> ' if s.get("macs") else "")
              + ('<span style="color:#7a3fb0">&#9670; int8</span> ' if s.get("int8") else "")
              + '<span style="color:#a11">- - budget</span></p>')
    table = "<pre>" + html.escape("\n".join(search_lines(s))) + "</pre>"
    return f"<h3>latency search</h3>{search_svg(s)}{legend}{table}"
