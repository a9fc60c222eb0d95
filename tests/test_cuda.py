"""CUDA cases of the fast paths: the CUDA-graph decoding step (``torch.compile`` with
``mode="reduce-overhead"``) gives eager's tokens, ``Llama(compile=True)`` generates what eager
``Llama`` does, a warmed-up step decodes without compiling again, int8 weight-only decoding runs
under CUDA graphs, and no graph is skipped; bf16 logits match transformers', sampling never
synchronises with the host, each attention call site's pinned kernels run and give the reference,
the CUDA int8 kernel is the dequantized product.

They need a GPU: scripts/gpu_check.sh runs them on a lent one. Its CPU dry run runs them on the CPU
(``LLAMA3_TEST_DEVICE=cpu``: the same code with inductor's CPU backend, no CUDA graphs), so they
cannot rot on a machine without a GPU; elsewhere without CUDA they are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from llama3 import ModelArgs, Transformer
from llama3.generation import Llama
from llama3.kernels import Int8Kernel, swap_linears

DEVICE = os.environ.get("LLAMA3_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None,
                                reason="needs CUDA (scripts/gpu_check.sh runs these on a GPU)")
CUDA = DEVICE == "cuda"
MODE = "reduce-overhead" if CUDA else None  # CUDA graphs; on the CPU dry run plain inductor

TINY = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=32,
            max_batch_size=2, max_seq_len=48)
PROMPT, STEPS = 8, 12


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Transformer(ModelArgs(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.08)  # logits spread out: greedy choices have clear margins
    return model.to(device=DEVICE, dtype=dtype).eval()


def greedy(model: Transformer, tokens: torch.Tensor, step) -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS greedy tokens after ``tokens`` with ``step(token, pos) -> logits``, and the logits."""
    token = model.forward(tokens, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)
    out, logits = [token], []
    for pos in range(tokens.shape[1], tokens.shape[1] + STEPS - 1):
        step_logits = step(token, pos)[:, -1].clone()  # a CUDA graph's output is overwritten next step
        token = step_logits.argmax(-1, keepdim=True)
        out.append(token)
        logits.append(step_logits)
    return torch.cat(out, dim=1), torch.stack(logits, dim=1)


def eager_step(model: Transformer):
    return lambda token, pos: model.forward(token, pos, last_only=True)


def compiled_step(model: Transformer):
    """The decoding step as Llama(compile=True) runs it: fixed input buffers, one graph."""
    compiled = torch.compile(model.forward, mode=MODE)
    tokens = torch.empty(TINY["max_batch_size"], 1, dtype=torch.long, device=DEVICE)
    input_pos = torch.empty(1, dtype=torch.long, device=DEVICE)

    def step(token: torch.Tensor, pos: int) -> torch.Tensor:
        tokens.copy_(token)
        input_pos.fill_(pos)
        if CUDA:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(tokens, input_pos, kv_len=model.params.max_seq_len)

    return step


def prompt(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (TINY["max_batch_size"], PROMPT), generator=g).to(DEVICE)


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def assert_one_graph_no_skips() -> None:
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["inductor"]["cudagraph_skips"] == 0, "a CUDA graph was skipped (see the log above)"


def test_cuda_graph_decode_gives_the_eager_tokens_fp32():
    model = make_model()
    tokens = prompt()
    want, want_logits = greedy(model, tokens, eager_step(model))
    got, got_logits = greedy(model, tokens, compiled_step(model))
    assert torch.equal(got, want)
    assert (got_logits - want_logits).abs().max().item() <= 1e-4
    assert_one_graph_no_skips()


def test_int8_decode_under_cuda_graphs():
    """int8 weight-only (the fused dequantise-matmul on CUDA) compiled = int8 eager: fp32 to rounding,
    bf16 within a bf16 step of the logits' range."""
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.05)):
        torch._dynamo.reset()
        model = make_model(dtype=dtype)
        swap_linears(model, Int8Kernel)
        tokens = prompt()
        want, want_logits = greedy(model, tokens, eager_step(model))
        # The compiled step fed the eager path's tokens: logits compare position by position.
        step = compiled_step(model)
        model.forward(tokens, 0, last_only=True)
        got_logits = torch.stack([step(want[:, i:i + 1], PROMPT + i)[:, -1].clone()
                                  for i in range(STEPS - 1)], dim=1)
        scale = want_logits.abs().max().item()
        assert (got_logits - want_logits).abs().max().item() <= tol * scale, dtype
        if dtype == torch.float32:
            assert torch.equal(got_logits.argmax(-1), want_logits.argmax(-1))
    assert_one_graph_no_skips()


