"""Scaled dot-product attention over the KV cache: one function, one plan per call site.

``attention(q, keys, values)`` computes softmax(q kᵀ / √head_dim + causal mask) v for queries that
are the last ``s`` of the ``kv_len`` cached positions (query i sees keys 0 .. kv_len - s + i), with
grouped-query attention: query head h reads key/value head h // n_rep. Each call is one of four
*call sites* (:func:`attention_case`); per site, dtype and head size a :class:`SdpaPlan` says which
SDPA kernels may run (CUDA: pinned, in order; elsewhere torch's own choice) and how the query heads
of a group meet their key/value head (the layout):

=================  =======================================  =========================================
site               CPU (and other devices)                  CUDA
=================  =======================================  =========================================
decode (s == 1)    folded, no mask                          folded; flash > efficient > math
prefill (s ==      ``is_causal`` with ``enable_gqa``        half: flash, ``enable_gqa``; float32:
kv_len, from 0)                                             efficient, the chunk's KV heads repeated
chunk after a      flash kernel twice (prefix folded, no    half: flash, lower-right causal bias,
prefix             mask; chunk square causal), merged by    ``enable_gqa``; float32: efficient twice,
                   log-sum-exp                              merged by log-sum-exp
masked (the        folded, the caller's boolean mask        folded; efficient > math (flash takes no
static step)       repeated per head of the group           mask)
=================  =======================================  =========================================

*Folded*: the n_rep query heads of a KV head stacked as extra query rows, so the cache is read once
per KV head and never copied per query head. Why CUDA is pinned: left to itself SDPA picks a
backend per call, and with cuDNN newer than 9.15 on sm90 torch 2.11 tries cuDNN first; cuDNN builds
(and caches) one execution plan per shape, and eager decode's key length grows by one every token.
cuDNN is therefore allowed only where a measurement found it faster *and* the shape repeats
(:data:`CUDNN_FASTER_AT`, empty until measured). Why the log-sum-exp merge for float32 chunks: float32
has no flash kernel and memory-efficient attention no GQA (torch 2.11), so SDPA would fall back to
the math kernel with a materialised [chunk, kv_len] mask, which runs out of memory at long context.
Each (device, dtype, head size) is planned once, and the plans are logged once. No mask of a whole
prompt is ever built.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

__all__ = ["CALL_SITES", "CUDNN_FASTER_AT", "AttentionCase", "KVCache", "SdpaPlan", "attention",
           "attention_case", "chunk_attention_by_lse_merge", "describe", "lse_attend", "sdpa_backends",
           "sdpa_context", "sdpa_plan"]

logger = logging.getLogger(__name__)

AttentionCase = Literal["decode", "prefill", "chunk", "masked"]
CALL_SITES: tuple[AttentionCase, ...] = ("decode", "prefill", "chunk", "masked")
# Sites where the GPU check measured cuDNN faster on this project's target GPUs. Empty: not yet
# measured (scripts/gpu_kernels.py measures it); only fixed-shape sites may ever be added.
CUDNN_FASTER_AT: frozenset[str] = frozenset()
_FIXED_SHAPE_SITES = ("prefill", "masked")  # a cuDNN plan built once is reused; never decode
_HALF = (torch.float16, torch.bfloat16)

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
    """Which call site ``s`` queries over ``kv_len`` keys are."""
    if masked:
        return "masked"
    if s == 1:
        return "decode"
    return "prefill" if s == kv_len else "chunk"


# --- the plan of a call site: a pure function of site, dtype, head size and device ----------------


class SdpaPlan(NamedTuple):
    """How one call site runs attention. ``backends``: ``SDPBackend`` names ("flash", "efficient",
    "cudnn", "math") allowed, in order; empty means not pinned. ``layout``: "folded", "gqa"
    (``enable_gqa=True``), "repeat_kv" (KV heads repeated for the call) or "lse_merge" (prefix and
    chunk attended apart, merged by log-sum-exp)."""

    site: str
    backends: tuple[str, ...]
    layout: str
    why: str


def _flash_ok(dtype: torch.dtype, head_dim: int) -> bool:
    # FlashAttention-2 in PyTorch: fp16/bf16 only, head size a multiple of 8 up to 256.
    return dtype in _HALF and head_dim % 8 == 0 and head_dim <= 256


def _efficient_ok(dtype: torch.dtype, head_dim: int) -> bool:
    # The memory-efficient (CUTLASS) kernel: fp32 too; rows aligned to 16 bytes.
    return dtype in (*_HALF, torch.float32) and (head_dim * dtype.itemsize) % 16 == 0


def _cudnn_ok(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in _HALF and head_dim % 8 == 0 and head_dim <= 128


def sdpa_plan(site: str, dtype: torch.dtype, head_dim: int, device_type: str = "cuda",
              cudnn_faster_at: Collection[str] = ()) -> SdpaPlan:
    """The plan of call site ``site`` (one of :data:`CALL_SITES`) for ``dtype`` and ``head_dim`` on
    ``device_type``. ``cudnn_faster_at``: sites where a measurement on this machine found cuDNN
    faster; cuDNN is only ever allowed there, and only at fixed-shape sites. Raises ``ValueError``
    for an unknown site."""
    if site not in CALL_SITES:
        raise ValueError(f"unknown attention call site {site!r}; expected one of {CALL_SITES}")
    if device_type != "cuda":
        layout = {"decode": "folded", "prefill": "gqa", "masked": "folded",
                  "chunk": "lse_merge" if device_type == "cpu" and _cpu_flash_attention else "gqa"}[site]
        return SdpaPlan(site, (), layout, f"{device_type}: PyTorch's own kernels, not pinned")
    flash, efficient = _flash_ok(dtype, head_dim), _efficient_ok(dtype, head_dim)
    cudnn = site in cudnn_faster_at and site in _FIXED_SHAPE_SITES and _cudnn_ok(dtype, head_dim)
    first = ("cudnn",) if cudnn else ()
    measured = "cuDNN first: measured faster here; " if cudnn else ""
    name = str(dtype).removeprefix("torch.")
    if site in ("decode", "masked"):
        # Small score matrices: math is an acceptable last resort; a mask rules out flash.
        kernels = ("flash",) if flash and site == "decode" else ()
        kernels += ("efficient",) if efficient else ()
        why = ("one query row per head of a KV group, no mask: flash splits the keys across blocks"
               if site == "decode" else "a [1, kv_len] mask over the bucket: flash takes no mask")
        return SdpaPlan(site, first + kernels + ("math",), "folded", measured + why)
    if flash:
        why = ("square causal, GQA inside the kernel" if site == "prefill"
               else "lower-right causal bias, GQA inside the kernel")
        return SdpaPlan(site, first + ("flash",), "gqa", measured + why)
    if efficient:
        if site == "prefill":
            return SdpaPlan(site, first + ("efficient",), "repeat_kv",
                            f"{name}: no flash kernel and no GQA in memory-efficient; a chunk's KV "
                            "heads repeated, causality in the kernel")
        return SdpaPlan(site, ("efficient",), "lse_merge",
                        f"{name}: no flash kernel and no GQA in memory-efficient; prefix (folded, "
                        "no mask) and chunk (square causal) merged by log-sum-exp, no [chunk, kv_len] mask")
    return SdpaPlan(site, ("math",), "repeat_kv" if site == "prefill" else "gqa",
                    f"{name}, head_dim {head_dim}: no fused kernel takes these inputs")


_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def sdpa_backends(plan: SdpaPlan) -> list[SDPBackend]:
    """``plan.backends`` as ``SDPBackend`` members, in order; empty for an unpinned plan."""
    return [_BACKENDS[b] for b in plan.backends]


def sdpa_context(plan: SdpaPlan) -> contextlib.AbstractContextManager:
    """The SDPA backends ``plan`` allows, in its order (``sdpa_kernel(..., set_priority=True)``), or
    torch's own choice for an unpinned plan."""
    backends = sdpa_backends(plan)
    return sdpa_kernel(backends, set_priority=True) if backends else contextlib.nullcontext()


