"""graphopt's int8 operators: ``torch.library`` custom ops with exact integer reference kernels.

This is the int8 contract between the ``quantize`` pass, which writes these ops into the graph
(``graphopt.passes.quant``), and the targets, which translate them to integer Relax
(``graphopt.targets.int8``): both import it, neither imports the other. Importing this module
registers the ops, so a quantized GraphModule runs in any process that imported it (or
``graphopt.passes.quantize``, or the lowering).

Every quantized tensor in a graph that the ``quantize`` pass produced is a real ``torch.uint8``
or ``torch.int8`` tensor, and every quantized op is one of these five custom ops, so

* the graph runs in PyTorch (the *simulated* int8 model), and its accuracy is known before
  lowering;
* ``torch.export`` keeps each op as a single node (``torch.ops.graphopt.q8_conv.default``...),
  which the Relax lowering translates one to one into integer compute: nothing has to be
  recognized from patterns of float ops;
* the reference kernels compute what the compiled kernels compute, bit for bit: the
  accumulation is exact (integers held in float32 when the bound proves it exact, else float64),
  the bias is an int32 added to the int32 accumulator, and requantization is the same float32
  operations in the same order (``acc * multiplier``, round half to even, ``+ zero point``,
  clip, cast) on both sides.

=============================  ===================================================================
op                             computes
=============================  ===================================================================
``q8_quantize(x, s, z, lo,     ``clip(round(x / s) + z, lo, hi)`` cast to ``dtype`` (uint8 / int8)
hi, dtype)``
``q8_dequantize(q, s, z)``     ``float32(int32(q) - z) * s``
``q8_conv(x, w, b, m, xz, z,   ``acc = conv(x - xz, w) + b`` in int32 (conv1d or conv2d by the
lo, hi, dtype, stride, pad,    weight's rank, any groups); int output:
dil, groups)``                 ``clip(round(float32(acc) * m) + z, lo, hi)``; float32 output:
                               ``clip(float32(acc) * m, lo, hi)``. ``m`` is per output channel.
``q8_linear(x, w, b, m, xz,    the same with ``acc = (x - xz) @ w.T + b``
z, lo, hi, dtype)``
``q8_matmul(a, b, az, bz, m,   ``acc = (a - az) @ (b - bz)`` (both activations, per tensor), then
z, lo, hi, dtype)``            requantized as above with the scalar ``m``
=============================  ===================================================================

``lo`` / ``hi`` carry the clip bounds, which is where a fused ReLU (``lo = z``) or ReLU6 goes.

Example:
    >>> import torch
    >>> from graphopt.ops import int8
    >>> x = torch.tensor([-1.0, 0.0, 0.26, 10.0])
    >>> q = torch.ops.graphopt.q8_quantize(x, 0.02, 128, 0, 255, torch.uint8)
    >>> q.tolist()
    [78, 128, 141, 255]
    >>> torch.ops.graphopt.q8_dequantize(q, 0.02, 128).tolist()[:3]
    [-1.0, 0.0, 0.25999999046325684]
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F

__all__ = ["DTYPE_RANGE", "NAMESPACE", "OPS", "OP_NAMES", "conv_params", "is_graphopt_op", "qrange"]

NAMESPACE = "graphopt"
#: The ops, by their names in ``torch.ops.graphopt`` (the one list of them).
OPS = ("q8_quantize", "q8_dequantize", "q8_conv", "q8_linear", "q8_matmul")
#: ``node.target.__name__`` of each op as ``torch.export`` shows it (the Relax translation keys).
OP_NAMES = tuple(f"{op}.default" for op in OPS)
#: value range of each quantized dtype
DTYPE_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}
_EXACT_F32 = 2 ** 24  # every integer of smaller magnitude is exact in float32


def qrange(dtype: torch.dtype):
    """``(min, max)`` of a quantized dtype; a clear error for anything else."""
    if dtype not in DTYPE_RANGE:
        raise TypeError(f"graphopt quantized tensors are uint8 or int8, not {dtype}")
    return DTYPE_RANGE[dtype]


def is_graphopt_op(target) -> bool:
    """True for a ``torch.ops.graphopt.q8_*`` overload or packet."""
    return getattr(target, "namespace", None) == NAMESPACE and \
        str(getattr(target, "__name__", "")).startswith("q8_")


def _check_quantized(t: torch.Tensor, what: str) -> None:
    if t.dtype not in DTYPE_RANGE:
        raise TypeError(f"{what} must be a uint8 or int8 tensor, got {t.dtype}")


def _max_centered(t: torch.Tensor, zero_point: int) -> int:
    """Largest ``|q - zero_point|`` any value of ``t``'s dtype can have (a bound, data-free)."""
    lo, hi = qrange(t.dtype)
    return max(abs(lo - zero_point), abs(hi - zero_point))


def _exact_dtype(bound: float) -> torch.dtype:
    """float32 when every partial sum is an integer below 2**24 in magnitude, else float64."""
    return torch.float32 if bound < _EXACT_F32 else torch.float64


def _requantize(acc: torch.Tensor, multiplier: torch.Tensor, out_zp: int, lo: float, hi: float,
                out_dtype: torch.dtype) -> torch.Tensor:
    """int32 accumulator -> output, in exactly the float32 steps the compiled kernel takes."""
    f = acc.to(torch.float32) * multiplier
    if out_dtype == torch.float32:
        if math.isinf(lo) and math.isinf(hi):
            return f
        return torch.clamp(f, lo, hi)
    qrange(out_dtype)
    return torch.clamp(torch.round(f) + float(out_zp), lo, hi).to(out_dtype)


