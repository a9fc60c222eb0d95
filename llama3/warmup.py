"""Compile the decode step's graphs up front, so a chat never stalls mid-answer to compile.

The compiled decode step (``make_decode_step(model, compile=True)``) attends over a kv-length
*bucket* (256, 512, 1024, ... up to ``max_seq_len``) and compiles one graph per (batch size,
bucket) the first time it reaches it: about 30-90 s each for an 8B model on a GPU (not yet
measured here), so a conversation that grows past 256, 512, 1024 ... tokens pauses for each.
:func:`warm_up_decode_step` takes those pauses at start-up instead, when asked, logging each
compile with its time.

It feeds one step at the last position of every bucket, which writes that position of the KV
cache with a throw-away token. Harmless: generation writes every position (prompt prefill, then
each decoded token) before any query attends to it, and the static step masks positions beyond
the current one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["WarmupRecord", "warm_up_decode_step"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmupRecord:
    """One compiled graph: its batch size and kv length, and the seconds it took (compile,
    first runs and, on CUDA, recording the graph)."""

    batch_size: int
    kv_len: int
    seconds: float


@torch.no_grad()
def warm_up_decode_step(step: object, batch_sizes: Iterable[int] = (1,), max_kv_len: int | None = None,
                        log: logging.Logger = logger) -> list[WarmupRecord]:
    """Compile every graph of a compiled decode step up front; returns what was compiled.

    Args:
        step: the step of ``make_decode_step(model, compile=True)`` (anything with ``buckets``,
            ``compiled`` and ``device`` attributes, called as ``step(tokens, pos)``). A step that
            does not compile (eager or ``static`` only) has nothing to warm up: returns [].
        batch_sizes: the batch sizes to compile for (each is its own set of graphs: 1 for a chat).
        max_kv_len: only buckets up to the one holding this many positions (default: all).
        log: where each compile is reported, with its time.

    Call it before generating (it writes throw-away keys and values into the KV cache; see the
    module docstring). The first call of each graph compiles; a second one records its CUDA graph.
    It runs under ``torch.no_grad``, as :func:`llama3.decoding.decode` does: the compiled graphs
    are guarded on the grad mode, so steps called with gradients enabled would compile again.
    """
    if not getattr(step, "compiled", False):
        return []
    buckets = list(step.buckets)  # type: ignore[attr-defined]
    if max_kv_len is not None:
        buckets = [b for i, b in enumerate(buckets) if i == 0 or buckets[i - 1] < max_kv_len]
    device = step.device  # type: ignore[attr-defined]
    records = []
    for bsz in batch_sizes:
        tokens = torch.zeros(bsz, 1, dtype=torch.long, device=device)
        for kv_len in buckets:
            start = time.perf_counter()
            for _ in range(2):  # compile (and warm up), then capture the CUDA graph
                step(tokens, kv_len - 1)  # type: ignore[operator]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            record = WarmupRecord(bsz, kv_len, time.perf_counter() - start)
            log.info("warm-up: decode step for batch %d, kv length %d compiled in %.1f s", bsz, kv_len,
                     record.seconds)
            records.append(record)
    total = sum(r.seconds for r in records)
    log.info("warm-up: %d decode graphs compiled in %.1f s", len(records), total)
    return records
