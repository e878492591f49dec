"""Relax module -> tuned, compiled library: the TVM pass sequence graphopt runs.

This is TVM's ``static_shape_tuning`` pipeline taken apart (TVM 0.27,
``relax/pipeline.py``) so that tuning can go through graphopt's cache and trial
allocation in between:

* :func:`prepare`: decompose inference ops, legalize to TIR, fuse; with ``prepack``, mark
  weight buffers "layout free" so MetaSchedule may choose blocked weight layouts
  (``AttachAttrLayoutFreeBuffers``). The tuning tasks are extracted from this module.
* :func:`build`: apply the best records, split the weight-layout rewrites out of the
  kernels and lift them (with every other weights-only computation, such as a Linear's
  transpose) into ``main_transform_params``; compile with TVM's default CPU pipeline.
  The weights are transformed once, when the model is built (design.md: prepacking).

``main`` then takes ``(*inputs, *transformed_params)``; :data:`TRANSFORM_ENTRY` takes the
raw weights as separate arguments (runners pass arrays, not tuples) and returns the tuple
``main`` expects.

Example:
    >>> import tvm  # doctest: +SKIP
    >>> built = build(prepare(mod, tvm.target.Target({"kind": "llvm"})), target, None)  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Optional

__all__ = ["Built", "TRANSFORM_ENTRY", "build", "export_library", "prepare"]

TRANSFORM_ENTRY = "graphopt_transform_params"

log = logging.getLogger("graphopt.targets")


@dataclasses.dataclass
class Built:
    """A compiled executable and its Relax text.

    Attributes:
        executable: ``tvm.compile``'s result (export it with :func:`export_library`).
        ir: the final Relax module as text (what ``CompiledModel.ir()`` shows).
        has_transform: the library has :data:`TRANSFORM_ENTRY` (weights are transformed).
    """

    executable: Any
    ir: str
    has_transform: bool


def prepare(mod, target, *, prepack: bool = True, layout_block: int = 0):
    """Legalize and fuse ``mod`` for ``target``: the module tuning tasks come from.

    Args:
        prepack: let tuning choose weight layouts (see the module docstring).
        layout_block: give convolutions NCHW[block]c layouts (see
            :mod:`graphopt.targets.layouts`); 0 keeps NCHW.
    """
    import tvm
    from tvm import relax

    from .layouts import legalize_map

    with target:
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                        relax.transform.CanonicalizeBindings()])(mod)
    if layout_block:
        mod = _blocked(mod, target, layout_block)
    passes = [  # TVM's "zero" pipeline, with graphopt's legalizations first
        relax.transform.LegalizeOps(customize_legalize_map=legalize_map()),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    if prepack:
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    with target:
        return tvm.transform.Sequential(passes)(mod)


def _blocked(mod, target, lanes: int):
    """Blocked conv layouts: per-conv blocks, else one block for all, else NCHW."""
    from .layouts import blocked_layout_pass

    for uniform, narrow in ((False, True), (True, True), (True, False)):
        try:
            with target:
                return blocked_layout_pass(lanes, uniform=uniform, narrow_inputs=narrow)(mod)
        except Exception as e:  # TVM's layout inference rejects some graphs outright
            log.info("blocked conv layouts (%s blocks%s) not applied: %s: %s", "uniform" if uniform
                     else "per-conv", "" if narrow else ", narrow inputs in NCHW", type(e).__name__,
                     str(e).splitlines()[0][:200])
    return mod


def build(prepared, target, database, *, prepack: bool = True) -> Built:
    """Apply ``database`` (None: default schedules), lift weight transforms, compile."""
    import tvm
    from tvm import relax

    with target, (database if database is not None else contextlib.nullcontext()):
        passes = []  # built inside the contexts: the apply pass captures target and database
        if database is not None:
            passes += [relax.transform.MetaScheduleApplyDatabase(enable_warning=False),
                       _keep_prescheduled(prepared)]
        if prepack:
            passes.append(relax.transform.SplitLayoutRewritePreproc())
        passes += [relax.transform.LiftTransformParams(), relax.transform.FoldConstant()]
        mod = tvm.transform.Sequential(passes)(prepared)
    mod = _add_flat_transform_entry(mod)
    executable = tvm.compile(mod, target)
    has_transform = any(gv.name_hint == TRANSFORM_ENTRY for gv in mod.get_global_vars())
    return Built(executable=executable, ir=mod.script(show_meta=False), has_transform=has_transform)


def _keep_prescheduled(prepared):
    """A pass restoring ``prepared``'s pre-scheduled kernels: ``MetaScheduleApplyDatabase``
    replaces any kernel the database has a record for, including hand-scheduled ones (older
    caches hold generic schedules for them, 100x slower for a layout copy)."""
    import tvm

    from .tuning import is_prescheduled

    kept = {gv.name_hint: f for gv, f in prepared.functions_items() if is_prescheduled(f)}

    @tvm.transform.module_pass(opt_level=0, name="graphopt.KeepPrescheduled")
    def keep(mod, _ctx):
        for gv in mod.get_global_vars():
            if gv.name_hint in kept:
                mod[gv] = kept[gv.name_hint]
        return mod

    return keep


def _add_flat_transform_entry(mod):
    """Add ``graphopt_transform_params(*weights)`` calling ``main_transform_params((weights,))``."""
    from tvm import relax

    names = {gv.name_hint: gv for gv in mod.get_global_vars()}
    lifted = names.get("main_transform_params")
    if lifted is None:
        return mod
    param = mod["main_transform_params"].params[0]
    tuple_info = getattr(param, "ty", None) or param.struct_info  # 0.27 unified StructInfo into ty
    if not tuple_info.fields:  # a model without weights: nothing to transform (and the VM
        return mod             # fails calling a function on an empty tuple)
    weights = [relax.Var(f"w{i}", info) for i, info in enumerate(tuple_info.fields)]
    bb = relax.BlockBuilder(mod)
    with bb.function(TRANSFORM_ENTRY, weights):
        out = bb.emit(relax.Call(lifted, [relax.Tuple(weights)]))
        bb.emit_func_output(out)
    return bb.get()


def export_library(executable, path: str, cross_compiler: Optional[str] = None) -> str:
    """Link ``executable`` into a shared library at ``path`` (cross-linked when asked).

    The host's g++ cannot link aarch64 objects (design.md), so ARM targets pass
    ``aarch64-linux-gnu-g++`` through ``tvm.support.cc.cross_compiler``.
    """
    if cross_compiler:
        from tvm.support import cc

        executable.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
    else:
        executable.export_library(path)
    return path