def _custom_op(name: str):
    """``torch.library.custom_op`` for the contract's op ``name`` (one of :data:`OPS`)."""
    if name not in OPS:
        raise ValueError(f"{name!r} is not one of graphopt's int8 ops {OPS}")
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-output-channel vector shaped to broadcast over ``(N, C, *spatial)``."""
    return t.reshape(1, -1, *([1] * (ndim - 2)))


# --- quantize / dequantize -------------------------------------------------------------------

@_custom_op("q8_quantize")
def q8_quantize(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                dtype: torch.dtype) -> torch.Tensor:
    """float32 -> uint8/int8: ``clip(round(x / scale) + zero_point, qmin, qmax)``."""
    qrange(dtype)
    return torch.clamp(torch.round(x.to(torch.float32) / scale) + float(zero_point), qmin, qmax).to(dtype)


@q8_quantize.register_fake
def _(x, scale, zero_point, qmin, qmax, dtype):
    return torch.empty_like(x, dtype=dtype)


@_custom_op("q8_dequantize")
def q8_dequantize(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """uint8/int8 -> float32: ``(q - zero_point) * scale``."""
    _check_quantized(q, "q8_dequantize's input")
    return (q.to(torch.int32) - zero_point).to(torch.float32) * scale


@q8_dequantize.register_fake
def _(q, scale, zero_point):
    return torch.empty_like(q, dtype=torch.float32)


# --- convolution ------------------------------------------------------------------------------

def _conv_out_len(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@_custom_op("q8_conv")
def q8_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, multiplier: torch.Tensor,
            x_zp: int, out_zp: int, lo: float, hi: float, out_dtype: torch.dtype,
            stride: List[int], padding: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    """Integer conv1d/conv2d (by ``weight.dim()``), int32 bias, requantized per output channel."""
    _check_quantized(x, "q8_conv's input")
    if weight.dtype != torch.int8 or bias.dtype != torch.int32:
        raise TypeError(f"q8_conv takes int8 weights and an int32 bias, got {weight.dtype} and {bias.dtype}")
    bound = float(weight.to(torch.int64).abs().flatten(1).sum(1).max()) * _max_centered(x, x_zp)
    ft = _exact_dtype(bound)
    conv = F.conv1d if weight.dim() == 3 else F.conv2d
    acc = conv((x.to(torch.int32) - x_zp).to(ft), weight.to(ft), None, stride, padding, dilation, groups)
    acc = acc.to(torch.int32) + _channel_view(bias, acc.dim())
    return _requantize(acc, _channel_view(multiplier, acc.dim()), out_zp, lo, hi, out_dtype)


@q8_conv.register_fake
def _(x, weight, bias, multiplier, x_zp, out_zp, lo, hi, out_dtype, stride, padding, dilation, groups):
    spatial = [_conv_out_len(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
               for i in range(weight.dim() - 2)]
    return x.new_empty((x.shape[0], weight.shape[0], *spatial), dtype=out_dtype)


# --- linear -----------------------------------------------------------------------------------

@_custom_op("q8_linear")
def q8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, multiplier: torch.Tensor,
              x_zp: int, out_zp: int, lo: float, hi: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Integer ``x @ weight.T`` over the last axis, int32 bias, requantized per output feature."""
    _check_quantized(x, "q8_linear's input")
    if weight.dtype != torch.int8 or bias.dtype != torch.int32:
        raise TypeError(f"q8_linear takes int8 weights and an int32 bias, got {weight.dtype} and {bias.dtype}")
    bound = float(weight.to(torch.int64).abs().sum(1).max()) * _max_centered(x, x_zp)
    ft = _exact_dtype(bound)
    acc = F.linear((x.to(torch.int32) - x_zp).to(ft), weight.to(ft)).to(torch.int32) + bias
    return _requantize(acc, multiplier, out_zp, lo, hi, out_dtype)


@q8_linear.register_fake
def _(x, weight, bias, multiplier, x_zp, out_zp, lo, hi, out_dtype):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


# --- matmul of two activations -----------------------------------------------------------------

@_custom_op("q8_matmul")
def q8_matmul(a: torch.Tensor, b: torch.Tensor, a_zp: int, b_zp: int, multiplier: float, out_zp: int,
              lo: float, hi: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Integer ``(a - a_zp) @ (b - b_zp)`` (torch.matmul broadcasting), requantized per tensor."""
    _check_quantized(a, "q8_matmul's first input")
    _check_quantized(b, "q8_matmul's second input")
    k = a.shape[-1]
    ft = _exact_dtype(float(k) * _max_centered(a, a_zp) * _max_centered(b, b_zp))
    acc = torch.matmul((a.to(torch.int32) - a_zp).to(ft), (b.to(torch.int32) - b_zp).to(ft)).to(torch.int32)
    return _requantize(acc, torch.tensor(multiplier, dtype=torch.float32), out_zp, lo, hi, out_dtype)


@q8_matmul.register_fake
def _(a, b, a_zp, b_zp, multiplier, out_zp, lo, hi, out_dtype):
    shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])  # the pass only quantizes 2-d and up
    return a.new_empty((*shape, a.shape[-2], b.shape[-1]), dtype=out_dtype)


def conv_params(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]):
    """Plain int lists, as the op schema wants them."""
    return [int(s) for s in stride], [int(p) for p in padding], [int(d) for d in dilation]
