"""The :class:`Target`: where a model runs, as data, plus the phase functions that get it there.

A target is a small frozen dataclass (its TVM target dict, triple, toolchain, CPU, ISA
features, threads, and optionally a remote device), so device presets are plain data
registered by name (see :mod:`graphopt.targets.presets`) and a user can build their own
with ``graphopt.Target(...)`` or derive one with :meth:`Target.replace`.

Phases (design.md, "Target"): :meth:`lower` (fx -> Relax), :meth:`tune` (MetaSchedule with the
persistent cache), :meth:`build` (-> :class:`~graphopt.targets.artifact.CompiledModel`);
:meth:`compile` runs all three, and is what ``graphopt.optimize`` calls.

Example:
    >>> t = Target(name="my-a72", tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu",
    ...            "mcpu": "cortex-a72", "mattr": ["+neon"]}, triple="aarch64-linux-gnu",
    ...            cross_compiler="aarch64-linux-gnu-g++", qemu_cpu="cortex-a72")
    >>> t.arch, t.mcpu, t.preferred_channel_multiple
    ('aarch64', 'cortex-a72', 4)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from graphopt.analysis.signature import structure_signature
from graphopt.errors import TargetError

from .hostcpu import host_arch, physical_cores

__all__ = ["Target"]

_log = logging.getLogger("graphopt.targets")

# bumped when the way candidates are timed changes, so records measured the old way are not reused
# (2: the runner uses the target's thread count; before, TVM's default of one thread on these machines)
MEASUREMENT_VERSION = 2

#: Debian packages that provide the tools a target may need (named in errors).
TOOL_PACKAGES = {
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "g++": "g++",
    "qemu-aarch64": "qemu-user",
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A compilation target: a CPU kind, how to build for it and where to run.

    Args:
        name: registry name (``"x86"``, ``"arm-rpi4"``...).
        tvm_target: the TVM 0.27 target as a JSON dict (``{"kind": "llvm", "mcpu": ...}``).
        triple: the platform triple; its first part is the architecture.
        description: one line for ``graphopt targets``.
        cross_compiler: the g++ that links the ``.so`` when the host cannot (None: host g++).
        qemu_cpu: the qemu ``-cpu`` model that enforces this target's ISA on an x86 host.
        features: ISA features the code may use (``avx512f``, ``neon``, ``dotprod``...);
            a loaded artifact is refused on a host lacking one.
        preferred_channel_multiple: fp32 vector lanes; pruning rounds channels to it.
        rpc: ``"host:port"`` of a TVM RPC server to run on.
        tracker: ``"host:port"`` of a TVM RPC tracker: tuning measures on its devices.
        key: the device key on the tracker.
        num_threads: runtime threads; None: the physical cores of the host (or 2 on
            emulated / remote devices, recorded in the artifact).
        weight_prepack: let tuning choose blocked weight layouts, computed once at build
            time (``cpu_weight_prepack`` in TVM's static-shape pipeline).
        layout_block: run convolutions in NCHW[block]c (e.g. 16 = one AVX-512 register
            of fp32); 0 keeps NCHW. See :mod:`graphopt.targets.layouts`.
        cache_dir: tuning cache root; None: ``$GRAPHOPT_CACHE_DIR`` or ``~/.cache/graphopt``.
    """

    name: str
    tvm_target: Mapping[str, Any]
    triple: str = "x86_64-linux-gnu"
    description: str = ""
    cross_compiler: Optional[str] = None
    qemu_cpu: Optional[str] = None
    features: Tuple[str, ...] = ()
    preferred_channel_multiple: int = 4
    rpc: Optional[str] = None
    tracker: Optional[str] = None
    key: Optional[str] = None
    num_threads: Optional[int] = None
    weight_prepack: bool = True
    layout_block: int = 0
    cache_dir: Optional[str] = None

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise TargetError("a target needs a non-empty name")
        if not isinstance(self.tvm_target, Mapping) or "kind" not in self.tvm_target:
            raise TargetError(f"target {self.name!r}: tvm_target must be a dict with a 'kind' "
                              f"(TVM 0.27 targets are JSON dicts), got {self.tvm_target!r}")
        object.__setattr__(self, "tvm_target", dict(self.tvm_target))
        object.__setattr__(self, "features", tuple(self.features))
        if self.rpc and self.tracker:
            raise TargetError(f"target {self.name!r}: give rpc= or tracker=, not both")
        if self.tracker and not self.key:
            raise TargetError(f"target {self.name!r}: a tracker hands out devices by key; pass key=")
        if not isinstance(self.layout_block, int) or self.layout_block < 0:
            raise TargetError(f"target {self.name!r}: layout_block must be an int >= 0, got {self.layout_block!r}")
        for attr in ("preferred_channel_multiple", "num_threads"):
            value = getattr(self, attr)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise TargetError(f"target {self.name!r}: {attr} must be a positive int, got {value!r}")

    # --- derived facts ---------------------------------------------------------------------

    @property
    def arch(self) -> str:
        """``x86_64`` or ``aarch64``: the first part of the triple."""
        return self.triple.split("-", 1)[0]

    @property
    def activation_dtype(self) -> str:
        """int8 activations on AArch64 (``sdot``/``smull`` multiply int8 by int8), uint8 on x86
        (VNNI's ``vpdpbusd`` multiplies uint8 by int8)."""
        return "int8" if self.arch == "aarch64" else "uint8"

    @property
    def mcpu(self) -> Optional[str]:
        return self.tvm_target.get("mcpu")

    @property
    def remote(self) -> bool:
        """Runs on a device behind TVM RPC."""
        return bool(self.rpc or self.tracker)

    @property
    def native(self) -> bool:
        """This host can load and run the target's code in-process."""
        return not self.remote and self.arch == host_arch()

    @property
    def emulated(self) -> bool:
        """Runs under qemu on this host (correct, but timings mean nothing)."""
        return not self.remote and not self.native

    @property
    def runtime_threads(self) -> int:
        """The thread count the runtime is set to (explicitly: TVM's default looked single-threaded)."""
        if self.num_threads is not None:
            return self.num_threads
        return physical_cores() if self.native else 2

    def replace(self, **changes) -> "Target":
        """A copy with some fields changed, e.g. ``get_target("arm-rpi4").replace(tracker=..., key=...)``."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """The fields as JSON-able data (the artifact manifest stores this)."""
        d = dataclasses.asdict(self)
        d["features"] = list(self.features)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Target":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TargetError(f"unknown target fields {unknown}; known: {sorted(known)}")
        return cls(**{**data, "features": tuple(data.get("features", ()))})

    def cache_key(self) -> str:
        """Identity of the code this target generates: tuning records are shared under it.

        What changes generated code or its timings counts (the TVM target, TVM's version, the
        runtime thread count the candidates were timed with, and the measurement method), so
        ``arm-rpi4`` tuned through a tracker and the same CPU described by hand share records.
        """
        import tvm

        payload = json.dumps({"tvm_target": self.tvm_target, "tvm": tvm.__version__,
                              "threads": self.runtime_threads, "measurement": MEASUREMENT_VERSION}, sort_keys=True)
        # layouts change the workloads themselves, so they need no place in the key
        return f"{self.name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"

    def tvm(self):
        """The ``tvm.target.Target``; an mcpu LLVM does not know is a TargetError, not a silent fallback."""
        import tvm
        from tvm.target import codegen

        mcpu = self.mcpu
        if mcpu and self.tvm_target.get("kind") == "llvm" and not codegen.llvm_is_valid_cpu(
                mcpu, self.tvm_target.get("mtriple", self.triple)):
            raise TargetError(f"target {self.name!r}: LLVM does not know mcpu {mcpu!r} for "
                              f"{self.triple} (TVM rejects 'native': give a real CPU name)")
        try:
            return tvm.target.Target(self.tvm_target)
        except Exception as e:  # TVM raises its own error types for bad target dicts
            raise TargetError(f"target {self.name!r}: TVM rejects {self.tvm_target}: {e}") from e

    def check_toolchain(self) -> None:
        """Fail early, naming the Debian package, when a tool this target needs is missing."""
        needed = [self.cross_compiler or "g++"]
        if self.emulated:
            needed.append("qemu-aarch64" if self.arch == "aarch64" else f"qemu-{self.arch}")
        if not self.native and not self.cross_compiler:
            raise TargetError(f"target {self.name!r} is {self.arch}, this host is {host_arch()}: "
                              "set cross_compiler= (e.g. aarch64-linux-gnu-g++)")
        for tool in needed:
            if shutil.which(tool) is None:
                package = TOOL_PACKAGES.get(tool, tool)
                raise TargetError(f"target {self.name!r} needs {tool}, which is not installed. "
                                  f"Install it with: apt-get install {package}")

    def check(self) -> None:
        """Before any work: the tools this target needs are installed and LLVM knows its CPU
        (the target protocol's ``check``; ``optimize`` calls it before capturing the model)."""
        self.check_toolchain()
        self.tvm  # noqa: B018  (raises for an mcpu LLVM does not know)

    def check_graph(self, gm, example_inputs: Sequence) -> None:
        """Before the passes: every output is a tensor and every op has a translation (the
        target protocol's ``check_graph``; see :func:`graphopt.targets.coverage.check_graph`)."""
        from .coverage import check_graph

        check_graph(gm, tuple(example_inputs))

    def describe(self) -> str:
        """One line for listings: what it is and where it runs."""
        where = ("rpc " + self.rpc if self.rpc else f"tracker {self.tracker} key {self.key}"
                 if self.tracker else "qemu " + (self.qemu_cpu or "?") if self.emulated else "local")
        feats = ",".join(self.features) or "-"
        return (f"{self.description or self.name} [mcpu={self.mcpu or 'generic'}, "
                f"features={feats}, lanes={self.preferred_channel_multiple}, runs: {where}]")

    # --- phases ----------------------------------------------------------------------------

    def lower(self, gm, example_inputs: Sequence, tune_trials: Optional[int] = None):
        """fx.GraphModule -> :class:`~graphopt.targets.lowering.LoweredModel` (Relax + weights).

        Masked layers run graphopt's sparse kernels where they time faster here than the dense
        kernel built with ``tune_trials`` (:mod:`graphopt.targets.sparse.choice`)."""
        from .lowering import lower
        from .sparse.choice import plan_for

        return lower(gm, tuple(example_inputs), sparse=plan_for(self, tune_trials))

    def tune(self, lowered, trials: Optional[int], *, progress: Optional[Callable] = None,
             log: Optional[logging.Logger] = None):
        """Prepare the Relax module for this target and tune it, reusing the cache.

        Returns:
            ``(prepared_module, database, TuningInfo)``; the database is None when nothing
            was ever tuned for this model's tasks.
        """
        from .pipeline import prepare
        from .tuning import tune

        logger = log or _log
        tvm_target = self.tvm()
        prepared = prepare(lowered.mod, tvm_target, prepack=self.weight_prepack,
                           layout_block=self.layout_block)
        database, info = tune(prepared, self, tvm_target, trials or 0, progress=progress, log=logger)
        return prepared, database, info

    def build(self, lowered, prepared, database, tuning=None, *, log: Optional[logging.Logger] = None):
        """Apply the tuning records, compile, link and load: a runnable CompiledModel."""
        from .artifact import CompiledModel
        from .pipeline import build

        start = time.perf_counter()
        built = build(prepared, self.tvm(), database, prepack=self.weight_prepack)
        return CompiledModel.from_build(self, lowered, built, tuning=tuning,
                                        build_seconds=time.perf_counter() - start,
                                        log=log or _log)

    def compile(self, gm, example_inputs: Sequence, *, tune_trials: Optional[int] = None,
                progress: Optional[Callable] = None, log: Optional[logging.Logger] = None):
        """Lower, tune (``tune_trials`` None or 0: TVM's default schedules) and build ``gm``.

        When layers went sparse, the whole model is also built dense and both are timed: the
        faster is returned (:func:`graphopt.targets.sparse.choice.check_whole_model`).

        Args:
            gm: an eval-mode ``torch.fx.GraphModule``; outputs a tensor or a (nested)
                tuple/list of tensors.
            example_inputs: a tuple of tensors fixing the compiled shapes and dtypes.
            tune_trials: MetaSchedule measurement budget for the whole model.
            progress: a tqdm-like factory for the tuning bar; None: no bar.
            log: where progress and cache hits are logged.

        Returns:
            A :class:`~graphopt.targets.artifact.CompiledModel`.
        """
        logger = log or _log
        self.check_toolchain()
        start = time.perf_counter()
        lowered = self.lower(gm, example_inputs, tune_trials)
        logger.info("%s: lowered to Relax in %.1f s (%d weights)", self.name,
                    time.perf_counter() - start, len(lowered.params))
        prepared, database, info = self.tune(lowered, tune_trials, progress=progress, log=logger)
        compiled = self.build(lowered, prepared, database, tuning=info, log=logger)
        from .sparse.choice import check_whole_model

        return check_whole_model(self, gm, example_inputs, compiled, tune_trials=tune_trials,
                                 progress=progress, log=logger)

    def boards(self) -> int:
        """Devices that can time graphs at once: the tracker's servers under ``key`` (asked now);
        1 for a local, a direct-RPC or an emulated target (the target protocol's ``boards``)."""
        if not self.tracker:
            return 1
        from .boards import tracker_boards

        return tracker_boards(self.tracker, self.key)

    def benchmark_graphs(self, gms: Sequence, example_inputs: Sequence, *, tune_trials: Optional[int] = None,
                         budget_s: float = 2.0) -> List[Any]:
        """:meth:`benchmark_graph` of each graph, in order: behind a tracker with several boards,
        built one by one and timed on the boards at once (:func:`graphopt.targets.boards.benchmark_many`)."""
        from .boards import benchmark_many

        return benchmark_many(self, gms, example_inputs, tune_trials, budget_s)

    def measure_latency(self, gm, example_inputs: Sequence, *, repeat: Optional[int] = None,
                        budget_s: float = 2.0, tune_trials: Optional[int] = None) -> float:
        """Median milliseconds of ``gm`` (see :meth:`benchmark_graph`); NaN on an emulated target."""
        result = self.benchmark_graph(gm, example_inputs, repeat=repeat, budget_s=budget_s,
                                      tune_trials=tune_trials)
        return float("nan") if result is None else result.median_ms

    def benchmark_graph(self, gm, example_inputs: Sequence, *, repeat: Optional[int] = None,
                        budget_s: float = 2.0, tune_trials: Optional[int] = None):
        """Latency statistics (a BenchmarkResult) of a build of ``gm``; None on an emulated target.

        ``tune_trials`` as in :meth:`compile`: None or 0 times the untuned build, more tunes
        through the shared cache first (layers tuned before are not tuned again), so a report
        can time every pass with the schedules the final artifact gets. Builds are cached by
        :func:`~graphopt.analysis.signature.structure_signature` (code, shapes, dtypes, zeros,
        not weight values): timing a graph whose structure a pass left alone costs only the
        runs. Without ``repeat``, the number of runs (3 to 20) fits in about ``budget_s``.
        """
        if self.emulated:
            _warn_once(f"{self.name}: latency is not measured under qemu emulation (NaN)")
            return None
        if self.remote:
            # a build holds a session on its board: keeping it open would leave the next build
            # (a latency search's next candidate) waiting for a free device on a one-board tracker
            with self.compile(gm, example_inputs, tune_trials=tune_trials or 0) as compiled:
                return _benchmark(compiled, repeat, budget_s)
        key = structure_signature(gm, example_inputs,
                                  json.dumps([self.to_dict(), tune_trials or 0], sort_keys=True, default=str))
        compiled = _LATENCY_BUILDS.get(key)
        if compiled is None:
            compiled = self.compile(gm, example_inputs, tune_trials=tune_trials or 0)
            if len(_LATENCY_BUILDS) >= _LATENCY_CACHE_SIZE:
                _LATENCY_BUILDS.pop(next(iter(_LATENCY_BUILDS))).close()
            _LATENCY_BUILDS[key] = compiled
        return _benchmark(compiled, repeat, budget_s)


def _benchmark(compiled, repeat: Optional[int], budget_s: float):
    """Without ``repeat``, as many runs (3 to 20) as fit in about ``budget_s``."""
    if repeat is None:
        first = compiled.benchmark(repeat=1, warmup=1).median_ms
        repeat = max(3, min(20, int(budget_s * 1e3 / max(first, 1e-3))))
    return compiled.benchmark(repeat=repeat, warmup=1)


_LATENCY_CACHE_SIZE = 8
_LATENCY_BUILDS: Dict[str, Any] = {}
_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
