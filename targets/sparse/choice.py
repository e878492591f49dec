"""Sparse or dense, per masked layer: timed on the target once, remembered by shape and pattern.

A layer runs sparse only where graphopt's sparse kernel was measured faster than graphopt's
dense build of the same layer on the target (the way ``separable_conv`` times layers): both
variants of the layer alone are lowered, built through the same pipeline and timed with the
runtime thread count. The dense one is built as the model will be: untuned (TVM's default
schedules) when the compile is, else tuned with up to :data:`LAYER_TRIALS` trials through the
target's tuning cache (the whole model's tuning then finds those records: the same task).
The sparse kernels are pre-scheduled (no tuning). The decision is cached per process by
target, tuning budget and :meth:`~.lowering.LayerSpec.key` (kind, input and weight shapes,
block, kept blocks), so the report's per-pass latency builds and a second compile cost nothing;
the dense time by shape alone (MobileNetV2's blocks repeat shapes with different zeros). Under qemu nothing is
timed (emulated timings mean nothing) and every layer stays dense, with that reason.

A layer faster alone can still make the model slower (x86 runs convolutions in blocked
``NCHW16c`` layouts: a sparse layer in NCHW costs a layout conversion on each side, and the
bias/activation it no longer fuses), so :func:`check_whole_model` then builds the whole model
dense too (and, where convs run blocked, with the same sparse layers in NCHW: no conversions),
times them, and keeps the fastest, saying so in every layer's record.

Example:
    >>> import graphopt
    >>> decide = policy_for(graphopt.get_target("arm-rpi4"))  # emulated on this x86 host
    >>> decide(None)[0], decide(None)[3].split(":")[0]
    (False, 'arm-rpi4 runs under qemu emulation here')
"""
from __future__ import annotations

import copy
import logging
from typing import Dict, Optional, Tuple

from .lowering import LayerSpec, Policy, SparsePlan

__all__ = ["LAYER_TRIALS", "MARGIN", "check_whole_model", "clear_decisions", "plan_for", "policy_for", "time_layer"]

log = logging.getLogger("graphopt.targets")

#: sparse must take at most this fraction of the dense time (a tie is noise: dense is the default)
MARGIN = 0.95
#: the most trials the dense variant of one layer is tuned with (a 1x1 conv or linear is one task)
LAYER_TRIALS = 64
REPEAT, WARMUP = 10, 2

_DECISIONS: Dict[Tuple, Tuple[bool, Optional[float], Optional[float], str]] = {}
_DENSE_MS: Dict[Tuple, float] = {}  # by shape alone: layers of one shape and different zeros share it


def clear_decisions() -> None:
    """Forget the cached decisions (tests, or a machine that became quiet)."""
    _DECISIONS.clear()
    _DENSE_MS.clear()


def forced(sparse: bool) -> Policy:
    """A policy that does not time: every eligible layer sparse (or dense)."""
    return lambda spec: (sparse, None, None, "forced " + ("sparse" if sparse else "dense"))


def time_layer(target, spec: LayerSpec, sparse: bool, *, repeat: int = REPEAT, tune_trials: int = 0) -> float:
    """Median ms of ``spec``'s layer alone, built for ``target`` with the sparse or dense kernel
    (the dense one tuned with ``tune_trials``, through the target's cache)."""
    import torch
    import torch.fx as fx

    from ..lowering import lower

    gm = fx.symbolic_trace(torch.nn.Sequential(copy.deepcopy(spec.module)).eval())
    x = torch.randn(spec.input_shape)
    plan = SparsePlan(forced(sparse), lanes=target.preferred_channel_multiple, threads=target.runtime_threads)
    lowered = lower(gm, (x,), sparse=plan)
    prepared, database, info = target.tune(lowered, 0 if sparse else tune_trials, log=log)
    with target.build(lowered, prepared, database, tuning=info, log=log) as compiled:
        return compiled.benchmark(repeat=repeat, warmup=WARMUP).median_ms


