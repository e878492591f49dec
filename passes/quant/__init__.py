"""Building blocks of the ``quantize`` pass: custom ops, observers, quantized modules, graph rewrite.

Importing this package registers ``torch.ops.graphopt.q8_*`` (so a quantized GraphModule runs in a
fresh process) and, when graphopt's targets are installed, their Relax translations.
"""
from . import ops  # noqa: F401  (registers the custom ops)
from . import relax_lowering  # noqa: F401  (registers their Relax translations; TVM is imported lazily)
from .modules import QuantizedConv, QuantizedLinear
from .observers import OBSERVERS, CalibrationError, QParams, make_observer

__all__ = ["CalibrationError", "OBSERVERS", "QParams", "QuantizedConv", "QuantizedLinear", "make_observer"]
