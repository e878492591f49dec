"""What the host CPU is: its architecture, vendor, ISA flags and the LLVM ``mcpu`` that fits.

TVM 0.27 rejects ``-mcpu=native`` (it silently falls back to a generic CPU, losing AVX-512
and FMA), so the x86 target needs a real LLVM CPU name. It is picked from the flags in
``/proc/cpuinfo`` with a table (best CPU first), not from LLVM's own host detection, so
that the choice is explainable ("avx512_vnni + avx512_bf16 on AMD: znver4") and testable
with a fake cpuinfo.

Example:
    >>> cpu = HostCpu(arch="x86_64", vendor="GenuineIntel", flags=frozenset({"avx", "avx2", "fma", "bmi2"}))
    >>> pick_x86_mcpu(cpu), x86_vector_lanes(cpu)
    ('haswell', 8)
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
from typing import FrozenSet, Optional, Sequence, Tuple

__all__ = ["HostCpu", "X86_CPU_TABLE", "X86_REPORTED_FEATURES", "host_cpu", "host_arch",
           "pick_x86_mcpu", "x86_vector_lanes", "physical_cores"]


@dataclasses.dataclass(frozen=True)
class HostCpu:
    """The host processor as /proc/cpuinfo describes it."""

    arch: str
    vendor: str = ""
    model_name: str = ""
    flags: FrozenSet[str] = frozenset()


#: (LLVM mcpu, required vendor or None, flags that must all be present); best first.
#: The flag sets are the distinguishing features of each generation, enough to rule out
#: an older CPU without listing every instruction it has.
X86_CPU_TABLE: Tuple[Tuple[str, Optional[str], FrozenSet[str]], ...] = (
    ("sapphirerapids", "GenuineIntel", frozenset({"amx_tile", "avx512_fp16", "avx512_vnni"})),
    ("znver5", "AuthenticAMD", frozenset({"avx512_vp2intersect", "avx_vnni", "avx512_vnni"})),
    ("znver4", "AuthenticAMD", frozenset({"avx512f", "avx512_vnni", "avx512_bf16"})),
    ("icelake-server", "GenuineIntel", frozenset({"avx512_vnni", "avx512_vbmi2", "avx512ifma"})),
    ("cascadelake", "GenuineIntel", frozenset({"avx512_vnni", "avx512f"})),
    ("skylake-avx512", None, frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})),
    ("alderlake", "GenuineIntel", frozenset({"avx_vnni", "avx2", "fma"})),
    ("znver3", "AuthenticAMD", frozenset({"avx2", "fma", "vaes"})),
    ("znver2", "AuthenticAMD", frozenset({"avx2", "fma", "clwb"})),
    ("znver1", "AuthenticAMD", frozenset({"avx2", "fma"})),
    ("haswell", None, frozenset({"avx2", "fma", "bmi2"})),
    ("sandybridge", None, frozenset({"avx"})),
    ("nehalem", None, frozenset({"sse4_2"})),
    ("x86-64", None, frozenset()),
)

#: Flags worth recording in a target (and checked again when an artifact is loaded).
X86_REPORTED_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                         "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")


def host_arch() -> str:
    """``x86_64`` or ``aarch64`` (``arm64`` is normalized)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> HostCpu:
    """Read the first processor's vendor, model and flags (empty flags if unreadable)."""
    fields = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break  # one processor block is enough: all cores are the same here
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    flags = fields.get("flags") or fields.get("features") or ""
    return HostCpu(arch=host_arch(), vendor=fields.get("vendor_id", ""),
                   model_name=fields.get("model name", ""), flags=frozenset(flags.split()))


def pick_x86_mcpu(cpu: HostCpu, table: Sequence = X86_CPU_TABLE) -> str:
    """The first LLVM CPU in ``table`` whose vendor and flags the host matches."""
    for mcpu, vendor, required in table:
        if (vendor is None or vendor == cpu.vendor) and required <= cpu.flags:
            return mcpu
    return "x86-64"


def x86_vector_lanes(cpu: HostCpu) -> int:
    """fp32 lanes of the widest vector unit: 16 (AVX-512), 8 (AVX/AVX2) or 4 (SSE)."""
    if "avx512f" in cpu.flags:
        return 16
    if "avx" in cpu.flags:
        return 8
    return 4


@functools.lru_cache(maxsize=None)
def physical_cores() -> int:
    """Cores this process may run on (affinity-aware), counting each core once.

    Hyper-threads share one core's vector units, so a compute-bound runtime gains
    nothing from the second thread of a core. Cached: TVM pins threads once its pool
    starts, after which this process's affinity no longer tells the machine's size.
    """
    try:
        logical = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        logical = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:
        physical = logical
    return max(1, min(logical, physical))
