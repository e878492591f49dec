"""The solver: coupled elements -> classes (union-find) -> groups of classes over the same spaces.

Elements are channels, numbered across every space. Each ``couple`` call ties elements in
pairs; the connected components of those ties are the *classes*, the atoms a pass may remove.
Classes that touch the same spaces (and are all frozen, or all free) form a
:class:`~graphopt.analysis.channels.ChannelGroup`.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from .context import Declarations
from .result import ChannelGroup
from .spaces import Coupling


def components(n: int, pairs: List[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Component label of each of ``n`` elements under the ties ``pairs``, by union-find.

    Vectorised over all ties at once: every round hooks each tie's larger root onto its smaller
    one, then halves paths until every element points at its root. A root is the smallest
    element of its component, so labels are numbered in order of each component's first
    element (the same numbering a breadth-first search from element 0 upwards gives).
    """
    parent = np.arange(n, dtype=np.int64)
    if n == 0 or not pairs:
        return parent
    a = np.concatenate([p[0] for p in pairs])
    b = np.concatenate([p[1] for p in pairs])
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        lo, hi = np.minimum(ra[differ], rb[differ]), np.maximum(ra[differ], rb[differ])
        np.minimum.at(parent, hi, lo)  # hi is a root: it now points below itself
        while True:  # path halving until every element points at a root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    _, labels = np.unique(parent, return_inverse=True)
    return labels.astype(np.int64)


def solve(d: Declarations) -> List[ChannelGroup]:
    """The groups of what the rules declared, ordered by their first space."""
    spaces = d.spaces
    labels = components(d.n, d.pairs)
    sizes = np.array([s.size for s in spaces], dtype=np.int64)
    elem_space = np.repeat(np.arange(len(spaces)), sizes)
    elem_index = np.arange(d.n) - np.repeat(np.array([s.base for s in spaces], dtype=np.int64), sizes)

    frozen: Dict[int, str] = {}
    for ids, why in d.frozen:
        for lab in np.unique(labels[ids]):
            frozen.setdefault(int(lab), why)
    # classes no layer produces (e.g. only the input channels of a conv fed by the model input)
    # cannot be cut: nothing upstream would shrink
    produced = np.zeros(d.n, dtype=bool)
    for s in spaces:
        if s.role == "out":
            produced[s.base:s.base + s.size] = True
    has_producer = np.zeros(labels.max() + 1 if d.n else 0, dtype=bool)
    has_producer[labels[produced]] = True

    order = np.lexsort((elem_index, elem_space, labels))
    labs_sorted = labels[order]
    starts = np.flatnonzero(np.r_[True, labs_sorted[1:] != labs_sorted[:-1]]) if d.n else np.zeros(0, int)
    ends = np.r_[starts[1:], len(order)] if d.n else np.zeros(0, int)
    by_sig: Dict[Tuple, List[np.ndarray]] = {}
    for s0, e0 in zip(starts, ends):
        members = order[s0:e0]
        lab = int(labels[members[0]])
        if lab not in frozen and not has_producer[lab]:
            frozen[lab] = "no layer produces these channels"
        sig = (tuple(np.unique(elem_space[members])), lab in frozen)
        by_sig.setdefault(sig, []).append(members)

    edges_by_space: Dict[str, List[Coupling]] = {}
    for c in d.history:
        edges_by_space.setdefault(c.a, []).append(c)
        if c.b != c.a:
            edges_by_space.setdefault(c.b, []).append(c)

    groups = []
    for (space_ids, is_frozen), classes in by_sig.items():
        classes.sort(key=lambda m: int(m.min()))
        gspaces = {spaces[i].key: spaces[i] for i in space_ids}
        index = {k: [] for k in gspaces}
        for members in classes:  # sorted by space, then index
            sp = elem_space[members]
            for i in space_ids:
                index[spaces[i].key].append(elem_index[members[sp == i]])
        reasons = [frozen[int(labels[m[0]])] for m in classes] if is_frozen else []
        reason = max(set(reasons), key=reasons.count) if reasons else ""
        seen, history = set(), []
        for k in gspaces:
            for c in edges_by_space.get(k, []):
                if id(c) not in seen and c.a in gspaces and c.b in gspaces:
                    seen.add(id(c))
                    history.append(c)
        groups.append(ChannelGroup(id=0, size=len(classes), spaces=gspaces, index=index,
                                   prunable=not is_frozen, reason=reason, history=history))
    groups.sort(key=lambda g: min(s.base for s in g.spaces.values()))
    for i, g in enumerate(groups):
        g.id = i
    return groups
