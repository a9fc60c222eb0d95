"""Which scaled-dot-product-attention kernels each attention call site may use on CUDA, and the
fp32 chunked-prefill form that needs no materialised mask.

Left to itself, ``F.scaled_dot_product_attention`` picks a backend per call from a priority list.
With cuDNN newer than 9.15 on sm90, torch 2.11 puts cuDNN first. cuDNN builds (and caches) one
execution plan per shape, and eager decoding calls attention with a key length that grows by one
every token: a new plan per token (tens of milliseconds the first time) and a cache that grows
with the number of lengths seen. So each call site is pinned to the kernels it is meant to use,
decided here as a pure function of the call site, dtype and head size (testable without a GPU),
and the decision is logged once per site (:func:`describe`).

The call sites (llama3's attention, one GQA strategy per case):

* ``decode``: one query per sequence over the filled cache, the n_rep query heads of a KV group
  folded into rows, no mask. Flash (half precision) then memory-efficient; math last, which is
  cheap here (an [n_rep, kv_len] score matrix per KV head).
* ``prefill``: a chunk filling the cache from position 0, square causal, ``is_causal`` with
  ``enable_gqa``. Flash only takes half precision; memory-efficient has no GQA in torch 2.11, so
  in float32 the KV heads are repeated for the chunk (``repeat_kv``: n_rep × a chunk's keys, a
  bounded copy) and memory-efficient applies causality itself.
* ``chunk``: a chunk after cached positions (lower-right causal). Half precision: flash through
  the lower-right causal bias. Float32 has no flash kernel and memory-efficient no GQA, so SDPA
  would fall back to the math kernel with a materialised [chunk, kv_len] float mask, which runs
  out of memory at long context. Instead (``lse_merge``): the cached prefix, which every query
  sees, is attended with the query heads folded into rows and no mask; the chunk's own keys,
  square causal, with those few keys repeated per head; the two results are merged exactly by
  their log-sum-exp (:func:`chunk_attention_by_lse_merge`), as flash-decoding merges its splits.
* ``masked_step``: the fixed-shape decode step (CUDA graphs) over a kv-length bucket with the
  unfilled tail masked out. Flash takes no mask: memory-efficient, then math (small, as decode).

cuDNN is excluded everywhere unless a measurement (scripts/gpu_kernels.py, the GPU check's
``preflight`` and ``kernels`` stages) found it faster at that site *and* the shape is fixed (the
masked step, or prefill at one chunk size): pass those sites in ``cudnn_faster_at``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["CALL_SITES", "SdpaPlan", "chunk_attention_by_lse_merge", "cuda_efficient_attend",
           "describe", "merge_by_lse", "sdpa_backends", "sdpa_plan"]

CALL_SITES = ("decode", "prefill", "chunk", "masked_step")
_HALF = (torch.float16, torch.bfloat16)
# Call sites whose shapes repeat, so a cuDNN plan built once is reused (never decode: its key length
# grows by one every token).
_FIXED_SHAPE_SITES = ("prefill", "masked_step")


@dataclass(frozen=True)
class SdpaPlan:
    """How one call site runs attention: the SDPA backends allowed, in order, and the layout.

    ``backends`` names members of ``torch.nn.attention.SDPBackend`` ("flash", "efficient", "cudnn",
    "math"); empty means "not pinned" (the CPU). ``layout`` is how queries meet the KV heads:
    "folded" (a group's query heads as rows), "gqa" (``enable_gqa=True``), "repeat_kv" (KV heads
    repeated for the call) or "lse_merge" (prefix folded + chunk repeated, merged by log-sum-exp).
    """

    site: str
    backends: tuple[str, ...]
    layout: str
    why: str


def _flash_ok(dtype: torch.dtype, head_dim: int) -> bool:
    # FlashAttention-2 in PyTorch: fp16/bf16 only, head size a multiple of 8 up to 256.
    return dtype in _HALF and head_dim % 8 == 0 and head_dim <= 256


def _efficient_ok(dtype: torch.dtype, head_dim: int) -> bool:
    # The memory-efficient (CUTLASS) kernel: fp32 too; rows aligned to 16 bytes.
    itemsize = torch.empty((), dtype=dtype).element_size()
    return dtype in (*_HALF, torch.float32) and (head_dim * itemsize) % 16 == 0


def _cudnn_ok(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in _HALF and head_dim % 8 == 0 and head_dim <= 128


def sdpa_plan(site: str, dtype: torch.dtype, head_dim: int, device_type: str = "cuda",
              cudnn_faster_at: Collection[str] = ()) -> SdpaPlan:
    """The attention plan of call site ``site`` (one of :data:`CALL_SITES`) for ``dtype`` and
    ``head_dim`` on ``device_type``. ``cudnn_faster_at``: sites where a measurement on this
    machine found cuDNN faster; cuDNN is only ever allowed there, and only at fixed-shape sites.
    Raises ``ValueError`` for an unknown site."""
    if site not in CALL_SITES:
        raise ValueError(f"unknown attention call site {site!r}; expected one of {CALL_SITES}")
    default_layout = {"decode": "folded", "prefill": "gqa", "chunk": "gqa", "masked_step": "folded"}[site]
    if device_type != "cuda":
        return SdpaPlan(site, (), default_layout, f"{device_type}: PyTorch's own kernels, not pinned")
    flash, efficient = _flash_ok(dtype, head_dim), _efficient_ok(dtype, head_dim)
    cudnn = (site in cudnn_faster_at and site in _FIXED_SHAPE_SITES and _cudnn_ok(dtype, head_dim))
    first = ("cudnn",) if cudnn else ()
    measured = "cuDNN first: measured faster here; " if cudnn else ""
    name = str(dtype).removeprefix("torch.")
    if site in ("decode", "masked_step"):
        # Small score matrices: math is an acceptable last resort; the mask rules out flash.
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


def sdpa_backends(plan: SdpaPlan) -> list:
    """``plan.backends`` as ``SDPBackend`` members, for ``torch.nn.attention.sdpa_kernel(...,
    set_priority=True)``; empty for an unpinned plan."""
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "math": "MATH"}
    return [getattr(SDPBackend, names[b]) for b in plan.backends]


def describe(plan: SdpaPlan) -> str:
    """One log line: the site, the kernels in order, the layout and why."""
    kernels = " > ".join(plan.backends) or "not pinned"
    return f"attention {plan.site}: {kernels} ({plan.layout}): {plan.why}"


# --- fp32 chunk after a prefix: two attentions merged by their log-sum-exp -----------------------

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]
"""``attend(q [b, h, s, d], k [b, h, n, d], v, is_causal) -> (out [b, h, s, d], lse [b, h, s])``:
attention that also returns each query's log-sum-exp of scaled scores."""


