"""Post-training int8 quantization: calibrate, then rewrite layers into graphopt's integer ops.

The pass

1. finds the quantizable layers (Conv1d/Conv2d, Linear, their functional forms, matmul of two
   activations) and folds a following ReLU/ReLU6 into each (``quant/graph.py``);
2. puts an observer on every activation those layers read or write, and runs the calibration
   batches through the graph (with a progress bar);
3. rewrites: weights become int8 (symmetric, per output channel by default), activations
   uint8/int8 per tensor with a zero point, bias int32; each layer becomes one quantized op
   (``torch.ops.graphopt.q8_conv`` / ``q8_linear`` / ``q8_matmul``) with ``q8_quantize`` /
   ``q8_dequantize`` only where the integer domain meets float ops;
4. with ``max_drop`` and an ``eval_fn``: if the accuracy drop is over budget, measures each
   layer's sensitivity (accuracy regained by keeping it alone in float) and keeps the most
   sensitive layers in float, one by one, until the budget holds.

The result runs in PyTorch with exact integer arithmetic, so its accuracy is the compiled int8
model's (see docs/quantization.md); the Relax lowering turns each op into int8 x int8 -> int32
compute. Run ``fuse_conv_bn`` first: a BatchNorm left after a conv stays float. A layer pruned
by ``prune_weights`` keeps its mask (:mod:`graphopt.sparsity`) on its quantized form: symmetric
weight quantization maps 0 to 0, so its pruned weights stay exactly zero in int8.

Example:
    >>> import torch, graphopt
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                         torch.nn.Linear(8 * 6 * 6, 4)).eval()
    >>> data = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    >>> opt = graphopt.optimize(m, ["quantize"], calibration_data=data, progress=False)
    >>> opt.report["quantize"].status
    'applied'
    >>> [type(mod).__name__ for mod in opt.graph_module.children()]
    ['QuantizedConv', 'Flatten', 'QuantizedLinear']
"""
from __future__ import annotations

from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence

import torch
import torch.fx as fx

import graphopt
from graphopt import Option

from .quant import graph as qgraph
from .quant.observers import OBSERVERS, AllZeroError, CalibrationError, QParams, make_observer

__all__ = ["ACTIVATION_DTYPES", "CalibrationError", "quantize"]

ACTIVATION_DTYPES = ("auto", "uint8", "int8")
_DTYPES = {"uint8": torch.uint8, "int8": torch.int8}


def activation_dtype_for(choice: str, ctx: graphopt.PassContext) -> torch.dtype:
    """``auto``: what the target's int8 kernels take (its ``activation_dtype`` capability: uint8
    on x86, where VNNI multiplies uint8 by int8, int8 on AArch64, where ``sdot`` multiplies int8
    by int8); uint8 without a target."""
    if choice != "auto":
        return _DTYPES[choice]
    caps = ctx.capabilities
    return _DTYPES[caps.activation_dtype] if caps is not None else torch.uint8


def _validate(gm: fx.GraphModule, ctx: graphopt.PassContext, *, skip, max_drop, **_) -> None:
    """Before any pass runs: data shapes, skip patterns, and max_drop's need for eval_fn."""
    ctx.require(("calibration_data",), "pass 'quantize'")
    graphopt.check_batches(ctx.calibration_data, ctx.example_inputs, "quantize: calibration")
    if max_drop is not None and ctx.eval_fn is None:
        raise graphopt.MissingInputError(
            "quantize: max_drop needs an eval_fn to measure accuracy: pass eval_fn=lambda model: accuracy(model), "
            "or drop max_drop")
    if skip:
        names = [s.name for s in qgraph.plan(gm).sites]
        unmatched = [p for p in skip if not qgraph.select(qgraph.plan(gm).sites, [p])]
        if unmatched:
            raise graphopt.PassOptionError(
                f"quantize: skip={list(skip)}: {', '.join(map(repr, unmatched))} match(es) no quantizable layer. "
                f"Quantizable layers: {', '.join(names) or '(none)'} (glob patterns such as 'block1.*' work)")


