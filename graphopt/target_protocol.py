"""What graphopt asks of a target: ``compile``, and a few optional capabilities passes adapt to.

A target is any object with a ``compile`` method (the built-in :class:`graphopt.Target` is one;
a third party's may be anything). Passes never read a target's attributes directly: they ask
:func:`capabilities_of`, which returns every capability below, taken from the target when it
provides it, else the documented default, with one log line naming what was defaulted, so a
target that leaves a capability out is never given a silent wrong choice.

=========================== =========== ======================================================
capability                  default     used by
=========================== =========== ======================================================
``name`` (str)              class name  reports, log lines
``activation_dtype``        ``"uint8"`` ``quantize`` (``auto``): the dtype the target's int8
(``"uint8"`` / ``"int8"``)              kernels take activations in (x86 VNNI multiplies
                                        uint8 by int8, ARM ``sdot`` int8 by int8)
``preferred_channel_multiple`` ``8``    ``prune_channels``: channel counts are rounded to it
(int >= 1)                              (the fp32 vector width; 8 is what pruning uses
                                        without a target: AVX2's lanes, two NEON registers)
``sparse_block`` (int >= 1) ``1``       ``prune_weights``: the default block, ``(k, 1)``: the
                                        output channels the target's sparse kernels take
                                        together (1: unstructured; graphopt has no sparse
                                        kernel yet, so no built-in target asks for more)
``measure_latency(gm,       absent      per-pass latency in reports, ``separable_conv``'s
example_inputs) -> ms``                 per-layer timing; absent: nothing is timed
``benchmark_graph(gm,       absent      the report's noise bands and tuned timing: statistics
example_inputs,                         with ``median_ms``, ``p10_ms``, ``p90_ms`` of a build
tune_trials=) -> stats``                tuned with ``tune_trials`` (the artifact's schedules);
                                        absent: ``measure_latency``, untuned, no noise band
``emulated`` (bool)         ``False``   timings under emulation mean nothing: not taken
``check()``                 absent      ``optimize`` calls it before any work: a target that
                                        cannot compile here (a missing toolchain, an unknown
                                        CPU) raises then, not after the passes
``check_graph(gm,           absent      ``optimize`` calls it right after capture, before the
example_inputs)``                       passes: a graph the target cannot compile (an op it
                                        has no translation for, an output that is not a
                                        tensor) raises then, not after the passes
``boards`` (int >= 1, or a  ``1``       the latency search: how many devices can time graphs
callable returning one)                 at once (an RPC tracker's servers under the key);
                                        read when used, not resolved once
``benchmark_graphs(gms,     absent      with ``boards`` > 1, :meth:`TargetCapabilities.time_many`:
example_inputs,                         the statistics of several graphs, built one after the
tune_trials=) -> [stats]``              other and measured on several devices at once; absent
                                        (or one board): the graphs are timed one at a time
=========================== =========== ======================================================

Example:
    >>> class Minimal:
    ...     def compile(self, gm, example_inputs, **kwargs):
    ...         return gm
    >>> caps = capabilities_of(Minimal())
    >>> caps.name, caps.activation_dtype, caps.preferred_channel_multiple, caps.sparse_block, caps.can_measure_latency
    ('Minimal', 'uint8', 8, 1, False)
    >>> sorted(caps.defaulted)
    ['activation_dtype', 'emulated', 'measure_latency', 'name', 'preferred_channel_multiple', 'sparse_block']
"""
from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

from .errors import InvalidArgumentError

__all__ = ["ACTIVATION_DTYPES", "DEFAULTS", "Latency", "TargetCapabilities", "TargetProtocol",
           "TimingCache", "capabilities_of", "check_target"]

log = logging.getLogger("graphopt")

ACTIVATION_DTYPES = ("uint8", "int8")

#: The documented default of every optional capability (``measure_latency``: absent).
DEFAULTS: Dict[str, Any] = {
    "activation_dtype": "uint8",
    "preferred_channel_multiple": 8,
    "sparse_block": 1,
    "emulated": False,
    "measure_latency": None,
}


@runtime_checkable
class TargetProtocol(Protocol):
    """The one method every target has; the optional capabilities are in the module docstring."""

    def compile(self, gm, example_inputs: Sequence, *, tune_trials: Optional[int] = None,
                progress: Optional[Callable] = None, log: Optional[logging.Logger] = None) -> Any:
        """Lower, tune and build ``gm`` for ``example_inputs``' shapes; returns a callable model."""
        ...


@dataclasses.dataclass(frozen=True)
class Latency:
    """One timing of a graph: the median, the noise band (p90 - p10, NaN when the target gives
    none) and whether it was timed with tuned schedules."""

    median_ms: float
    spread_ms: float = math.nan
    tuned: bool = False