def merge_by_lse(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor
                 ) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from attention over each: outputs
    [..., s, d] weighted by each part's share of the softmax denominator, exp(lseᵢ - lse)."""
    lse = torch.logaddexp(lse1, lse2)
    return out1 * (lse1 - lse).exp()[..., None] + out2 * (lse2 - lse).exp()[..., None]


def chunk_attention_by_lse_merge(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                 attend: Attend) -> torch.Tensor:
    """Causal attention of a chunk of s queries at the last s of kv_len positions, with no
    [s, kv_len] mask and no copy of the prefix per query head.

    q: [b, n_heads, s, d]; keys, values: [b, n_kv_heads, kv_len, d] (kv_len > s). The prefix
    (kv_len - s positions, seen by every query) is attended with the n_rep query heads of a KV
    group folded into rows, no mask; the chunk's own s keys square-causally, repeated per query
    head (s × n_rep rows: small). Returns [b, n_heads, s, d] in q's dtype.
    """
    b, n_heads, s, d = q.shape
    n_kv_heads, kv_len = keys.shape[1], keys.shape[2]
    n_rep, start = n_heads // n_kv_heads, kv_len - s
    out1, lse1 = attend(q.reshape(b, n_kv_heads, n_rep * s, d), keys[:, :, :start], values[:, :, :start],
                        False)
    out2, lse2 = attend(q, keys[:, :, start:].repeat_interleave(n_rep, dim=1),
                        values[:, :, start:].repeat_interleave(n_rep, dim=1), True)
    out = merge_by_lse(out1.reshape(b, n_heads, s, d).float(), lse1.reshape(b, n_heads, s).float(),
                       out2.float(), lse2.float())
    return out.to(q.dtype)


def cuda_efficient_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """:data:`Attend` with CUDA's memory-efficient kernel (fp32 included), which returns the
    log-sum-exp when asked; its rows are padded to a multiple of 32, so they are cut to s."""
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0,
                                                                             is_causal)
    return out, lse[..., : q.shape[-2]]


def reference_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """:data:`Attend` by the textbook formula (any device; for tests and as the math fallback)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    if is_causal:
        s, n = scores.shape[-2:]
        causal = torch.ones(s, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return F.softmax(scores, dim=-1) @ v.float(), lse
