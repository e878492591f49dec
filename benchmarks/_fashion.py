"""The command line the Fashion-MNIST compress-and-recover benchmarks share (prune, prune_weights)."""
from __future__ import annotations

import argparse
from typing import List, Optional, Sequence


def recovery_parser(doc: str, page: str) -> argparse.ArgumentParser:
    """Distillation, threads, test-set limit, config choice and docs flags; ``page`` is the docs
    page the script rewrites. Scripts add their own options to the parser returned."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2, help="distillation epochs over the train split")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2, help="torch threads (keep <= the cores you may use)")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--configs", default=None, help="comma-separated indices into CONFIGS (default: all)")
    p.add_argument("--no-docs", action="store_true", help=f"do not rewrite docs/{page}")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def chosen(configs: Sequence, indices: Optional[str]) -> List:
    """``configs``, or those at the comma-separated ``indices`` (``--configs``)."""
    return list(configs) if indices is None else [configs[int(i)] for i in indices.split(",")]