def test_llama_compile_generates_what_eager_generates(llama3_tokenizer):
    """Llama(compile=True).generate = Llama(compile=False).generate: ragged prompts, greedy, fp32."""
    model = make_model(vocab_size=llama3_tokenizer.n_words, max_seq_len=64)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128000, (n,), generator=g).tolist() for n in (5, 9)]
    want, _ = Llama(model, llama3_tokenizer, compile=False).generate(prompts, 20, temperature=0)
    got, _ = Llama(model, llama3_tokenizer, compile=True).generate(prompts, 20, temperature=0)
    assert got == want
    assert sum(len(t) for t in got) > 20  # the decode loop ran, through the compiled step
    assert_one_graph_no_skips()


@torch.no_grad()  # as llama3.decoding.decode runs the step: the compiled graphs are guarded on it
def test_warmed_up_step_decodes_the_eager_tokens_without_compiling_again():
    """llama3.warmup compiles (and records the CUDA graph of) each kv-length bucket up front; a
    decode afterwards that crosses from bucket 256 into bucket 300 compiles nothing and gives the
    eager step's greedy tokens."""
    from llama3.decoding import make_decode_step
    from llama3.warmup import warm_up_decode_step

    model = make_model(max_seq_len=300, max_batch_size=1)
    step = make_decode_step(model, compile=True)
    records = warm_up_decode_step(step, batch_sizes=(1,))
    assert [r.kv_len for r in records] == [256, 300]
    graphs = counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, TINY["vocab_size"], (1, 250), generator=g).to(DEVICE)

    def greedy(step):
        token = model.forward(tokens, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)
        out = [token]
        for pos in range(250, 262):
            token = step(token, pos)[:, -1].clone().argmax(-1, keepdim=True)
            out.append(token)
        return torch.cat(out, dim=1)

    got = greedy(step)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled while decoding
    assert torch.equal(got, greedy(make_decode_step(model, compile=False)))
    assert_one_graph_no_skips()


# --- bf16 parity with transformers, sampling without host syncs, attention plans, int8 ---------------


def _hf_model(model: Transformer, dtype: torch.dtype):
    """transformers' LlamaForCausalLM holding ``model``'s weights (the independent oracle)."""
    transformers = pytest.importorskip("transformers")
    from llama3.checkpoint import meta_to_hf_state_dict, model_args_to_hf_config

    args = model.params
    config = transformers.LlamaConfig(**{**model_args_to_hf_config(args, dtype), "bos_token_id": None,
                                         "eos_token_id": None, "pad_token_id": 0,
                                         "attn_implementation": "sdpa"})
    hf = transformers.LlamaForCausalLM(config).to(dtype)
    state = {k: v.float().cpu().to(dtype) for k, v in meta_to_hf_state_dict(model.state_dict(), args).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "rotary" not in k], missing
    return hf.to(DEVICE).eval()


def test_bf16_logits_match_transformers():
    """Same weights, bf16 on the device: our logits are as close to the float32 truth (transformers
    in float32, which ours matches to 1e-4) as transformers' own bf16 logits are, and the greedy
    choice agrees wherever the float32 lead is clear of bf16 rounding."""
    model = make_model(dtype=torch.float32)
    tokens = prompt()
    with torch.no_grad():
        truth = _hf_model(model, torch.float32)(tokens).logits.float()
        ours32 = model.forward(tokens, 0).float()
        assert (ours32 - truth).abs().max().item() <= 1e-4
        theirs16 = _hf_model(model, torch.bfloat16)(tokens).logits.float()
        ours16 = model.to(torch.bfloat16).forward(tokens, 0).float()
    scale = truth.abs().max().item()
    ours_err, theirs_err = (ours16 - truth).abs().max().item(), (theirs16 - truth).abs().max().item()
    assert ours_err <= 2 * theirs_err + 0.01 * scale, (ours_err, theirs_err)
    top2 = truth.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * max(ours_err, theirs_err)
    assert clear.sum() >= 4  # not vacuous
    assert torch.equal(ours16.argmax(-1)[clear], truth.argmax(-1)[clear])
    assert torch.equal(theirs16.argmax(-1)[clear], truth.argmax(-1)[clear])


