"""Observers: what calibration learns about each activation, and the quantization parameters chosen.

An observer is an identity ``nn.Module`` that records statistics of the tensors flowing through
it. After calibration, ``observer.qparams(dtype)`` picks a per-tensor affine quantization
``(scale, zero_point)`` for ``uint8`` or ``int8``. Four kinds, registered by name:

* ``minmax``: the smallest and largest value seen.
* ``moving_average``: an exponential moving average of each batch's min and max
  (``averaging_constant``, as torch.ao's), which discounts single outlier batches.
* ``percentile``: a histogram of the values; the range keeps ``percentile`` % of them on each
  side (99.99 by default) and clips the rest.
* ``mse``: the same histogram; the range minimizing the expected squared quantization error
  (rounding inside, clipping outside) among shrinking candidates.

Every observer refuses NaN/Inf (the message names the layer and the batch): :class:`CalibrationError`.
A tensor that was zero on every batch has no range of its own (:class:`AllZeroError`); the
quantize pass then refuses the data when it is the model's input that is all zero, and
otherwise gives the value a unit range (:meth:`Observer.assume_range`), which is exact for the
zeros it holds (a residual branch whose last BatchNorm scale is 0, as timm initializes ResNets).

Example:
    >>> import torch
    >>> obs = make_observer("minmax", "relu1")
    >>> _ = obs(torch.tensor([0.0, 0.5, 2.55]))
    >>> obs.qparams(torch.uint8)
    QParams(scale=0.009999999776482582, zero_point=0, dtype=torch.uint8)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

import graphopt
from graphopt.ops.int8 import qrange

__all__ = ["AllZeroError", "CalibrationError", "HistogramObserver", "MSEObserver", "MinMaxObserver",
           "MovingAverageObserver", "OBSERVERS", "Observer", "PercentileObserver", "QParams",
           "make_observer", "qparams_from_range", "quantize_weight"]


class CalibrationError(graphopt.GraphoptError, ValueError):
    """Calibration found activations that cannot be quantized (all zero, NaN or Inf)."""


class AllZeroError(CalibrationError):
    """A value was exactly 0 on every calibration batch (it has no range of its own)."""


@dataclasses.dataclass(frozen=True)
class QParams:
    """Per-tensor affine quantization: ``real = (q - zero_point) * scale``.

    ``scale`` is always a float32 value (stored as a Python float), so PyTorch and the
    compiled code divide by exactly the same number.
    """

    scale: float
    zero_point: int
    dtype: torch.dtype

    @property
    def qmin(self) -> int:
        return qrange(self.dtype)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.dtype)[1]

    def quantize_real(self, value: float) -> int:
        """The quantized level of a real value (clipped), e.g. where ReLU6's 6.0 lands."""
        return int(min(max(round(value / self.scale) + self.zero_point, self.qmin), self.qmax))


def _f32(x: float) -> float:
    return float(np.float32(x))


def qparams_from_range(lo: float, hi: float, dtype: torch.dtype) -> QParams:
    """Affine parameters covering ``[lo, hi]`` (widened to include 0, so 0 is exact).

    Raises:
        ValueError: the range is empty (``lo == hi == 0``) or not finite.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"range [{lo}, {hi}] is not finite")
    if hi - lo <= 0:
        raise ValueError("range is empty: every value was 0")
    qmin, qmax = qrange(dtype)
    scale = _f32((hi - lo) / (qmax - qmin))
    if scale <= np.finfo(np.float32).tiny:
        raise ValueError(f"range [{lo:g}, {hi:g}] is too small for float32 scales")
    zero_point = int(min(max(round(qmin - lo / scale), qmin), qmax))
    return QParams(scale, zero_point, dtype)


def quantize_weight(w: torch.Tensor, per_channel: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights in ``[-127, 127]``: ``(q, scale)`` with one scale per output channel
    (axis 0) or a single one. A channel of zeros gets scale 1 (any scale represents it exactly).
    """
    w = w.detach().to(torch.float32)
    if per_channel:
        amax = w.abs().reshape(w.shape[0], -1).amax(1)
    else:
        amax = w.abs().max().reshape(1).expand(w.shape[0])
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).to(torch.float32)
    view = scale.reshape(-1, *([1] * (w.dim() - 1)))
    q = torch.clamp(torch.round(w / view), -127, 127).to(torch.int8)
    return q, scale


class Observer(nn.Module):
    """Identity module recording statistics; subclasses choose the range.

    Args:
        where: the name of the observed value, used in every message.
    """

    kind = ""

    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.batches = 0
        self.nonzero = False
        self.min_val = float("inf")
        self.max_val = float("-inf")
        self.assumed: Optional[Tuple[float, float]] = None  # a range given, not observed

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        t = x.detach()
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CalibrationError(
                f"{self.where}: {bad} NaN/Inf value(s) of {t.numel()} on calibration batch {self.batches}. "
                "Check the calibration data (normalized, finite) and the model's weights; a layer that "
                "overflows can be kept in float with skip=[...].")
        lo, hi = float(t.min()), float(t.max())
        self.nonzero = self.nonzero or lo != 0.0 or hi != 0.0
        self.min_val, self.max_val = min(self.min_val, lo), max(self.max_val, hi)
        self.observe(t, lo, hi)
        self.batches += 1
        return x

    def observe(self, t: torch.Tensor, lo: float, hi: float) -> None:
        """Record one batch (min and max are already computed)."""

    def range(self) -> Tuple[float, float]:
        """The real range to quantize: ``[lo, hi]``."""
        return self.min_val, self.max_val

    def assume_range(self, lo: float, hi: float) -> None:
        """Quantize over ``[lo, hi]`` although every value seen was 0 (exact for those zeros)."""
        self.assumed = (float(lo), float(hi))

    def check(self) -> None:
        """Raise CalibrationError when nothing usable was seen."""
        if self.batches == 0:
            raise CalibrationError(f"{self.where}: no calibration batch reached this value "
                                   "(is it computed only on some inputs?)")
        if not self.nonzero and self.assumed is None:
            raise AllZeroError(
                f"{self.where}: every value was 0 on all {self.batches} calibration batch(es), so it has no "
                "range to quantize. Use real, varied calibration data (not zeros); if the model really "
                "produces only zeros there (e.g. dead ReLUs), keep the layer in float with skip=[...].")

    def qparams(self, dtype: torch.dtype) -> QParams:
        self.check()
        lo, hi = self.assumed if self.assumed is not None and not self.nonzero else self.range()
        try:
            return qparams_from_range(lo, hi, dtype)
        except ValueError as e:
            raise CalibrationError(f"{self.where}: cannot quantize: {e}") from e

    def extra_repr(self) -> str:
        return f"{self.where!r}, range=[{self.min_val:.4g}, {self.max_val:.4g}]"


