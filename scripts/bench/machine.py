"""What machine a measurement was taken on: CPU model and flags, threads, torch, load."""

from __future__ import annotations

import contextlib
import os
import platform

import torch

# The flags that decide which kernels can be fast, in the order a reader looks for them.
KEY_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict[str, str | list[str]]:
    """``model name`` and the key ``flags`` of /proc/cpuinfo (platform's guess elsewhere)."""
    name, flags = "", []
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    return {"model": name or platform.processor() or platform.machine(),
            "flags": [f for f in KEY_FLAGS if f in flags]}


def cpu_summary(threads: int | None = None) -> str:
    """One header line: CPU model, key flags, threads, torch version and its CPU capability, load."""
    info = cpu_info()
    threads = threads or torch.get_num_threads()
    capability = torch.backends.cpu.get_cpu_capability()
    return (f"# CPU: {info['model']}; flags: {' '.join(info['flags']) or 'none of ' + ','.join(KEY_FLAGS)}; "
            f"{threads} threads; torch {torch.__version__} ({capability}); "
            f"load average {os.getloadavg()[0]:.1f}")