@graphopt.register_pass(
    "quantize",
    exact=False,
    description="int8 post-training quantization: calibrated observers, integer conv/linear/matmul ops",
    options={
        "observer": Option("minmax", str, choices=tuple(OBSERVERS),
                           help="activation range: minmax, moving_average, percentile (histogram) or mse"),
        "per_channel": Option(True, bool, help="one weight scale per output channel (else one per layer)"),
        "activation_dtype": Option("auto", str, choices=ACTIVATION_DTYPES,
                                   help="uint8 or int8 activations; auto: uint8 on x86, int8 on ARM"),
        "skip": Option((), tuple, help="layer names or glob patterns kept in float (CLI: a+b)"),
        "first_last_fp32": Option(False, bool, help="keep the first and the last quantizable layer in float"),
        "max_drop": Option(None, float, check=lambda v: v >= 0,
                           help="accuracy budget (eval_fn units): keep the most sensitive layers in float "
                                "until the drop is at most this"),
        "percentile": Option(99.99, float, check=lambda v: 50 < v <= 100,
                             help="percentile observer: % of values kept inside the range on each side"),
        "num_batches": Option(None, int, check=lambda v: v > 0,
                              help="use only the first N calibration batches (default: all)"),
    },
    tolerance=0.5,
    needs=("calibration_data",),
    runs_after=("fuse_conv_bn", "prune_channels", "prune_weights", "separable_conv"),
    validate=_validate,
)
def quantize(gm: fx.GraphModule, ctx: graphopt.PassContext, *, observer: str, per_channel: bool,
             activation_dtype: str, skip: Sequence[str], first_last_fp32: bool, max_drop: Optional[float],
             percentile: float, num_batches: Optional[int]) -> fx.GraphModule:
    """Calibrate, then replace every quantizable layer (not kept in float) by integer compute."""
    dtype = activation_dtype_for(activation_dtype, ctx)
    if qgraph.freeze_dtype_reads(gm):  # a cast to a layer's weight dtype must stay a float cast
        ctx.note("dtype reads (x.dtype) fixed to the float graph's dtypes: quantized layers hold int8 weights")
    p = qgraph.plan(gm)
    for message in p.skipped:
        ctx.note(message)
    _note_unfused_batchnorm(gm, p, ctx)
    keep_float = {s.name: "skip" for s in qgraph.select(p.sites, skip)}
    if first_last_fp32 and p.sites:
        for s in (p.sites[0], p.sites[-1]):
            keep_float.setdefault(s.name, "first_last_fp32")
    for name, why in keep_float.items():
        ctx.note(f"{name} stays float ({why})")
    candidates = [s for s in p.sites if s.name not in keep_float]
    if not candidates:
        ctx.note("nothing to quantize: no conv, linear or matmul layer left after skip/first_last_fp32")
        return gm

    batches = list(ctx.calibration_data)[:num_batches] if num_batches else list(ctx.calibration_data)
    observers = calibrate(gm, qgraph.Plan(candidates, []), batches, observer, ctx, percentile=percentile)
    nodes = {n.name: n for n in gm.graph.nodes}
    cache: Dict[str, QParams] = {}

    def qparams(v: fx.Node) -> QParams:
        if v.name not in cache:
            cache[v.name] = observers[v.name].qparams(dtype)
        return cache[v.name]

    for name in observers:  # every observed value must be quantizable, before anything is built
        qparams(nodes[name])

    def build(float_sites: Iterable[str]) -> fx.GraphModule:
        return qgraph.convert(gm, p, qparams, set(keep_float) | set(float_sites), per_channel)

    float_for_accuracy: List[str] = []
    if max_drop is not None:
        float_for_accuracy = mixed_precision(gm, candidates, build, max_drop, ctx)
    result = build(float_for_accuracy)
    n_int = len(candidates) - len(float_for_accuracy)
    kinds = {k: sum(1 for s in candidates if s.kind == k and s.name not in float_for_accuracy)
             for k in ("conv", "linear", "matmul")}
    ctx.note(f"{n_int} layer(s) int8 ({', '.join(f'{v} {k}' for k, v in kinds.items() if v)}): weights int8 "
             f"{'per-channel' if per_channel else 'per-tensor'} symmetric, activations "
             f"{str(dtype).replace('torch.', '')} per-tensor, observer {observer}, {len(batches)} calibration "
             f"batch(es); {sum(1 for s in candidates if s.act_kind)} activation(s) folded into the clip")
    return result


