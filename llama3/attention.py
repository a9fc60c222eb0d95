"""Scaled dot-product attention over the KV cache: one function, one kernel choice per case.

``attention(q, keys, values)`` computes softmax(q kᵀ / √head_dim + causal mask) v for queries that
are the last ``s`` of the ``kv_len`` cached positions (query i sees keys 0 .. kv_len - s + i), with
grouped-query attention: query head h reads key/value head h // n_rep. Which kernel runs, and how
the query heads of a group share their key/value head, depends on the case:

============================  ===================================================================
case                          kernel and grouped-query strategy
============================  ===================================================================
decode (s == 1)               SDPA, no mask; the group's query heads *folded* into query rows
prefill from 0 (s == kv_len)  SDPA ``is_causal=True`` with ``enable_gqa=True``
chunk after a prefix, CPU     CPU flash kernel twice (prefix: folded, no mask; chunk: keys
                              repeated, square causal), merged exactly by log-sum-exp
chunk after a prefix, other   SDPA with a lower-right causal bias and ``enable_gqa=True``
masked (the static step)      SDPA with the caller's boolean mask; folded, mask repeated per head
============================  ===================================================================

The keys and values live in a :class:`KVCache` per layer. No mask of a whole prompt is ever
built. :func:`sdpa_context` is the one place that may pin SDPA's backends per device and case
(today it leaves torch's own choice).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

__all__ = ["AttentionCase", "KVCache", "attention", "attention_case", "sdpa_context"]

AttentionCase = Literal["decode", "prefill", "chunk", "masked"]

# PyTorch's CPU flash-attention kernel, called directly because it also returns the log-sum-exp of
# each query's scores, which merging two attentions needs. (SDPA with a lower-right causal mask
# gives the same result, twice as slow in float32, with a [chunk, kv_len] mask as scratch.)
_cpu_flash_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class KVCache(nn.Module):
    """Keys and values of every position seen so far, preallocated once: [batch, kv_heads, seq, head_dim].

    Buffers (so ``.to()`` moves them) but not persistent (so they stay out of state_dict).
    Writing in place at fixed addresses keeps decoding free of reallocation and lets
    ``torch.compile``/CUDA graphs capture the step.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [batch, kv_heads, seq, head_dim] at positions ``input_pos``; return the first
        ``kv_len`` positions of the cache for the same batch rows."""
        bsz = k.shape[0]
        self.k[:bsz].index_copy_(2, input_pos, k)
        self.v[:bsz].index_copy_(2, input_pos, v)
        return self.k[:bsz, :, :kv_len], self.v[:bsz, :, :kv_len]


def attention_case(s: int, kv_len: int, masked: bool) -> AttentionCase:
    """Which case of the table above ``s`` queries over ``kv_len`` keys are."""
    if masked:
        return "masked"
    if s == 1:
        return "decode"
    return "prefill" if s == kv_len else "chunk"


def sdpa_context(device: torch.device, case: AttentionCase) -> contextlib.AbstractContextManager:
    """The SDPA backends allowed for ``case`` on ``device``: torch's own choice today.

    The hook for pinning a call site (e.g. ``torch.nn.attention.sdpa_kernel`` with flash /
    memory-efficient attention on CUDA): return that context manager here.
    """
    return contextlib.nullcontext()


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √head_dim + mask) v with grouped-query attention.

    q: [b, n_heads, s, hd]; keys, values: [b, n_kv_heads, kv_len, hd] (n_kv_heads divides n_heads).
    Without ``mask`` the queries are the last s of the kv_len positions, causally. ``mask``
    [s, kv_len] boolean (True where a query may attend) replaces causality: the fixed-shape step,
    whose position is a tensor. Returns [b, n_heads, s, hd] in q's dtype.
    """
    s, kv_len = q.shape[2], keys.shape[2]
    case = attention_case(s, kv_len, mask is not None)
    with sdpa_context(q.device, case):
        if case in ("decode", "masked"):
            # Folding the group's query heads into rows of their KV head reads the cache once per
            # KV head, never copied per query head; CPU bf16 kernels for enable_gqa / repeat_kv are
            # slower at decode.
            return _folded(q, keys, values, mask)
        if case == "prefill":
            # The square causal case: the kernel applies causality itself; enable_gqa broadcasts.
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
        if q.device.type == "cpu" and _cpu_flash_attention is not None:
            # CPU SDPA with a lower-right bias falls back to the math kernel (a [s, kv_len] scratch
            # mask, twice as slow); two flash calls and an exact merge avoid it.
            return _prefix_then_chunk(q, keys, values)
        # CUDA and others: the lower-right causal bias runs in the flash kernel there.
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(s, kv_len),
                                              enable_gqa=True)


def _folded(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
            ) -> torch.Tensor:
    """Attention with the n_rep query heads of each KV head stacked as extra query rows."""
    b, n_heads, s, hd = q.shape
    n_kv_heads = keys.shape[1]
    n_rep = n_heads // n_kv_heads
    q = q.reshape(b, n_kv_heads, n_rep * s, hd)  # (b, n_kv_heads, n_rep·s, hd)
    if mask is not None and s > 1:
        mask = mask.repeat(n_rep, 1)  # (n_rep·s, kv_len): the same rows for every head of the group
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return out.view(b, n_heads, s, hd)


def _prefix_then_chunk(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The cached prefix (seen by every query) and the chunk's own keys (square causal) attended
    apart and merged exactly by their log-sum-exp, as flash-decoding merges its splits."""
    b, n_heads, s, hd = q.shape
    n_kv_heads, kv_len = keys.shape[1], keys.shape[2]
    n_rep, start = n_heads // n_kv_heads, kv_len - s
    out1, lse1 = _cpu_flash_attention(q.reshape(b, n_kv_heads, n_rep * s, hd),
                                      keys[:, :, :start], values[:, :, :start])
    # The chunk's own keys: only s of them, so repeating them per query head is cheap.
    out2, lse2 = _cpu_flash_attention(q, keys[:, :, start:].repeat_interleave(n_rep, dim=1),
                                      values[:, :, start:].repeat_interleave(n_rep, dim=1), is_causal=True)
    lse1 = lse1.reshape(b, n_heads, s, 1)
    lse2 = lse2.reshape(b, n_heads, s, 1)
    lse = torch.logaddexp(lse1, lse2)  # log of the softmax denominator over both parts
    out = out1.reshape(b, n_heads, s, hd) * (lse1 - lse).exp() + out2 * (lse2 - lse).exp()
    return out.type_as(q)
