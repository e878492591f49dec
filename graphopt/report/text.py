"""The report as a compact terminal table."""
from __future__ import annotations

from typing import List, Optional, Sequence

from .record import Report


def human(n: Optional[float], unit: str = "") -> str:
    """12345678 -> '12.3M'."""
    if n is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.4g}{unit}"


def change(before: Optional[float], after: Optional[float], unit: str = "") -> str:
    if before is None or after is None:
        return "-"
    if before == after:
        return human(after, unit)
    pct = f" ({(after - before) / before:+.0%})" if before else ""
    return f"{human(after, unit)}{pct}"


def latency_change(before: Optional[float], after: Optional[float], spread_before: Optional[float] = None,
                   spread_after: Optional[float] = None) -> str:
    """Like :func:`change`, but a difference inside the noise band (p90 - p10) is said to be noise."""
    if before is None or after is None:
        return "-"
    noise = max(spread_before or 0.0, spread_after or 0.0)
    if before != after and noise > 0 and abs(after - before) <= noise:
        return f"{human(after, 'ms')} (within noise)"
    return change(before, after, "ms")


def params_change(before: int, after: int, masked: int = 0) -> str:
    """The params column: the change, and the nonzeros when weight masks hold some at zero."""
    return change(before, after) + (f" ({human(after - masked)} nonzero)" if masked else "")


def _acc(before: Optional[float], after: Optional[float]) -> str:
    if after is None:
        return "-"
    return f"{after:.4f}" + (f" ({after - before:+.4f})" if before is not None else "")


def _table(rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def render_text(report: Report, diffs: bool = False) -> str:
    o = report.original
    head = (f"graphopt report: {report.model}" + (f" -> {report.target}" if report.target else "")
            + f"\noriginal: {human(o.params)} params, {human(o.macs)} MACs, {human(o.bytes, 'B')}"
            + (f", accuracy {o.accuracy:.4f}" if o.accuracy is not None else "")
            + (f", latency {o.latency_ms:.3g} ms" if o.latency_ms is not None else "")
            + "".join(f"\ncapture: {note}" for note in report.capture))
    rows = [["#", "pass", "status", "time", "nodes +/-/~", "params", "MACs", "size",
             "rel err", "accuracy", "latency"]]
    for i, r in enumerate(report.records, 1):
        rows.append([
            str(i), r.name, r.status + (" (!)" if r.warnings else ""), f"{r.seconds:.2f}s",
            f"+{len(r.nodes_added)}/-{len(r.nodes_removed)}/~{len(r.nodes_changed)}",
            params_change(r.params_before, r.params_after, r.params_masked_after),
            change(r.macs_before, r.macs_after),
            change(r.bytes_before, r.bytes_after, "B"),
            f"{r.rel_error:.2g}" if r.rel_error is not None else "-",
            _acc(r.accuracy_before, r.accuracy_after),
            latency_change(r.latency_ms_before, r.latency_ms_after, r.latency_spread_ms_before,
                           r.latency_spread_ms_after) if r.latency_ms_after else "-",
        ])
    lines = [head, ""] + _table(rows)
    if report.latency_schedules:
        lines.append(f"latency: {report.latency_schedules}")
    for i, r in enumerate(report.records, 1):
        notes = ([f"rolled back: {r.reason}"] if r.status in ("rolled back", "failed") else []) \
            + [f"WARNING: {w}" for w in r.warnings] + r.messages
        if r.status == "skipped":
            notes = [r.reason]
        if notes or (diffs and r.code_diff):
            lines.append(f"\n[{i}] {r.name}")
            lines += [f"  - {m}" for m in notes]
            if r.data.get("search"):
                from .search import search_lines

                lines += ["  " + line for line in search_lines(r.data["search"])]
            if diffs and r.code_diff:
                lines += ["  " + line for line in r.code_diff.splitlines()]
    if report.compile:
        c = report.compile
        lines.append("\ncompiled: " + ", ".join(f"{k}={v}" for k, v in c.items() if not isinstance(v, (dict, list))))
        lines += [_sparse_line(r) for r in c.get("sparse_layers") or []]
    f = report.final
    if f is not None:
        lines.append(f"\nfinal: {params_change(o.params, f.params, f.params_masked)} params, {change(o.macs, f.macs)} MACs, "
                     f"{change(o.bytes, f.bytes, 'B')}"
                     + (f", accuracy {f.accuracy:.4f}" if f.accuracy is not None else ""))
    return "\n".join(lines)


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def _sparse_line(r: dict) -> str:
    """A masked layer's kernel in the compiled model (the target's ``sparse_layers`` record)."""
    return (f"  masked {r.get('name')} ({r.get('kind')}, {100 * r.get('sparsity', 0):.0f}% zeros, block "
            f"{r.get('block')}): {r.get('kernel')} kernel, dense {_ms(r.get('dense_ms'))}, sparse "
            f"{_ms(r.get('sparse_ms'))}, stores {human(r.get('stored_bytes', 0))}B of {human(r.get('dense_bytes', 0))}B"
            f": {r.get('reason')}")