def _note_unfused_batchnorm(gm: fx.GraphModule, p: qgraph.Plan, ctx) -> None:
    bn = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
    for s in p.sites:
        users = list(s.node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(gm.get_submodule(users[0].target), bn):
            ctx.note(f"{s.name} is followed by BatchNorm {users[0].target}, which stays float: "
                     "run fuse_conv_bn before quantize")


def calibrate(gm: fx.GraphModule, p: qgraph.Plan, batches, kind: str, ctx: graphopt.PassContext,
              **observer_args) -> Dict[str, "qgraph.Observer"]:
    """Run ``batches`` through ``gm`` with observers on the values ``p`` reads and writes.

    Raises:
        CalibrationError: a value was NaN/Inf, the data was all zero, or the model failed on a
            batch; the message names the value and says what to do. Other values that were 0 on
            every batch are given a unit range (exact for zeros), with a warning.
    """
    values = p.observed_values()
    observed, observers = qgraph.insert_observers(
        gm, values, lambda where: make_observer(kind, where, **observer_args))
    bar = ctx.progress(batches, desc="quantize: calibrating", unit="batch", total=len(batches))
    with torch.no_grad():
        for i, batch in enumerate(bar):
            try:
                observed(*batch)
            except CalibrationError:
                raise
            except Exception as e:  # the user's model may raise anything on a bad batch
                raise CalibrationError(f"the model failed on calibration batch {i}: {type(e).__name__}: {e}") from e
    problems, zeros = [], []
    for name, obs in observers.items():
        try:
            obs.check()
        except AllZeroError as e:
            zeros.append((name, e))
        except CalibrationError as e:
            problems.append(str(e))
    inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    if zeros and (len(zeros) == len(observers) or any(name in inputs for name, _ in zeros)):
        problems += [str(e) for _, e in zeros]  # the data itself is zeros: the caller's to fix
    elif zeros:
        for name, _ in zeros:  # e.g. a branch whose last BatchNorm scale is 0 (timm's ResNets)
            observers[name].assume_range(0.0, 1.0)
        ctx.warn(f"{len(zeros)} value(s) were exactly 0 on every calibration batch "
                 f"({', '.join(observers[name].where for name, _ in zeros[:3])}{', ...' if len(zeros) > 3 else ''}): "
                 "quantized over [0, 1], exact for those zeros; if real data makes them nonzero, "
                 "calibrate with such data or keep the layers in float with skip=[...]")
    if problems:
        raise CalibrationError("cannot quantize: " + " | ".join(problems))
    return observers


def mixed_precision(gm: fx.GraphModule, candidates: Sequence["qgraph.Site"],
                    build: Callable[[Iterable[str]], fx.GraphModule], max_drop: float,
                    ctx: graphopt.PassContext) -> List[str]:
    """The layers to keep in float so that ``eval_fn`` drops by at most ``max_drop``.

    Sensitivity of a layer = accuracy with only that layer in float minus accuracy with every
    layer int8. The most sensitive layers go back to float one at a time until the budget holds.
    """
    evaluate = ctx.eval_fn
    scores: Dict[FrozenSet[str], float] = {}

    def accuracy(float_sites: FrozenSet[str]) -> float:
        if float_sites not in scores:
            scores[float_sites] = float(evaluate(build(float_sites)))
        return scores[float_sites]

    reference = float(evaluate(gm))
    full = accuracy(frozenset())
    if reference - full <= max_drop:
        ctx.note(f"accuracy {reference:.4f} -> {full:.4f} with every layer int8 "
                 f"(drop {reference - full:.4f} <= max_drop {max_drop:g})")
        return []
    sensitivity = {}
    for s in ctx.progress(candidates, desc="quantize: sensitivity", unit="layer"):
        sensitivity[s.name] = accuracy(frozenset([s.name])) - full
    ranked = sorted(sensitivity, key=lambda n: (-sensitivity[n], n))
    ctx.note("sensitivity (accuracy regained keeping one layer float): "
             + ", ".join(f"{n} {sensitivity[n]:+.4f}" for n in ranked))
    kept: List[str] = []
    for name in ranked:
        kept.append(name)
        acc = accuracy(frozenset(kept))
        if reference - acc <= max_drop:
            break
    ctx.note(f"kept in float for accuracy: {', '.join(kept)}; accuracy {reference:.4f} -> "
             f"{accuracy(frozenset(kept)):.4f} (int8 everywhere: {full:.4f}, max_drop {max_drop:g})")
    return kept
