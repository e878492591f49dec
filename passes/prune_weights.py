"""Magnitude weight pruning: zero the smallest weights of conv and linear layers, and mask them.

Written only against graphopt's public API, like any plugin. Unlike ``prune_channels`` this
removes no channel and changes no shape: it sets weights to zero, so the model computes the
same MACs in PyTorch and on a dense kernel. What it buys is the pattern: every pruned layer
carries the mask and its structure (the contract in :mod:`graphopt.sparsity`: the bool buffer
``weight_mask``, True where kept, and the attribute ``weight_sparsity``, a
``SparsityPattern(block, n_m)``), which keeps the zeros through ``distill`` and ``quantize`` and
tells a target's lowering which layers are sparse and how (graphopt has no sparse kernel yet:
docs/prune_weights.md).

How much is pruned (give one of ``sparsity``, ``alpha``, ``n_m``; the default is
``sparsity=0.5``):
- ``sparsity``: that fraction of the weights of the prunable layers, with one threshold over
  all of them (``scope="global"``, the default: layers whose weights are small lose more) or
  per layer (``scope="layer"``: every layer loses the same fraction);
- ``alpha``: per layer, the weights with ``|w| < alpha * max|w|`` (the founding documents' rule);
- ``n_m=(n, m)``: keep the ``n`` largest of every ``m`` consecutive input channels (2:4).

Importance is ``|w|``, or the mean ``|w|`` over a block: ``block=k`` (or ``(k, 1)``) prunes
blocks of ``k`` consecutive output channels at one input position together, which is what sparse
kernels vectorised over output channels want; the default is the target's ``sparse_block``
capability, else 1 (unstructured). ``schedule="gradual"`` reaches ``sparsity`` in ``steps``
steps along Zhu & Gupta's (2017) polynomial schedule, each followed by a short recovery training
against the model before the lossy passes (on ``calibration_data``; without it, gradual is
one-shot, and the report says so).

Which layers: ``Conv1d``/``Conv2d`` (1x1 and kxk; depthwise convs are left dense unless
``include_depthwise``) and ``Linear``; the first and the last of them in graph order (the stem and
the classifier) stay dense unless ``prune_first``/``prune_last``; so do layers with fewer than
``min_params`` weights, tied weights, and ``ignore``.

Example:
    >>> import torch, graphopt
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3),
    ...                         torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 1))
    >>> opt = graphopt.optimize(m, [("prune_weights", {"sparsity": 0.75})], example_inputs=(torch.randn(1, 3, 12, 12),))
    >>> conv = opt.graph_module.get_submodule("2")
    >>> float((conv.weight == 0).float().mean()), conv.weight_mask.dtype, conv.weight_sparsity.block
    (0.75, torch.bool, (1, 1))
    >>> graphopt.sparsity.mask_of(opt.graph_module.get_submodule("0")) is None  # the first conv stays dense
    True
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import Option
from graphopt.numerics import flat_outputs
from graphopt.report.text import human
from graphopt.sparsity import SparsityPattern, apply_masks, mask_of, pattern_of, set_mask

SCOPES = ("global", "layer")
SCHEDULES = ("oneshot", "gradual")
DEFAULT_SPARSITY = 0.5
DEFAULT_STEPS = 4
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


# --------------------------------------------------------------------------------------------
# Options: normalized and checked once, before any pass runs and again in the pass
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """The options, resolved: exactly one of sparsity / alpha / n_m is set."""

    sparsity: Optional[float]
    alpha: Optional[float]
    n_m: Optional[Tuple[int, int]]
    scope: str
    block: int
    schedule: str
    steps: int

    @property
    def pattern(self) -> SparsityPattern:
        return SparsityPattern(block=(self.block, 1), n_m=self.n_m)

    def describe(self) -> str:
        if self.n_m is not None:
            return f"{self.n_m[0]}:{self.n_m[1]} (n_m): the {self.n_m[0]} largest of every {self.n_m[1]} input channels kept"
        elif self.alpha is not None:
            how = f"|w| < {self.alpha:g} * max|w| per layer (alpha)"
        else:
            how = f"sparsity {self.sparsity:g}, {self.scope} threshold"
        sched = f", gradual in {self.steps} steps" if self.schedule == "gradual" else ""
        return f"{how}, block ({self.block}, 1){sched}"


def _ints(value, name: str, size: Optional[int] = None) -> Tuple[int, ...]:
    items = value if isinstance(value, (tuple, list)) else (value,)
    try:
        out = tuple(int(v) for v in items)
    except (TypeError, ValueError):
        out = ()
    if not out or (size is not None and len(out) != size) or any(v < 1 for v in out) \
            or any(isinstance(v, float) and v != int(v) for v in items):
        want = f"{size} positive integers" if size else "a positive integer"
        raise graphopt.PassOptionError(f"prune_weights: {name}={value!r} must be {want}")
    return out


def settings(ctx: graphopt.PassContext, sparsity=None, alpha=None, n_m=None, scope=None, block=None,
             schedule="oneshot", steps=None, **_) -> Settings:
    """The options resolved against each other and the target; PassOptionError when they clash."""
    given = [k for k, v in (("sparsity", sparsity), ("alpha", alpha), ("n_m", n_m)) if v is not None]
    if len(given) > 1:
        raise graphopt.PassOptionError(
            f"prune_weights: give one of sparsity (a fraction of the weights), alpha (prune |w| < alpha * "
            f"max|w| per layer) or n_m (keep n of every m), not {' and '.join(given)}")
    if n_m is not None:
        n, m = _ints(n_m, "n_m", 2)
        if n >= m:
            raise graphopt.PassOptionError(f"prune_weights: n_m=({n}, {m}) keeps n of every m weights: n < m "
                                           "(e.g. n_m=(2, 4))")
        n_m = (n, m)
    if alpha is not None and scope == "global":
        raise graphopt.PassOptionError("prune_weights: alpha is a per-layer rule (|w| < alpha * max|w| of the "
                                       "layer): drop scope='global', or give sparsity for a global threshold")
    if block is None:  # N:M is along the input channels: the target's output-channel block does not apply
        block = ctx.capabilities.sparse_block if ctx.capabilities is not None and n_m is None else 1
    else:
        dims = _ints(block, "block")
        if len(dims) > 2 or (len(dims) == 2 and dims[1] != 1):
            raise graphopt.PassOptionError(
                f"prune_weights: block={block!r}: blocks span output channels only: give k or (k, 1)")
        block = dims[0]
    if n_m is not None and block != 1:
        raise graphopt.PassOptionError(f"prune_weights: n_m and block={block} do not combine: N:M groups are "
                                       "along the input channels, blocks along the output channels")
    if schedule == "gradual" and given and sparsity is None:
        raise graphopt.PassOptionError("prune_weights: schedule='gradual' ramps up a sparsity target: give "
                                       f"sparsity, not {given[0]}")
    if steps is not None and schedule != "gradual":
        raise graphopt.PassOptionError("prune_weights: steps is for schedule='gradual'")
    if not given:
        sparsity = DEFAULT_SPARSITY
    return Settings(sparsity, alpha, n_m, scope or "global", block, schedule, steps or DEFAULT_STEPS)


# --------------------------------------------------------------------------------------------
# Which layers
# --------------------------------------------------------------------------------------------

def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.weight.shape[1] == 1


def select_layers(gm: fx.GraphModule, prune_first: bool, prune_last: bool, include_depthwise: bool,
                  min_params: int, ignore=()) -> Tuple[Dict[str, nn.Module], Dict[str, str]]:
    """(layers to prune, {layer left dense: why}), both in graph order."""
    names: List[str] = []
    prune, dense = {}, {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in names or node.target in dense:
            continue
        m = gm.get_submodule(node.target)
        if type(m) in _LAYERS:
            names.append(node.target)
        elif isinstance(m, _LAYERS):
            dense[node.target] = f"a subclass of {next(t for t in _LAYERS if isinstance(m, t)).__name__} " \
                                 "(it may compute something else)"
    tied = graphopt.shared_weights(gm, calls=False)
    for i, name in enumerate(names):
        m = gm.get_submodule(name)
        if name in ignore:
            dense[name] = "in ignore"
        elif name in tied:
            dense[name] = tied[name]
        elif i == 0 and not prune_first:
            dense[name] = "the first layer (prune_first=True prunes it)"
        elif i == len(names) - 1 and not prune_last:
            dense[name] = "the last layer, the classifier (prune_last=True prunes it)"
        elif _is_depthwise(m) and not include_depthwise:
            dense[name] = "depthwise (include_depthwise=True prunes it)"
        elif m.weight.numel() < min_params:
            dense[name] = f"{m.weight.numel()} weights < min_params={min_params}"
        else:
            prune[name] = m
    return prune, dense


def check_layers(layers: Dict[str, nn.Module], s: Settings) -> None:
    """Blocks must tile the output channels and N:M groups the input channels of every layer."""
    if s.block > 1:
        bad = [f"{n} ({m.weight.shape[0]})" for n, m in layers.items() if m.weight.shape[0] % s.block]
        if bad:
            raise graphopt.PassOptionError(
                f"prune_weights: block=({s.block}, 1) does not divide the output channels of {', '.join(bad)}: "
                "choose a block that divides them, or leave these layers dense with ignore=(...)")
    if s.n_m is not None:
        m_ = s.n_m[1]
        bad = [f"{n} ({m.weight.shape[1]})" for n, m in layers.items() if m.weight.shape[1] % m_]
        if bad:
            raise graphopt.PassOptionError(
                f"prune_weights: n_m={s.n_m} groups {m_} input channels, which does not divide those of "
                f"{', '.join(bad)}: leave these layers dense with ignore=(...)")


def validate_options(gm: fx.GraphModule, ctx: graphopt.PassContext, *, ignore=(), prune_first=False,
                     prune_last=False, include_depthwise=False, min_params=0, **options) -> None:
    """Before any pass runs: option clashes, unknown ``ignore`` names, blocks that do not fit."""
    s = settings(ctx, **options)
    graphopt.check_module_names(gm, ignore, "prune_weights: ignore", _LAYERS)
    if s.schedule == "gradual" and ctx.calibration_data:
        graphopt.check_batches(ctx.calibration_data, ctx.example_inputs, "prune_weights: recovery")
    check_layers(select_layers(gm, prune_first, prune_last, include_depthwise, min_params, ignore)[0], s)


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------

def block_scores(w: torch.Tensor, k: int) -> torch.Tensor:
    """Mean |w| over each block of ``k`` output channels: shape ``(out // k, *w.shape[1:])``."""
    a = w.detach().abs().float()
    return a.reshape(a.shape[0] // k, k, *a.shape[1:]).mean(1)


def expand_blocks(keep: torch.Tensor, k: int) -> torch.Tensor:
    """A block mask back to the weight's shape."""
    return keep.repeat_interleave(k, dim=0)


def n_m_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest |w| of every ``m`` consecutive input channels (dim 1)."""
    a = w.detach().abs().movedim(1, -1)
    groups = a.reshape(*a.shape[:-1], a.shape[-1] // m, m)
    top = groups.topk(n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(a.shape).movedim(-1, 1)


def _prune_count(fraction: float, n_blocks: int) -> int:
    """Blocks to prune so that ``fraction`` of the elements go (every block has as many): within
    half a block of the ask."""
    return min(n_blocks, int(math.floor(fraction * n_blocks + 0.5)))


def threshold_masks(layers: Dict[str, nn.Module], s: Settings, fraction: float) -> Dict[str, torch.Tensor]:
    """The masks that prune ``fraction`` (sparsity) or the alpha rule, per layer or globally."""
    k = s.block
    scores = {}
    for name, m in layers.items():
        sc = block_scores(m.weight, k)
        old = mask_of(m)
        if old is not None:  # what is pruned stays pruned, and goes first
            sc = torch.where(old[::k].bool() if k > 1 else old, sc, torch.full_like(sc, -1.0))
        scores[name] = sc
    keep = {}
    if s.alpha is not None:
        for name, m in layers.items():
            keep[name] = scores[name] >= s.alpha * float(m.weight.detach().abs().max())
    elif s.scope == "layer":
        for name, sc in scores.items():
            flat = sc.flatten()
            cut = _prune_count(fraction, flat.numel())
            kept = torch.ones_like(flat, dtype=torch.bool)
            kept[torch.argsort(flat, stable=True)[:cut]] = False
            keep[name] = kept.reshape(sc.shape)
    else:
        flat = torch.cat([sc.flatten() for sc in scores.values()])
        cut = _prune_count(fraction, flat.numel())
        kept = torch.ones_like(flat, dtype=torch.bool)
        kept[torch.argsort(flat, stable=True)[:cut]] = False
        offset = 0
        for name, sc in scores.items():
            keep[name] = kept[offset:offset + sc.numel()].reshape(sc.shape)
            offset += sc.numel()
    return {name: expand_blocks(kp, k) for name, kp in keep.items()}


def zhu_gupta(step: int, steps: int, final: float, initial: float = 0.0) -> float:
    """Sparsity after ``step`` of ``steps``: s_f + (s_i - s_f) (1 - t/n)^3 (Zhu & Gupta, 2017)."""
    return final + (initial - final) * (1 - step / steps) ** 3


# --------------------------------------------------------------------------------------------
# Recovery between gradual steps
# --------------------------------------------------------------------------------------------

def recover(gm: fx.GraphModule, ctx: graphopt.PassContext, epochs: int, lr: float) -> float:
    """Train ``gm`` to match the model before the lossy passes on the calibration batches (MSE
    on the outputs, Adam), in eval mode (BatchNorm statistics and dropout as deployed), masks
    re-applied after every step; the mean loss of the last epoch."""
    teacher = ctx.reference if ctx.reference is not None else ctx.original
    params = [p for p in gm.parameters() if p.requires_grad]
    batches = list(ctx.calibration_data)
    if teacher is None or not params or epochs == 0:
        return math.nan
    with torch.no_grad():
        targets = [[t.detach() for t in flat_outputs(teacher(*b))] for b in batches]
    opt = torch.optim.Adam(params, lr=lr)
    gm.eval()
    total = 0.0
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        gen = torch.Generator().manual_seed(ctx.seed)
        for _ in range(epochs):
            total = 0.0
            for i in torch.randperm(len(batches), generator=gen).tolist():
                outs = flat_outputs(gm(*batches[i]))
                loss = sum(F.mse_loss(o, t) for o, t in zip(outs, targets[i]) if o.is_floating_point())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                apply_masks(gm)
                total += float(loss.detach())
    gm.zero_grad(set_to_none=True)
    return total / len(batches)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def compressed_bytes(mask: torch.Tensor, block: int, value_bytes: int = 4) -> int:
    """Bytes of the weight in BSR with ``(block, 1)`` blocks (CSR for 1): the kept blocks'
    values, an int32 column index per kept block, an int32 row pointer per block row (+1)."""
    rows = mask.shape[0] // block
    kept = int(mask.reshape(rows, block, -1)[:, 0].sum())
    return kept * block * value_bytes + 4 * kept + 4 * (rows + 1)


def _report(ctx, gm, layers: Dict[str, nn.Module], dense: Dict[str, str], s: Settings) -> None:
    ctx.note(f"{len(layers)} layer(s) pruned: {s.describe()}; {len(dense)} left dense")
    zeros = numel = dense_b = packed_b = 0
    for name, m in layers.items():
        w = m.weight
        z = int((w == 0).sum())
        zeros, numel = zeros + z, numel + w.numel()
        dense_b += w.numel() * w.element_size()
        packed_b += compressed_bytes(mask_of(m), pattern_of(m).block[0], w.element_size())
        ctx.note(f"{name} {tuple(w.shape)}: {z / w.numel():.1%} zeros ({z} of {w.numel()})")
    for name, why in dense.items():
        ctx.note(f"{name} {tuple(gm.get_submodule(name).weight.shape)}: kept dense: {why}")
    emptied = [n for n, m in layers.items() if bool((m.weight == 0).float().mean() >= 0.99)]
    if emptied and s.sparsity is not None and s.scope == "global":
        ctx.warn(f"the global threshold left {', '.join(emptied)} with 99% or more of their weights at zero "
                 "(their weights are small next to the other layers'): scope='layer' prunes every layer "
                 "to the same sparsity")
    if not layers:
        ctx.warn("no layer was pruned: " + ("; ".join(f"{n}: {w}" for n, w in dense.items()) or
                                            "the model has no Conv1d/Conv2d/Linear module"))
        return
    params = graphopt.count_params(gm)
    all_zeros = sum(int((p == 0).sum()) for p in gm.parameters())
    ctx.note(f"zeros: {human(zeros)} of {human(numel)} weights of the pruned layers ({zeros / numel:.1%}); "
             f"{human(all_zeros)} of all {human(params)} parameters ({all_zeros / max(params, 1):.1%}); "
             f"nonzero parameters: {params - all_zeros}")
    blocks = {pattern_of(m).block[0] for m in layers.values()}
    fmt = "CSR" if blocks == {1} else f"BSR ({max(blocks)}, 1)" if len(blocks) == 1 else "CSR/BSR"
    ctx.note(f"pruned layers' weights: {human(dense_b, 'B')} dense, {human(packed_b, 'B')} compressed "
             f"({fmt}: fp32 values, int32 indices; an estimate, artifacts still store them dense): "
             f"{packed_b / max(dense_b, 1):.2f}x")


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------

@graphopt.register_pass(
    "prune_weights",
    exact=False,
    description="Magnitude weight pruning (unstructured, (k, 1) blocks or N:M) with masks kept by later passes",
    options={
        "sparsity": Option(None, float, check=lambda v: 0 <= v < 1,
                           help="fraction of the prunable weights to zero, in [0, 1); default 0.5"),
        "alpha": Option(None, float, check=lambda v: 0 < v < 1,
                        help="per layer, prune |w| < alpha * max|w|, alpha in (0, 1); instead of sparsity"),
        "n_m": Option(None, tuple, help="(n, m): keep n of every m consecutive input channels, e.g. 2+4"),
        "scope": Option(None, str, choices=SCOPES, help="sparsity threshold: global (default) or per layer"),
        "block": Option(None, (int, tuple), help="k or (k, 1): prune k output channels together; "
                                                 "default: the target's sparse_block, else 1"),
        "schedule": Option("oneshot", str, choices=SCHEDULES,
                           help="oneshot, or gradual (Zhu & Gupta) with recovery on calibration_data"),
        "steps": Option(None, int, check=lambda v: v >= 1, help="gradual: pruning steps (default 4)"),
        "recovery_epochs": Option(1, int, check=lambda v: v >= 0,
                                  help="gradual: passes over calibration_data after each step (0: none)"),
        "recovery_lr": Option(1e-3, float, check=lambda v: v > 0, help="gradual: Adam learning rate"),
        "prune_first": Option(False, bool, help="prune the first conv/linear layer too (kept dense by default)"),
        "prune_last": Option(False, bool, help="prune the last layer, the classifier, too"),
        "include_depthwise": Option(False, bool, help="prune depthwise convs too"),
        "min_params": Option(256, int, check=lambda v: v >= 0, help="leave layers with fewer weights dense"),
        "ignore": Option((), tuple, help="layers left dense (module names)"),
    },
    runs_after=("fuse_conv_bn", "merge_branches", "prune_channels", "separable_conv"),
    runs_before=("distill", "quantize"),
    validate=validate_options,
)
def prune_weights(gm: fx.GraphModule, ctx: graphopt.PassContext, sparsity, alpha, n_m, scope, block, schedule,
                  steps, recovery_epochs, recovery_lr, prune_first, prune_last, include_depthwise, min_params,
                  ignore):
    """Zero the smallest weights of the prunable layers and mask them (graphopt.sparsity)."""
    s = settings(ctx, sparsity=sparsity, alpha=alpha, n_m=n_m, scope=scope, block=block, schedule=schedule,
                 steps=steps)
    layers, dense = select_layers(gm, prune_first, prune_last, include_depthwise, min_params, ignore)
    check_layers(layers, s)
    if not layers:
        _report(ctx, gm, layers, dense, s)
        return gm
    if s.n_m is not None:
        for name, m in layers.items():
            set_mask(m, n_m_mask(m.weight, *s.n_m), s.pattern)
    elif s.schedule == "oneshot" or not ctx.calibration_data or recovery_epochs == 0:
        if s.schedule == "gradual":
            ctx.note(f"schedule='gradual' without recovery ({'recovery_epochs=0' if ctx.calibration_data else 'no calibration_data'}): "
                     f"the {s.steps} steps would give the one-shot masks, so one step was taken; pass "
                     "calibration_data to recover between steps, or follow with distill")
        for name, mask in threshold_masks(layers, s, s.sparsity or 0.0).items():
            set_mask(layers[name], mask, s.pattern)
    else:
        losses = []
        for t in range(1, s.steps + 1):
            target = zhu_gupta(t, s.steps, s.sparsity)
            for name, mask in threshold_masks(layers, s, target).items():
                set_mask(layers[name], mask, s.pattern)
            losses.append((target, recover(gm, ctx, recovery_epochs, recovery_lr)))
        ctx.note("gradual: sparsity and recovery loss (MSE to the model before the lossy passes) per step: "
                 + ", ".join(f"{t:.1%} {v:.4g}" for t, v in losses)
                 + f"; {recovery_epochs} epoch(s) over {len(ctx.calibration_data)} batch(es), lr {recovery_lr:g}")
    _report(ctx, gm, layers, dense, s)
    return gm
