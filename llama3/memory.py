"""Will the model fit? Free memory on a device, checked before minutes of loading.

A model needs its weights, its KV cache (:func:`llama3.model.kv_cache_bytes`, fixed by
max_batch_size × max_seq_len) and some scratch while it runs. ``check_fits_device`` compares the
first two with what the device has free and raises :class:`NotEnoughMemoryError` naming the
numbers, instead of an out-of-memory crash halfway through loading.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import LlamaError

logger = logging.getLogger(__name__)

__all__ = ["NotEnoughMemoryError", "available_bytes", "check_fits_device"]

GIB = 1024**3
MEMINFO = Path("/proc/meminfo")


class NotEnoughMemoryError(LlamaError, RuntimeError):
    """Weights plus KV cache would not fit in the device's free memory."""


def available_bytes(device: torch.device | str) -> int | None:
    """Memory free for a new allocation on ``device``, in bytes, or None where it cannot be told.

    CUDA: the driver's free memory (``torch.cuda.mem_get_info``). CPU: ``MemAvailable`` from
    /proc/meminfo (Linux; None elsewhere). Other devices: None.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    if device.type == "cpu":
        try:
            for line in MEMINFO.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
        except (OSError, ValueError, IndexError):
            return None
    return None


def check_fits_device(weight_bytes: int, cache_bytes: int, device: torch.device | str) -> None:
    """Raise :class:`NotEnoughMemoryError` when weights + KV cache exceed the free memory of
    ``device`` (see :func:`available_bytes`; no check where it is unknown).

    Pass the sizes one process allocates (one model-parallel rank's slice). Running also needs
    scratch beyond this: O(prefill_chunk × kv_len) for attention and O(prefill_chunk × vocab) for
    logits while a prompt is processed, so a fit with nothing to spare can still fail later.
    """
    device = torch.device(device)
    need = weight_bytes + cache_bytes
    free = available_bytes(device)
    logger.info("memory on %s: weights %.2f GiB + KV cache %.2f GiB = %.2f GiB; free: %s", device,
                weight_bytes / GIB, cache_bytes / GIB, need / GIB,
                "unknown" if free is None else f"{free / GIB:.2f} GiB")
    if free is None or need <= free:
        return
    raise NotEnoughMemoryError(
        f"the model does not fit on {device}: weights {weight_bytes / GIB:.2f} GiB + KV cache "
        f"{cache_bytes / GIB:.2f} GiB = {need / GIB:.2f} GiB, but only {free / GIB:.2f} GiB is free. "
        "The KV cache grows with max_batch_size × max_seq_len: lower them, or shrink the weights "
        "(int8 quantisation, a 16-bit dtype) or split them over more model-parallel ranks."
    )
