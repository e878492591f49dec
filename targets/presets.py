"""Built-in targets, registered as data: the host's x86 CPU and a few ARM devices.

Imported through the ``graphopt.targets`` entry point exactly like a third party's plugin.
Importing it reads ``/proc/cpuinfo`` but does not import TVM.

ARM presets name the core (LLVM ``mcpu``) so TVM uses the right instructions and
scheduling model, and the qemu CPU that enforces the same ISA on an x86 host: code using
an instruction the board lacks dies with SIGILL under qemu exactly as on the board.
qemu 7.2 (Debian bookworm) has no Cortex-A55 model; Cortex-A76 has the same ARMv8.2-A
feature set the A55 code may use (dotprod, fp16, rcpc), so it stands in for it.

Example:
    >>> import graphopt
    >>> graphopt.get_target("arm-rpi4").mcpu
    'cortex-a72'
"""
from __future__ import annotations

from typing import Dict, List

from graphopt.target_registry import register_target

from .hostcpu import X86_REPORTED_FEATURES, host_cpu, physical_cores, pick_x86_mcpu, x86_vector_lanes
from .target import Target

__all__ = ["ARM_PRESETS", "x86_host_target"]

AARCH64 = "aarch64-linux-gnu"
CROSS_CXX = "aarch64-linux-gnu-g++"


def x86_host_target(name: str = "x86") -> Target:
    """The host's x86 CPU: the LLVM mcpu and vector width picked from /proc/cpuinfo."""
    cpu = host_cpu()
    mcpu = pick_x86_mcpu(cpu)
    lanes = x86_vector_lanes(cpu)
    features = tuple(f for f in X86_REPORTED_FEATURES if f in cpu.flags)
    return Target(
        name=name,
        # num-cores: MetaSchedule sizes parallel loops by it
        tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu,
                    "num-cores": physical_cores()},
        triple="x86_64-linux-gnu",
        description=f"this host's x86-64 CPU ({cpu.model_name or 'unknown model'}, LLVM mcpu {mcpu})",
        features=features,
        preferred_channel_multiple=lanes,
        # NCHW16c on AVX-512: a 64->128 3x3 conv tuned to 88 GFLOP/s vs 65 in NCHW and 52
        # in NCHW8c with the same 48 trials (docs/targets.md); SSE-only CPUs keep NCHW.
        layout_block=lanes if lanes >= 8 else 0,
    )


#: name -> fields; every ARM preset is cross-compiled and (without a device) run under qemu.
ARM_PRESETS: Dict[str, dict] = {
    "arm": dict(
        description="generic AArch64 with NEON (ARMv8.0-A; runs on any 64-bit ARM board)",
        tvm_target={"kind": "llvm", "mtriple": AARCH64, "mattr": ["+neon"], "num-cores": 4},
        qemu_cpu="cortex-a53", features=("neon",)),
    "arm-rpi4": dict(
        description="Raspberry Pi 4 (Cortex-A72, ARMv8.0-A, NEON, no dot product)",
        tvm_target={"kind": "llvm", "mtriple": AARCH64, "mcpu": "cortex-a72", "mattr": ["+neon"],
                    "num-cores": 4},
        qemu_cpu="cortex-a72", features=("neon",)),
    "arm-neoverse-n1": dict(
        description="Neoverse N1 servers (AWS Graviton2, Ampere Altra; ARMv8.2-A, dotprod)",
        tvm_target={"kind": "llvm", "mtriple": AARCH64, "mcpu": "neoverse-n1",
                    "mattr": ["+neon", "+dotprod"], "num-cores": 4},
        qemu_cpu="neoverse-n1", features=("neon", "dotprod")),
    "arm-a55": dict(
        description="Cortex-A55 little cores (ARMv8.2-A, dotprod; emulated as cortex-a76)",
        tvm_target={"kind": "llvm", "mtriple": AARCH64, "mcpu": "cortex-a55",
                    "mattr": ["+neon", "+dotprod"], "num-cores": 4},
        qemu_cpu="cortex-a76", features=("neon", "dotprod")),
}


def _register_all() -> List[str]:
    register_target("x86", x86_host_target("x86"))
    for name, fields in ARM_PRESETS.items():
        register_target(name, Target(name=name, triple=AARCH64, cross_compiler=CROSS_CXX,
                                     preferred_channel_multiple=4, **fields))
    return ["x86", *ARM_PRESETS]


BUILTIN_TARGETS = _register_all()