def describe(plan: SdpaPlan) -> str:
    """One log line: the site, the kernels in order, the layout and why."""
    kernels = " > ".join(plan.backends) or "not pinned"
    return f"attention {plan.site}: {kernels} ({plan.layout}): {plan.why}"


_PLANS: dict[tuple[str, torch.dtype, int, bool], dict[str, SdpaPlan]] = {}


def _plan(site: AttentionCase, device_type: str, dtype: torch.dtype, head_dim: int) -> SdpaPlan:
    """The plan of ``site``; every site of a (device, dtype, head size) is planned and logged at its
    first eager call. While ``torch.compile`` traces, the plan is computed afresh and nothing is
    read from or written to the cache: a compiled graph guarded on the cache would compile again
    whenever an eager call adds to it (a warmed-up step before the first prefill)."""
    if torch.compiler.is_compiling():
        return sdpa_plan(site, dtype, head_dim, device_type, CUDNN_FASTER_AT)
    key = (device_type, dtype, head_dim, _cpu_flash_attention is not None)  # the CPU plan depends on it
    plans = _PLANS.get(key)
    if plans is None:
        plans = _PLANS[key] = {s: sdpa_plan(s, dtype, head_dim, device_type, CUDNN_FASTER_AT)
                               for s in CALL_SITES}
        # Pinned plans (CUDA) are news worth a line each; "torch's own choice" is only for debugging.
        level = logging.INFO if any(plan.backends for plan in plans.values()) else logging.DEBUG
        for plan in plans.values():
            logger.log(level, "%s (%s, head_dim %d)", describe(plan), str(dtype).removeprefix("torch."),
                       head_dim)
    return plans[site]


