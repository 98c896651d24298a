"""What benchmarks record of the machine they ran on: the CPU's model name, its CPUs and whether it
computes bf16 natively (AVX512-BF16 or AMX), the flags that decide bf16's speed."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from iclsft.cpu import bf16_flags, cpu_flags


def cpu_description() -> str:
    """E.g. "AMD EPYC, 2 CPUs, avx512_bf16" (the model name from /proc/cpuinfo where there is one)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine() or "?")
    return f"{name}, {os.cpu_count()} CPUs, {' '.join(bf16_flags(cpu_flags(info))) or 'no native bf16'}"
