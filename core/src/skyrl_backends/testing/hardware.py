"""What machine a measurement ran on, for benchmark tables and conformance reports."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo(key: str) -> str | None:
    """The first ``key : value`` of ``/proc/cpuinfo`` (the first processor's), or None where there is
    no such file or line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``), or what ``platform`` knows elsewhere."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_vector_isa() -> str:
    """The widest vector instruction set this CPU offers for bfloat16 work (``/proc/cpuinfo`` flags):
    ``avx512_bf16`` (native bfloat16 dot products, or AMX), ``avx512``, ``avx2`` or ``baseline``.
    Engines' CPU kernels pick their code by it, and bfloat16 results differ between those paths."""
    line = _cpuinfo("flags")
    if line is None:
        return "unknown"
    flags = set(line.split())
    if flags & {"avx512_bf16", "amx_bf16"}:
        return "avx512_bf16"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "baseline"


def describe_hardware() -> str:
    """``"<GPU name> x<count>"`` when CUDA is available, else ``"<CPU model>, <n> cores"``."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except ImportError:
        pass
    return f"{cpu_model()}, {os.cpu_count()} cores"
