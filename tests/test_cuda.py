"""CUDA cases of the fast paths: the CUDA-graph decoding step (``torch.compile`` with
``mode="reduce-overhead"``) gives eager's tokens, ``Llama(compile=True)`` generates what eager
``Llama`` does, int8 weight-only decoding runs under CUDA graphs, and no graph is skipped.

They need a GPU: scripts/gpu_check.sh runs them on a lent one. Its CPU dry run runs them on the CPU
(``LLAMA3_TEST_DEVICE=cpu``: the same code with inductor's CPU backend, no CUDA graphs), so they
cannot rot on a machine without a GPU; elsewhere without CUDA they are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
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
