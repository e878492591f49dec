"""``graphopt.optimize``: the one entry point: capture, passes, report, and optionally compile."""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx

from .batches import as_batches
from .capture import capture, normalize_inputs
from .context import PassContext, default_progress, no_progress
from .arguments import (
    check_concrete_args, check_eval_fn, check_example_inputs, check_leaf_modules, check_model, check_passes,
    check_positive, check_tolerances, check_tune_trials,
)
from .errors import InvalidArgumentError, MissingInputError
from .manager import PassInstrument, PassManager
from .pass_registry import PassItem
from .report.instrument import ReportInstrument
from .report.record import Report
from .target_registry import get_target

log = logging.getLogger("graphopt")

#: Passes run when the caller names none: exact ones only, so accuracy cannot change.
DEFAULT_PASSES: Tuple[str, ...] = ("fuse_conv_bn", "dce")


class OptimizedModel:
    """The result of ``optimize``: the optimized graph, its report, and the compiled artifact.

    Calling it runs the compiled model when there is one (same input and output kinds as the
    original), else the optimized GraphModule.
    """

    def __init__(self, graph_module: fx.GraphModule, report: Report, compiled: Any = None):
        self.graph_module = graph_module
        self.report = report
        self.compiled = compiled

    def __call__(self, *inputs):
        if self.compiled is not None:
            return self.compiled(*inputs)
        with torch.no_grad():
            return self.graph_module(*inputs)

    def __repr__(self) -> str:
        target = self.report.target or "torch"
        return f"<OptimizedModel {self.report.model} [{', '.join(r.name for r in self.report.records)}] on {target}>"


class ProgressInstrument(PassInstrument):
    """One progress bar over the pipeline, showing the pass that is running."""

    def __init__(self, total: int, bar_factory):
        self.total, self.bar_factory, self.bar = total, bar_factory, None

    def enter_pipeline(self, gm, ctx):
        self.bar = self.bar_factory(total=self.total, desc="graphopt passes", unit="pass")

    def run_before_pass(self, step, gm, ctx):
        self.bar.set_postfix_str(step.spec.name)

    def run_after_pass(self, result, ctx):
        self.bar.update(1)

    def exit_pipeline(self, gm, ctx):
        self.bar.close()


def latency_schedules(tune_trials: Optional[int]) -> str:
    """What the report's latencies were timed with, said next to them."""
    if tune_trials:
        return (f"tuned: every graph timed after tuning with tune_trials={tune_trials} and the shared "
                "tuning cache, as the artifact was built; median of the runs, noise band p90 - p10")
    return ("untuned: TVM's default schedules for float layers and graphopt's pre-scheduled int8 "
            "kernels, as the artifact was built (float and int8 timings do not compare: pass "
            "tune_trials to time every pass tuned); median of the runs, noise band p90 - p10")


