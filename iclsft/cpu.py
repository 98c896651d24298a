"""Whether this CPU computes bf16 natively, from the flags in /proc/cpuinfo: AVX512-BF16 or AMX on x86,
BF16 on Arm. Without them torch emulates bf16 arithmetic. Measured on an AVX2-only CPU (docs/throughput.md):
SmolLM2 scoring in bf16 4-8x slower than in fp32, bf16-mixed LoRA training 22x slower. The hf engine and the
trainer say so, once per process, when asked for bf16 on such a CPU.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (AVX-512 BF16, AMX), Arm (FEAT_BF16)
_warned: set[str] = set()


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str] | None:
    """The first processor's flags (x86 `flags`, Arm `Features`) in `cpuinfo` (default: this machine's
    /proc/cpuinfo); None where there is none to read (not Linux)."""
    if cpuinfo is None:
        return _this_machine()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


@functools.cache
def _this_machine() -> frozenset[str] | None:
    path = Path("/proc/cpuinfo")  # read once: on a many-core machine it is a megabyte, and trainers ask every step
    return cpu_flags(path.read_text(errors="replace")) if path.is_file() else None


def bf16_flags(flags: frozenset[str] | None) -> list[str]:
    """Those of `flags` that make bf16 native, in NATIVE_BF16's order."""
    return [f for f in NATIVE_BF16 if flags and f in flags]


def warn_emulated_bf16(what: str, measured: str, instead: str, logger: logging.Logger) -> bool:
    """Warn once per `what` where this CPU's flags are known and make bf16 emulated. Returns whether it did."""
    if what in _warned:
        return False
    flags = cpu_flags()
    if flags is None or bf16_flags(flags):
        return False
    _warned.add(what)
    logger.warning("%s on this CPU is emulated (it has no %s flag): %s on an AVX2 CPU (docs/throughput.md); %s",
                   what, " / ".join(NATIVE_BF16), measured, instead)
    return True
