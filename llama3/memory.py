"""Memory a model needs, and whether the device has it: the check ``Llama.build`` runs before loading.

Weights (all parameters in the run dtype) plus the KV cache (``max_batch_size`` x ``max_seq_len`` x
layers x KV heads x head_dim x dtype size, for keys and values) are compared with what the device
has free: ``torch.cuda.mem_get_info`` on CUDA (each GPU holds its rank's share), MemAvailable on
the CPU (all ranks of a machine share its RAM). Activations come on top: a chunk of prefill
(``prefill_chunk`` x cached positions of attention scratch) and one position's logits per row.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

__all__ = ["ModelDoesNotFitError", "check_memory_fits"]

logger = logging.getLogger(__name__)


class ModelDoesNotFitError(MemoryError):
    """``Llama.build``: the weights and KV cache need more memory than the device has free."""


def _weight_bytes(args: Any, dtype: torch.dtype) -> int:
    """Bytes of the model's weights in ``dtype`` (all ranks together)."""
    kv_dim = args.n_kv_heads * args.head_dim
    per_layer = (2 * args.dim * args.dim + 2 * args.dim * kv_dim  # wq, wo; wk, wv
                 + 3 * args.dim * args.ffn_hidden_dim + 2 * args.dim)  # w1, w2, w3; two norms
    embeddings = args.vocab_size * args.dim * (1 if args.tie_word_embeddings else 2)
    numel = embeddings + args.n_layers * per_layer + args.dim
    return numel * torch.empty(0, dtype=dtype).element_size()


def _kv_cache_bytes(args: Any, dtype: torch.dtype, world_size: int) -> int:
    try:
        from .model import kv_cache_bytes
    except ImportError:  # TODO(merge): llama3.model.kv_cache_bytes (contract 3) replaces this formula.
        local_kv_heads = max(args.n_kv_heads, world_size) // world_size
        return (2 * args.n_layers * args.max_batch_size * args.max_seq_len * local_kv_heads * args.head_dim
                * torch.empty(0, dtype=dtype).element_size())
    return kv_cache_bytes(args, dtype, world_size)


def _free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device``: CUDA's free memory, or the RAM Linux calls MemAvailable."""
    if device.type == "cuda":
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        return torch.cuda.mem_get_info(index)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


def check_memory_fits(args: Any, dtype: torch.dtype, device: torch.device, world_size: int = 1) -> None:
    """Log the KV cache ``args`` asks for and raise :class:`ModelDoesNotFitError` when weights and
    cache cannot fit in ``device``'s free memory (each GPU holds its rank's share; on the CPU all
    ranks share the machine's RAM)."""
    gib = 2**30
    cache = _kv_cache_bytes(args, dtype, world_size)
    weights = _weight_bytes(args, dtype) // world_size
    size = torch.empty(0, dtype=dtype).element_size()
    logger.info(f"KV cache: {cache / gib:.2f} GiB per rank (max_batch_size {args.max_batch_size} x "
                f"max_seq_len {args.max_seq_len} x {args.n_layers} layers x {args.n_kv_heads} KV heads x "
                f"head_dim {args.head_dim} x {size} bytes x 2 for keys and values"
                f"{f' / {world_size} ranks' if world_size > 1 else ''})")
    free = _free_memory(device)
    ranks_here = world_size if device.type == "cpu" else 1
    need = (weights + cache) * ranks_here
    if free is None or need <= free:
        return
    where = "free RAM (MemAvailable)" if device.type == "cpu" else f"free on {device}"
    raise ModelDoesNotFitError(
        f"the model does not fit: {weights * ranks_here / gib:.2f} GiB of weights + "
        f"{cache * ranks_here / gib:.2f} GiB of KV cache = {need / gib:.2f} GiB, but only {free / gib:.2f} "
        f"GiB is {where}. Lower max_seq_len (now {args.max_seq_len}) or max_batch_size (now "
        f"{args.max_batch_size}) — the cache grows with both — or use a smaller dtype or more "
        "model-parallel ranks")