def optimize(
    model: torch.nn.Module,
    passes: Optional[Sequence[PassItem]] = None,
    target: Union[str, Any, None] = None,
    *,
    example_inputs: Any = None,
    calibration_data: Optional[Iterable[Any]] = None,
    eval_fn: Optional[Callable[[Any], float]] = None,
    tune_trials: Optional[int] = None,
    on_error: str = "rollback",
    leaf_modules: Sequence[Union[str, type]] = (),
    concrete_args: Optional[Dict[str, Any]] = None,
    tolerances: Optional[Dict[str, float]] = None,
    exact_tolerance: float = 1e-4,
    measure_latency: Optional[bool] = None,
    progress: bool = True,
    seed: int = 0,
) -> OptimizedModel:
    """Capture ``model``, run ``passes`` with checks and a diff report, and compile for ``target``.

    Args:
        model: any traceable ``nn.Module``; it is copied, never modified.
        passes: names, ``(name, {options})`` pairs or pass functions; None runs the exact
            ``DEFAULT_PASSES``.
        target: a target name (see ``graphopt.list_targets()``) or Target; None: no compile.
        example_inputs: a tensor or tuple of tensors; defaults to the first calibration batch.
        calibration_data: iterable of batches (tensor, or tuple of tensors), any batch size.
        eval_fn: ``eval_fn(model) -> float`` (e.g. accuracy), reported before/after each pass.
        tune_trials: MetaSchedule trials for the target (None or 0: default schedules).
        on_error: "rollback", "stop" or "raise" (see PassManager).
        leaf_modules, concrete_args: tracing controls (see the CaptureError message).
        tolerances: per-pass relative error tolerances, overriding the declared ones.
        measure_latency: time every applied pass on the target (default: when a target is given),
            with the schedules the artifact gets: with ``tune_trials``, each new graph is tuned
            through the shared cache first (layers tuned before are not tuned again).

    Example:
        >>> import torch, graphopt
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8).eval(), torch.nn.ReLU())
        >>> opt = graphopt.optimize(m, example_inputs=(torch.randn(1, 3, 16, 16),))
        >>> [r.status for r in opt.report.records]
        ['applied', 'no-op']
    """
    # every argument is checked here, before the (possibly slow) capture, passes and compile
    check_model(model)
    pipeline = check_passes(DEFAULT_PASSES if passes is None else passes)
    tgt = get_target(target) if target is not None else None
    if callable(getattr(tgt, "check", None)):
        tgt.check()  # a missing toolchain or an unknown CPU: said now, not after the passes
    check_tune_trials(tune_trials, tgt is not None)
    exact_tolerance = check_positive("exact_tolerance", exact_tolerance)
    eval_fn = check_eval_fn(eval_fn)
    leaf_modules = check_leaf_modules(model, leaf_modules)
    concrete_args = check_concrete_args(model, concrete_args)
    for name, value in (("measure_latency", measure_latency), ("progress", progress)):
        if value is not None and not isinstance(value, bool):
            raise InvalidArgumentError(f"{name} must be True or False, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgumentError(f"seed must be an int, got {seed!r}")
    if example_inputs is None and calibration_data is None:
        raise MissingInputError(
            "optimize needs example_inputs to trace the model, propagate shapes and check numerics: "
            "pass example_inputs=(torch.randn(1, 3, 224, 224),) shaped like the model's inputs")
    example = normalize_inputs(example_inputs) if example_inputs is not None else None
    batches = as_batches(calibration_data, example)  # copies: the caller's tensors stay as they are
    example = tuple(t.detach().clone() for t in (example if example is not None else batches[0]))
    check_example_inputs(example)
    bar = default_progress if progress else no_progress
    ctx = PassContext(example_inputs=example, calibration_data=batches, eval_fn=eval_fn, target=tgt,
                      seed=seed, logger=log, progress=bar)
    manager = PassManager(pipeline, on_error=on_error, exact_tolerance=exact_tolerance, log=log)
    manager.tolerances = check_tolerances(tolerances, [step.spec.name for step in manager.steps])
    reporter = ReportInstrument(type(model).__name__, ctx.capabilities.name if tgt is not None else None)
    manager.instruments += [reporter, ProgressInstrument(len(manager.steps), bar)]
    manager.check_needs(ctx)
    gm = capture(model, example, leaf_modules=leaf_modules, concrete_args=concrete_args)
    if callable(getattr(tgt, "check_graph", None)):
        tgt.check_graph(gm, example)  # an op it cannot lower or a non-tensor output: now, not after the passes
    caps = ctx.capabilities
    if caps is not None and (measure_latency or measure_latency is None):
        if caps.can_measure_latency:
            # timed with the schedules the artifact gets: tuned through the shared cache, or untuned
            reporter.latency_fn = lambda g: caps.time(g, example, tune_trials)
            reporter.latency_schedules = latency_schedules(tune_trials)
        elif measure_latency and caps.emulated:  # qemu timings say nothing about the device
            log.warning("%s runs under qemu emulation here: per-pass latency is not measured; give the "
                        "target rpc= or tracker= to time passes on a real device", caps.name)
        elif measure_latency:
            log.warning("target %s cannot measure latency (it has no measure_latency method): "
                        "per-pass latency is not measured", caps.name)
    final = manager.run(gm, ctx)
    compiled = None
    if tgt is not None:
        compiled = tgt.compile(final, example, tune_trials=tune_trials, progress=bar, log=log)
        reporter.report.compile = getattr(compiled, "summary", lambda: None)()
    return OptimizedModel(final, reporter.report, compiled)
