"""Recovery after lossy passes: fine-tune the graph with knowledge distillation.

The teacher is ``ctx.reference``, the model before the first lossy pass of the pipeline (the
unpruned model), or ``ctx.original`` when there is none. The student is the current graph
module (an ``nn.Module``), trained to match the teacher's outputs on the calibration data (or
``train_data``): inputs only, the teacher provides the targets, no labels needed.

Loss: with ``loss="auto"``, outputs with a class dim (dim 1 larger than 1: logits, segmentation
maps) use the KL divergence between the temperature-softened distributions, times ``T**2``
(Hinton et al. 2015); other outputs use the mean squared error.

BatchNorm: ``bn="frozen"`` (the default) keeps every BatchNorm in eval mode while the rest
trains: running statistics are used and kept, affine parameters still learn, so the function
optimized is exactly the one deployed, and small calibration batches cannot corrupt the
statistics. ``bn="train"`` trains BatchNorm in train mode (batch statistics; running statistics
re-estimated with momentum): for large, representative data when the statistics went stale.
Measured on a random-BN residual net: frozen cut the student-teacher error 70x, train mode
barely moved it (eval-mode statistics drifted from what was trained). The module is put back in
eval mode at the end, and the run is deterministic for a given ``ctx.seed`` (the global RNG
state is restored afterwards).

Masks: layers that carry a weight mask (:mod:`graphopt.sparsity`, written by ``prune_weights``)
keep their pruned weights at exactly zero: the masks are re-applied after every optimizer step.

Example:
    >>> import torch, graphopt
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 36, 4))
    >>> data = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    >>> opt = graphopt.optimize(m, [("prune_channels", {"ratio": 0.5}), ("distill", {"epochs": 2})],
    ...                         calibration_data=data, progress=False)
    >>> [r.status for r in opt.report.records], opt.graph_module.training
    (['applied', 'applied'], False)
"""
from __future__ import annotations

import math
from typing import Any, List, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import Option
from graphopt.numerics import flat_outputs
from graphopt.sparsity import apply_masks, masked_layers

LOSSES = ("auto", "kl", "mse")
BN_MODES = ("frozen", "train")


def _batches_from(data: Any, n_inputs: int, where: str, consume: bool = True) -> Any:
    """A re-iterable source of input tuples; one-shot iterators are read once into a list."""
    if isinstance(data, torch.Tensor) or not hasattr(data, "__iter__"):
        raise graphopt.PassOptionError(
            f"distill: {where} must be an iterable of batches (tensors, or tuples whose first "
            f"{n_inputs} item(s) are the model's inputs), got {type(data).__name__}")
    if iter(data) is data and consume:  # a generator or iterator: keep what it yields
        data = list(data)
    return data


def _inputs(batch: Any, example: Tuple[torch.Tensor, ...], i: int) -> Tuple[torch.Tensor, ...]:
    """The model inputs of training batch ``i``, checked like calibration data (shape, dtype, finite)."""
    inputs = graphopt.batch_inputs(batch, len(example), "distill: training", i)
    graphopt.check_batch(inputs, example, "distill: training", i)
    return inputs


def validate_options(gm: fx.GraphModule, ctx: graphopt.PassContext, train_data=None, **_) -> None:
    """Distillation needs data: calibration_data or train_data (checked before any pass runs)."""
    if train_data is None and not ctx.calibration_data:
        raise graphopt.MissingInputError(
            "distill needs input batches to train on: pass calibration_data=[batch, ...] to "
            "optimize(), or the option train_data=<iterable of batches> (inputs only, no labels needed)")
    if train_data is not None:
        data = _batches_from(train_data, max(len(ctx.example_inputs), 1), "train_data", consume=False)
        if isinstance(data, (list, tuple)):  # in memory: check every batch now, not mid-training
            for i, b in enumerate(data):
                _inputs(b, ctx.example_inputs, i)


