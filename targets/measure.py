"""How MetaSchedule candidates get built and timed, with the fixed costs cut down.

Two fixed costs dominated small tuning runs on these 2-core machines (measured, loaded
machine): importing ``tvm.s_tir.tensor_intrin`` (done by every ``TuneContext``) took
50-80 s because the package imports the CUDA, ROCm and Hexagon intrinsics; TVM's
``default_build`` imports it again in every builder worker (so the first build of a batch
hit the 30 s build timeout), and ``LocalBuilder`` starts a fresh process pool for every
batch of candidates. Here:

* :func:`load_cpu_intrinsics` imports only the CPU intrinsic modules (x86 VNNI/AVX-512,
  ARM NEON/sdot) and marks the package as imported;
* :func:`persistent_builder` keeps one worker pool for the whole tuning run;
* :func:`measure_tools` picks builder and runner: local for the host, cross-build plus
  the tracker's devices for a remote target.

Example:
    >>> builder, runner = measure_tools(graphopt.get_target("x86"))  # doctest: +SKIP
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import sys
from typing import Callable, List, Optional, Tuple

from graphopt.errors import TargetError

__all__ = ["BUILD_TIMEOUT_S", "RUN_TIMEOUT_S", "load_cpu_intrinsics", "measure_tools",
           "persistent_builder", "progress_callback", "shutdown"]

log = logging.getLogger("graphopt.targets")

BUILD_TIMEOUT_S = 120.0  # TVM's 30 s default killed valid builds on a loaded 2-core machine
RUN_TIMEOUT_S = 60.0
_CPU_INTRINSICS = ("dot_product_common", "x86", "arm_cpu")


def load_cpu_intrinsics() -> None:
    """Register the CPU tensor intrinsics without importing the GPU ones.

    If the package was already imported in full, nothing happens. Otherwise an empty
    package module stands in for ``tvm.s_tir.tensor_intrin`` (so ``import`` of it is a
    no-op) and only the CPU submodules run. A GPU target tuned later in the same process
    would have to import its intrinsic module (e.g. ``...tensor_intrin.cuda``) itself.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        import tvm.s_tir

        spec = importlib.util.find_spec(name)
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        tvm.s_tir.tensor_intrin = package
    for sub in _CPU_INTRINSICS:
        try:
            importlib.import_module(f"{name}.{sub}")
        except ImportError:  # a TVM build without this backend
            pass


def export_shared_library(rt_mod) -> str:
    """MetaSchedule ``f_export`` for the host: link the candidate into a ``.so`` in the builder.

    TVM's default exports a ``.tar`` that the runner links with g++ before timing, serially,
    in the one runner process; linking here runs on every builder worker in parallel.
    """
    import os
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="graphopt-ms-"), "candidate.so")
    rt_mod.export_library(path)
    return path


def persistent_builder(max_workers: Optional[int], timeout_sec: float,
                       f_export: Optional[Callable] = None):
    """A MetaSchedule builder like ``LocalBuilder`` whose worker pool lives for the whole run.

    Built by a factory because TVM's ``derived_object`` classes need TVM imported.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
    from tvm.s_tir.meta_schedule.utils import cpu_count
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class PersistentBuilder(PyBuilder):
        """``LocalBuilder`` semantics, one worker pool reused for every batch."""

        def __init__(self):
            super().__init__()
            self.timeout_sec = timeout_sec
            # TVM's default_build imports tvm.s_tir.tensor_intrin in every worker: with the GPU
            # intrinsics that alone took 50-80 s here, longer than the build timeout.
            self.pool = PopenPoolExecutor(max_workers=max_workers or cpu_count(logical=True),
                                          timeout=timeout_sec, initializer=load_cpu_intrinsics)

        def build(self, build_inputs) -> List:
            args = [(None, f_export, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
            results = []
            for r in self.pool.map_with_error_catching(lambda x: _worker_func(*x), args):
                if r.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"PersistentBuilder: timeout after {self.timeout_sec} s"))
                else:
                    results.append(BuilderResult(None, f"PersistentBuilder: an exception occurred\n{r.value}"))
            return results

        def shutdown(self) -> None:
            self.pool.shutdown()

    return PersistentBuilder()


def measure_tools(target) -> Tuple[object, object]:
    """``(builder, runner)`` for tuning ``target``.

    Raises:
        TargetError: the target runs emulated and names no tracker: nothing here can
            time its code meaningfully.
    """
    from tvm.s_tir import meta_schedule as ms

    if target.tracker:
        from .rpc import export_cross_compiled, make_ms_runner

        f_export = (functools.partial(export_cross_compiled, cross_compiler=target.cross_compiler)
                    if target.cross_compiler else None)
        return (persistent_builder(None, BUILD_TIMEOUT_S, f_export),
                make_ms_runner(target.tracker, target.key))
    if target.native:
        from .runtime import set_runtime_threads

        config = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50,
                                           enable_cpu_cache_flush=False)
        # candidates are timed with the thread count the model will run with: TVM's default in
        # the runner's worker was one thread here, which tuned for (and measured) one core
        threads = functools.partial(set_runtime_threads, target.runtime_threads)
        return (persistent_builder(None, BUILD_TIMEOUT_S, export_shared_library),
                ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, evaluator_config=config, initializer=threads))
    raise TargetError(f"{target.name}: nothing can time candidates here (emulated, no tracker=)")


def shutdown(tool) -> None:
    """Stop a builder's or runner's worker processes, if it has any we own."""
    for obj in (tool, getattr(tool, "_inst", None)):
        for attr in ("shutdown",):
            fn = getattr(obj, attr, None)
            if callable(fn):
                fn()
                return
        pool = getattr(obj, "pool", None)
        if pool is not None and hasattr(pool, "shutdown"):
            pool.shutdown()
            return


def progress_callback(bar):
    """A MetaSchedule measure callback advancing a tqdm-like ``bar`` per measured candidate."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            bar.update(len(runner_results))

    return _Progress()