@dataclasses.dataclass(frozen=True)
class TargetCapabilities:
    """A target's capabilities, each from the target or its documented default.

    Attributes:
        target: the target object itself.
        name: its name.
        activation_dtype: ``"uint8"`` or ``"int8"``.
        preferred_channel_multiple: the channel multiple it runs fastest at (>= 1).
        sparse_block: the output channels its sparse kernels take together (>= 1; 1: unstructured).
        emulated: True when timings on it mean nothing (qemu).
        defaulted: the capabilities the target did not provide.
    """

    target: Any
    name: str
    activation_dtype: str
    preferred_channel_multiple: int
    sparse_block: int
    emulated: bool
    defaulted: Tuple[str, ...]

    @property
    def can_measure_latency(self) -> bool:
        """The target can time a graph on the real device (not emulated)."""
        return callable(getattr(self.target, "measure_latency", None)) and not self.emulated

    def measure_latency(self, gm, example_inputs: Sequence) -> float:
        """Milliseconds of ``gm`` on the target; NaN when it cannot time (see ``can_measure_latency``)."""
        if not self.can_measure_latency:
            return math.nan
        return float(self.target.measure_latency(gm, example_inputs))

    def time(self, gm, example_inputs: Sequence, tune_trials: Optional[int] = None) -> Optional[Latency]:
        """A :class:`Latency` of ``gm`` with the schedules ``tune_trials`` gives (as the final
        compile would); None when the target cannot time. A target without ``benchmark_graph``
        is timed untuned, without a noise band."""
        if not self.can_measure_latency:
            return None
        bench = getattr(self.target, "benchmark_graph", None)
        if not callable(bench):
            return Latency(float(self.target.measure_latency(gm, example_inputs)))
        stats = bench(gm, example_inputs, tune_trials=tune_trials)
        if stats is None:
            return None
        return Latency(float(stats.median_ms), float(stats.p90_ms - stats.p10_ms), bool(tune_trials))

    def boards(self) -> int:
        """How many devices can time graphs at once (``boards`` of the target, asked now: an RPC
        tracker's servers come and go); 1 when the target does not say or cannot time."""
        if not self.can_measure_latency:
            return 1
        value = getattr(self.target, "boards", 1)
        value = value() if callable(value) else value
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidArgumentError(f"target {self.name!r}: boards must be an int >= 1, got {value!r}")
        return value

    def time_many(self, gms: Sequence, example_inputs: Sequence,
                  tune_trials: Optional[int] = None) -> List[Optional[Latency]]:
        """:meth:`time` of each graph, in order: measured on several devices at once when the
        target has ``benchmark_graphs`` and more than one board, else one after the other."""
        gms = list(gms)
        batch = getattr(self.target, "benchmark_graphs", None)
        if len(gms) < 2 or not callable(batch) or not callable(getattr(self.target, "benchmark_graph", None)) \
                or self.boards() < 2:
            return [self.time(gm, example_inputs, tune_trials) for gm in gms]
        stats = list(batch(gms, example_inputs, tune_trials=tune_trials))
        if len(stats) != len(gms):
            raise InvalidArgumentError(f"target {self.name!r}: benchmark_graphs returned {len(stats)} "
                                       f"results for {len(gms)} graphs")
        return [None if st is None else Latency(float(st.median_ms), float(st.p90_ms - st.p10_ms), bool(tune_trials))
                for st in stats]


