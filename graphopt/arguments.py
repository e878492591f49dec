"""``optimize()``'s arguments, checked in one place before any slow work.

Each check raises :class:`~graphopt.errors.InvalidArgumentError` (or a more specific graphopt
error) whose message names the argument, what is wrong with it and what to pass instead, so a
typo costs a second, not a capture, a pipeline and a compile.

Example:
    >>> check_passes("fuse_conv_bn")
    Traceback (most recent call last):
    ...
    graphopt.errors.InvalidArgumentError: passes must be a list of passes, not a string: pass passes=['fuse_conv_bn']
"""
from __future__ import annotations

import inspect
import math
import numbers
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .errors import InputShapeError, InvalidArgumentError, InvalidModelError, did_you_mean

__all__ = ["check_concrete_args", "check_eval_fn", "check_eval_result", "check_example_inputs",
           "check_leaf_modules", "check_model", "check_passes", "check_positive", "check_tolerances",
           "check_tune_trials"]


def check_model(model: Any) -> None:
    """An eager ``nn.Module`` with real (not ``meta``) weights."""
    if isinstance(model, torch.jit.ScriptModule):
        raise InvalidArgumentError(
            f"model is a TorchScript module ({type(model).__name__}): graphopt traces eager PyTorch "
            "modules with torch.fx, which cannot read TorchScript; pass the eager nn.Module you "
            "scripted (the object before torch.jit.script / torch.jit.trace)")
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_meta:
                raise InvalidModelError(
                    f"{kind} `{name}` is on the meta device (it has a shape but no values): load real "
                    "weights first (model.to_empty(device='cpu') then load_state_dict(...)), or build "
                    "the model on the CPU")
            if t.device.type != "cpu":
                raise InvalidModelError(
                    f"{kind} `{name}` is on {t.device}: graphopt optimizes for CPUs; move the model with "
                    "model.cpu() first")


def check_passes(passes: Any) -> List[Any]:
    """``None`` or a list/tuple of pass items, each a name, ``(name, {options})``, or a pass."""
    if passes is None:
        return []
    if isinstance(passes, str):
        names = [p.strip() for p in passes.split(",") if p.strip()]
        raise InvalidArgumentError(f"passes must be a list of passes, not a string: pass passes={names!r}")
    if callable(passes) and not isinstance(passes, (list, tuple)):
        return [passes]
    if not isinstance(passes, (list, tuple)):
        raise InvalidArgumentError(f"passes must be a list (e.g. ['fuse_conv_bn', ('prune_channels', "
                                   f"{{'ratio': 0.5}})]), got {type(passes).__name__}")
    for i, item in enumerate(passes):
        if isinstance(item, (tuple, list)):
            if len(item) != 2 or not isinstance(item[0], str):
                raise InvalidArgumentError(
                    f"passes[{i}] = {item!r}: a pass with options is a pair (name, {{option: value}}), "
                    "e.g. ('prune_channels', {'ratio': 0.5})")
            if not isinstance(item[1], Mapping):
                raise InvalidArgumentError(
                    f"passes[{i}] = {item!r}: the options of {item[0]!r} must be a dict, got "
                    f"{type(item[1]).__name__}; e.g. ({item[0]!r}, {{'ratio': {item[1]!r}}}) "
                    f"(`graphopt passes` lists each pass's options)")
        elif not (isinstance(item, str) or callable(item)):
            raise InvalidArgumentError(
                f"passes[{i}] is a {type(item).__name__}: each pass is a registered name, a (name, "
                "{options}) pair, or a pass function")
    return list(passes)


def check_example_inputs(inputs: Sequence[torch.Tensor]) -> None:
    """Non-empty and finite (the numeric checks compare outputs on these)."""
    if not inputs:
        raise InputShapeError("example_inputs is empty: pass at least one tensor, e.g. (torch.randn(1, 3, 224, 224),)")
    for i, t in enumerate(inputs):
        if t.numel() == 0:
            raise InputShapeError(
                f"example_inputs[{i}] has shape {tuple(t.shape)} with no elements: every check would "
                "compare empty tensors; pass at least one sample (batch size >= 1)")
        if t.is_meta:
            raise InputShapeError(f"example_inputs[{i}] is on the meta device: pass a CPU tensor with values")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputShapeError(
                f"example_inputs[{i}] contains {int((~torch.isfinite(t)).sum())} NaN/Inf value(s): "
                "pass finite inputs shaped and normalized like the model's real inputs")


