"""The x86 VNNI tensor intrinsic, fixed for the LLVM that TVM 0.27 ships.

TVM 0.27 registers ``dot_16x4_vnni`` (``tvm/s_tir/tensor_intrin/x86.py``) with an implementation
that calls ``llvm.x86.avx512.vpdpbusd.512`` on ``<16 x i32>`` operands. LLVM 22 declares the two
multiplicands as ``<64 x i8>``, so every candidate MetaSchedule tensorizes with it fails LLVM's
module verification ("Call parameter type does not match function signature"), and tuning
silently falls back to schedules without VNNI (design.md, section 3).

:func:`fix_vnni_intrinsic` registers the same description under the same name with an
implementation passing the operands as ``int8x64`` (the bits are unchanged: 4 uint8 activations
broadcast to the 16 lanes, 16 x 4 int8 weights). MetaSchedule looks the intrinsic up by name when
it tensorizes, both while tuning and when a tuned schedule is replayed at build time, so calling
this once per process before tuning and building is enough. The Relax translations of graphopt's
quantized ops call it, so any lowering of a quantized graph has it in place.

Example:
    >>> from graphopt.targets.int8.tensor_intrin import fix_vnni_intrinsic
    >>> fix_vnni_intrinsic()  # doctest: +SKIP
    True
"""
from __future__ import annotations

import functools

__all__ = ["VNNI_INTRIN", "fix_vnni_intrinsic", "vnni_impl"]

VNNI_INTRIN = "dot_16x4_vnni"


def vnni_impl():
    """The ``dot_16x4_vnni`` implementation with LLVM 22's operand types."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def dot_product_16x4_u8i8i32_vnni_llvm22(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            A_u8x4 = A.vload([0], "uint8x4")
            A_i32 = T.reinterpret(A_u8x4, dtype="int32")
            A_i8x64 = T.reinterpret(T.broadcast(A_i32, 16), dtype="int8x64")
            B_i8x64 = B.vload([0, 0], dtype="int8x64")
            C_i32x16 = C.vload([0], dtype="int32x16")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C_i32x16,
                A_i8x64,
                B_i8x64,
                dtype="int32x16",
            )

    return dot_product_16x4_u8i8i32_vnni_llvm22


@functools.lru_cache(maxsize=None)
def fix_vnni_intrinsic() -> bool:
    """Re-register ``dot_16x4_vnni`` with LLVM 22's signature (once per process).

    Returns:
        True when the intrinsic was (re-)registered.
    """
    import importlib

    from tvm.s_tir import TensorIntrin

    from ..measure import load_cpu_intrinsics

    load_cpu_intrinsics()  # the CPU intrinsics only: importing the whole package pulls in CUDA's (slow)
    # TVM's own registration must come first: a later plain register() of the name would fail
    x86 = importlib.import_module("tvm.s_tir.tensor_intrin.x86")

    TensorIntrin.register(VNNI_INTRIN, x86.dot_product_16x4_u8i8i32_desc, vnni_impl(), override=True)
    return True
