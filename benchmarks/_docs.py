"""Write a benchmark's table between markers in a docs page, so the numbers always come from a script."""
from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
START, END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"


def write_block(page: str, text: str) -> Path:
    """Replace the marked block of ``docs/page`` with ``text`` (append the markers if absent)."""
    path = DOCS / page
    block = f"{START}\n{text.strip()}\n{END}"
    doc = path.read_text() if path.exists() else ""
    if START in doc:
        doc = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)
    return path