def check_positive(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """A number > 0 (finite unless ``allow_inf``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value <= 0 \
            or (math.isinf(value) and not allow_inf):
        raise InvalidArgumentError(f"{name} must be a positive number (e.g. {name}=1e-4), got {value!r}")
    return float(value)


def check_tune_trials(tune_trials: Any, has_target: bool) -> None:
    """An int >= 0 or None; given without a target it does nothing, which is said."""
    if tune_trials is None:
        return
    if isinstance(tune_trials, bool) or not isinstance(tune_trials, int) or tune_trials < 0:
        raise InvalidArgumentError(
            f"tune_trials must be a non-negative int (0: default schedules) or None, got {tune_trials!r}")
    if tune_trials > 0 and not has_target:
        warnings.warn(f"tune_trials={tune_trials} has no effect without a target: pass target='x86' (or "
                      "another, see `graphopt targets`) to compile and tune", UserWarning, stacklevel=3)


def check_tolerances(tolerances: Any, pipeline: Sequence[str]) -> Dict[str, float]:
    """Keys are passes of this pipeline, values positive numbers (``inf``: no limit)."""
    if tolerances is None:
        return {}
    if not isinstance(tolerances, Mapping):
        raise InvalidArgumentError(
            f"tolerances must be a dict {{pass name: relative error}}, got {type(tolerances).__name__}")
    out = {}
    for name, value in tolerances.items():
        if name not in pipeline:
            raise InvalidArgumentError(
                f"tolerances[{name!r}]: {name!r} is not a pass of this pipeline "
                f"({', '.join(pipeline) or 'none'}).{did_you_mean(name, pipeline)}")
        out[name] = check_positive(f"tolerances[{name!r}]", value, allow_inf=True)
    return out


def check_leaf_modules(model: torch.nn.Module, leaf_modules: Any) -> Tuple[Any, ...]:
    """Names of submodules of ``model``, or nn.Module subclasses."""
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = (leaf_modules,)
    if not isinstance(leaf_modules, (list, tuple, set)):
        raise InvalidArgumentError(f"leaf_modules must be a list of submodule names or module classes, "
                                   f"got {type(leaf_modules).__name__}")
    names = [n for n, _ in model.named_modules() if n]
    for item in leaf_modules:
        if isinstance(item, type):
            if not issubclass(item, torch.nn.Module):
                raise InvalidArgumentError(f"leaf_modules: {item.__name__} is not an nn.Module class")
        elif isinstance(item, str):
            if item not in names:
                raise InvalidArgumentError(
                    f"leaf_modules: the model has no submodule named {item!r}.{did_you_mean(item, names)} "
                    "(names as in model.named_modules())")
        else:
            raise InvalidArgumentError(f"leaf_modules: {item!r} is neither a submodule name nor a module class")
    return tuple(leaf_modules)


def check_concrete_args(model: torch.nn.Module, concrete_args: Any) -> Optional[Dict[str, Any]]:
    """A dict whose keys are parameters of ``model.forward``."""
    if concrete_args is None:
        return None
    if not isinstance(concrete_args, Mapping):
        raise InvalidArgumentError(f"concrete_args must be a dict {{forward argument: value}}, "
                                   f"got {type(concrete_args).__name__}")
    params = list(inspect.signature(model.forward).parameters)
    for name in concrete_args:
        if name not in params:
            raise InvalidArgumentError(
                f"concrete_args[{name!r}]: {type(model).__name__}.forward has no argument {name!r} "
                f"(its arguments: {', '.join(params) or 'none'}).{did_you_mean(name, params)}")
    return dict(concrete_args)


def check_eval_fn(eval_fn: Any) -> Optional[Callable]:
    """Callable with one argument (the model)."""
    if eval_fn is None:
        return None
    if not callable(eval_fn):
        raise InvalidArgumentError(f"eval_fn must be a function eval_fn(model) -> float, got {type(eval_fn).__name__}")
    try:
        inspect.signature(eval_fn).bind(object())
    except TypeError:
        raise InvalidArgumentError(
            f"eval_fn must take exactly one argument, the model (eval_fn(model) -> float, e.g. "
            f"lambda model: accuracy(model, test_data)); {getattr(eval_fn, '__name__', 'it')}"
            f"{inspect.signature(eval_fn)} cannot be called that way") from None
    except ValueError:  # builtins without a signature: accept
        pass
    return eval_fn


def check_eval_result(value: Any) -> float:
    """What ``eval_fn`` returned on the original model: a finite number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidArgumentError(
            f"eval_fn returned {value!r} on the original model: it must return a finite number, higher "
            "is better (e.g. top-1 accuracy as a float)")
    return float(value)
