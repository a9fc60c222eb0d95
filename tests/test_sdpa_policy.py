"""The CUDA attention-kernel policy as a pure function (llama3.sdpa_policy), and the fp32
chunk-after-prefix form that merges two attentions by log-sum-exp, checked against float64 math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from llama3.sdpa_policy import (
    CALL_SITES,
    chunk_attention_by_lse_merge,
    describe,
    reference_attend,
    sdpa_backends,
    sdpa_plan,
)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def test_cudnn_is_never_chosen_unless_measured_and_never_for_growing_shapes():
    for site in CALL_SITES:
        for dtype in DTYPES:
            for head_dim in (64, 128):
                assert "cudnn" not in sdpa_plan(site, dtype, head_dim).backends
    # A measurement may enable it where shapes repeat (a cached plan is reused), never for eager
    # decode, whose key length grows by one every token (a new cuDNN plan per token).
    measured = set(CALL_SITES)
    assert "cudnn" not in sdpa_plan("decode", torch.bfloat16, 128, cudnn_faster_at=measured).backends
    assert "cudnn" not in sdpa_plan("chunk", torch.bfloat16, 128, cudnn_faster_at=measured).backends
    step = sdpa_plan("masked_step", torch.bfloat16, 128, cudnn_faster_at={"masked_step"})
    assert step.backends[0] == "cudnn"
    prefill = sdpa_plan("prefill", torch.bfloat16, 128, cudnn_faster_at={"prefill"})
    assert prefill.backends == ("cudnn", "flash")
    assert "cudnn" not in sdpa_plan("prefill", torch.float32, 128, cudnn_faster_at={"prefill"}).backends


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sites_get_flash_or_memory_efficient(dtype):
    assert sdpa_plan("decode", dtype, 128).backends == ("flash", "efficient", "math")
    assert sdpa_plan("decode", dtype, 128).layout == "folded"
    assert sdpa_plan("prefill", dtype, 128).backends == ("flash",)
    assert sdpa_plan("chunk", dtype, 128).backends == ("flash",)
    assert sdpa_plan("chunk", dtype, 128).layout == "gqa"
    # A mask rules flash out: the fixed-shape step runs memory-efficient.
    assert sdpa_plan("masked_step", dtype, 128).backends == ("efficient", "math")


def test_float32_never_materialises_a_chunk_by_kv_len_mask():
    """fp32 has no flash kernel and memory-efficient has no GQA: prefill repeats a chunk's KV heads
    and chunk-after-prefix uses the log-sum-exp merge, both on memory-efficient, never math."""
    prefill, chunk = sdpa_plan("prefill", torch.float32, 128), sdpa_plan("chunk", torch.float32, 128)
    assert (prefill.backends, prefill.layout) == (("efficient",), "repeat_kv")
    assert (chunk.backends, chunk.layout) == (("efficient",), "lse_merge")
    assert sdpa_plan("decode", torch.float32, 128).backends == ("efficient", "math")


def test_unusual_head_sizes_and_other_devices():
    assert sdpa_plan("prefill", torch.bfloat16, 4).backends == ("math",)  # no fused kernel: says so
    assert sdpa_plan("decode", torch.bfloat16, 320).backends == ("efficient", "math")  # flash: <= 256
    cpu = sdpa_plan("chunk", torch.float32, 128, device_type="cpu")
    assert cpu.backends == ()
    assert sdpa_backends(cpu) == []
    assert "not pinned" in describe(cpu)
    with pytest.raises(ValueError, match="call site"):
        sdpa_plan("encode", torch.bfloat16, 128)


def test_backends_map_to_sdpbackend_and_the_log_line_names_them():
    plan = sdpa_plan("decode", torch.bfloat16, 128)
    want = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    assert sdpa_backends(plan) == want
    line = describe(plan)
    assert line.startswith("attention decode: flash > efficient > math (folded)")


def _float64_causal_chunk(q, keys, values):
    """Oracle: queries at the last s of kv_len positions, lower-right causal, KV heads repeated."""
    n_rep = q.shape[1] // keys.shape[1]
    s, kv_len = q.shape[2], keys.shape[2]
    mask = torch.ones(s, kv_len, dtype=torch.bool).tril(diagonal=kv_len - s)
    return F.scaled_dot_product_attention(q.double(), keys.double().repeat_interleave(n_rep, 1),
                                          values.double().repeat_interleave(n_rep, 1), attn_mask=mask)


@pytest.mark.parametrize(("s", "kv_len"), [(5, 12), (16, 17), (8, 64)])
def test_lse_merge_chunk_attention_equals_lower_right_causal_attention(s, kv_len):
    g = torch.Generator().manual_seed(s * kv_len)
    q = torch.randn(2, 8, s, 16, generator=g)
    keys, values = torch.randn(2, 2, kv_len, 16, generator=g), torch.randn(2, 2, kv_len, 16, generator=g)
    want = _float64_causal_chunk(q, keys, values)
    got = chunk_attention_by_lse_merge(q, keys, values, reference_attend)
    assert got.dtype == torch.float32
    assert got.shape == q.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

    # The same contract served by a real fused kernel that returns its log-sum-exp (the CPU flash
    # kernel here; CUDA's memory-efficient one on a GPU: llama3.sdpa_policy.cuda_efficient_attend).
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        def attend(q, k, v, is_causal):
            out, lse = cpu_flash(q, k, v, is_causal=is_causal)
            return out, lse
        torch.testing.assert_close(chunk_attention_by_lse_merge(q, keys, values, attend).double(), want,
                                   rtol=1e-5, atol=1e-5)
