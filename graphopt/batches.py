"""Batches of data a user hands graphopt (calibration, training): read one way, checked one way.

A batch is a tensor (one-input models) or a tuple/list whose first items are the model's
inputs; anything after them (labels) is ignored. Every batch must match the example inputs in
all but the batch dimension, and be finite: NaN in the data would otherwise surface as every
pass "breaking numerics".

Example:
    >>> import torch
    >>> x = torch.zeros(1, 3, 8, 8)
    >>> [tuple(b[0].shape) for b in as_batches([torch.ones(4, 3, 8, 8), (torch.ones(2, 3, 8, 8), torch.ones(2))], (x,))]
    [(4, 3, 8, 8), (2, 3, 8, 8)]
"""
from __future__ import annotations

from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch

from .errors import InputShapeError, MissingInputError

__all__ = ["as_batches", "batch_inputs", "check_batch", "check_batches"]

Batch = Tuple[torch.Tensor, ...]


def batch_inputs(batch: Any, n_inputs: int, where: str, i: int) -> Batch:
    """Copies of the model inputs of ``batch`` (its first ``n_inputs`` tensors), the ``i``-th of
    ``where``: the caller's tensors are never handed to a model.

    Raises:
        InputShapeError: ``batch`` is neither a tensor nor a tuple starting with that many tensors.
    """
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    if not isinstance(batch, (tuple, list)) or len(batch) < n_inputs or \
            not all(isinstance(t, torch.Tensor) for t in batch[:n_inputs]):
        raise InputShapeError(
            f"{where} batch {i} is a {type(batch).__name__}; each batch must be a tensor or a tuple "
            f"starting with the model's {n_inputs} input tensor(s) (labels after them are ignored)")
    return tuple(t.detach().clone() for t in batch[:n_inputs])  # a forward may write into its inputs


def check_batch(inputs: Sequence[Any], example: Sequence[torch.Tensor], where: str, i: int) -> None:
    """``inputs`` must be as many tensors as ``example``, alike in all but dim 0, and finite.

    Raises:
        InputShapeError: naming the batch, the input and what it should be.
    """
    if len(inputs) != len(example):
        raise InputShapeError(
            f"{where} batch {i} has {len(inputs)} input(s), the model takes {len(example)}: "
            "give each batch as a tensor or a tuple of tensors, one per model input")
    for j, (t, e) in enumerate(zip(inputs, example)):
        if not isinstance(t, torch.Tensor) or t.shape[1:] != e.shape[1:] or t.dtype != e.dtype:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputShapeError(
                f"{where} batch {i}, input {j} is {got}, but the model's example input is "
                f"{tuple(e.shape)} {e.dtype}: batches must have the example's shape and dtype "
                "except for the batch dimension")
        if t.numel() == 0:
            raise InputShapeError(f"{where} batch {i}, input {j} is empty (shape {tuple(t.shape)}): "
                                  "give batches with at least one sample")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputShapeError(
                f"{where} batch {i}, input {j} contains {int((~torch.isfinite(t)).sum())} NaN/Inf "
                "value(s): the data must be finite (normalized like the model's real inputs)")


def check_batches(batches: Iterable[Sequence[Any]], example: Sequence[torch.Tensor], where: str) -> None:
    """:func:`check_batch` on every batch (already input tuples: no label is dropped)."""
    for i, b in enumerate(batches):
        check_batch(b, example, where, i)


def as_batches(data: Optional[Iterable[Any]], example: Optional[Sequence[torch.Tensor]],
               arg: str = "calibration_data", where: str = "calibration") -> Optional[List[Batch]]:
    """``data`` (the argument ``arg``) as a list of input tuples, each checked against ``example``
    (None: the first batch); errors name a batch as "``where`` batch i".

    Raises:
        InputShapeError: ``data`` is a single tensor, or a batch does not fit (see :func:`check_batch`).
        MissingInputError: ``data`` holds no batch.
    """
    if data is None:
        return None
    if isinstance(data, torch.Tensor) or not hasattr(data, "__iter__"):
        raise InputShapeError(f"{arg} must be an iterable of batches (e.g. a list of tensors or a "
                              f"DataLoader), not a {type(data).__name__}: wrap a single tensor as [tensor]")
    n_inputs = len(example) if example is not None else None
    batches: List[Batch] = []
    for i, b in enumerate(data):
        if n_inputs is None:
            n_inputs = len(b) if isinstance(b, (tuple, list)) else 1
        batches.append(batch_inputs(b, n_inputs, where, i))
    if not batches:
        raise MissingInputError(f"{arg} is empty: give at least one batch")
    check_batches(batches, tuple(example) if example is not None else batches[0], where)
    return batches