def policy_for(target, tune_trials: Optional[int] = None) -> Policy:
    """The timing policy for ``target`` (module docstring): dense timed tuned when ``tune_trials``."""
    trials = min(int(tune_trials or 0), LAYER_TRIALS)
    dense_kind = f"tuned dense ({trials} trials)" if trials else "untuned dense"

    def decide(spec: LayerSpec):
        if target.emulated:
            return False, None, None, (f"{target.name} runs under qemu emulation here: its timings mean "
                                       "nothing, so the dense kernel is kept")
        key = (target.cache_key(), trials, spec.key())
        if key not in _DECISIONS:
            dense_key = (target.cache_key(), trials, spec.kind, spec.input_shape, spec.weight_shape)
            if dense_key not in _DENSE_MS:  # the dense kernel's time does not depend on the zeros
                _DENSE_MS[dense_key] = time_layer(target, spec, sparse=False, tune_trials=trials)
            dense_ms = _DENSE_MS[dense_key]
            sparse_ms = time_layer(target, spec, sparse=True)
            faster = sparse_ms <= MARGIN * dense_ms
            ratio = dense_ms / sparse_ms if sparse_ms > 0 else float("inf")
            why = (f"sparse {sparse_ms:.3f} ms vs {dense_kind} {dense_ms:.3f} ms ({ratio:.2f}x)"
                   + ("" if faster else f": not {1 / MARGIN:.2f}x faster, dense kept"))
            _DECISIONS[key] = (faster, dense_ms, sparse_ms, why)
            log.info("%s: layer %s %s", target.name, spec.name, why)
        return _DECISIONS[key]

    return decide


def plan_for(target, tune_trials: Optional[int] = None) -> SparsePlan:
    """What ``Target.lower`` hands the lowering."""
    return SparsePlan(policy_for(target, tune_trials), lanes=target.preferred_channel_multiple,
                      threads=target.runtime_threads)


def check_whole_model(target, gm, example_inputs, compiled, *, tune_trials=None, progress=None, log=log):
    """The fastest of ``compiled`` and the whole model built dense (same tuning budget) and, on
    a target with blocked conv layouts, with the same sparse layers in NCHW (no conversions
    around them). ``compiled`` alone when it runs no layer sparse. Every masked layer's record
    says which was kept and the three timings."""
    from ..lowering import lower

    layers = list(compiled.manifest.get("sparse_layers") or [])
    chosen = {r["name"] for r in layers if r["kernel"] == "sparse"}
    if not chosen or target.emulated:
        return compiled

    def build(tgt, policy):
        plan = SparsePlan(policy, lanes=tgt.preferred_channel_multiple, threads=tgt.runtime_threads)
        lowered = lower(gm, tuple(example_inputs), sparse=plan)
        prepared, database, info = tgt.tune(lowered, tune_trials or 0, progress=progress, log=log)
        return tgt.build(lowered, prepared, database, tuning=info, log=log)

    variants = {"sparse": compiled, "dense": build(target, forced(False))}
    if target.layout_block:
        variants["sparse, NCHW"] = build(target.replace(layout_block=0),
                                         lambda spec: (spec.name in chosen, None, None, "chosen alone"))
    ms = {k: float("inf") for k in variants}
    for _ in range(3):  # alternate, so that a burst of load hits every variant
        for k, v in variants.items():
            ms[k] = min(ms[k], v.benchmark(repeat=REPEAT, warmup=WARMUP).median_ms)
    best = min(ms, key=ms.get)
    if best != "dense" and ms[best] > MARGIN * ms["dense"]:
        best = "dense"  # a tie is noise: dense is the default
    where = " (NCHW16c)" if target.layout_block else ""
    verdict = "whole model: " + ", ".join(
        f"{ms[k]:.3f} ms {'with the sparse layers' + where if k == 'sparse' else 'with them in NCHW' if k != 'dense' else 'all dense'}"
        for k in variants) + f": {'the dense build' if best == 'dense' else 'the ' + best + ' build'} is kept"
    records = []
    for r in layers:
        r = dict(r)
        if r["name"] in chosen:
            r["reason"] += "; " + verdict
            if best == "dense":
                r["kernel"], r["stored_bytes"] = "dense", r["dense_bytes"]
        records.append(r)
    log.info("%s: %s", target.name, verdict)
    for k, v in variants.items():
        if k != best:
            v.close()
    variants[best].set_sparse_layers(records)
    return variants[best]