class TimingCache:
    """Timings by structure signature (code, shapes, dtypes, zeros: ``graphopt.analysis.signature``),
    so a graph with the structure of one timed before is not built and timed again: its latency
    is the same, and a second timing would only add the machine's noise. One cache serves a whole
    ``optimize`` run (the report and the latency search share it, through ``PassContext.time``).

    Attributes:
        measured: timings taken on the target.
        reused: timings answered from the cache.

    Example:
        >>> import torch, torch.fx as fx
        >>> class Fake:
        ...     def compile(self, gm, example_inputs, **kw): return gm
        ...     def measure_latency(self, gm, example_inputs): return 1.0
        >>> cache, caps = TimingCache(), capabilities_of(Fake())
        >>> x = (torch.randn(1, 4),)
        >>> a, b = fx.symbolic_trace(torch.nn.Linear(4, 2)), fx.symbolic_trace(torch.nn.Linear(4, 2))
        >>> cache.time(caps, a, x).median_ms, cache.time(caps, b, x).median_ms, cache.measured, cache.reused
        (1.0, 1.0, 1, 1)
    """

    def __init__(self):
        self.timings: Dict[str, Optional[Latency]] = {}
        self.measured = 0
        self.reused = 0

    def time(self, capabilities: "TargetCapabilities", gm, example_inputs: Sequence,
             tune_trials: Optional[int] = None) -> Optional[Latency]:
        """``capabilities.time(gm, ...)``, or the timing of a graph with the same structure."""
        from .analysis.signature import structure_signature

        key = structure_signature(gm, example_inputs, f"{capabilities.name}|{tune_trials or 0}")
        if key in self.timings:
            self.reused += 1
            return self.timings[key]
        self.measured += 1
        self.timings[key] = timing = capabilities.time(gm, example_inputs, tune_trials)
        return timing

    def time_many(self, capabilities: "TargetCapabilities", gms: Sequence, example_inputs: Sequence,
                  tune_trials: Optional[int] = None) -> List[Optional[Latency]]:
        """:meth:`time` of each graph, in order; the structures not timed before (each once, however
        often it occurs in ``gms``) measured together with :meth:`TargetCapabilities.time_many`.
        The counters are those the graphs timed one by one would give."""
        from .analysis.signature import structure_signature

        keys = [structure_signature(gm, example_inputs, f"{capabilities.name}|{tune_trials or 0}") for gm in gms]
        new: Dict[str, Any] = {}
        for key, gm in zip(keys, gms):
            if key not in self.timings and key not in new:
                new[key] = gm
        if new:
            for key, timing in zip(new, capabilities.time_many(list(new.values()), example_inputs, tune_trials)):
                self.timings[key] = timing
        self.measured += len(new)
        self.reused += len(keys) - len(new)
        return [self.timings[key] for key in keys]


def check_target(target: Any) -> Any:
    """``target`` itself when it is a usable target object, else a TypeError saying what to pass."""
    if isinstance(target, type):
        raise InvalidArgumentError(
            f"target is the class {target.__name__}, not a target: pass a registered name such as "
            f"target='x86', or an instance (e.g. graphopt.Target(name=..., tvm_target={{...}}))")
    if not isinstance(target, TargetProtocol) or not callable(getattr(target, "compile", None)):
        raise InvalidArgumentError(f"target must be a registered name or an object with a compile() method, "
                        f"not {type(target).__name__}")
    return target


_RESOLVED: "weakref.WeakKeyDictionary[Any, TargetCapabilities]" = weakref.WeakKeyDictionary()
_BY_ID: Dict[int, TargetCapabilities] = {}


def capabilities_of(target: Any) -> TargetCapabilities:
    """Resolve ``target``'s capabilities once (logging each default it falls back to).

    Raises:
        InvalidArgumentError: ``target`` is not a target, or a capability it provides has a value
            graphopt cannot use.
    """
    try:
        cached = _RESOLVED.get(target)
    except TypeError:  # not weak-referenceable or unhashable
        cached = _BY_ID.get(id(target))
    if cached is not None and cached.target is target:
        return cached
    check_target(target)
    defaulted = []

    def get(attr: str):
        if hasattr(target, attr):
            return getattr(target, attr)
        defaulted.append(attr)
        return DEFAULTS.get(attr)

    name = getattr(target, "name", None)
    if not isinstance(name, str) or not name:
        defaulted.append("name")
        name = type(target).__name__
    dtype = get("activation_dtype")
    if dtype not in ACTIVATION_DTYPES:
        raise InvalidArgumentError(f"target {name!r}: activation_dtype must be one of {ACTIVATION_DTYPES}, got {dtype!r}")
    multiple = get("preferred_channel_multiple")
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise InvalidArgumentError(f"target {name!r}: preferred_channel_multiple must be an int >= 1, got {multiple!r}")
    block = get("sparse_block")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise InvalidArgumentError(f"target {name!r}: sparse_block must be an int >= 1, got {block!r}")
    emulated = bool(get("emulated"))
    if not callable(getattr(target, "measure_latency", None)):
        defaulted.append("measure_latency")
    caps = TargetCapabilities(target=target, name=name, activation_dtype=dtype,
                              preferred_channel_multiple=multiple, sparse_block=block, emulated=emulated,
                              defaulted=tuple(defaulted))
    if defaulted:
        log.info("target %r (%s) does not provide %s: using the documented defaults (%s)", name,
                 type(target).__name__, ", ".join(defaulted),
                 ", ".join(f"{a}={DEFAULTS.get(a, type(target).__name__)!r}" if a != "measure_latency"
                           else "no latency measurement" for a in defaulted))
    try:
        _RESOLVED[target] = caps
    except TypeError:
        _BY_ID[id(target)] = caps
    return caps
