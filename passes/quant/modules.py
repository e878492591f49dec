"""Quantized conv and linear layers: int8 weights, int32 bias, one requantization multiplier per channel.

They are ordinary modules holding their integers as (frozen) parameters, so

* the fx graph stays readable (``block1.conv1`` is still a ``call_module`` named ``block1.conv1``)
  and MACs, parameter counts and model bytes work as for any layer;
* ``torch.export`` inlines ``forward`` into one ``torch.ops.graphopt.q8_conv`` /
  ``q8_linear`` node whose weights are lifted as parameters: the lowering keeps them as model
  weights (``params.npz``), where tuning may prepack them.

Example:
    >>> import torch
    >>> from graphopt.passes.quant.modules import QuantizedLinear
    >>> from graphopt.passes.quant.observers import QParams
    >>> lin = torch.nn.Linear(4, 2)
    >>> q = QuantizedLinear.from_float(lin, QParams(0.02, 128, torch.uint8), None, per_channel=True)
    >>> q(torch.full((1, 4), 140, dtype=torch.uint8)).dtype
    torch.float32
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

import graphopt
from graphopt.ops import int8  # registers torch.ops.graphopt.q8_*

from .observers import QParams, quantize_weight

__all__ = ["QuantizedConv", "QuantizedLinear", "output_spec"]

_INT32 = (-(2 ** 31), 2 ** 31 - 1)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=False)


def output_spec(x_scale: float, w_scale: torch.Tensor, out: Optional[QParams], act: Optional[str]):
    """``(multiplier, out_zp, lo, hi, out_dtype)`` for an int8/uint8 output (``out``) or float32 (None).

    ``act`` ("relu", "relu6" or None) is folded into the clip bounds.
    """
    combined = x_scale * w_scale.double()
    if out is None:
        lo = 0.0 if act in ("relu", "relu6") else -math.inf
        hi = 6.0 if act == "relu6" else math.inf
        return combined.float(), 0, lo, hi, torch.float32
    lo, hi = out.qmin, out.qmax
    if act in ("relu", "relu6"):
        lo = max(lo, out.zero_point)
    if act == "relu6":
        hi = min(hi, out.quantize_real(6.0))
    return (combined / out.scale).float(), out.zero_point, float(lo), float(hi), out.dtype


def quantize_bias(bias: Optional[torch.Tensor], x_scale: float, w_scale: torch.Tensor) -> torch.Tensor:
    """int32 bias on the accumulator's scale ``x_scale * w_scale`` (zeros when there is none)."""
    if bias is None:
        return torch.zeros(w_scale.numel(), dtype=torch.int32)
    q = torch.round(bias.detach().double() / (x_scale * w_scale.double()))
    return torch.clamp(q, *_INT32).to(torch.int32)


class _QuantizedLayer(nn.Module):
    """What conv and linear share: the integers, the zero points, the clip, the scales."""

    def _init_quant(self, weight: torch.Tensor, bias: Optional[torch.Tensor], x: QParams,
                    out: Optional[QParams], act: Optional[str], per_channel: bool):
        q, w_scale = quantize_weight(weight, per_channel)
        multiplier, out_zp, lo, hi, out_dtype = output_spec(x.scale, w_scale, out, act)
        self.weight = _frozen(q)
        self.bias = _frozen(quantize_bias(bias, x.scale, w_scale))
        self.multiplier = _frozen(multiplier)
        self.x_zp, self.out_zp, self.lo, self.hi, self.out_dtype = x.zero_point, out_zp, lo, hi, out_dtype
        # kept for inspection and dequantization only (plain attributes: not model weights)
        self.x_qparams, self.out_qparams, self.activation = x, out, act
        self.weight_scale = w_scale
        self.per_channel = per_channel

    def float_weight(self) -> torch.Tensor:
        """The dequantized weights (what the simulation effectively multiplies by)."""
        view = self.weight_scale.reshape(-1, *([1] * (self.weight.dim() - 1)))
        return self.weight.float() * view

    def _extra(self) -> str:
        out = (f"out={str(self.out_dtype).replace('torch.', '')} scale={self.out_qparams.scale:.4g} "
               f"zp={self.out_zp}" if self.out_qparams else "out=float32")
        act = f", {self.activation}" if self.activation else ""
        return (f"x: {str(self.x_qparams.dtype).replace('torch.', '')} scale={self.x_qparams.scale:.4g} "
                f"zp={self.x_zp}, {out}{act}, weights int8 {'per-channel' if self.per_channel else 'per-tensor'}")


class QuantizedConv(_QuantizedLayer):
    """A Conv1d/Conv2d on uint8/int8 activations with int8 weights (see :mod:`graphopt.ops.int8`)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
                 groups: int, x: QParams, out: Optional[QParams], act: Optional[str] = None,
                 per_channel: bool = True):
        super().__init__()
        if weight.dim() not in (3, 4):
            raise ValueError(f"QuantizedConv handles conv1d and conv2d, not a weight of shape {tuple(weight.shape)}")
        self.stride, self.padding, self.dilation = int8.conv_params(stride, padding, dilation)
        self.groups = int(groups)
        self.in_channels = weight.shape[1] * self.groups
        self.out_channels = weight.shape[0]
        self.kernel_size: Tuple[int, ...] = tuple(weight.shape[2:])
        self._init_quant(weight, bias, x, out, act, per_channel)

    @classmethod
    def from_float(cls, conv: nn.Module, x: QParams, out: Optional[QParams], act: Optional[str] = None,
                   per_channel: bool = True) -> "QuantizedConv":
        return cls(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                   x, out, act, per_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.graphopt.q8_conv(x, self.weight, self.bias, self.multiplier, self.x_zp, self.out_zp,
                                          self.lo, self.hi, self.out_dtype, self.stride, self.padding,
                                          self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, {self._extra()}")


class QuantizedLinear(_QuantizedLayer):
    """A Linear on uint8/int8 activations with int8 weights (see :mod:`graphopt.ops.int8`)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], x: QParams,
                 out: Optional[QParams], act: Optional[str] = None, per_channel: bool = True):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._init_quant(weight, bias, x, out, act, per_channel)

    @classmethod
    def from_float(cls, linear: nn.Module, x: QParams, out: Optional[QParams], act: Optional[str] = None,
                   per_channel: bool = True) -> "QuantizedLinear":
        return cls(linear.weight, linear.bias, x, out, act, per_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.graphopt.q8_linear(x, self.weight, self.bias, self.multiplier, self.x_zp, self.out_zp,
                                            self.lo, self.hi, self.out_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._extra()}"


# --- MACs of the quantized ops (same work as the float layers they replace) -------------------

@graphopt.register_macs(QuantizedConv)
def _qconv_macs(node, m):
    shape = node.meta.get("tensor_meta")
    return math.prod(shape.shape) * (m.in_channels // m.groups) * math.prod(m.kernel_size) if shape else 0


@graphopt.register_macs(QuantizedLinear)
def _qlinear_macs(node, m):
    shape = node.meta.get("tensor_meta")
    return math.prod(shape.shape) * m.in_features if shape else 0


@graphopt.register_macs(torch.ops.graphopt.q8_matmul.default)
def _qmatmul_macs(node, m):
    out, a = node.meta.get("tensor_meta"), node.args[0].meta.get("tensor_meta")
    return math.prod(out.shape) * a.shape[-1] if out is not None and a is not None else 0