class MinMaxObserver(Observer):
    """The range of every value seen."""

    kind = "minmax"


class MovingAverageObserver(Observer):
    """Exponential moving average of per-batch min and max."""

    kind = "moving_average"

    def __init__(self, where: str, averaging_constant: float = 0.01):
        super().__init__(where)
        self.c = averaging_constant
        self.avg_min: Optional[float] = None
        self.avg_max: Optional[float] = None

    def observe(self, t, lo, hi):
        if self.avg_min is None:
            self.avg_min, self.avg_max = lo, hi
        else:
            self.avg_min += self.c * (lo - self.avg_min)
            self.avg_max += self.c * (hi - self.avg_max)

    def range(self):
        return self.avg_min, self.avg_max


class HistogramObserver(Observer):
    """A histogram over a range that grows as batches arrive (old counts are re-binned)."""

    BINS = 2048

    def __init__(self, where: str, bins: int = BINS):
        super().__init__(where)
        self.bins = bins
        self.hist: Optional[np.ndarray] = None
        self.lo = self.hi = 0.0

    def observe(self, t, lo, hi):
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if hi <= lo:  # an all-zero batch: count it at 0 once a range exists
            hi = lo + 1e-12
        if self.hist is None:
            self.lo, self.hi, self.hist = lo, hi, np.zeros(self.bins)
        elif lo < self.lo or hi > self.hi:
            self._rebin(min(lo, self.lo), max(hi, self.hi))
        counts = torch.histc(t.float().flatten(), self.bins, self.lo, self.hi)
        self.hist += counts.double().numpy()

    def _rebin(self, lo: float, hi: float) -> None:
        """Spread the old counts over the new, wider bins by the overlap of their intervals."""
        old_edges = np.linspace(self.lo, self.hi, self.bins + 1)
        new_edges = np.linspace(lo, hi, self.bins + 1)
        cdf = np.concatenate([[0.0], np.cumsum(self.hist)])
        self.hist = np.diff(np.interp(new_edges, old_edges, cdf))
        self.lo, self.hi = lo, hi

    def centers(self) -> np.ndarray:
        edges = np.linspace(self.lo, self.hi, self.bins + 1)
        return (edges[:-1] + edges[1:]) / 2


class PercentileObserver(HistogramObserver):
    """Clip the ``100 - percentile`` % most extreme values on each side."""

    kind = "percentile"

    def __init__(self, where: str, percentile: float = 99.99):
        super().__init__(where)
        self.percentile = percentile

    def range(self):
        cdf = np.cumsum(self.hist) / max(self.hist.sum(), 1e-30)
        edges = np.linspace(self.lo, self.hi, self.bins + 1)
        tail = 1.0 - self.percentile / 100.0
        lo = edges[int(np.searchsorted(cdf, tail, side="left"))] if self.min_val < 0 else 0.0
        hi = edges[min(int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1, self.bins)]
        return max(lo, self.min_val), min(hi, self.max_val)


class MSEObserver(HistogramObserver):
    """The clipping range with the least expected squared quantization error."""

    kind = "mse"
    CANDIDATES = 80

    def __init__(self, where: str, dtype: torch.dtype = torch.uint8):
        super().__init__(where)
        self.dtype = dtype

    def qparams(self, dtype):
        self.dtype = dtype
        return super().qparams(dtype)

    def range(self):
        x, w = self.centers(), self.hist
        qmin, qmax = qrange(self.dtype)
        best, best_err = (self.min_val, self.max_val), np.inf
        for alpha in np.linspace(1.0, 0.2, self.CANDIDATES):
            lo, hi = min(self.min_val * alpha, 0.0), max(self.max_val * alpha, 0.0)
            if hi - lo <= 0:
                continue
            scale = (hi - lo) / (qmax - qmin)
            zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
            q = np.clip(np.round(x / scale) + zp, qmin, qmax)
            err = float(np.sum(w * ((q - zp) * scale - x) ** 2))
            if err < best_err:
                best, best_err = (lo, hi), err
        return best


OBSERVERS: Dict[str, Callable[..., Observer]] = {
    cls.kind: cls for cls in (MinMaxObserver, MovingAverageObserver, PercentileObserver, MSEObserver)
}


def make_observer(kind: str, where: str, **kwargs) -> Observer:
    """A new observer of a registered kind; kwargs the kind does not take are ignored."""
    if kind not in OBSERVERS:
        raise graphopt.PassOptionError(f"unknown observer {kind!r}; known: {sorted(OBSERVERS)}")
    cls = OBSERVERS[kind]
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls(where, **{k: v for k, v in kwargs.items() if k in accepted})
