"""The weight-sparsity contract: how a layer says which of its weights are zero for good.

``prune_weights`` writes it; ``distill`` (and any pass that trains) and ``quantize`` keep it; a
target's lowering may read it to choose sparse kernels and to store weights compressed. It lives
in the core because passes and targets may not import each other.

A layer (any ``nn.Module`` with a ``weight`` tensor: ``Conv1d``/``Conv2d``, ``Linear``, the
quantized layers) is **masked** when it carries:

- the buffer ``weight_mask`` (:data:`MASK`): ``torch.bool``, the shape of ``weight``, True
  where the weight is kept. Invariant: ``weight[~weight_mask] == 0`` exactly, after every pass
  (:func:`apply_masks` restores it after an optimizer step). The buffer is persistent (it is in
  ``state_dict``) but not counted by ``graphopt.model_bytes``: it is derivable metadata, not
  something an artifact must store.
- the attribute ``weight_sparsity`` (:data:`PATTERN`): a :class:`SparsityPattern` saying how the
  mask is structured, so a lowering knows what kernel fits without scanning it: ``block = (k, 1)``
  means every block of ``k`` consecutive output channels (dim 0 of ``weight``) at one position
  of the other dims is all zero or all kept (``(1, 1)``: unstructured); ``n_m = (n, m)`` means
  every ``m`` consecutive input channels (dim 1) at one output channel and kernel position hold
  at most ``n`` nonzeros.

Example:
    >>> import torch
    >>> conv = torch.nn.Conv2d(4, 8, 1)
    >>> set_mask(conv, conv.weight.abs() > 0.2, SparsityPattern(block=(1, 1)))
    >>> bool((conv.weight[~mask_of(conv)] == 0).all()), pattern_of(conv).block
    (True, (1, 1))
    >>> with torch.no_grad():
    ...     _ = conv.weight.add_(1.0)  # an optimizer step revives pruned weights...
    >>> apply_masks(conv)              # ...the mask puts them back to zero
    1
    >>> bool((conv.weight[~mask_of(conv)] == 0).all()), list(masked_layers(torch.nn.Sequential(conv)))
    (True, ['0'])
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["MASK", "PATTERN", "SparsityPattern", "apply_masks", "copy_mask", "count_masked", "mask_of",
           "mask_tensors", "masked_layers", "pattern_of", "set_mask"]

#: Name of the boolean buffer holding a layer's mask (True: kept).
MASK = "weight_mask"
#: Name of the attribute holding the layer's :class:`SparsityPattern`.
PATTERN = "weight_sparsity"


@dataclasses.dataclass(frozen=True)
class SparsityPattern:
    """The structure of a layer's mask.

    Attributes:
        block: ``(k, 1)``: zeros come in blocks of ``k`` consecutive output channels.
        n_m: ``(n, m)``: at most ``n`` nonzeros in every ``m`` consecutive input channels; None
            when the mask has no such structure.
    """

    block: Tuple[int, int] = (1, 1)
    n_m: Optional[Tuple[int, int]] = None


def mask_of(module: nn.Module) -> Optional[torch.Tensor]:
    """The layer's mask (bool, the shape of its weight), or None when it is dense."""
    mask = getattr(module, "_buffers", {}).get(MASK)
    return mask if isinstance(mask, torch.Tensor) else None


def pattern_of(module: nn.Module) -> Optional[SparsityPattern]:
    """The layer's :class:`SparsityPattern`, or None when it is dense."""
    return getattr(module, PATTERN, None) if mask_of(module) is not None else None


def set_mask(module: nn.Module, mask: torch.Tensor, pattern: SparsityPattern) -> None:
    """Mask ``module``: combine ``mask`` with the one it has (a zero stays zero), zero its
    weight where the mask is False, and record the pattern (unstructured when it differs from
    the pattern of the mask it had: their combination has neither structure).

    Raises:
        ValueError: ``module`` has no weight, or ``mask`` is not of its shape.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"a mask of shape {tuple(mask.shape)} does not fit {type(module).__name__} "
                         f"with weight {None if weight is None else tuple(weight.shape)}")
    mask = mask.detach().to(torch.bool)
    old = mask_of(module)
    if old is not None:
        mask = mask & old
        if pattern_of(module) != pattern:
            pattern = SparsityPattern()
    module.register_buffer(MASK, mask.clone())
    setattr(module, PATTERN, pattern)
    apply_masks(module)


def copy_mask(src: nn.Module, dst: nn.Module) -> bool:
    """Give ``dst`` (a layer that replaces ``src``, e.g. its quantized form) ``src``'s mask and
    pattern; True when there was one to copy."""
    mask = mask_of(src)
    if mask is None:
        return False
    set_mask(dst, mask, pattern_of(src) or SparsityPattern())
    return True


def masked_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Qualified name -> layer, for every masked layer of ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if mask_of(m) is not None}


def mask_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every mask buffer of ``model`` (``graphopt.model_bytes`` leaves them out)."""
    for m in model.modules():
        mask = mask_of(m)
        if mask is not None:
            yield mask


def count_masked(model: nn.Module) -> int:
    """Weights held at zero by masks (the report's "nonzero" is the parameters minus these)."""
    seen, total = set(), 0
    for mask in mask_tensors(model):
        if id(mask) not in seen:
            seen.add(id(mask))
            total += int((~mask).sum())
    return total


def apply_masks(model: nn.Module) -> int:
    """Zero every masked layer's weight where its mask is False (in place, without autograd);
    the number of masked layers.

    Raises:
        ValueError: a mask no longer has its weight's shape (a pass resized the weight and kept
            the mask: it must resize or drop it).
    """
    n = 0
    with torch.no_grad():
        for name, m in masked_layers(model).items():
            mask, w = mask_of(m), m.weight
            if mask.shape != w.shape:
                raise ValueError(f"{name or type(m).__name__}: weight_mask {tuple(mask.shape)} no longer fits "
                                 f"its weight {tuple(w.shape)}: a pass resized the weight and kept the mask")
            w.masked_fill_(~mask, 0)
            n += 1
    return n
