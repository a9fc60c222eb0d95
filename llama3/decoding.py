"""The one-token decoding step: ``step(tokens [bsz, 1], pos) -> logits [bsz, 1, vocab]``.

:func:`make_decode_step` builds it, for :class:`~llama3.generation.Llama`, the benchmark and the
tests alike:

* eager (``compile=False``): ``model.forward(tokens, pos, last_only=True)``, which attends over
  exactly the ``pos + 1`` filled cache positions;
* static (``compile=True``): ``model.forward_static`` under ``torch.compile`` (CUDA graphs on
  CUDA). Its shapes must be fixed, so it attends over a *bucket* of cache positions: the smallest
  of 256, 512, 1024, ... (capped at ``max_seq_len``) that holds ``pos + 1``. Each bucket is one
  compiled graph, so a short chat in a model built for 128K tokens costs a short chat's decode,
  not a 128K one.
"""

from __future__ import annotations

import bisect
import inspect
import logging
from collections.abc import Callable

import torch

from .progress import Progress

__all__ = ["DecodeStep", "kv_buckets", "make_decode_step"]

logger = logging.getLogger(__name__)

DecodeStep = Callable[[torch.Tensor, int], torch.Tensor]
"""``step(tokens [bsz, 1], pos) -> logits [bsz, 1, vocab]``: feed the token at position ``pos``."""

SMALLEST_BUCKET = 256


def kv_buckets(max_seq_len: int, smallest: int = SMALLEST_BUCKET) -> list[int]:
    """Cache lengths the static step attends over: powers of two from ``smallest``, then ``max_seq_len``."""
    buckets = []
    size = smallest
    while size < max_seq_len:
        buckets.append(size)
        size *= 2
    return buckets + [max_seq_len]


def make_decode_step(model: torch.nn.Module, compile: bool, *, static: bool | None = None) -> DecodeStep:
    """The decoding step of ``model`` (a :class:`~llama3.model.Transformer`).

    Args:
        model: the model, on its device, its KV cache allocated.
        compile: run ``model.forward_static`` through ``torch.compile`` (``mode="reduce-overhead"``,
            i.e. CUDA graphs, on CUDA); the first step of each (batch size, bucket) compiles, which
            is logged.
        static: use the fixed-shape ``forward_static`` path (default: ``compile``). ``static=True``
            without ``compile`` runs that path eagerly: slower, but the same numbers as compiled,
            which tests use to check it.
    """
    static = compile if static is None else static
    if compile and not static:
        raise ValueError("compile=True needs the static decode step (static=True or None)")
    if not static:
        def eager_step(tokens: torch.Tensor, pos: int) -> torch.Tensor:
            return model.forward(tokens, pos, last_only=True)

        return eager_step
    return _StaticStep(model, compile)


class _StaticStep:
    """``forward_static`` over the kv-length bucket that holds ``pos + 1``, with fixed input buffers."""

    def __init__(self, model: torch.nn.Module, compile: bool) -> None:
        self.buckets = kv_buckets(model.params.max_seq_len)
        self.device = model.tok_embeddings.weight.device
        self.compiled = compile
        forward = model.forward_static
        # TODO(merge): model's forward_static takes kv_len (contract 3); then drop this check.
        self._takes_kv_len = "kv_len" in inspect.signature(forward).parameters
        if compile:
            # kv_len is a Python int and dynamic=False keeps it (and the batch size) static: one
            # graph per value. Dynamo's default of 8 graphs per function would fall back to eager.
            _allow_graphs(len(self.buckets) * model.params.max_batch_size)
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            forward = torch.compile(forward, mode=mode, dynamic=False)
        self.forward = forward
        # Fixed buffers: a CUDA graph replays on the same input addresses.
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._tokens: dict[int, torch.Tensor] = {}
        self._seen: set[tuple[int, int]] = set()

    def bucket(self, pos: int) -> int:
        """The kv length attended over when feeding position ``pos``."""
        i = bisect.bisect_left(self.buckets, pos + 1)
        if i == len(self.buckets):
            raise ValueError(f"position {pos} is outside the KV cache (max_seq_len={self.buckets[-1]})")
        return self.buckets[i]

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        kv_len = self.bucket(pos)
        bsz = tokens.shape[0]
        buffer = self._tokens.get(bsz)
        if buffer is None:
            buffer = self._tokens[bsz] = torch.empty(bsz, 1, dtype=torch.long, device=self.device)
        buffer.copy_(tokens)
        self._pos.fill_(pos)
        if self.device.type == "cuda" and self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        kwargs = {"kv_len": kv_len} if self._takes_kv_len else {}
        key = (bsz, kv_len)
        if not self.compiled or key in self._seen:
            return self.forward(buffer, self._pos, **kwargs)
        self._seen.add(key)
        logger.info("Compiling the decode step for batch %d, kv length %d (once per bucket)", bsz, kv_len)
        with Progress(f"compiling the decode step (batch {bsz}, kv length {kv_len})", logger=logger):
            return self.forward(buffer, self._pos, **kwargs)


def _allow_graphs(n: int) -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < n:
        setattr(config, name, n)
