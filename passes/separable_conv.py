"""Replace standard (and grouped) KxK convolutions by cheaper factorized pairs, initialized by SVD.

``depthwise`` mode (MobileNet's structure applied to a trained model): a KxK depthwise conv
with depth multiplier m, then a 1x1 pointwise conv. For input channel i the original weight
slice W[:, i] (out x K) is approximated by P_i (out x m) @ D_i (m x K); the truncated SVD of
that slice is the best rank-m choice (Eckart-Young), and m = min(out, K) is exact.

``spatial`` mode (AIMET's spatial SVD): a (kh x 1) conv to r channels, then a (1 x kw) conv;
W reshaped to (in*kh) x (out*kw) and truncated to rank r.

Each layer gets the smallest multiplier / rank whose output error on the layer's real inputs
is within ``max_error`` and whose MAC saving is at least ``min_saving``; with a target, the
pair is kept only when it is also faster there.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt import Option

MODES = ("depthwise", "spatial")
_CAPTURE_BATCHES = 4  # enough real activations to measure an output error, cheap to keep


@dataclasses.dataclass
class Factorization:
    """A replacement for one conv and what it costs."""

    modules: Tuple[nn.Module, nn.Module]
    rank: int
    weight_error: float
    output_error: float = math.inf
    macs_before: int = 0
    macs_after: int = 0

    @property
    def saving(self) -> float:
        return 1 - self.macs_after / self.macs_before if self.macs_before else 0.0


def is_factorizable(m: nn.Module) -> bool:
    """A Conv1d/Conv2d with a kernel larger than 1 that is not depthwise (groups < in_channels).

    Grouped convs are factorized group by group: the pointwise conv keeps the groups.
    """
    return isinstance(m, (nn.Conv1d, nn.Conv2d)) and math.prod(m.kernel_size) > 1 \
        and m.groups < m.in_channels and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def full_rank(conv: nn.Module, mode: str) -> int:
    k = math.prod(conv.kernel_size)
    if mode == "depthwise":
        return min(conv.out_channels // conv.groups, k)
    kh, kw = conv.kernel_size
    return min(conv.in_channels * kh, conv.out_channels * kw)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def depthwise_pair(conv: nn.Module, m: int) -> Factorization:
    """Depthwise KxK (multiplier m) + pointwise 1x1 (same groups) from per-input-channel truncated SVDs."""
    w = conv.weight.detach().double()  # (out, in/g, *k)
    g, out_c, in_c, k = conv.groups, conv.out_channels, conv.in_channels, math.prod(w.shape[2:])
    og, ig = out_c // g, in_c // g
    # input channel i = group * ig + local: its slice is the (og x K) block of its group's outputs
    slices = w.reshape(g, og, ig, k).permute(0, 2, 1, 3).reshape(in_c, og, k)
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)
    r = min(m, s.shape[-1])
    root = s[:, :r].sqrt()
    pw = u[:, :, :r] * root[:, None, :]            # (in, og, r)
    dw = vh[:, :r, :] * root[:, :, None]           # (in, r, K)
    if r < m:  # more multiplier than rank: pad with zero filters so the shapes are as asked
        pw = torch.cat([pw, pw.new_zeros(in_c, og, m - r)], 2)
        dw = torch.cat([dw, dw.new_zeros(in_c, m - r, k)], 1)
    conv_t = type(conv)
    depthwise = conv_t(in_c, in_c * m, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                       groups=in_c, bias=False)
    pointwise = conv_t(in_c * m, out_c, 1, groups=g, bias=conv.bias is not None)
    dtype = conv.weight.dtype
    depthwise.weight.data = dw.reshape(in_c * m, 1, *conv.kernel_size).to(dtype)
    pw_weight = pw.reshape(g, ig, og, m).permute(0, 2, 1, 3).reshape(out_c, ig * m)
    pointwise.weight.data = pw_weight.reshape(out_c, ig * m, *([1] * (w.dim() - 2))).to(dtype)
    if conv.bias is not None:
        pointwise.bias.data = conv.bias.detach().clone()
    approx = torch.einsum("iom,imk->iok", pw, dw)
    return Factorization((depthwise, pointwise), m, _relative(approx, slices))


def spatial_pair(conv: nn.Conv2d, r: int) -> Factorization:
    """(kh x 1) conv to r channels, then (1 x kw) conv, from a truncated SVD of W as (in*kh) x (out*kw)."""
    w = conv.weight.detach().double()
    out_c, in_c, kh, kw = w.shape
    mat = w.permute(1, 2, 0, 3).reshape(in_c * kh, out_c * kw)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = min(r, s.shape[0])
    root = s[:r].sqrt()
    a = (u[:, :r] * root).reshape(in_c, kh, r)      # first conv: [r, in, kh, 1]
    b = (vh[:r] * root[:, None]).reshape(r, out_c, kw)  # second conv: [out, r, 1, kw]
    (sh, sw), (ph, pw_), (dh, dw_) = conv.stride, conv.padding, conv.dilation
    vertical = nn.Conv2d(in_c, r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False)
    horizontal = nn.Conv2d(r, out_c, (1, kw), (1, sw), (0, pw_), (1, dw_), bias=conv.bias is not None)
    dtype = conv.weight.dtype
    vertical.weight.data = a.permute(2, 0, 1).unsqueeze(-1).to(dtype)
    horizontal.weight.data = b.permute(1, 0, 2).unsqueeze(2).to(dtype)
    if conv.bias is not None:
        horizontal.bias.data = conv.bias.detach().clone()
    approx = (u[:, :r] * s[:r]) @ vh[:r]
    return Factorization((vertical, horizontal), r, _relative(approx, mat))


def _macs(m: nn.Module, out: torch.Tensor) -> int:
    return out[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def measure(f: Factorization, conv: nn.Module, xs: Sequence[torch.Tensor]) -> Factorization:
    """Output error of the pair on the layer's recorded inputs, and the MACs of both (per sample)."""
    first, second = f.modules
    with torch.no_grad():
        ref = [conv(x) for x in xs]
        mid = [first(x) for x in xs]
        got = [second(h) for h in mid]
    f.output_error = _relative(torch.cat([g.flatten() for g in got]), torch.cat([r.flatten() for r in ref]))
    f.macs_before = _macs(conv, ref[0])
    f.macs_after = _macs(first, mid[0]) + _macs(second, got[0])
    return f