def test_sampling_on_the_device_never_waits_for_the_host():
    """On CUDA, torch's sync debug mode turns any device-to-host synchronisation in the sampler
    into an error; the draws stay inside Meta's nucleus."""
    from llama3.sampling import sample_next_token, top_p_mask

    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 128256, generator=g) * 4).to(DEVICE)
    if CUDA:
        torch.cuda.set_sync_debug_mode("error")
    try:
        drawn = torch.stack([sample_next_token(logits, 0.6, 0.9) for _ in range(16)], dim=1)
    finally:
        if CUDA:
            torch.cuda.set_sync_debug_mode(0)
    kept = top_p_mask(torch.softmax(logits.float() / 0.6, dim=-1).cpu(), 0.9)
    assert kept.gather(1, drawn.cpu()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pinned_attention_plans_run_and_give_the_reference(dtype):
    """attention() at each call site runs its pinned kernels (llama3.attention's plan) on the
    inputs as the model shapes them, and gives textbook attention; fp32 chunk-after-prefix through
    the log-sum-exp merge (CUDA's memory-efficient kernel), never a [chunk, kv_len] mask."""
    from llama3.attention import attention, attention_case, sdpa_plan

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, hd, kv_len, s = 8, 2, 64, 96, 16

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    keys, values = rand(1, kv_heads, kv_len, hd), rand(1, kv_heads, kv_len, hd)
    rep = heads // kv_heads
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    device_type = "cuda" if CUDA else "cpu"
    cases = ((s, kv_len, None), (s, s, None), (1, kv_len, None),
             (1, kv_len, torch.arange(kv_len, device=DEVICE)[None, :] <= kv_len // 2))
    for n, length, mask in cases:  # chunk, prefill, decode, masked
        q = rand(1, heads, n, hd)
        k, v = keys[:, :, :length], values[:, :, :length]
        visible = torch.ones(n, length, dtype=torch.bool, device=DEVICE).tril(diagonal=length - n)
        want = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(rep, 1),
                                              v.float().repeat_interleave(rep, 1),
                                              attn_mask=visible if mask is None else mask)
        got = attention(q, k, v, mask=mask)
        assert got.dtype == dtype
        site = attention_case(n, length, mask is not None)
        torch.testing.assert_close(got.float(), want, **tol, msg=lambda m, site=site: f"{site}: {m}")
        if CUDA and dtype == torch.float32 and site == "chunk":
            assert sdpa_plan(site, dtype, hd, device_type=device_type).layout == "lse_merge"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_cuda_kernel_eager_and_compiled_is_the_dequantized_product(dtype):
    from llama3.kernels.int8 import quantize_per_channel
    from llama3.kernels.int8_cuda import int8_linear_cuda

    g = torch.Generator().manual_seed(0)
    q, scale = quantize_per_channel(torch.randn(256, 512, generator=g))
    q, scale = q.to(DEVICE), scale.to(DEVICE, dtype)
    x = torch.randn(1, 1, 512, generator=g).to(DEVICE, dtype)
    want = x.double() @ (q.double() * scale.double()[:, None]).T
    tol = 1e-3 if dtype == torch.float32 else 1e-2
    # No fullgraph=True: the CI dry run disables compiling, and fullgraph then refuses to run at all.
    for fn in (int8_linear_cuda, torch.compile(int8_linear_cuda)):
        got = fn(x, q, scale)
        assert got.dtype == dtype
        assert (got.double() - want).abs().max().item() <= tol * want.abs().max().item()
