"""What a pass may read besides the graph: data, the target, a logger, progress bars."""
from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .errors import MissingInputError
from .target_protocol import Latency, TargetCapabilities, TimingCache, capabilities_of

log = logging.getLogger("graphopt")


def default_progress(iterable: Optional[Iterable] = None, **kwargs):
    """A tqdm bar on stderr, silent when stderr is not a terminal unless forced."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", not sys.stderr.isatty())
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


def no_progress(iterable: Optional[Iterable] = None, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=True, **kwargs)


_NEEDS_HELP = {
    "example_inputs": "pass example_inputs=(torch.randn(1, 3, 224, 224),) shaped like the model's inputs",
    "calibration_data": "pass calibration_data=[batch, ...] (tensors, or tuples of tensors for several inputs)",
    "eval_fn": "pass eval_fn=lambda model: accuracy_of(model) returning a float (higher is better)",
    "target": "pass target='x86' or target='arm' (see `graphopt targets`)",
}


@dataclasses.dataclass
class PassContext:
    """Shared, read-mostly state of one pipeline run.

    Attributes:
        example_inputs: inputs the model is traced, shape-propagated and checked with.
        calibration_data: a list of input batches, each a tuple of tensors.
        eval_fn: ``eval_fn(model) -> float``, higher is better (e.g. accuracy).
        target: the resolved target object, or None.
        original: the captured model before any pass (never modified).
        reference: the model before the first lossy pass ran: the teacher for recovery passes.
        seed: seed for passes that sample.
        progress: progress-bar factory with tqdm's signature.
        messages: what the running pass reported with ``note()``; read by the report.
        warnings: what it reported with ``warn()``: the report shows them at warning level.
        data: structured, JSON-serializable results of the running pass, stored in its report
            record's ``data`` (the latency search puts its steps under ``"search"``).
        tune_trials: the schedules every timing uses (``optimize``'s tune_trials).
        timings: the run's timing cache: :meth:`time` and the report share it.
    """

    example_inputs: Tuple[torch.Tensor, ...] = ()
    calibration_data: Optional[List[Tuple[torch.Tensor, ...]]] = None
    eval_fn: Optional[Callable[[Any], float]] = None
    target: Any = None
    original: Optional[torch.fx.GraphModule] = None
    reference: Optional[torch.fx.GraphModule] = None
    seed: int = 0
    logger: logging.Logger = log
    progress: Callable = default_progress
    messages: List[str] = dataclasses.field(default_factory=list)
    warnings: List[str] = dataclasses.field(default_factory=list)
    data: Dict[str, Any] = dataclasses.field(default_factory=dict)
    tune_trials: Optional[int] = None
    timings: TimingCache = dataclasses.field(default_factory=TimingCache)

    @property
    def capabilities(self) -> Optional[TargetCapabilities]:
        """The target's capabilities (documented defaults for what it leaves out); None without a target."""
        return capabilities_of(self.target) if self.target is not None else None

    def time(self, gm: torch.fx.GraphModule) -> Optional[Latency]:
        """``gm``'s latency on the target with the run's schedules (``tune_trials``); a graph with
        the structure of one timed before in this run gets that timing. None when the target
        cannot time (none given, no ``measure_latency``, or emulated)."""
        caps = self.capabilities
        if caps is None or not caps.can_measure_latency:
            return None
        return self.timings.time(caps, gm, self.example_inputs, self.tune_trials)

    def time_many(self, gms: Sequence[torch.fx.GraphModule]) -> List[Optional[Latency]]:
        """:meth:`time` of each graph, in order; on a target with several boards the new
        structures are measured on several at once (``TargetCapabilities.time_many``)."""
        caps = self.capabilities
        if caps is None or not caps.can_measure_latency:
            return [None] * len(gms)
        return self.timings.time_many(caps, list(gms), self.example_inputs, self.tune_trials)

    def note(self, message: str) -> None:
        """Record a message for the current pass's report entry (e.g. why a layer was skipped)."""
        self.messages.append(message)
        self.logger.info(message)

    def warn(self, message: str) -> None:
        """Record a warning for the current pass (e.g. it achieved far less than asked, and why)."""
        self.warnings.append(message)
        self.logger.warning(message)

    def require(self, needs: Sequence[str], who: str) -> None:
        """Raise MissingInputError naming what ``who`` needs and how to give it."""
        missing = [n for n in needs if not getattr(self, n)]
        if missing:
            how = "; ".join(_NEEDS_HELP[n] for n in missing)
            raise MissingInputError(f"{who} needs {', '.join(missing)}: {how}.")

    def data_batches(self) -> List[Tuple[torch.Tensor, ...]]:
        """Calibration batches when given, else the example inputs as one batch."""
        return list(self.calibration_data) if self.calibration_data else [tuple(self.example_inputs)]
