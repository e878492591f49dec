"""graphopt's translations of ATen ops the Relax frontend lacks or gets wrong (TVM 0.27).

Found by compiling timm's CNNs and layers like theirs; each is checked against PyTorch in
``tests/targets/test_aten_translations.py``:

=============================== ============================================================
op                              why
=============================== ============================================================
``amax`` / ``amin``             no translation (``x.amax(-1)`` pooling, CBAM, logsumexp)
``min.dim``                     no translation (``max.dim`` has one)
``adaptive_max_pool2d``         no translation (timm's ``max`` / ``avgmax`` global pools,
                                ``adaptive_max_pool1d`` decomposes to it)
``prod.dim_int``                no translation
``var_mean.correction``         no translation
``rrelu_with_noise_functional`` no translation (eval-mode ``RReLU`` is a leaky ReLU)
``upsample_nearest2d.vec``      the frontend maps output to input pixels with TVM's
                                rounding, not PyTorch's ``floor(dst * scale)``: wrong
                                whenever the scale is not an integer (GhostNetV2's DFC
                                attention upsamples 4x4 gates to 7x7)
``elu.default``                 the frontend drops ``scale`` and ``input_scale`` (SELU
                                decomposes to ``elu``)
``div.Tensor_mode``             an int scalar becomes an int32 constant next to a float
                                tensor, which Relax refuses (EdgeNeXt's positional encoding)
``native_group_norm.default``   fails on ``weight=None`` / ``bias=None``
=============================== ============================================================

Translations that return several values (``min.dim``, pooling with indices) return an
un-emitted ``relax.Tuple``, as the frontend's own do, so ``getitem`` hands on the values.

Example:
    >>> from graphopt.targets import lowering
    >>> all(op in lowering.translations() for op in ("amax.default", "upsample_nearest2d.vec"))
    True
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from graphopt.errors import TargetError

from .translations import register_translation

__all__: List[str] = []


def _arg(node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _axes(dims, ndim: int) -> Optional[List[int]]:
    """ATen's ``dim`` argument as Relax axes; None (every axis) for ``[]`` or None."""
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [d % ndim if ndim else 0 for d in dims]


def _reduction(relax_op_name: str):
    def translate(node, importer):
        from tvm.relax import op as R

        x = importer.env[node.args[0]]
        axes = _axes(_arg(node, 1, "dim"), len(x.ty.shape))
        return importer.block_builder.emit(getattr(R, relax_op_name)(x, axis=axes,
                                                                     keepdims=bool(_arg(node, 2, "keepdim", False))))

    translate.__qualname__ = f"reduce[{relax_op_name}]"
    return translate


register_translation("amax.default")(_reduction("max"))
register_translation("amin.default")(_reduction("min"))


@register_translation("min.dim")
def translate_min_dim(node, importer):
    """``(values, indices)`` of the minimum along one axis."""
    from tvm import relax
    from tvm.relax import op as R

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    axis, keep = _axes(node.args[1], len(x.ty.shape))[0], bool(_arg(node, 2, "keepdim", False))
    values = bb.emit(R.min(x, axis=[axis], keepdims=keep))
    indices = bb.emit(R.astype(R.argmin(x, axis=axis, keepdims=keep), "int64"))
    return relax.Tuple([values, indices])


@register_translation("prod.dim_int")
def translate_prod(node, importer):
    from tvm.relax import op as R

    x = importer.env[node.args[0]]
    out = R.prod(x, axis=_axes(node.args[1], len(x.ty.shape)), keepdims=bool(_arg(node, 2, "keepdim", False)))
    dtype = _arg(node, 3, "dtype")
    if dtype is not None:
        out = R.astype(out, str(dtype).replace("torch.", ""))
    return importer.block_builder.emit(out)


