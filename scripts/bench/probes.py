"""Measuring instruments: timers, the memory-bandwidth probe, peak memory, bytes per decoding step."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from llama3.model import ModelArgs


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls (after one untimed warm-up): the least disturbed by
    other processes, which on a shared machine only ever make things slower."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth in GB/s (1e9 bytes/s) over a ``gib`` GiB buffer (far larger than any cache).

    ``read`` is the one decoding is held to: a float32 sum, which reads the buffer once and writes
    nothing (decode reads weights, it does not copy them). ``copy`` (read + write) and
    ``gemv_fp32`` (torch.mv over the buffer as a matrix) are reported alongside."""
    n = max(int(gib * 2**30) // 4 // 4096, 1) * 4096  # whole rows of the GEMV probe
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    probes = {
        "read": (lambda: a.sum(), a.nbytes),
        "copy": (lambda: b.copy_(a), 2 * a.nbytes),  # reads a, writes b
        "gemv_fp32": (lambda: torch.mv(a.view(-1, 4096), b[:4096]), a.nbytes),
    }
    return {name: nbytes / best_time(fn, device, repeats) / 1e9 for name, (fn, nbytes) in probes.items()}


@contextlib.contextmanager
def peak_memory(device: torch.device, record: dict[str, float]) -> Iterator[None]:
    """Puts the peak memory (GB) used inside the block into ``record["peak_mem_gb"]``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
    yield
    if device.type == "cuda":
        record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        record["peak_mem_gb"] = _vm_hwm_bytes() / 1e9


def _vm_hwm_bytes() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not Linux: the peak of the whole process

    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def decode_bytes_per_step(model: torch.nn.Module, args: ModelArgs, batch: int, kv_len: int,
                          kv_dtype: torch.dtype) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) one decoding step must read: every parameter and buffer of
    the linear layers and norms (int8 weights and their scales after quantization; the token
    embedding only for the ``batch`` rows looked up, unless it is the output projection too) and
    keys and values of ``kv_len`` positions. Layers whose weight is not a tensor (FBGEMM packs,
    oneDNN int8 packs) report their bytes through ``weight_nbytes``."""
    weight_bytes = 0
    for m in model.modules():
        nbytes = getattr(m, "weight_nbytes", None)
        if nbytes is not None and not isinstance(getattr(m, "weight", None), torch.Tensor):
            weight_bytes += nbytes() if callable(nbytes) else nbytes
    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or "kv_cache" in name:
            continue
        seen.add(id(t))
        # Only the looked-up rows of the embedding are read, unless it is also the output weight.
        if name == "tok_embeddings.weight" and t is not getattr(model.output, "weight", None):
            weight_bytes += batch * t.shape[1] * t.element_size()
        else:
            weight_bytes += t.numel() * t.element_size()
    elem = torch.tensor([], dtype=kv_dtype).element_size()
    kv_bytes = 2 * args.n_layers * batch * args.n_kv_heads * args.head_dim * kv_len * elem
    return weight_bytes, kv_bytes