# --- attention -----------------------------------------------------------------------------------


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √head_dim + mask) v with grouped-query attention.

    q: [b, n_heads, s, hd]; keys, values: [b, n_kv_heads, kv_len, hd] (n_kv_heads divides n_heads).
    Without ``mask`` the queries are the last s of the kv_len positions, causally. ``mask``
    [s, kv_len] boolean (True where a query may attend) replaces causality: the fixed-shape step,
    whose position is a tensor. Returns [b, n_heads, s, hd] in q's dtype.
    """
    s, kv_len = q.shape[2], keys.shape[2]
    plan = _plan(attention_case(s, kv_len, mask is not None), q.device.type, q.dtype, q.shape[-1])
    if plan.layout == "lse_merge":
        # Calls the kernels directly (they return the log-sum-exp): nothing to pin.
        return chunk_attention_by_lse_merge(q, keys, values, lse_attend(q.device.type))
    with sdpa_context(plan):
        if plan.layout == "folded":
            return _folded(q, keys, values, mask)
        causal = ({"is_causal": True} if plan.site == "prefill"
                  else {"attn_mask": causal_lower_right(s, kv_len)})
        if plan.layout == "repeat_kv":
            # Memory-efficient attention has no GQA: repeat a chunk's KV heads (a bounded copy).
            n_rep = q.shape[1] // keys.shape[1]
            return F.scaled_dot_product_attention(q, keys.repeat_interleave(n_rep, dim=1),
                                                  values.repeat_interleave(n_rep, dim=1), **causal)
        # The square causal case applies causality in the kernel; a chunk after a prefix takes a
        # lower-right causal bias (flash on CUDA); enable_gqa broadcasts the KV heads.
        return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True, **causal)


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


# --- a chunk after a prefix as two attentions merged by their log-sum-exp ------------------------

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]
"""``attend(q [b, h, s, d], k [b, h, n, d], v, is_causal) -> (out [b, h, s, d], lse [b, h, s])``:
attention that also returns each query's log-sum-exp of scaled scores."""


def chunk_attention_by_lse_merge(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                 attend: Attend) -> torch.Tensor:
    """Causal attention of a chunk of s queries at the last s of kv_len positions, with no
    [s, kv_len] mask and no copy of the prefix per query head.

    q: [b, n_heads, s, d]; keys, values: [b, n_kv_heads, kv_len, d] (kv_len > s). The prefix
    (kv_len - s positions, seen by every query) is attended with the n_rep query heads of a KV
    group folded into rows, no mask; the chunk's own s keys square-causally, repeated per query
    head (only s of them: cheap). The two are merged exactly, as flash-decoding merges its splits:
    each weighted by its share of the softmax denominator, exp(lseᵢ - lse). Returns
    [b, n_heads, s, d] in q's dtype.
    """
    b, n_heads, s, d = q.shape
    n_kv_heads, kv_len = keys.shape[1], keys.shape[2]
    n_rep, start = n_heads // n_kv_heads, kv_len - s
    out1, lse1 = attend(q.reshape(b, n_kv_heads, n_rep * s, d), keys[:, :, :start], values[:, :, :start],
                        False)
    out2, lse2 = attend(q, keys[:, :, start:].repeat_interleave(n_rep, dim=1),
                        values[:, :, start:].repeat_interleave(n_rep, dim=1), True)
    lse1, lse2 = lse1.reshape(b, n_heads, s, 1).float(), lse2.reshape(b, n_heads, s, 1).float()
    lse = torch.logaddexp(lse1, lse2)  # log of the softmax denominator over both parts
    out = out1.reshape(b, n_heads, s, d).float() * (lse1 - lse).exp() + out2.float() * (lse2 - lse).exp()
    return out.to(q.dtype)


def _cpu_flash_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _cpu_flash_attention(q, k, v, is_causal=is_causal)
    return out, lse


def _cuda_efficient_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    # CUDA's memory-efficient kernel (float32 included) returns the log-sum-exp when asked; its
    # rows are padded to a multiple of 32, so they are cut to s.
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0,
                                                                             is_causal)
    return out, lse[..., : q.shape[-2]]


def lse_attend(device_type: str) -> Attend:
    """The fused kernel that returns its log-sum-exp on ``device_type``: CPU flash, CUDA
    memory-efficient. Raises ``ValueError`` elsewhere (their plans never merge)."""
    if device_type == "cpu" and _cpu_flash_attention is not None:
        return _cpu_flash_attend
    if device_type == "cuda":
        return _cuda_efficient_attend
    raise ValueError(f"no attention kernel returning its log-sum-exp on {device_type!r}")