def _rebatch(batches: List[Tuple[torch.Tensor, ...]], size: int, gen: torch.Generator) -> List[Tuple[torch.Tensor, ...]]:
    """All samples, shuffled, in batches of ``size`` (the last one may be smaller)."""
    cols = [torch.cat([b[j] for b in batches]) for j in range(len(batches[0]))]
    perm = torch.randperm(cols[0].shape[0], generator=gen)
    return [tuple(c[perm[i:i + size]] for c in cols) for i in range(0, len(perm), size)]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, loss: str) -> torch.Tensor:
    """KL(teacher || student) over dim 1 at ``temperature`` (times T^2), or the MSE."""
    if loss == "auto":
        loss = "kl" if student.dim() >= 2 and student.shape[1] > 1 else "mse"
    if loss == "mse":
        return F.mse_loss(student, teacher)
    t = temperature
    log_s = F.log_softmax(student / t, dim=1)
    log_t = F.log_softmax(teacher / t, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean() * t * t


def _set_bn_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@graphopt.register_pass(
    "distill",
    exact=False,
    description="Fine-tune with knowledge distillation from the model before the lossy passes",
    options={
        "epochs": Option(3, int, check=lambda v: v >= 1, help="passes over the data, >= 1"),
        "lr": Option(1e-3, float, check=lambda v: v > 0, help="Adam learning rate (cosine-annealed to 0)"),
        "temperature": Option(4.0, float, check=lambda v: v > 0, help="softmax temperature of the KL loss, > 0"),
        "batch_size": Option(None, int, check=lambda v: v >= 1,
                             help="re-batch the data to this many samples (default: batches as given)"),
        "weight_decay": Option(0.0, float, check=lambda v: v >= 0, help="Adam weight decay, >= 0"),
        "loss": Option("auto", str, choices=LOSSES, help="kl on class scores, mse otherwise (auto)"),
        "bn": Option("frozen", str, choices=BN_MODES,
                     help="frozen: BatchNorm stays in eval mode (statistics kept); train: batch statistics"),
        "train_data": Option(None, None, help="iterable of input batches (default: calibration_data)"),
    },
    runs_after=("prune_channels", "prune_weights", "separable_conv"),
    runs_before=("quantize",),
    validate=validate_options,
)
def distill(gm: fx.GraphModule, ctx: graphopt.PassContext, epochs, lr, temperature, batch_size,
            weight_decay, loss, bn, train_data):
    """Train the current graph to match the reference model's outputs, then put it in eval mode."""
    n_inputs = max(len(ctx.example_inputs), 1)
    source = _batches_from(train_data, n_inputs, "train_data") if train_data is not None else ctx.calibration_data
    teacher = ctx.reference if ctx.reference is not None else ctx.original
    who = "the model before the lossy passes" if ctx.reference is not None else "the original model"
    if teacher is None:
        raise graphopt.MissingInputError("distill needs a teacher: run it through optimize() or a PassManager")
    params = [p for p in gm.parameters() if p.requires_grad]
    if not params:
        ctx.note("no trainable parameters (every requires_grad is False): nothing to distill")
        return gm
    masked = len(masked_layers(gm))
    in_memory = isinstance(source, (list, tuple))
    n_batches = len(source) if hasattr(source, "__len__") else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)
        gen = torch.Generator().manual_seed(ctx.seed)
        if in_memory:
            batches = [_inputs(b, ctx.example_inputs, i) for i, b in enumerate(source)]
            if not batches:
                raise graphopt.MissingInputError("distill: the training data holds no batch")
            if batch_size is not None:
                n_batches = math.ceil(sum(b[0].shape[0] for b in batches) / batch_size)
        frozen_bn = bn == "frozen"
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        total = epochs * n_batches if n_batches else None
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total) if total else None
        teacher_was_training = teacher.training
        teacher.eval()
        bar = ctx.progress(total=total, desc="distill", unit="batch")
        epoch_losses: List[float] = []
        try:
            with torch.enable_grad():
                for epoch in range(epochs):
                    gm.train()
                    if frozen_bn:
                        _set_bn_eval(gm)
                    if in_memory:
                        if batch_size is not None:
                            epoch_batches = _rebatch(batches, batch_size, gen)
                        else:
                            epoch_batches = [batches[i] for i in torch.randperm(len(batches), generator=gen)]
                    else:
                        epoch_batches = (_inputs(b, ctx.example_inputs, i) for i, b in enumerate(source))
                    running, count = 0.0, 0
                    for inputs in epoch_batches:
                        if not frozen_bn and inputs[0].shape[0] < 2:
                            continue  # BatchNorm in train mode cannot use a batch of one
                        with torch.no_grad():
                            targets = [t.detach() for t in flat_outputs(teacher(*inputs))]
                        outs = flat_outputs(gm(*inputs))
                        value = sum(kd_loss(o, t, temperature, loss) for o, t in zip(outs, targets)
                                    if o.is_floating_point())
                        opt.zero_grad(set_to_none=True)
                        value.backward()
                        opt.step()
                        if masked:
                            apply_masks(gm)  # pruned weights stay zero (graphopt.sparsity)
                        if sched is not None:
                            sched.step()
                        running += float(value.detach())
                        count += 1
                        bar.update(1)
                        if hasattr(bar, "set_postfix"):
                            bar.set_postfix(epoch=epoch + 1, loss=f"{running / count:.4g}")
                    if count == 0:
                        raise graphopt.MissingInputError("distill: the training data yielded no usable batch")
                    epoch_losses.append(running / count)
        finally:
            bar.close()
            gm.zero_grad(set_to_none=True)
            gm.eval()
            teacher.train(teacher_was_training)
    ctx.note(f"distilled from {who}: {epochs} epoch(s) x {count} batches, loss {loss} "
             f"(T={temperature:g}), lr {lr:g}, BatchNorm {'frozen' if frozen_bn else 'in train mode'}; "
             f"mean loss per epoch: {', '.join(f'{v:.4g}' for v in epoch_losses)}")
    if masked:
        ctx.note(f"{masked} masked layer(s) kept their pruned weights at zero (masks re-applied after every step)")
    return gm
