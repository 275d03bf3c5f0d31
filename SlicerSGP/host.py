"""The computer this runs on, as reports name it: the processor's model and the memory.

Standard library only. Benchmarks print it beside every figure; the service reports it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` of ``/proc/cpuinfo`` (Linux); None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def processor_name() -> str:
    """The CPU model as ``/proc/cpuinfo`` names it (Linux), else the platform's word for it."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (empty where it does not)."""
    return frozenset((_cpuinfo("flags") or "").split())


def memory_total_mb() -> int | None:
    """Physical memory in MiB, None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
    except (AttributeError, ValueError, OSError):
        return None