@register_translation("var_mean.correction")
def translate_var_mean(node, importer):
    """``(var, mean)`` with Bessel's ``correction`` (default 1), as ``torch.var_mean``."""
    from tvm import relax
    from tvm.relax import op as R

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    shape = [int(s) for s in x.ty.shape]
    axes = _axes(_arg(node, 1, "dim"), len(shape)) or list(range(len(shape)))
    correction = node.kwargs.get("correction", 1)
    correction = 1 if correction is None else correction
    keep = bool(node.kwargs.get("keepdim", False))
    n = int(np.prod([shape[a] for a in axes]))
    mean = bb.emit(R.mean(x, axis=axes, keepdims=True))
    centered = bb.emit(R.subtract(x, mean))
    total = bb.emit(R.sum(R.multiply(centered, centered), axis=axes, keepdims=keep))
    var = bb.emit(R.divide(total, relax.const(float(max(n - correction, 0)), x.ty.dtype)))
    return relax.Tuple([var, mean if keep else bb.emit(R.squeeze(mean, axis=axes))])


def _refuse_extra_outputs(node, op: str, what: str) -> None:
    """Outputs beyond the first that are not computed (pooling indices, group statistics): a
    graph reading them is refused rather than given placeholder values."""
    for user in node.users:
        if getattr(user.target, "__name__", "") == "getitem" and user.args[1] != 0 and user.users:
            raise TargetError(f"`{user.name}` reads the {what} of {op}, which graphopt's lowering does not "
                              "compute: use its first output only")


@register_translation("adaptive_max_pool2d.default")
def translate_adaptive_max_pool2d(node, importer):
    """PyTorch's bins (``floor(i * in / out)`` to ``ceil((i + 1) * in / out)``), via TOPI."""
    from tvm import relax, topi
    from tvm.relax import op as R

    _refuse_extra_outputs(node, "adaptive_max_pool2d", "indices")
    bb = importer.block_builder
    x = importer.env[node.args[0]]
    size = node.args[1]
    size = [size, size] if isinstance(size, int) else [int(s) for s in size]
    batched = len(x.ty.shape) == 4
    data = x if batched else bb.emit(R.expand_dims(x, axis=0))
    out = bb.emit_te(topi.nn.adaptive_pool, data, size, "max", "NCHW", primfunc_name_hint="adaptive_max_pool2d")
    out = out if batched else bb.emit(R.squeeze(out, axis=[0]))
    return relax.Tuple([out, bb.emit(R.zeros(out.ty.shape, "int64"))])


@register_translation("rrelu_with_noise_functional.default")
def translate_rrelu(node, importer):
    """Eval-mode RReLU: a leaky ReLU with slope ``(lower + upper) / 2`` (training mode refused)."""
    from tvm import relax
    from tvm.relax import op as R

    if _arg(node, 4, "training", False):
        raise TargetError(f"`{node.name}`: RReLU in training mode samples random slopes; compile the model in eval()")
    bb = importer.block_builder
    x = importer.env[node.args[0]]
    lower, upper = _arg(node, 2, "lower", 1.0 / 8), _arg(node, 3, "upper", 1.0 / 3)
    out = bb.emit(R.nn.leakyrelu(x, alpha=(float(lower) + float(upper)) / 2))
    return relax.Tuple([out, importer.env[node.args[1]]])


def _nearest_indices(n_in: int, n_out: int, scale: Optional[float]) -> np.ndarray:
    """PyTorch's legacy ``nearest`` source pixels: ``min(floor(dst * s), n_in - 1)`` in float32,
    ``s = 1 / scale_factor`` when one was given, else ``n_in / n_out``."""
    s = np.float32(1.0 / scale) if scale else np.float32(n_in) / np.float32(n_out)
    src = np.floor(np.arange(n_out, dtype=np.float32) * s).astype(np.int64)
    return np.minimum(src, n_in - 1).astype("int32")


