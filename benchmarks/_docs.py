"""Write a benchmark's table between markers in a docs page, so the numbers always come from a script."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

DOCS = Path(__file__).resolve().parent.parent / "docs"


def write_block(page: str, text: str, marker: str = "benchmark", heading: Optional[str] = None) -> Path:
    """Replace the ``<!-- marker:start/end -->`` block of ``docs/page`` with ``text``.

    If the page has no such block yet, it is appended (after ``heading``, when given).
    """
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    path = DOCS / page
    block = f"{start}\n{text.strip()}\n{end}"
    doc = path.read_text() if path.exists() else ""
    if start in doc:
        doc = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"
    path.write_text(doc)
    return path
