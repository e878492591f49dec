"""Structured channel pruning: fewer channels, smaller weight tensors, fewer MACs (not masks).

Written only against graphopt's public API, like any plugin. The channel dependency analysis
(``graphopt.analysis.channels``) says which channels must go together (a *group* of
interchangeable classes: residual branches, concat offsets, depthwise convs, flatten blocks,
channel shuffles...) and which must stay (model inputs and outputs, ops it does not understand,
``ignore``). This pass scores each class, picks what to cut, and hands the plan to the
analysis's ``cut``, which slices the parameters and resizes each layer through its layer family
(``graphopt.register_layer``): a layer type graphopt does not know prunes once its family is
registered.

How much is cut:
- ``ratio``: that fraction of every prunable group's channels (the default, 0.5).
- ``target_macs``: a MAC budget for the whole model, reached with one global ranking across
  groups (each group's scores divided by its mean, so groups compare). A value below 1 is a
  fraction of the model's MACs *to keep* (0.5: at most half the MACs); a value of 1 or more is
  an absolute number of MACs. Give ``ratio`` or ``target_macs``, not both.

Per group, the number of kept channels is rounded to a multiple of ``round_to`` (default: the
target's ``preferred_channel_multiple``, else 8; for a grouped conv the multiple is of the whole
layer, e.g. groups=4 keeps 2 per group to get 8), and never goes below ``min_channels``. A group
too small to round (8 channels with round_to=8) keeps every channel, and the report says so.

Importance of a class (the channels cut together), aggregated over every layer of its group:
``l1`` / ``l2``: norm of the conv/linear weight slices (output and input side); ``bn_scale``:
|gamma| of the BatchNorms in the group (falls back to l1 where a group has none, e.g. after
fuse_conv_bn); ``taylor``: (sum of weight x gradient)^2 per slice, averaged over the
calibration batches, with the model's own predictions as labels. Each layer's scores are
divided by their mean before they are added up, so that layers compare.

Example:
    >>> import torch, graphopt
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 4, 3))
    >>> opt = graphopt.optimize(m, [("prune_channels", {"ratio": 0.5})], example_inputs=(torch.randn(1, 3, 16, 16),))
    >>> opt.graph_module.get_submodule("0").out_channels
    16
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import ChannelAnalysis, ChannelGroup, Option, analyze_channels, node_macs, propagate_shapes
from graphopt.analysis.channels import cut
from graphopt.analysis.channels.blockers import blockers
from graphopt.numerics import flat_outputs
from graphopt.report.text import human

from .weight_folding import fold_computed_weights

IMPORTANCE = ("l1", "l2", "bn_scale", "taylor")
DEFAULT_RATIO = 0.5
DEFAULT_ROUND_TO = 8
_PRUNABLE_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


# --------------------------------------------------------------------------------------------
# Validation (runs before any pass)
# --------------------------------------------------------------------------------------------

def validate_options(gm: fx.GraphModule, ctx: graphopt.PassContext, ratio=None, target_macs=None,
                     importance="l1", ignore=(), **_) -> None:
    """Bad option combinations, unknown ``ignore`` names and ``taylor`` without data fail here."""
    if ratio is not None and target_macs is not None:
        raise graphopt.PassOptionError(
            "prune_channels: give ratio (cut that fraction of every group) or target_macs (a MAC "
            f"budget for the whole model), not both (got ratio={ratio}, target_macs={target_macs})")
    graphopt.check_module_names(gm, ignore, "prune_channels: ignore", _PRUNABLE_LAYERS)
    if importance == "taylor" and not ctx.calibration_data:
        raise graphopt.MissingInputError(
            "prune_channels: importance='taylor' needs gradients on real inputs: pass "
            "calibration_data=[batch, ...] to optimize(), or use importance='l1', 'l2' or 'bn_scale'")


# --------------------------------------------------------------------------------------------
# Importance
# --------------------------------------------------------------------------------------------

def _slice_scores(t: torch.Tensor, dim: int, how: str) -> np.ndarray:
    flat = t.detach().double().movedim(dim, 0).reshape(t.shape[dim], -1)
    if how == "l2":
        return flat.pow(2).sum(1).sqrt().numpy()
    if how == "sum":
        return flat.sum(1).numpy()
    return flat.abs().sum(1).numpy()


def _weight_spaces(group: ChannelGroup) -> list:
    """Conv / linear weight dims of the group (both the output and the input side)."""
    return [s for s in group.params() if s.param == "weight" and s.role in ("out", "in")]


def _bn_spaces(gm: fx.GraphModule, group: ChannelGroup) -> list:
    return [s for s in group.params("channel") if s.param == "weight"
            and isinstance(gm.get_submodule(s.module), nn.modules.batchnorm._BatchNorm)]


def _taylor_scores(gm: fx.GraphModule, ctx, spaces: Sequence) -> Dict[str, np.ndarray]:
    """(sum over a slice of weight * grad)^2 per channel, averaged over the calibration batches.

    The loss is the cross-entropy against the model's own predictions (argmax over dim 1), or
    half the mean square of the output when it has a single channel: no labels needed."""
    params = {(s.module, s.param) for s in spaces}
    tensors = {k: getattr(gm.get_submodule(k[0]), k[1]) for k in params}
    flags = {k: t.requires_grad for k, t in tensors.items()}
    sums = {s.key: np.zeros(s.size) for s in spaces}
    batches = list(ctx.calibration_data)
    was_training = gm.training
    gm.eval()
    try:
        with torch.enable_grad():
            for t in tensors.values():
                t.requires_grad_(True)
            for batch in ctx.progress(batches, desc="prune_channels: taylor", total=len(batches)):
                gm.zero_grad(set_to_none=True)
                outs = [o for o in flat_outputs(gm(*batch)) if o.is_floating_point()]
                sum(_self_loss(o) for o in outs).backward()
                for s in spaces:
                    t = tensors[(s.module, s.param)]
                    if t.grad is not None:
                        sums[s.key] += _slice_scores(t * t.grad, s.dim, "sum") ** 2
    finally:
        gm.zero_grad(set_to_none=True)
        for k, t in tensors.items():
            t.requires_grad_(flags[k])
        gm.train(was_training)
    return {k: v / len(batches) for k, v in sums.items()}


def _self_loss(out: torch.Tensor) -> torch.Tensor:
    if out.dim() >= 2 and out.shape[1] > 1:
        return F.cross_entropy(out, out.detach().argmax(1))
    return 0.5 * out.pow(2).mean()


def group_importance(gm: fx.GraphModule, ctx, groups: Sequence[ChannelGroup], importance: str
                     ) -> Tuple[Dict[int, np.ndarray], List[str]]:
    """Per group, one score per class (higher: more important); and notes about fallbacks."""
    notes = []
    spaces_of = {}
    for g in groups:
        spaces = _bn_spaces(gm, g) if importance == "bn_scale" else _weight_spaces(g)
        if not spaces:
            spaces = _weight_spaces(g)
            notes.append(f"{g.describe()}: no BatchNorm to read scales from; l1 importance used")
        spaces_of[g.id] = spaces
    raw: Dict[str, np.ndarray] = {}
    if importance == "taylor":
        raw = _taylor_scores(gm, ctx, list({s.key: s for ss in spaces_of.values() for s in ss}.values()))
    how = "l2" if importance == "l2" else "l1"
    scores = {}
    for g in groups:
        total = np.zeros(g.size)
        for s in spaces_of[g.id]:
            per = raw.get(s.key)
            if per is None:
                per = _slice_scores(getattr(gm.get_submodule(s.module), s.param), s.dim, how)
            cls = np.array([per[idx].sum() for idx in g.index[s.key]])
            mean = cls.mean()
            total += cls / mean if mean > 0 else cls
        scores[g.id] = total / max(len(spaces_of[g.id]), 1)
    return scores, notes


# --------------------------------------------------------------------------------------------
# Choosing what to cut
# --------------------------------------------------------------------------------------------

def _step(group: ChannelGroup, round_to: int) -> int:
    """Classes kept (and cut) must be a multiple of this for every layer of the group to keep
    and lose a multiple of round_to channels (a class may hold several channels of a layer,
    e.g. one per group of a grouped conv)."""
    step = 1
    for s in group.params("out"):
        per_class = len(group.index[s.key][0])
        step = math.lcm(step, round_to // math.gcd(round_to, per_class))
    return step


def _keep_count(group: ChannelGroup, keep: float, round_to: int, min_channels: int) -> int:
    step = _step(group, round_to)
    kept = max(step, int(math.floor(keep / step + 0.5)) * step)
    kept = max(kept, math.ceil(min_channels / group.width), 1)
    return min(kept, group.size)


class _MacModel:
    """MACs as a function of how many classes each group keeps, from the analysis alone.

    A conv's MACs scale with its output channels and its weight's input dim; a transposed conv's
    with its input channels and its weight's output dim; other ops with their output channels."""

    def __init__(self, gm: fx.GraphModule, analysis: ChannelAnalysis, groups: Sequence[ChannelGroup],
                 order: Dict[int, np.ndarray]):
        self.terms: List[Tuple[int, List[str]]] = []
        for node in gm.graph.nodes:
            macs = node_macs(gm, node)
            if not macs:
                continue
            keys = []
            out = analysis.node_spaces.get(node.name)
            first = node.all_input_nodes[0] if node.all_input_nodes else None
            src = analysis.node_spaces.get(first.name) if first is not None else None
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                keys += [src.key] if src is not None else []
            elif out is not None:
                keys.append(out.key)
            elif src is not None:
                keys.append(src.key)
            if isinstance(module, _PRUNABLE_LAYERS):
                w1 = f"param:{node.target}.weight:1"
                if w1 in analysis.spaces:
                    keys.append(w1)
            self.terms.append((macs, keys))
        self.sizes = {k: s.size for k, s in analysis.spaces.items()}
        # removed elements per space after cutting the first j classes (in cut order) of a group
        self.cum: Dict[int, Dict[str, np.ndarray]] = {}
        for g in groups:
            per = {}
            for k in g.spaces:
                counts = np.array([len(g.index[k][c]) for c in order[g.id]])
                per[k] = np.r_[0, np.cumsum(counts)]
            self.cum[g.id] = per

    def macs(self, cuts: Dict[int, int]) -> float:
        removed: Dict[str, int] = {}
        for gid, n in cuts.items():
            for k, cum in self.cum[gid].items():
                removed[k] = removed.get(k, 0) + int(cum[n])
        total = 0.0
        for macs, keys in self.terms:
            f = 1.0
            for k in keys:
                f *= 1 - removed.get(k, 0) / self.sizes[k]
            total += macs * f
        return total