@register_translation("upsample_nearest2d.vec")
def translate_upsample_nearest2d(node, importer):
    """Nearest resize as two gathers of PyTorch's source rows and columns (exact for any size)."""
    from tvm import relax
    from tvm.relax import op as R

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    shape = [int(s) for s in x.ty.shape]
    size, scales = _arg(node, 1, "output_size"), _arg(node, 2, "scale_factors")
    scales = list(scales) if scales else [None, None]
    if size is None:
        size = [int(np.floor(n * s)) for n, s in zip(shape[-2:], scales)]
    out = x
    for axis, n_in, n_out, scale in zip((-2, -1), shape[-2:], size, scales):
        if n_in == n_out and not scale:
            continue
        index = relax.const(_nearest_indices(n_in, int(n_out), scale))
        out = bb.emit(R.take(out, index, axis=len(shape) + axis))
    return out


@register_translation("elu.default")
def translate_elu(node, importer):
    """``scale * (x if x > 0 else alpha * (exp(input_scale * x) - 1))`` (SELU and CELU included)."""
    from tvm import relax
    from tvm.relax import op as R

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    dtype = x.ty.dtype
    alpha, scale, input_scale = (float(_arg(node, i, k, 1.0)) for i, k in
                                 ((1, "alpha"), (2, "scale"), (3, "input_scale")))

    def c(v: float):
        return relax.const(v, dtype)

    scaled = x if input_scale == 1.0 else R.multiply(x, c(input_scale))
    negative = R.multiply(c(alpha), R.subtract(R.exp(R.minimum(scaled, c(0.0))), c(1.0)))
    out = R.where(R.greater(x, c(0.0)), x, negative)
    return bb.emit(out if scale == 1.0 else R.multiply(out, c(scale)))


def _float_dtype(*dtypes: str) -> str:
    return next((d for d in dtypes if d.startswith(("float", "bfloat"))), "float32")


@register_translation("div.Tensor_mode")
def translate_div_mode(node, importer):
    """``torch.div(a, b, rounding_mode=...)`` with PyTorch's type promotion for scalars."""
    from tvm import relax
    from tvm.relax import op as R

    bb = importer.block_builder
    a, b = (importer.env[v] if hasattr(v, "op") else v for v in node.args[:2])
    mode = node.kwargs.get("rounding_mode", node.args[2] if len(node.args) > 2 else None)
    tensors = [v for v in (a, b) if isinstance(v, relax.Expr)]
    dtypes = [str(t.ty.dtype) for t in tensors]
    floating = any(d.startswith(("float", "bfloat")) for d in dtypes) or \
        any(isinstance(v, float) for v in (a, b)) or mode is None
    dtype = _float_dtype(*dtypes) if floating else dtypes[0]

    def as_expr(v):
        if isinstance(v, relax.Expr):
            return v if str(v.ty.dtype) == dtype else R.astype(v, dtype)
        return relax.const(v, dtype)

    a, b = as_expr(a), as_expr(b)
    if mode == "floor":
        return bb.emit(R.floor_divide(a, b))
    quotient = R.divide(a, b)
    return bb.emit(R.trunc(quotient) if mode == "trunc" and floating else quotient)


@register_translation("native_group_norm.default")
def translate_native_group_norm(node, importer):
    """Group norm (``input, weight, bias, N, C, HxW, groups, eps``); a missing affine is ones / zeros."""
    from tvm import relax
    from tvm.relax import op as R

    _refuse_extra_outputs(node, "group_norm", "mean and inverse deviation")
    bb = importer.block_builder
    x = importer.env[node.args[0]]
    channels, dtype = int(x.ty.shape[1]), str(x.ty.dtype)
    weight, bias = (importer.env[a] if a is not None else None for a in node.args[1:3])
    weight = weight if weight is not None else relax.const(np.ones(channels, dtype=dtype))
    bias = bias if bias is not None else relax.const(np.zeros(channels, dtype=dtype))
    out = bb.emit(R.nn.group_norm(x, weight, bias, num_groups=int(node.args[6]), channel_axis=1,
                                  axes=list(range(2, len(x.ty.shape))), epsilon=float(node.args[7])))
    return relax.Tuple([out, out, out])  # the statistics are refused above when read

