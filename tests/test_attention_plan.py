"""The attention plan of each call site as a pure function (llama3.attention.sdpa_plan), the plans
attention() applies and logs once, and the chunk-after-prefix form that merges two attentions by
log-sum-exp, checked against float64 math."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import LogLines
from torch.nn.attention import SDPBackend

from llama3.attention import (
    CALL_SITES,
    SdpaPlan,
    chunk_attention_by_lse_merge,
    describe,
    lse_attend,
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
    step = sdpa_plan("masked", torch.bfloat16, 128, cudnn_faster_at={"masked"})
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
    assert sdpa_plan("masked", dtype, 128).backends == ("efficient", "math")


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


def reference_attend(q, k, v, is_causal):
    """The merge's ``attend`` contract by the textbook formula, in float64: (out, log-sum-exp)."""
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    return F.softmax(scores, dim=-1) @ v.double(), torch.logsumexp(scores, dim=-1)


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
    # kernel here; CUDA's memory-efficient one on a GPU, which tests/test_cuda.py checks).
    torch.testing.assert_close(chunk_attention_by_lse_merge(q, keys, values, lse_attend("cpu")).double(),
                               want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="log-sum-exp"):
        lse_attend("mps")




def test_attention_applies_the_plan_of_each_site_and_logs_the_plans_once(monkeypatch, caplog):
    """attention() runs the layout its plan names (here: CUDA's float32 plans forced onto the CPU,
    the merge served by the CPU kernel) and gives float64 attention; the plans of a (device, dtype,
    head size) are logged once, at the first call."""
    import llama3.attention as attention_module

    monkeypatch.setattr(attention_module, "_PLANS", {})
    cuda_plans = {site: sdpa_plan(site, torch.float32, 16) for site in CALL_SITES}
    monkeypatch.setattr(attention_module, "sdpa_plan",
                        lambda site, *args: cuda_plans[site]._replace(backends=()))
    lines = LogLines()
    attention_module.logger.addHandler(lines)
    caplog.set_level(logging.DEBUG, logger=attention_module.logger.name)  # unpinned: DEBUG
    try:
        g = torch.Generator().manual_seed(7)
        for s, kv_len in ((9, 9), (6, 40), (1, 40)):  # prefill (repeat_kv), chunk (lse_merge), decode
            q = torch.randn(1, 8, s, 16, generator=g)
            keys, values = (torch.randn(1, 2, kv_len, 16, generator=g) for _ in range(2))
            got = attention_module.attention(q, keys, values)
            torch.testing.assert_close(got.double(), _float64_causal_chunk(q, keys, values), rtol=1e-5,
                                       atol=1e-5)
    finally:
        attention_module.logger.removeHandler(lines)
    assert [cuda_plans[s].layout for s in ("prefill", "chunk", "decode")] == ["repeat_kv", "lse_merge",
                                                                             "folded"]
    assert len(lines.lines) == len(CALL_SITES)  # every site, once
    assert any(line.startswith("attention chunk:") and "lse_merge" in line for line in lines.lines)


def test_a_pinned_call_site_compiles_into_one_graph(monkeypatch, caplog):
    """The masked site of the compiled decode step, pinned (``sdpa_kernel`` with priorities), traces
    without a graph break and gives the eager result; pinned plans are logged at INFO."""
    import llama3.attention as attention_module

    pinned = SdpaPlan("masked", ("flash", "math"), "folded", "pinned for the test")
    monkeypatch.setattr(attention_module, "_PLANS", {})
    monkeypatch.setattr(attention_module, "sdpa_plan", lambda site, *args: pinned._replace(site=site))
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 8, 1, 16, generator=g)
    keys, values = torch.randn(1, 2, 32, 16, generator=g), torch.randn(1, 2, 32, 16, generator=g)
    mask = torch.arange(32)[None, :] <= 20
    caplog.set_level(logging.INFO, logger=attention_module.logger.name)
    want = attention_module.attention(q, keys, values, mask=mask)
    assert "attention masked: flash > math (folded)" in caplog.text
    torch._dynamo.reset()
    compiled = torch.compile(attention_module.attention, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(q, keys, values, mask=mask), want)
    torch._dynamo.reset()