def _plan_budget(groups, scores, order, mac_model: _MacModel, budget: float, round_to: int,
                 min_channels: int) -> Tuple[Dict[int, int], float]:
    """Smallest global threshold on the normalized scores whose cuts fit the MAC budget."""
    norm = {g.id: scores[g.id] / (scores[g.id].mean() or 1.0) for g in groups}
    levels = np.unique(np.concatenate([norm[g.id] for g in groups] + [np.array([np.inf])]))

    def cuts_at(t: float) -> Dict[int, int]:
        out = {}
        for g in groups:
            below = int((norm[g.id] < t).sum())
            keep = _keep_count(g, g.size - below, round_to, min_channels) if below else g.size
            out[g.id] = g.size - keep
        return out

    lo, hi = 0, len(levels) - 1
    if mac_model.macs(cuts_at(levels[hi])) > budget:
        return cuts_at(levels[hi]), mac_model.macs(cuts_at(levels[hi]))
    while lo < hi:
        mid = (lo + hi) // 2
        if mac_model.macs(cuts_at(levels[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    cuts = cuts_at(levels[lo])
    # rounding makes the threshold jump by whole steps: give back, most important first, every
    # step of channels that still fits the budget
    steps = {g.id: _step(g, round_to) for g in groups}
    while True:
        options = []
        for gid, n in cuts.items():
            back = min(steps[gid], n)
            if back:
                trial = {**cuts, gid: n - back}
                if mac_model.macs(trial) <= budget:
                    restored = norm[gid][order[gid][n - back:n]].max()
                    options.append((restored, gid, trial))
        if not options:
            break
        cuts = max(options, key=lambda o: (o[0], -o[1]))[2]
    return cuts, mac_model.macs(cuts)


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------

def _width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


@graphopt.register_pass(
    "prune_channels",
    exact=False,
    description="Structured channel pruning over dependency groups (real surgery, not masks)",
    options={
        "ratio": Option(None, float, check=lambda v: 0 < v < 1,
                        help="fraction of every group's channels to cut, in (0, 1); default 0.5"),
        "target_macs": Option(None, float, check=lambda v: v > 0,
                              help="MAC budget: < 1 is the fraction of MACs to keep, >= 1 a MAC count"),
        "importance": Option("l1", str, choices=IMPORTANCE, help="how channels are ranked"),
        "round_to": Option(None, int, check=lambda v: v >= 1,
                           help="kept channels per layer a multiple of this; default: the target's, else 8"),
        "min_channels": Option(1, int, check=lambda v: v >= 1, help="never keep fewer channels in a layer"),
        "ignore": Option((), tuple, help="modules left exactly as they are (inputs and outputs)"),
    },
    runs_after=("fuse_conv_bn",),
    runs_before=("distill", "quantize"),
    validate=validate_options,
)
def prune_channels(gm: fx.GraphModule, ctx: graphopt.PassContext, ratio, target_macs, importance,
                   round_to, min_channels, ignore):
    """Cut the least important channels of every prunable channel group."""
    if ratio is None and target_macs is None:
        ratio = DEFAULT_RATIO
    folded = fold_computed_weights(gm)  # weight standardization: a computed weight has no channels to cut
    if folded:
        ctx.note(f"folded {folded} weight(s) computed from parameters (weight standardization...) into "
                 "constant weights first, so their channels can be cut")
    if round_to is None:
        caps = ctx.capabilities
        round_to = caps.preferred_channel_multiple if caps is not None else DEFAULT_ROUND_TO
    if any("tensor_meta" not in n.meta for n in gm.graph.nodes if n.op == "call_module"):
        propagate_shapes(gm, ctx.example_inputs)
    macs_before = graphopt.count_macs(gm)
    params_before = graphopt.count_params(gm)
    before_widths = {name: _width(m) for name, m in gm.named_modules() if isinstance(m, _PRUNABLE_LAYERS)}
    frozen = {n: f"in ignore ({n})" for n in ignore}
    # tied tensors: cutting one module's copy would untie it (a module called twice is one space)
    for module, why in graphopt.shared_weights(gm, calls=False).items():
        if module and module not in frozen:
            frozen[module] = f"{why}: cutting it would change every use"
    analysis = analyze_channels(gm, frozen_modules=frozen)
    groups = analysis.prunable_groups()
    scores, notes = group_importance(gm, ctx, groups, importance)
    order = {g.id: np.argsort(scores[g.id], kind="stable") for g in groups}  # least important first

    if ratio is not None:
        cuts = {g.id: g.size - _keep_count(g, g.size * (1 - ratio), round_to, min_channels) for g in groups}
        how = f"ratio {ratio:g}"
    else:
        budget = target_macs * macs_before if target_macs < 1 else target_macs
        model = _MacModel(gm, analysis, groups, order)
        cuts, estimate = _plan_budget(groups, scores, order, model, budget, round_to, min_channels)
        how = f"global ranking for a budget of {human(budget)} MACs"
        if estimate > budget:
            ctx.note(f"budget of {human(budget)} MACs not reachable: cutting every prunable group to its "
                     f"minimum leaves about {human(estimate)} (frozen channels and round_to={round_to} limit it)")

    removed: Dict[str, List[np.ndarray]] = {}
    for g in groups:
        for c in order[g.id][:cuts[g.id]]:
            for k in g.spaces:
                removed.setdefault(k, []).append(g.index[k][c])
    removed_idx = {k: np.unique(np.concatenate(v)) for k, v in removed.items()}
    locked = blockers(analysis)[:3]  # weighed on the graph before the cut
    cut(gm, analysis, removed_idx, ctx.example_inputs)

    ctx.note(f"{len(groups)} prunable channel groups ({how}, {importance} importance, round_to={round_to}, "
             f"min_channels={min_channels})")
    for g in groups:
        n = cuts[g.id]
        if n:
            per_layer = ", ".join(f"{s.module} -{sum(len(g.index[s.key][c]) for c in order[g.id][:n])}"
                                  for s in g.params("out") if s.param == "weight")
            ctx.note(f"{g.describe()}: cut {n} of {g.size} ({per_layer})")
        elif ratio is None:
            ctx.note(f"{g.describe()}: kept all {g.size * g.width} channels: the budget was met by cutting "
                     "lower-ranked channels elsewhere")
        elif g.size * (1 - (ratio or 0)) >= min_channels / g.width:
            ctx.note(f"{g.describe()}: kept all {g.size * g.width} channels: too few to cut and keep a "
                     f"multiple of round_to={round_to}")
        else:
            ctx.note(f"{g.describe()}: kept all {g.size * g.width} channels (min_channels={min_channels})")
    for n in notes:
        ctx.note(n)
    for g in analysis.groups:
        if not g.prunable and g.producers():
            ctx.note(f"{g.describe()}: left alone: {g.reason}")
    for node, why in analysis.unknown.items():
        ctx.note(f"`{node}` not understood, its channels are left alone: {why}")
    for n in analysis.notes:  # what the cut rewrote besides the layers (shape asserts)
        ctx.note(n)
    widths = []
    for name, m in gm.named_modules():
        if name in before_widths and before_widths[name] != _width(m):
            widths.append(f"{name} {before_widths[name]}->{_width(m)}")
    if widths:
        ctx.note("output channels: " + ", ".join(widths))
    macs_after, params_after = graphopt.count_macs(gm), graphopt.count_params(gm)
    ctx.note(f"MACs {human(macs_before)} -> {human(macs_after)} ({100 * (1 - macs_after / max(macs_before, 1)):.1f}% cut), "
             f"params {human(params_before)} -> {human(params_after)} "
             f"({100 * (1 - params_after / max(params_before, 1)):.1f}% cut)")
    asked = ratio if ratio is not None else 1 - min(budget / max(macs_before, 1), 1.0)
    _warn_if_short(ctx, locked, asked, 1 - macs_after / max(macs_before, 1), how)
    return gm


def _warn_if_short(ctx, top, asked: float, achieved: float, how: str) -> None:
    """Say so, at warning level, when the cut is under half of what was asked, naming the
    blockers that lock the most MACs (``top``) and what would unblock them."""
    if asked <= 0 or achieved >= asked / 2:
        return
    ctx.warn(f"cut {achieved:.1%} of the MACs where {how} asks for about {asked:.0%}: most channels are "
             "locked. " + (" | ".join(f"{b.describe()}" for b in top) if top else "no channel group is prunable"))
