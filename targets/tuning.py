"""MetaSchedule tuning with graphopt's trial allocation and persistent cache.

``tune_trials`` is a budget for the whole model. Where the trials go matters more than how
many there are (design.md): every task first gets a small floor (enough to find a
parallel, vectorized schedule for a pooling or elementwise kernel), and the rest is split
in proportion to each task's share of the model's FLOPs, so the convolutions that are the
latency get the search. Each task is then tuned on its own with exactly its budget
(``max_trials_per_task`` semantics, nothing skipped), sharing one builder, runner and cost
model, and its records are merged into the cache as soon as it finishes, so an interrupted
run keeps what it measured.

Tasks whose workload the cache already holds with at least this budget are cache hits and
are not tuned; with a larger budget only the difference is tuned, seeded with the cached
records.

Example:
    >>> allocate_trials(100, [1e9, 1e8, 1e3, None])
    [77, 15, 8, 0]
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from graphopt.context import no_progress
from graphopt.errors import TargetError

__all__ = ["TuningInfo", "allocate_capped", "allocate_trials", "tune", "tuning_tasks"]

_log = logging.getLogger("graphopt.targets")

FLOOR_TRIALS = 8        # per task, when the budget allows it
CUSTOM_SPACE_TRIALS = 40  # a hand-written conv space has at most about 36 points (targets/schedules.py)
MAX_TRIALS_PER_ITER = 64


@dataclasses.dataclass
class TuningInfo:
    """What tuning did, for the report (``CompiledModel.tuning``).

    Attributes:
        trials_requested: the model's budget (``tune_trials``).
        trials_run: candidates measured in this run.
        tasks: tuning tasks (distinct fused kernels) in the model.
        tasks_skipped: kernels not worth tuning (weights-only, reshapes).
        tasks_tuned: tasks tuned in this run.
        cache_hits: tasks the cache already had with enough trials.
        tasks_with_records: tasks the build found a tuned schedule for.
        seconds: wall time of the tuning phase (including cache I/O).
        note: why tuning was skipped, if it was.
    """

    trials_requested: int = 0
    trials_run: int = 0
    tasks: int = 0
    tasks_skipped: int = 0
    tasks_tuned: int = 0
    cache_hits: int = 0
    tasks_with_records: int = 0
    seconds: float = 0.0
    note: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TuningInfo":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def allocate_capped(total: int, costs: Sequence[Optional[float]], caps: Sequence[Optional[int]],
                    floor: int = FLOOR_TRIALS) -> List[int]:
    """:func:`allocate_trials`, but no task gets more than its cap (None: no cap).

    A task with a small hand-written design space has nothing to spend more trials on; what
    it cannot use goes to the others, in proportion to their costs.

    Example:
        >>> allocate_capped(100, [1e9, 1e8, 1e3], [40, None, None])
        [40, 52, 8]
    """
    out = [0] * len(costs)
    free = list(range(len(costs)))
    while True:
        shares = allocate_trials(total, [costs[i] for i in free], floor)
        over = [i for i, b in zip(free, shares) if caps[i] is not None and b > caps[i]]
        if not over or len(over) == len(free):
            for i, b in zip(free, shares):
                out[i] = min(b, caps[i]) if caps[i] is not None else b
            return out
        for i in over:
            out[i] = caps[i]
            total -= caps[i]
            free.remove(i)


def allocate_trials(total: int, costs: Sequence[Optional[float]], floor: int = FLOOR_TRIALS) -> List[int]:
    """Split ``total`` trials over tasks: a floor each, the rest in proportion to ``costs``.

    A cost of None marks a task not worth tuning (it gets 0). With fewer trials than
    tasks, the most expensive tasks get one trial each (the others keep TVM's default
    schedule). The result sums to ``total`` whenever some task is worth tuning.
    """
    n_all = len(costs)
    wanted = [i for i, c in enumerate(costs) if c is not None]
    if len(wanted) < n_all:
        out = [0] * n_all
        for i, b in zip(wanted, allocate_trials(total, [costs[i] for i in wanted], floor)):
            out[i] = b
        return out
    n = n_all
    if n == 0 or total <= 0:
        return [0] * n
    order = sorted(range(n), key=lambda i: -costs[i])
    if total < n:
        out = [0] * n
        for i in order[:total]:
            out[i] = 1
        return out
    base = min(floor, total // n)
    rest = total - base * n
    weights = [max(float(c), 0.0) for c in costs]
    norm = sum(weights) or float(n)
    shares = [rest * (w / norm if sum(weights) else 1.0 / n) for w in weights]
    out = [base + int(math.floor(s)) for s in shares]
    leftover = total - sum(out)
    for i in sorted(range(n), key=lambda i: -(shares[i] - math.floor(shares[i])))[:leftover]:
        out[i] += 1
    return out


@dataclasses.dataclass
class _Task:
    name: str
    mod: Any
    target: Any
    weight: int
    flops: float
    key: str
    skip: bool = False
    custom: bool = False  # scheduled by graphopt's hand-written rule (targets/schedules.py)
    budget: int = 0
    done: int = 0

    @property
    def cost(self) -> Optional[float]:
        return None if self.skip else max(self.flops, 1.0) * self.weight


def not_worth_tuning(prepared) -> set:
    """Names of kernels tuning cannot speed up at run time.

    A kernel called only on weights (a Linear's transpose, a bias reshape, a weight layout
    change) is lifted into the weight transform and runs once at build time; a kernel that
    only reshapes becomes a view of its input when the VM is built.
    """
    from tvm import ir, relax, tirx
    from tvm.relax.analysis import has_reshape_pattern

    skip = {gv.name_hint for gv, f in prepared.functions_items()
            if isinstance(f, tirx.PrimFunc) and has_reshape_pattern(f)}
    main = prepared["main"]
    attrs = main.attrs if main.attrs is not None else {}
    n_in = int(attrs["num_input"]) if "num_input" in attrs else len(main.params)
    from_weights = list(main.params[n_in:])  # vars computed from weights only

    def weight_only(expr) -> bool:
        return isinstance(expr, ir.Constant) or any(expr.same_as(v) for v in from_weights)

    on_weights, on_activations = set(), set()
    for block in getattr(main.body, "blocks", []):
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call) or getattr(value.op, "name", "") != "relax.call_tir":
                continue
            callee = value.args[0].name_hint
            args = value.args[1].fields if isinstance(value.args[1], relax.Tuple) else [value.args[1]]
            if all(weight_only(a) for a in args):
                from_weights.append(binding.var)
                on_weights.add(callee)
            else:
                on_activations.add(callee)
    return skip | (on_weights - on_activations)


def is_prescheduled(func) -> bool:
    """A kernel emitted already scheduled (``tirx.is_scheduled``): never a tuning task, and
    the build keeps its schedule even where the cache holds a record for it."""
    attrs = getattr(func, "attrs", None)
    return bool(attrs is not None and attrs.get("tirx.is_scheduled", False))


def tuning_tasks(prepared, tvm_target) -> List[_Task]:
    """The distinct kernels of ``prepared``: name, module, weight (calls), FLOPs, cache key, flags."""
    import tvm_ffi
    from tvm.s_tir import analysis
    from tvm.s_tir import meta_schedule as ms

    from .schedules import uses_custom_rule

    skip = not_worth_tuning(prepared)
    tasks = []
    for t in ms.relax_integration.extract_tasks(prepared, tvm_target):
        mod = t.dispatched[0]
        if is_prescheduled(mod["main"]):
            continue
        try:
            flops = float(analysis.estimate_tir_flops(mod))
        except Exception:  # estimation fails on some opaque kernels: treat as cheap
            flops = 1.0
        tasks.append(_Task(name=t.task_name, mod=mod, target=t.target, weight=int(t.weight),
                           flops=flops, key=str(tvm_ffi.structural_hash(mod)), skip=t.task_name in skip,
                           custom=uses_custom_rule(mod)))
    return tasks


def _file_logger(work_dir: Path, name: str) -> logging.Logger:
    """MetaSchedule's per-task log (design spaces, traces) goes to a file, never the console."""
    logger = logging.getLogger(f"tvm.s_tir.meta_schedule.graphopt.{work_dir.name}.{name}")
    logger.propagate = False
    if not logger.handlers:
        handler = logging.FileHandler(work_dir / f"{name}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    return logger


def _release_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def _quiet_scheduler(logger: logging.Logger):
    """A round-robin scheduler logging to ``logger``: TVM's logs its progress tables at INFO
    through a module logger, which would flood the user's log."""
    from tvm.s_tir.meta_schedule import _ffi_api
    from tvm.s_tir.meta_schedule.logging import get_logging_func
    from tvm.s_tir.meta_schedule.task_scheduler import RoundRobin

    scheduler = RoundRobin.__new__(RoundRobin)
    scheduler.__init_handle_by_constructor__(_ffi_api.TaskSchedulerRoundRobin, get_logging_func(logger))
    return scheduler


def _tune_one(task: _Task, trials: int, *, work_dir: Path, database, builder, runner, cost_model,
              callbacks, seed: int) -> None:
    from tvm.s_tir import meta_schedule as ms

    from .schedules import space_generator

    per_iter = min(MAX_TRIALS_PER_ITER, trials)
    population = min(512, max(64, 8 * per_iter))
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, population // 2))
    logger = _file_logger(work_dir, f"task_{seed}")
    try:
        space = space_generator(task.mod, task.target) if task.custom else "post-order-apply"
        context = ms.TuneContext(mod=task.mod, target=task.target, space_generator=space,
                                 search_strategy=strategy, task_name=task.name, logger=logger,
                                 rand_state=seed, num_threads="physical").clone()
        ms.tune_tasks(tasks=[context], task_weights=[float(task.weight)], work_dir=str(work_dir),
                      max_trials_global=trials, max_trials_per_task=trials,
                      num_trials_per_iter=per_iter, builder=builder, runner=runner,
                      database=database, cost_model=cost_model, measure_callbacks=callbacks,
                      task_scheduler=_quiet_scheduler(logger))
    finally:
        _release_logger(logger)


def tune(prepared, target, tvm_target, trials: int, *, progress: Optional[Callable] = None,
         log: logging.Logger = _log) -> Tuple[Optional[Any], TuningInfo]:
    """Tune ``prepared``'s tasks for ``target`` within ``trials``, through the cache.

    Returns:
        ``(database, info)``: the database to apply (cached and new records), or None when
        ``trials`` is 0 (TVM's default schedules), and what happened.
    """
    start = time.perf_counter()
    info = TuningInfo(trials_requested=int(trials))
    if trials <= 0:
        info.note = "not tuned (tune_trials=0): TVM default schedules"
        return None, info
    if not (target.tracker or target.native):
        info.note = (f"not tuned: {target.name} runs under emulation here; give tracker= and key= "
                     "of a device to tune on (timings under qemu mean nothing)")
        log.warning("%s: %s", target.name, info.note)
        warnings.warn(info.note, RuntimeWarning, stacklevel=3)
        return None, info

    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.database import JSONDatabase, UnionDatabase

    from .cache import TuningCache
    from .measure import load_cpu_intrinsics, measure_tools, progress_callback, shutdown
    from .schedules import register as register_schedule_rules

    tasks = tuning_tasks(prepared, tvm_target)
    info.tasks = len(tasks)
    caps = [CUSTOM_SPACE_TRIALS if t.custom else None for t in tasks]
    for task, budget in zip(tasks, allocate_capped(trials, [t.cost for t in tasks], caps)):
        task.budget = budget
    cache = TuningCache(target.cache_key(), root=target.cache_dir)
    with tempfile.TemporaryDirectory(prefix="graphopt-tune-") as tmp:
        tmp = Path(tmp)
        snap = cache.snapshot(tmp / "snapshot")
        todo = []
        info.tasks_skipped = sum(t.skip for t in tasks)
        for task in tasks:
            if task.skip:
                continue
            task.done = snap.budgets.get(task.key, 0) if snap.database.has_workload(task.mod) else 0
            if task.done >= task.budget:
                info.cache_hits += task.done > 0
            else:
                todo.append(task)
        if not todo:
            log.info("%s: tuning cache hit: all %d kernels worth tuning already have >= their budget "
                     "(%d trials for the model): no tuning", target.name, info.cache_hits, trials)
        else:
            run_trials = sum(t.budget - t.done for t in todo)
            log.info("%s: tuning %d kernels with %d trials (%d cache hits; %d kernels that only touch "
                     "weights or only reshape are not tuned); cache %s", target.name, len(todo),
                     run_trials, info.cache_hits, info.tasks_skipped, cache.dir)
            work = tmp / "work"
            work.mkdir()
            tuning_db = JSONDatabase(work_dir=str(work))
            load_cpu_intrinsics()
            register_schedule_rules()
            builder, runner = measure_tools(target)
            cost_model = ms.CostModel.create("xgb", num_tuning_cores=max(1, target.runtime_threads))
            bar_factory = progress or no_progress
            with contextlib.ExitStack() as stack:
                stack.callback(shutdown, runner)
                stack.callback(shutdown, builder)
                bar = stack.enter_context(contextlib.closing(
                    bar_factory(total=run_trials, desc=f"tuning {target.name}")))
                callbacks = list(ms.MeasureCallback.create("default")) + [progress_callback(bar)]
                for i, task in enumerate(sorted(todo, key=lambda t: -t.flops * t.weight)):
                    extra = task.budget - task.done
                    _seed(tuning_db, snap.database, task.mod)
                    log.info("%s: task %d/%d %s (%.1f MFLOP x%d): %d trials%s", target.name, i + 1,
                             len(todo), task.name, task.flops / 1e6, task.weight, extra,
                             f" on top of {task.done} cached" if task.done else "")
                    before = _records_of(tuning_db, task.mod)
                    try:
                        _tune_one(task, extra, work_dir=work, database=tuning_db, builder=builder,
                                  runner=runner, cost_model=cost_model, callbacks=callbacks,
                                  seed=int(task.key) % (2**31 - 1))
                    except Exception as e:
                        raise TargetError(f"tuning task {task.name} for {target.name} failed: "
                                          f"{type(e).__name__}: {e}") from e
                    new = _records_of(tuning_db, task.mod)[len(before):]
                    info.trials_run += len(new)
                    info.tasks_tuned += 1
                    cache.merge(new, {task.key: task.budget})
        database = UnionDatabase(snap.database, tuning_db) if todo else snap.database
        info.tasks_with_records = sum(
            1 for t in tasks if database.query_tuning_record(t.mod, t.target, "main") is not None)
    info.seconds = time.perf_counter() - start
    log.info("%s: tuning done in %.1f s: %d trials run, %d tasks tuned, %d cache hits, %d/%d tasks "
             "have tuned schedules", target.name, info.seconds, info.trials_run, info.tasks_tuned,
             info.cache_hits, info.tasks_with_records, info.tasks)
    return database, info


def _records_of(database, mod) -> list:
    """Every record of ``mod``'s workload, in commit order (JSONDatabase appends)."""
    if not database.has_workload(mod):
        return []
    workload = database.commit_workload(mod)
    return [r for r in database.get_all_tuning_records()
            if _same_workload(r.workload, workload)]


def _same_workload(a, b) -> bool:
    import tvm_ffi

    return a.same_as(b) or tvm_ffi.structural_equal(a.mod, b.mod)


def _seed(tuning_db, cached_db, mod, top_k: int = 32) -> int:
    """Copy the cache's best records of ``mod`` into the tuning database: the search starts there."""
    if not cached_db.has_workload(mod):
        return 0
    from tvm.s_tir.meta_schedule.database import TuningRecord

    workload = tuning_db.commit_workload(mod)
    best = cached_db.get_top_k(cached_db.commit_workload(mod), top_k)
    for r in best:
        tuning_db.commit_tuning_record(TuningRecord(r.trace, workload, r.run_secs, r.target, r.args_info))
    return len(best)
