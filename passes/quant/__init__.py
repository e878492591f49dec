"""Building blocks of the ``quantize`` pass: observers, quantized modules, graph rewrite.

The int8 ops themselves (``torch.ops.graphopt.q8_*``, their reference kernels and names) are the
core's contract, :mod:`graphopt.ops.int8`, imported (so registered) here: a quantized GraphModule
runs in a fresh process after importing this package. Their lowering lives in the targets
(:mod:`graphopt.targets.int8`): this package imports neither TVM nor ``graphopt.targets``.
"""
from graphopt.ops import int8 as _int8  # noqa: F401  (registers torch.ops.graphopt.q8_*)

from .modules import QuantizedConv, QuantizedLinear
from .observers import OBSERVERS, CalibrationError, QParams, make_observer

__all__ = ["CalibrationError", "OBSERVERS", "QParams", "QuantizedConv", "QuantizedLinear", "make_observer"]