def record_inputs(gm: fx.GraphModule, names: Sequence[str], batches) -> Dict[str, List[torch.Tensor]]:
    """Run the graph on real batches and keep each named layer's inputs."""
    seen: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    hooks = [gm.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen[n].append(args[0].detach())) for n in names]
    try:
        with torch.no_grad():
            for batch in batches[:_CAPTURE_BATCHES]:
                gm(*batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _candidate_ranks(conv: nn.Module, mode: str, multiplier: Optional[int]) -> List[int]:
    if multiplier is not None:
        return [multiplier]
    return list(range(1, full_rank(conv, mode) + 1))


def choose(conv, xs, mode, multiplier, max_error, min_saving) -> Tuple[Optional[Factorization], str]:
    """The cheapest factorization within the error budget, or None and why not."""
    build = depthwise_pair if mode == "depthwise" else spatial_pair
    best_err = math.inf
    for rank in _candidate_ranks(conv, mode, multiplier):
        f = measure(build(conv, rank), conv, xs)
        if f.saving < min_saving:
            return None, (f"saving {f.saving:.0%} < min_saving {min_saving:.0%} at rank {rank}"
                          + (f" (best error below that rank {best_err:.3f} > max_error {max_error})"
                             if best_err < math.inf else ""))
        if f.output_error <= max_error:
            return f, ""
        best_err = min(best_err, f.output_error)
    return None, f"output error {best_err:.3f} > max_error {max_error} at every rank tried"


def faster_on_target(caps: graphopt.TargetCapabilities, conv, f: Factorization, x: torch.Tensor) -> Tuple[bool, str]:
    """Time the original layer and the pair on the target, alone, on one real input."""
    sample = (x[:1],)
    before = caps.measure_latency(fx.symbolic_trace(nn.Sequential(conv)), sample)
    after = caps.measure_latency(fx.symbolic_trace(nn.Sequential(*f.modules)), sample)
    return after < before, f"{before:.3g} ms -> {after:.3g} ms on {caps.name}"


def _validate_names(gm: fx.GraphModule, names: Sequence[str], option: str, need_standard: bool) -> None:
    modules = dict(gm.named_modules())
    for n in names:
        if n not in modules:
            convs = [k for k, v in modules.items() if is_factorizable(v)]
            raise graphopt.PassOptionError(
                f"separable_conv: {option} names {n!r}, which is not a module of this model. "
                f"Factorizable convs here: {', '.join(convs) or 'none'}")
        if need_standard and not is_factorizable(modules[n]):
            m = modules[n]
            why = (f"groups={m.groups}, kernel {tuple(m.kernel_size)}" if isinstance(m, nn.modules.conv._ConvNd)
                   else f"a {type(m).__name__}")
            raise graphopt.PassOptionError(
                f"separable_conv: layer {n!r} is not a standard convolution ({why}); only Conv1d/Conv2d "
                "that are not depthwise, with a kernel larger than 1 and zero padding, can be factorized")


def validate_options(gm: fx.GraphModule, ctx, layers=(), ignore=(), **_) -> None:
    """Layer names must exist, and ``layers`` must be factorizable convs (checked before any pass runs)."""
    _validate_names(gm, layers, "layers", need_standard=True)
    _validate_names(gm, ignore, "ignore", need_standard=False)


@graphopt.register_pass(
    "separable_conv",
    exact=False,
    description="Replace KxK convs by depthwise+pointwise (or spatial SVD) pairs, SVD-initialized",
    options={
        "mode": Option("depthwise", str, choices=MODES, help="depthwise+pointwise, or kx1 then 1xk"),
        "multiplier": Option(None, int, check=lambda v: v >= 1,
                             help="depth multiplier (depthwise) or rank (spatial) >= 1; None: smallest that fits max_error"),
        "max_error": Option(0.5, float, check=lambda v: v > 0,
                            help="largest relative output error per layer, on its real inputs"),
        "min_saving": Option(0.2, float, check=lambda v: 0 <= v < 1, help="smallest MAC saving per layer, in [0, 1)"),
        "layers": Option((), tuple, help="only these conv modules (default: every standard conv)"),
        "ignore": Option((), tuple, help="conv modules to leave alone"),
        "measure": Option(True, bool, help="with a target: keep a pair only if it is faster there"),
    },
    runs_after=("fuse_conv_bn", "prune_channels"),
    runs_before=("quantize", "distill"),
    validate=validate_options,
)
def separable_conv(gm, ctx, mode, multiplier, max_error, min_saving, layers, ignore, measure):
    """Factorize every standard conv that fits the error budget and saves enough MACs."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and is_factorizable(gm.get_submodule(n.target))]
    if mode == "spatial":
        def spatial_ok(m):
            return isinstance(m, nn.Conv2d) and m.groups == 1 and min(m.kernel_size) > 1
        for n in [n for n in nodes if not spatial_ok(gm.get_submodule(n.target))]:
            ctx.note(f"{n.target} skipped: spatial mode needs a Conv2d with groups=1 and a kxk kernel, k > 1")
        nodes = [n for n in nodes if spatial_ok(gm.get_submodule(n.target))]
    if layers:
        nodes = [n for n in nodes if n.target in layers]
    for n in [n for n in nodes if n.target in ignore]:
        ctx.note(f"{n.target} skipped: in ignore")
    nodes = [n for n in nodes if n.target not in ignore]
    if sum(1 for n in gm.graph.nodes if n.op == "call_module") and not nodes:
        ctx.note("no convolution to factorize (kernel > 1, not depthwise)")
    inputs = record_inputs(gm, [n.target for n in nodes], ctx.data_batches())
    shared = graphopt.shared_weights(gm)
    for node in nodes:
        conv = gm.get_submodule(node.target)
        if node.target in shared:
            ctx.note(f"{node.target} skipped: {shared[node.target]}")
            continue
        f, why = choose(conv, inputs[node.target], mode, multiplier, max_error, min_saving)
        if f is None:
            ctx.note(f"{node.target} skipped: {why}")
            continue
        timing = ""
        caps = ctx.capabilities
        if measure and caps is not None and caps.can_measure_latency:
            faster, timing = faster_on_target(caps, conv, f, inputs[node.target][0])
            if not faster:
                ctx.note(f"{node.target} kept as is: the pair is not faster ({timing})")
                continue
            timing = f", {timing}"
        _replace(gm, node, f.modules)
        ctx.note(f"{node.target}: {mode} rank {f.rank}, weight error {f.weight_error:.3f}, "
                 f"output error {f.output_error:.3f}, MACs {f.macs_before} -> {f.macs_after} "
                 f"(-{f.saving:.0%}){timing}")
    gm.delete_all_unused_submodules()
    return gm


def _replace(gm: fx.GraphModule, node: fx.Node, pair: Tuple[nn.Module, nn.Module]) -> None:
    first, second = (f"{node.target}_{s}" for s in ("dw", "pw"))
    gm.add_submodule(first, pair[0])
    gm.add_submodule(second, pair[1])
    with gm.graph.inserting_after(node):
        a = gm.graph.call_module(first, node.args, node.kwargs)
    with gm.graph.inserting_after(a):
        b = gm.graph.call_module(second, (a,))
    node.replace_all_uses_with(b)
    gm.graph.erase_node(node)
