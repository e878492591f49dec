"""Schedules from the hand-written spaces without measuring anything.

A hand-written space is small and every point in it is a valid schedule, so a build can use
one without tuning. Here every kernel a hand-written rule covers gets a record for one chosen
point of its space (the same design space, decisions and postprocessors the tuner would use,
no builder, no runner, no timing), in a MetaSchedule database the build applies like the
tuner's. Tests use it to check each point of a space against PyTorch in seconds (tuning
would time every candidate); its "run time" is a placeholder, never compared with a
measured one.

Example:
    >>> database = unmeasured_database(prepared, tvm_target, choice=lambda n: n - 1)  # doctest: +SKIP
    >>> compiled = target.build(lowered, prepared, database)  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Tuple

__all__ = ["decision_sizes", "hand_written_tasks", "point", "unmeasured_database"]

_PLACEHOLDER_SECONDS = 1.0  # a valid run time (failures are stored as 1e10): nothing compares it


def _spaces(mod, target):
    from tvm.s_tir import meta_schedule as ms

    from ..measure import load_cpu_intrinsics
    from . import register, space_generator

    load_cpu_intrinsics()  # a TuneContext imports every intrinsic (GPU ones too) otherwise: a minute
    register()
    ctx = ms.TuneContext(mod=mod, target=target, space_generator=space_generator(mod, target),
                         task_name="unmeasured")
    return ctx, list(ctx.space_generator.generate_design_space(mod))


def decision_sizes(mod, target) -> List[List[int]]:
    """Per design space of ``mod``'s kernel, the number of candidates of each sampled decision."""
    _, spaces = _spaces(mod, target)
    return [[len(inst.attrs[0]) for inst in sch.trace.insts if inst.kind.name == "SampleCategorical"]
            for sch in spaces]


def point(mod, target, space: int = 0, choice: Callable[[int], int] = lambda n: 0):
    """The schedule of design space ``space`` (the last one if there are fewer) with each
    sampled decision set to ``choice(number of candidates)``, postprocessed as the tuner would."""
    from tvm import s_tir

    ctx, spaces = _spaces(mod, target)
    trace = spaces[min(space, len(spaces) - 1)].trace
    for inst in [i for i in trace.insts if i.kind.name == "SampleCategorical"]:
        trace = trace.with_decision(inst, int(choice(len(inst.attrs[0]))), remove_postproc=True)
    sch = s_tir.Schedule(mod)
    trace.apply_to_schedule(sch, remove_postproc=True)
    for postproc in ctx.space_generator.postprocs:
        if not postproc.apply(sch):
            raise RuntimeError(f"postprocessor {type(postproc).__name__} rejected the schedule")
    return sch


def hand_written_tasks(prepared, target) -> Iterator[Tuple[str, object]]:
    """``(task name, kernel module)`` of every kernel of ``prepared`` a hand-written rule schedules."""
    from tvm.s_tir import meta_schedule as ms

    from . import uses_custom_rule

    for task in ms.relax_integration.extract_tasks(prepared, target):
        mod = task.dispatched[0]
        if uses_custom_rule(mod):
            yield task.task_name, mod


def unmeasured_database(prepared, target, space: int = 0, choice: Callable[[int], int] = lambda n: 0):
    """A database with one record per hand-written kernel of ``prepared``: :func:`point` of it."""
    from tvm.s_tir import meta_schedule as ms

    database = ms.database.MemoryDatabase()
    for _, mod in hand_written_tasks(prepared, target):
        sch = point(mod, target, space, choice)
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, database.commit_workload(mod), [_PLACEHOLDER_SECONDS], target,
            ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    return database
