"""The pass manager: order, run copy-on-write, check, roll back, and tell the instruments.

Every pass gets its own deep copy of the graph. After it runs the manager lints, recompiles
and re-propagates shapes, compares outputs with the graph before the pass and with the
original, and (with an ``eval_fn``) measures accuracy. A pass that raises or fails a check is
rolled back: the graph before it goes on to the next pass, and the reason is recorded.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import networkx as nx
import torch.fx as fx

from .analysis.diff import GraphDiff, diff_graphs
from .analysis.shapes import propagate_shapes
from .context import PassContext
from .arguments import check_eval_result
from .errors import (
    InputShapeError, InvalidArgumentError, MissingInputError, PassFailedError, PassOptionError, PassOrderError,
)
from .numerics import OutputError, compare, run
from .pass_registry import PassItem, PassSpec, resolve_pass_item

ON_ERROR = ("rollback", "stop", "raise")
APPLIED, NOOP, ROLLED_BACK, FAILED, SKIPPED = "applied", "no-op", "rolled back", "failed", "skipped"
#: Errors that are the caller's to fix: raised whatever on_error says, since rollback cannot help.
USER_ERRORS = (PassOptionError, MissingInputError, InputShapeError, InvalidArgumentError)


@dataclasses.dataclass
class Step:
    """One entry of the pipeline: a pass and its validated options."""

    spec: PassSpec
    options: Dict[str, Any]


@dataclasses.dataclass
class PassResult:
    """What the manager learned running one pass; instruments turn it into a report entry."""

    step: Step
    status: str
    before: fx.GraphModule
    after: fx.GraphModule
    candidate: Optional[fx.GraphModule] = None
    reason: str = ""
    seconds: float = 0.0
    diff: Optional[GraphDiff] = None
    error_vs_before: Optional[OutputError] = None
    error_vs_original: Optional[OutputError] = None
    accuracy_before: Optional[float] = None
    accuracy_after: Optional[float] = None
    messages: List[str] = dataclasses.field(default_factory=list)
    warnings: List[str] = dataclasses.field(default_factory=list)
    exception: Optional[BaseException] = None


class PassInstrument:
    """Hooks around every pass (TVM's PassInstrument idea). Override what you need."""

    def enter_pipeline(self, gm: fx.GraphModule, ctx: PassContext) -> None: ...

    def run_before_pass(self, step: Step, gm: fx.GraphModule, ctx: PassContext) -> None: ...

    def run_after_pass(self, result: PassResult, ctx: PassContext) -> None: ...

    def exit_pipeline(self, gm: fx.GraphModule, ctx: PassContext) -> None: ...


def order_steps(steps: Sequence[Step], log=None) -> List[Step]:
    """Order steps by their runs_after / runs_before names, as close to the given order as allowed.

    Raises:
        PassOrderError: the constraints form a cycle; the message names the passes in it.
    """
    g = nx.DiGraph()
    g.add_nodes_from(range(len(steps)))
    for i, s in enumerate(steps):
        for j, other in enumerate(steps):
            if other.spec.name in s.spec.runs_after or s.spec.name in other.spec.runs_before:
                g.add_edge(j, i)
    if not nx.is_directed_acyclic_graph(g):
        cycle = [steps[u].spec.name for u, _ in nx.find_cycle(g)]
        raise PassOrderError(
            "contradictory pass ordering: " + " -> ".join(cycle + cycle[:1])
            + " (each must run after the previous). Remove one of these passes or one constraint."
        )
    order = list(nx.lexicographical_topological_sort(g, key=lambda i: i))
    if order != list(range(len(steps))) and log is not None:
        log.warning("graphopt reordered the passes to satisfy their constraints: %s -> %s",
                    [s.spec.name for s in steps], [steps[i].spec.name for i in order])
    return [steps[i] for i in order]


def _fingerprint(gm: fx.GraphModule) -> Tuple:
    """What a pass could change in a graph module: its graph, and each tensor's identity and
    version counter (in-place writes bump it)."""
    tensors = gm.state_dict(keep_vars=True)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in tensors:
            value = getattr(gm, node.target, None) if "." not in node.target else None
            if value is not None and hasattr(value, "_version"):
                tensors[node.target] = value
    return (str(gm.graph), tuple((k, id(t), t._version) for k, t in sorted(tensors.items())))


class _ReadOnly:
    """A context entry passes may read but not change (``ctx.original``, ``ctx.reference``):
    a pristine copy to restore it from, and a fingerprint to notice a change."""

    def __init__(self, ctx: PassContext, attr: str):
        self.ctx, self.attr = ctx, attr
        gm = getattr(ctx, attr)
        self.backup, self.fingerprint = copy.deepcopy(gm), _fingerprint(gm)

    def restore_if_changed(self) -> bool:
        """Put the pristine copy back when the entry was changed; True when it was."""
        gm = getattr(self.ctx, self.attr)
        if gm is not None and _fingerprint(gm) == self.fingerprint:
            return False
        restored = copy.deepcopy(self.backup)
        setattr(self.ctx, self.attr, restored)
        self.fingerprint = _fingerprint(restored)
        return True


def _evaluate_original(eval_fn, gm: fx.GraphModule):
    """eval_fn on the model before any pass: an error here is the caller's, named as such."""
    try:
        return eval_fn(gm)
    except Exception as e:
        raise InvalidArgumentError(f"eval_fn raised on the original model, before any pass ran: "
                                   f"{type(e).__name__}: {e}; it must take the model and return a "
                                   "number (it gets a torch.fx.GraphModule, called like the model)") from e


class PassManager:
    """Validate, order and run a list of passes.

    Args:
        passes: registered names, ``(name, {options})`` pairs, or decorated pass functions.
        instruments: PassInstrument hooks (the report is one).
        on_error: "rollback" (undo the pass, go on), "stop" (undo, skip the rest) or "raise".
        exact_tolerance: largest relative output error an exact pass may cause.
        tolerances: per-pass overrides of the relative error tolerance, by name.

    Example:
        >>> import torch, graphopt
        >>> from graphopt.capture import capture
        >>> x = torch.randn(1, 3, 8, 8)
        >>> gm = capture(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), (x,))
        >>> pm = graphopt.PassManager(["fuse_conv_bn"])
        >>> out = pm.run(gm, graphopt.PassContext(example_inputs=(x,)))
        >>> [n.op for n in out.graph.nodes]
        ['placeholder', 'call_module', 'output']
    """

    def __init__(
        self,
        passes: Sequence[PassItem],
        *,
        instruments: Sequence[PassInstrument] = (),
        on_error: str = "rollback",
        exact_tolerance: float = 1e-4,
        tolerances: Optional[Mapping[str, float]] = None,
        log=None,
    ):
        if on_error not in ON_ERROR:
            raise PassOptionError(f"on_error={on_error!r} is not one of {list(ON_ERROR)}")
        if isinstance(passes, (str, PassSpec)) or callable(passes):
            passes = [passes]
        self.steps = order_steps([Step(*resolve_pass_item(p)) for p in passes], log)
        self.instruments = list(instruments)
        self.on_error = on_error
        self.exact_tolerance = exact_tolerance
        self.tolerances = dict(tolerances or {})
        self._needs_checked: Optional[PassContext] = None

    def check_needs(self, ctx: PassContext) -> None:
        """Fail before anything runs when a pass needs data the context does not have."""
        for step in self.steps:
            ctx.require(step.spec.needs, f"pass {step.spec.name!r}")
        self._needs_checked = ctx

    def validate(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Each pass's own check of its options against this model, before any pass runs
        (and the needs, unless :meth:`check_needs` already ran for ``ctx``)."""
        if self._needs_checked is not ctx:
            self.check_needs(ctx)
        if ctx.target is not None:
            ctx.capabilities  # noqa: B018  (resolves, and refuses a target graphopt cannot use)
        for step in self.steps:
            if step.spec.validate is not None:
                step.spec.validate(gm, ctx, **step.options)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        """Run every pass on copies of ``gm``; ``gm`` itself is never modified."""
        self.validate(gm, ctx)
        ctx.original = ctx.original if ctx.original is not None and ctx.original is not gm else copy.deepcopy(gm)
        self._read_only = [_ReadOnly(ctx, "original")]
        original_out = run(ctx.original, ctx.example_inputs)
        current, current_out = gm, run(gm, ctx.example_inputs)
        accuracy = check_eval_result(_evaluate_original(ctx.eval_fn, current)) if ctx.eval_fn else None
        for inst in self.instruments:
            inst.enter_pipeline(gm, ctx)
        stopped_by: Optional[str] = None
        done: List[str] = []
        for step in self.steps:
            if stopped_by:
                self._notify(PassResult(step, SKIPPED, current, current,
                                        reason=f"skipped: {stopped_by} failed and on_error='stop'",
                                        accuracy_before=accuracy, accuracy_after=accuracy), ctx)
                continue
            result, out = self._run_one(step, current, current_out, original_out, accuracy, ctx)
            if result.status in (ROLLED_BACK, FAILED):
                if self.on_error == "raise":
                    before = ", ".join(done) or "none"
                    raise PassFailedError(
                        f"pass {step.spec.name!r} (after passes: {before}) {result.status}: {result.reason}"
                    ) from result.exception
                if self.on_error == "stop":
                    stopped_by = step.spec.name
            else:
                current, current_out, accuracy = result.after, out, result.accuracy_after
            done.append(step.spec.name)
            self._notify(result, ctx)
        for inst in self.instruments:
            inst.exit_pipeline(current, ctx)
        return current

    def _notify(self, result: PassResult, ctx: PassContext) -> None:
        for inst in self.instruments:
            inst.run_after_pass(result, ctx)

    def _tolerance(self, spec: PassSpec) -> Optional[float]:
        if spec.name in self.tolerances:
            return self.tolerances[spec.name]
        return self.exact_tolerance if spec.exact else spec.tolerance

    def _run_one(self, step, current, current_out, original_out, accuracy, ctx) -> Tuple[PassResult, Any]:
        spec = step.spec
        ctx.messages, ctx.warnings = [], []
        if not spec.exact and ctx.reference is None:
            ctx.reference = copy.deepcopy(current)  # the teacher: a copy, so nothing can change `current`
            self._read_only.append(_ReadOnly(ctx, "reference"))
        for inst in self.instruments:
            inst.run_before_pass(step, current, ctx)
        result = PassResult(step, FAILED, current, current, accuracy_before=accuracy,
                            accuracy_after=accuracy, messages=ctx.messages,
                            warnings=ctx.warnings)
        candidate = copy.deepcopy(current)
        t0 = time.perf_counter()
        try:
            returned = step.spec.instantiate(step.options)(candidate, ctx)
            result.seconds = time.perf_counter() - t0
            if returned is not None:
                if not isinstance(returned, fx.GraphModule):
                    raise TypeError(f"a pass must return a GraphModule or None, got {type(returned).__name__}")
                candidate = returned
            result.candidate = candidate
            candidate.graph.lint()
            candidate.recompile()
            propagate_shapes(candidate, ctx.example_inputs)
            out = run(candidate, ctx.example_inputs)
        except USER_ERRORS:
            raise
        except Exception as e:  # a plugin may raise anything: record it, never crash the pipeline
            result.seconds = result.seconds or time.perf_counter() - t0
            result.reason = f"{type(e).__name__}: {e}" + self._restore_read_only()
            result.exception = e
            ctx.logger.warning("pass %s failed and was rolled back: %s", spec.name, result.reason)
            return result, None
        touched = self._restore_read_only()
        if touched:
            result.status, result.reason = ROLLED_BACK, touched.lstrip("; ")
            ctx.logger.warning("pass %s rolled back: %s", spec.name, result.reason)
            return result, None
        result.diff = diff_graphs(current, candidate)
        result.error_vs_before = compare(current_out, out)
        result.error_vs_original = compare(original_out, out)
        reason = self._numeric_verdict(spec, result.error_vs_before)
        if reason is None and ctx.eval_fn is not None:
            reason = self._accuracy_verdict(spec, ctx, candidate, accuracy, result)
        if reason is not None:
            result.status, result.reason = ROLLED_BACK, reason
            result.accuracy_after = accuracy
            ctx.logger.warning("pass %s rolled back: %s", spec.name, reason)
            return result, None
        d = result.diff
        result.status = APPLIED if (d.added or d.removed or d.changed) else NOOP
        result.after = candidate
        ctx.logger.info("pass %s: %s in %.2f s", spec.name, result.status, result.seconds)
        return result, out

    def _restore_read_only(self) -> str:
        """'; <why>' when the pass changed a read-only context entry (now restored), else ''."""
        changed = [g.attr for g in self._read_only if g.restore_if_changed()]
        if not changed:
            return ""
        names = " and ".join(f"ctx.{a}" for a in changed)
        return (f"; the pass modified {names}, which passes may only read (restored; change the graph "
                "the pass is given instead)")

    def _accuracy_verdict(self, spec, ctx, candidate, accuracy, result) -> Optional[str]:
        """Measure accuracy after the pass; None when it is acceptable, else why not."""
        try:
            value = ctx.eval_fn(candidate)
        except Exception as e:  # the pass produced a model the caller's eval_fn cannot use
            return f"eval_fn raised on the optimized model: {type(e).__name__}: {e}"
        try:
            result.accuracy_after = check_eval_result(value)
        except InvalidArgumentError:
            return f"eval_fn returned {value!r} on the optimized model (not a finite number)"
        drop = (accuracy or 0.0) - result.accuracy_after
        if spec.max_accuracy_drop is not None and drop > spec.max_accuracy_drop:
            return f"accuracy fell by {drop:.4f} > max_accuracy_drop {spec.max_accuracy_drop}"
        return None

    def _numeric_verdict(self, spec: PassSpec, err: OutputError) -> Optional[str]:
        """None when the outputs are acceptable, else why not."""
        if not err.same_shapes:
            return "output shapes changed"
        if not err.finite:
            return "outputs contain NaN or Inf"
        tol = self._tolerance(spec)
        if tol is not None and err.rel > tol:
            kind = "exact pass" if spec.exact else "lossy pass"
            return f"{kind} broke numerics: {err.describe()} > tolerance {tol:g}"
        return None
