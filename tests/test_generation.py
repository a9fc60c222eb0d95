"""Generation (llama3.generation): batched KV-cache decoding against a full recompute, logprobs,
echo, stop tokens, sampling, streaming, chat completion, input validation and the example scripts.

Two kinds of model are used: a tiny random Transformer (checked against itself recomputed from
scratch at every step) and ``ScriptedModel``, whose logits say exactly which token comes next, for
tests that need an exact expected output (stop tokens, multi-byte characters, call counts).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import tiny_model as shared_tiny_model
from torch import nn

from llama3 import ModelArgs, Transformer, generation, memory
from llama3.decoding import kv_buckets
from llama3.generation import (
    ConcurrentUseError,
    Llama,
    NonFiniteLogitsError,
    NotEnoughMemoryError,
    SamplingParams,
    make_decode_step,
)
from llama3.presets import PRESETS
from llama3.progress import configure_logging
from llama3.sampling import sample_next_token, sample_top_p

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128256  # the real tokenizer's; the tiny models share it so its ids are valid
TINY = dict(PRESETS["test-chat"], max_batch_size=4, max_seq_len=64)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    # The shared helper; weights ~ N(0, 0.1²), larger than the default init: clear greedy margins.
    return shared_tiny_model("test-chat", seed=seed, std=0.1, **{**TINY, **overrides})


class ScriptedModel(nn.Module):
    """A stand-in model: at row r, position p the logits are 0 except SCORE at ``targets[r, p]``.

    So the token generated at position p + 1 is ``targets[r, p]`` (greedy, or top-p 0.9 sampling at
    temperature 0.6, which keeps only that token). Records every call as (start_pos, seqlen).
    """

    SCORE = 10.0

    def __init__(self, max_seq_len: int = 32, max_batch_size: int = 4) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.params = SimpleNamespace(vocab_size=VOCAB, max_seq_len=max_seq_len,
                                      max_batch_size=max_batch_size)
        # Default continuation: ordinary text tokens that never stop.
        self.targets = (1000 + torch.arange(max_seq_len)).repeat(max_batch_size, 1)
        self.calls: list[tuple[int, int]] = []

    def script(self, row: int, prompt_len: int, continuation: list[int]) -> None:
        """Make ``row`` (with a prompt of ``prompt_len`` tokens) continue with ``continuation``."""
        self.targets[row, prompt_len - 1 : prompt_len - 1 + len(continuation)] = torch.tensor(continuation)

    def forward(self, tokens: torch.Tensor, start_pos: int, *, last_only: bool = False) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        self.calls.append((start_pos, seqlen))
        target = self.targets[:bsz, start_pos : start_pos + seqlen]
        logits = torch.zeros(bsz, seqlen, VOCAB)
        logits.scatter_(-1, target[..., None], self.SCORE)
        return logits[:, -1:] if last_only else logits

    @classmethod
    def logprob(cls) -> float:
        """log-probability of the favoured token."""
        return cls.SCORE - math.log(math.exp(cls.SCORE) + VOCAB - 1)


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[128000] + torch.randint(100, 100000, (n - 1,), generator=g).tolist() for n in lengths]


def oracle_greedy(model: Transformer, prompt: list[int], max_gen_len: int, stop: set[int]) -> list[int]:
    """Greedy decoding that recomputes the whole sequence from position 0 at every step."""
    fresh = copy.deepcopy(model)
    seq = list(prompt)
    out: list[int] = []
    while len(out) < max_gen_len and len(seq) < model.params.max_seq_len:
        logits = fresh.forward(torch.tensor([seq]), 0)
        token = int(logits[0, -1].argmax())
        if token in stop:
            break
        out.append(token)
        seq.append(token)
    return out


@pytest.fixture(scope="module")
def tok(llama3_tokenizer):
    return llama3_tokenizer


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model()


@pytest.fixture
def llama(model, tok) -> Llama:
    return Llama(model, tok)


# --- decoding against oracles -----------------------------------------------------------------------


def test_greedy_batch_equals_full_recompute(llama, model, tok):
    batch = prompts([3, 9, 5])
    out, lp = llama.generate(batch, max_gen_len=12, temperature=0)
    assert lp is None
    stop = set(tok.stop_tokens)
    for prompt, got in zip(batch, out, strict=True):
        assert got == oracle_greedy(model, prompt, 12, stop)
        assert len(got) == 12  # random weights: no stop token within 12 steps


def test_ragged_batch_equals_each_prompt_alone(llama):
    batch = prompts([2, 11, 6, 4], seed=3)
    together, _ = llama.generate(batch, max_gen_len=9, temperature=0)
    alone = [llama.generate([p], max_gen_len=9, temperature=0)[0][0] for p in batch]
    assert together == alone


def test_generation_stops_at_the_end_of_the_context(llama, model, tok):
    # 60 + 10 > max_seq_len 64: only 4 tokens fit, and they must still be right.
    prompt = prompts([60])[0]
    out, _ = llama.generate([prompt], max_gen_len=10, temperature=0)
    assert out[0] == oracle_greedy(model, prompt, 10, set(tok.stop_tokens))
    assert len(out[0]) == 4


def test_logprobs_are_log_softmax_of_the_chosen_tokens(llama, model):
    batch = prompts([4, 7])
    out, lp = llama.generate(batch, max_gen_len=6, temperature=0, logprobs=True)
    fresh = copy.deepcopy(model)
    for prompt, gen, logprobs in zip(batch, out, lp, strict=True):
        seq = prompt + gen
        ref = torch.log_softmax(fresh.forward(torch.tensor([seq]), 0)[0], dim=-1)
        expected = [ref[len(prompt) - 1 + j, t].item() for j, t in enumerate(gen)]
        assert logprobs == pytest.approx(expected, abs=1e-4)


def test_echo_returns_prompt_and_its_logprobs(llama, model):
    batch = prompts([3, 8])
    plain, plain_lp = llama.generate(batch, max_gen_len=5, temperature=0, logprobs=True)
    echoed, echoed_lp = llama.generate(batch, max_gen_len=5, temperature=0, logprobs=True, echo=True)
    fresh = copy.deepcopy(model)
    for prompt, gen, gen_lp, tokens, lps in zip(batch, plain, plain_lp, echoed, echoed_lp, strict=True):
        assert tokens == prompt + gen
        ref = torch.log_softmax(fresh.forward(torch.tensor([prompt]), 0)[0], dim=-1)
        prompt_lp = [0.0] + [ref[k - 1, prompt[k]].item() for k in range(1, len(prompt))]
        assert lps == pytest.approx(prompt_lp + gen_lp, abs=1e-4)
    # echo without logprobs, and echo with nothing to generate (the prompt scored in one pass)
    assert llama.generate(batch, max_gen_len=5, temperature=0, echo=True)[0] == echoed
    tokens, lps = llama.generate([batch[1]], max_gen_len=0, temperature=0, logprobs=True, echo=True)
    assert tokens == [batch[1]]
    assert lps[0] == pytest.approx(echoed_lp[1][: len(batch[1])], abs=1e-4)


# --- stop tokens, lengths and call pattern (scripted model) -------------------------------------------


def test_each_row_stops_at_its_first_stop_token(tok):
    model = ScriptedModel()
    llama = Llama(model, tok)
    batch = [[tok.bos_id, 10], [tok.bos_id, 20, 21, 22, 23], [tok.bos_id, 30, 31]]
    model.script(0, 2, [101, 102, tok.eot_id, 103, tok.eos_id])
    model.script(1, 5, [201, 202, 203, tok.eom_id])
    model.script(2, 3, [301, tok.eos_id])
    out, lp = llama.generate(batch, max_gen_len=20, temperature=0, logprobs=True)
    assert out == [[101, 102], [201, 202, 203], [301]]
    assert lp == [[pytest.approx(ScriptedModel.logprob(), abs=1e-4)] * n for n in (2, 3, 1)]
    # Prefill up to the shortest prompt, then one position per step until the last row stops
    # (row 1 emits <|eom_id|> at position 8).
    assert model.calls == [(0, 2)] + [(p, 1) for p in range(2, 8)]


def test_stop_token_inside_the_prompt_does_not_stop(tok):
    model = ScriptedModel()
    llama = Llama(model, tok)
    prompt = [tok.bos_id, 40, tok.eot_id, 41]
    model.script(0, 4, [401, 402])
    out, _ = llama.generate([prompt], max_gen_len=2, temperature=0, echo=True)
    assert out == [prompt + [401, 402]]


def test_max_gen_len_and_default_length(tok):
    model = ScriptedModel(max_seq_len=32)
    llama = Llama(model, tok)
    model.script(1, 6, [tok.eot_id])
    out, _ = llama.generate([[tok.bos_id, 5], [tok.bos_id, 6, 7, 8, 9, 10]], max_gen_len=3, temperature=0)
    assert out == [[1001, 1002, 1003], []]
    # Row 0 has its 3 tokens at position 4, row 1 stops at 6: the loop ends there, not at the
    # buffer's end (position 8 = longest prompt + max_gen_len - 1).
    assert model.calls[-1] == (5, 1)
    text = llama.text_completion(["x"], temperature=0)  # default: fill the context
    assert text[0]["generation"] == tok.decode(list(range(1001, 1031)))


def test_echoed_prompt_logprobs_come_from_forward_logprobs(tok, monkeypatch):
    # The prompt is scored by decoding.forward_logprobs (chunk by chunk, never prompt x vocab
    # logits at once); generate must not ask forward() for every prompt position's logits.
    import llama3.decoding as decoding

    monkeypatch.setattr(decoding, "forward_logprobs",
                        lambda model, tokens, start_pos: model.forward_logprobs(tokens, start_pos))

    class Scoring(ScriptedModel):
        def forward_logprobs(self, tokens, start_pos):
            bsz, seqlen = tokens.shape
            self.calls.append(("logprobs", start_pos, seqlen))
            target = self.targets[:bsz, start_pos + seqlen - 1 : start_pos + seqlen]
            last = torch.zeros(bsz, 1, VOCAB).scatter_(-1, target[..., None], self.SCORE)
            return torch.full((bsz, seqlen - 1), -1.5), last

    model = Scoring()
    llama = Llama(model, tok)
    model.script(0, 4, [401, 402, tok.eot_id])
    prompt = [tok.bos_id, 10, 11, 12]
    out, lps = llama.generate([prompt], max_gen_len=5, temperature=0, logprobs=True, echo=True)
    assert out == [[tok.bos_id, 10, 11, 12, 401, 402]]
    assert lps[0] == pytest.approx([0.0, -1.5, -1.5, -1.5] + [ScriptedModel.logprob()] * 2, abs=1e-4)
    assert model.calls == [("logprobs", 0, 4), (4, 1), (5, 1)]


def test_sampling_with_top_p_keeps_only_the_nucleus(tok):
    # The favoured token has probability ~0.99 at temperature 0.6, so top-p 0.9 keeps it alone.
    model = ScriptedModel()
    llama = Llama(model, tok)
    model.script(0, 2, [11, 12, 13, tok.eot_id])
    out, _ = llama.generate([[tok.bos_id, 9]], max_gen_len=10, temperature=0.6, top_p=0.9)
    assert out == [[11, 12, 13]]


def test_sample_top_p_draws_from_the_renormalised_nucleus():
    torch.manual_seed(0)
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).repeat(20000, 1)
    # Sorted: 0.5, 0.3, 0.15, 0.05. Mass before them: 0, 0.5, 0.8, 0.95.
    drawn = sample_top_p(probs, 0.85).flatten()
    counts = torch.bincount(drawn, minlength=4).float() / drawn.numel()
    assert counts[0] == 0  # 0.95 of the mass comes before it
    assert counts[1:].tolist() == pytest.approx([0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95], abs=0.015)
    assert set(sample_top_p(probs, 0.7).flatten().tolist()) == {1, 3}
    assert set(sample_top_p(probs, 0.0).flatten().tolist()) == {1}
    logits = torch.randn(5, 100)
    assert torch.equal(sample_next_token(logits, 0.0, 0.9), logits.argmax(-1))


def test_sampling_is_reproducible_with_the_seed(llama):
    batch = prompts([3, 6])

    def run(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        return llama.generate(batch, max_gen_len=8, temperature=1.0, top_p=0.95)[0]

    first = run(7)
    assert run(7) == first
    assert run(8) != first
    assert first != llama.generate(batch, max_gen_len=8, temperature=0)[0]


def test_static_decode_step_matches_eager(model, tok):
    # The compile=True path runs decode steps through model.forward(..., kv_len=); exercise that path
    # (without the compiler, which the fast-path tests cover) against eager decoding.
    eager = Llama(model, tok)
    static = Llama(model, tok, decode_step=make_decode_step(model, compile=False, static=True))
    batch = prompts([5, 2, 8], seed=5)
    ref = eager.generate(batch, max_gen_len=7, temperature=0, logprobs=True)
    got = static.generate(batch, max_gen_len=7, temperature=0, logprobs=True)
    assert got[0] == ref[0]
    for a, b in zip(got[1], ref[1], strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    with pytest.raises(ValueError, match="not both"):
        Llama(model, tok, compile=True, decode_step=eager.decode_step)


def test_static_decode_step_attends_over_kv_length_buckets():
    assert kv_buckets(64) == [64]
    assert kv_buckets(256) == [256]
    assert kv_buckets(1000) == [256, 512, 1000]
    assert kv_buckets(131072) == [2**k for k in range(8, 18)]
    model = tiny_model(max_seq_len=1000)
    seen = []

    def forward(tokens, input_pos, kv_len=None):
        seen.append((tokens.tolist(), input_pos.tolist(), kv_len))
        return torch.zeros(tokens.shape[0], 1, VOCAB)

    model.forward = forward  # the fixed-shape call: model.forward(tokens, input_pos, kv_len=bucket)
    step = make_decode_step(model, compile=False, static=True)
    for pos in (0, 255, 256, 511, 512, 999):
        step(torch.tensor([[pos]]), pos)
    assert seen == [([[p]], [p], kv) for p, kv in
                    [(0, 256), (255, 256), (256, 512), (511, 512), (512, 1000), (999, 1000)]]
    with pytest.raises(ValueError, match="outside the KV cache"):
        step(torch.tensor([[1]]), 1000)


def test_static_decode_across_a_bucket_boundary_gives_the_eager_tokens(tok):
    # Positions 249..261 cross the 256 bucket: the step then attends over 512 cached positions.
    model = tiny_model(max_seq_len=600, max_batch_size=2)
    batch = prompts([252, 249], seed=9)
    want, want_lp = Llama(model, tok).generate(batch, max_gen_len=10, temperature=0, logprobs=True)
    static = Llama(model, tok, decode_step=make_decode_step(model, compile=False, static=True))
    got, got_lp = static.generate(batch, max_gen_len=10, temperature=0, logprobs=True)
    assert got == want
    for a, b in zip(got_lp, want_lp, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


# --- text, chat and streaming ---------------------------------------------------------------------


def test_text_completion_decodes_generate(llama, tok):
    texts = ["Hello", "The capital of France is"]
    result = llama.text_completion(texts, temperature=0, max_gen_len=6, logprobs=True)
    ids, lps = llama.generate([tok.encode(t, bos=True, eos=False) for t in texts], 6, temperature=0,
                              logprobs=True)
    for r, gen, lp in zip(result, ids, lps, strict=True):
        assert r["generation"] == tok.decode(gen)
        assert r["tokens"] == [tok.decode([t]) for t in gen]
        assert r["logprobs"] == lp
    assert set(llama.text_completion(texts, temperature=0, max_gen_len=2)[0]) == {"generation"}


def test_chat_completion_returns_the_scripted_assistant_message(tok):
    model = ScriptedModel(max_seq_len=64)
    llama = Llama(model, tok)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    prompt = llama.formatter.encode_dialog_prompt(dialog)
    answer = tok.encode("Hello there 🦙", bos=False, eos=False)
    model.script(0, len(prompt), answer + [tok.eot_id])
    [result] = llama.chat_completion([dialog], temperature=0)
    assert set(result) == {"generation"}
    message = result["generation"]
    assert (message["role"], message["content"], message["stop_reason"]) == (
        "assistant", "Hello there 🦙", "end_of_turn")
    assert message.get("tool_calls", []) == []
    assert "".join(llama.stream_chat_completion(dialog, temperature=0)) == "Hello there 🦙"
    # <|eom_id|> ends a message (the model waits for a tool's answer); running out of tokens is said too.
    model.script(0, len(prompt), answer[:2] + [tok.eom_id])
    assert llama.chat_completion([dialog], temperature=0)[0]["generation"]["stop_reason"] == "end_of_message"
    cut = llama.chat_completion([dialog], temperature=0, max_gen_len=1)[0]["generation"]
    assert (cut["content"], cut["stop_reason"]) == (tok.decode(answer[:1]), "out_of_tokens")


def test_chat_completion_on_a_tiny_model(llama, tok):
    dialogs = [[{"role": "user", "content": "What is 2 + 2?"}],
               [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]]
    result = llama.chat_completion(dialogs, temperature=0, max_gen_len=5, logprobs=True)
    ids, _ = llama.generate([llama.formatter.encode_dialog_prompt(d) for d in dialogs], 5, temperature=0)
    for r, gen in zip(result, ids, strict=True):
        assert (r["generation"]["role"], r["generation"]["content"]) == ("assistant", tok.decode(gen))
        assert len(r["logprobs"]) == len(gen) == len(r["tokens"])


def test_stream_never_splits_a_multibyte_character(tok):
    model = ScriptedModel()
    llama = Llama(model, tok)
    text = "ok 🦙🦙 日本語 é"
    ids = tok.encode(text, bos=False, eos=False)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # the llama emoji is split over tokens
    prompt = tok.encode("x", bos=True, eos=False)
    model.script(0, len(prompt), ids + [tok.eot_id])
    deltas = list(llama.stream_text_completion("x", temperature=0))
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "🦙" in deltas  # the emoji came out whole, once its last byte arrived
    assert llama.text_completion(["x"], temperature=0)[0]["generation"] == text


def test_stream_batch_deltas_concatenate_to_the_completions(llama):
    texts = ["Once upon a time", "1, 2, 3,", "Bonjour"]
    full = [r["generation"] for r in llama.text_completion(texts, temperature=0, max_gen_len=10)]
    rows = [""] * len(texts)
    for step in llama.stream_text_completion(texts, temperature=0, max_gen_len=10):
        assert len(step) == len(texts)
        rows = [acc + d for acc, d in zip(rows, step, strict=True)]
    assert rows == full
    # Sampling: the same seed gives the same stream and the same completion.
    torch.manual_seed(3)
    streamed = "".join(llama.stream_text_completion("Once upon a time", temperature=1.0, max_gen_len=10))
    torch.manual_seed(3)
    assert streamed == llama.text_completion(["Once upon a time"], temperature=1.0, max_gen_len=10)[0][
        "generation"]


def test_stream_reading_back_every_few_steps_gives_the_same_text(llama):
    # On an accelerator the stream reads tokens back every few steps (no host sync per token);
    # the text must not depend on how often it reads.
    texts = ["Once upon a time", "1, 2, 3,", "Bonjour"]
    full = [r["generation"] for r in llama.text_completion(texts, temperature=0, max_gen_len=10)]
    every_step = list(llama.stream_text_completion(texts, temperature=0, max_gen_len=10))
    llama.stop_check_interval = 3
    try:
        steps = list(llama.stream_text_completion(texts, temperature=0, max_gen_len=10))
    finally:
        llama.stop_check_interval = 1
    assert ["".join(row) for row in zip(*steps, strict=True)] == full
    assert len(steps) <= len(every_step) // 3 + 1  # positions read back three at a time


# --- bad input ------------------------------------------------------------------------------------


def test_empty_input_gives_empty_output(llama):
    assert llama.generate([], 5) == ([], None)
    assert llama.generate([], 5, logprobs=True) == ([], [])
    assert llama.text_completion([]) == []
    assert llama.chat_completion([]) == []
    assert list(llama.stream([])) == []


def test_too_many_prompts_or_too_long_a_prompt(llama):
    with pytest.raises(ValueError, match=r"5 prompts exceed max_batch_size=4"):
        llama.generate(prompts([3] * 5), 4)
    with pytest.raises(ValueError, match=r"prompt 1 has 65 tokens, more than max_seq_len=64"):
        llama.generate(prompts([3, 65]), 4)
    with pytest.raises(ValueError, match=r"max_seq_len=64"):
        llama.stream(prompts([65]))  # raised at the call, not at the first next()
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        llama.generate([[]], 4)
    with pytest.raises(ValueError, match=f"token id {VOCAB} is outside"):
        llama.generate([[1, VOCAB]], 4)
    with pytest.raises(ValueError, match="temperature"):
        llama.generate(prompts([3]), 4, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        llama.generate(prompts([3]), 4, top_p=1.5)
    with pytest.raises(ValueError, match="max_gen_len"):
        llama.generate(prompts([3]), -1)


@pytest.mark.parametrize(("dialog", "message"), [
    ([], r"dialog 0 is empty.*user or ipython"),
    ([{"role": "robot", "content": "hi"}],
     r"message 0: unknown role 'robot'; roles are system, user, assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
     r"ends with a message of role 'assistant'.*user or ipython"),
    ([{"role": "system", "content": "be nice"}], r"role 'system'.*user or ipython"),
])
def test_bad_dialogs(llama, dialog, message):
    with pytest.raises(ValueError, match=message):
        llama.chat_completion([dialog])
    with pytest.raises(ValueError, match=message):
        llama.stream_chat_completion([dialog])


def test_model_and_tokenizer_must_match(tok):
    with pytest.raises(ValueError, match="vocabulary"):
        Llama(tiny_model(vocab_size=256), tok)


# --- reliability: never a silently wrong answer (issue 10) -----------------------------------------


def test_reliability_concurrent_calls_give_the_single_thread_outputs(model, tok):
    # One Llama, one KV cache: concurrent calls are serialised, so each gets its own right answer.
    llama = Llama(model, tok)
    jobs = [["Once upon a time", "1, 2, 3,"], ["Bonjour"], ["The capital of France is", "x", "Hi"]]
    want = [llama.text_completion(texts, temperature=0, max_gen_len=8) for texts in jobs]
    got: dict[int, list] = {}

    def work(i: int) -> None:
        got[i] = [llama.text_completion(jobs[i], temperature=0, max_gen_len=8) for _ in range(2)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(jobs))] == [[w, w] for w in want]


def test_reliability_interleaved_streams_raise(model, tok):
    llama = Llama(model, tok)
    want = llama.text_completion(["Bonjour"], temperature=0, max_gen_len=6)[0]["generation"]
    first = llama.stream_text_completion("Once upon a time", temperature=0, max_gen_len=6)
    second = llama.stream_text_completion("Bonjour", temperature=0, max_gen_len=6)
    next(first)
    text = next(second)  # takes over the KV cache
    with pytest.raises(ConcurrentUseError, match="overtaken"):
        next(first)
    assert text + "".join(second) == want  # the stream that took over is unharmed
    # A stream resumed after a plain call on the same Llama fails the same way.
    stream = llama.stream_text_completion("Bonjour", temperature=0, max_gen_len=6)
    next(stream)
    llama.generate(prompts([3]), 2, temperature=0)
    with pytest.raises(ConcurrentUseError):
        next(stream)
    # A stream created before another call but not yet started is fine: it has not used the cache.
    late = llama.stream_text_completion("Bonjour", temperature=0, max_gen_len=6)
    llama.generate(prompts([3]), 2, temperature=0)
    assert "".join(late) == want


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_reliability_non_finite_logits_raise(tok, poison):
    model = tiny_model()
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[0, 0] = poison
    llama = Llama(model, tok)
    batch = prompts([4, 6])
    for temperature in (0, 0.6):
        with pytest.raises(NonFiniteLogitsError, match="NaN or infinite.*float16"):
            llama.generate(batch, 5, temperature=temperature)
    with pytest.raises(NonFiniteLogitsError):
        llama.generate(batch, 0, temperature=0, logprobs=True, echo=True)
    with pytest.raises(NonFiniteLogitsError):
        list(llama.stream_text_completion(["Hi"], temperature=0, max_gen_len=4))


@pytest.mark.parametrize(("temperature", "top_p", "message"), [
    (float("nan"), 0.9, "temperature must be a finite number"),
    (float("inf"), 0.9, "temperature must be a finite number"),
    (-0.1, 0.9, "temperature must be >= 0"),
    ("0.5", 0.9, "temperature must be a finite number"),
    (0.6, float("nan"), "top_p must be a finite number"),
    (0.6, 0.0, r"top_p must be in \(0, 1\]"),
    (0.6, 1.5, r"top_p must be in \(0, 1\]"),
])
def test_reliability_bad_sampling_parameters_are_rejected(llama, temperature, top_p, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(temperature, top_p)
    with pytest.raises(ValueError, match=message):
        llama.generate(prompts([3]), 2, temperature=temperature, top_p=top_p)
    with pytest.raises(ValueError, match=message):
        llama.stream(prompts([3]), 2, temperature=temperature, top_p=top_p)  # at the call
    assert SamplingParams() == SamplingParams(0.6, 0.9)
    assert SamplingParams(temperature=0, top_p=1).temperature == 0.0


def test_reliability_token_ids_must_be_integers(llama):
    with pytest.raises(ValueError, match=r"prompt 1, position 2: token id 791.7 is not an integer"):
        llama.generate([[128000, 5], [128000, 9, 791.7]], 2, temperature=0)
    with pytest.raises(ValueError, match=r"prompt 0, position 1: token id 7.0 is not an integer"):
        llama.generate([[128000, 7.0]], 2, temperature=0)
    with pytest.raises(ValueError, match="prompt 0, position 0: .* not an integer"):
        llama.generate([torch.tensor([128000.0, 5.0])], 2, temperature=0)
    with pytest.raises(ValueError, match=f"prompt 0, position 1: token id {VOCAB} is outside"):
        llama.generate([[1, VOCAB]], 2, temperature=0)
    # Integer numpy and torch scalars and arrays are ids like any other.
    want = llama.generate([[128000, 791, 6864]], 3, temperature=0)
    assert llama.generate([[np.int64(128000), torch.tensor(791), np.int32(6864)]], 3, temperature=0) == want
    assert llama.generate([np.array([128000, 791, 6864])], 3, temperature=0) == want
    assert llama.generate(torch.tensor([[128000, 791, 6864]]), 3, temperature=0) == want


def _no_loading(*args, **kwargs):
    raise AssertionError("Llama.build loaded weights before its checks")


def test_reliability_model_and_tokenizer_vocabularies_must_be_equal(tok, llama3_tokenizer_path, tmp_path,
                                                                     monkeypatch):
    with pytest.raises(ValueError, match="128256 tokens but the model's vocabulary has 128512"):
        Llama(tiny_model(vocab_size=128512), tok)
    # Llama.build refuses before reading any weight.
    from llama3 import checkpoint

    args = ModelArgs(**{**TINY, "vocab_size": 128512, "n_layers": 1})
    checkpoint.save_meta_checkpoint(checkpoint.random_state_dict(args, dtype=torch.bfloat16), args, tmp_path)
    monkeypatch.setattr(checkpoint, "load_model", _no_loading)
    with pytest.raises(ValueError, match="128256 tokens but the model's vocabulary has 128512"):
        Llama.build(tmp_path, llama3_tokenizer_path, 64, 1, device="cpu", verbose=False)


# --- building from a checkpoint and the example scripts ---------------------------------------------


def test_build_seeds_sampling_and_explains_a_missing_tokenizer(generation_checkpoint, llama3_tokenizer_path):
    def sample() -> str:
        gen = Llama.build(generation_checkpoint, llama3_tokenizer_path, 64, 2, seed=5, device="cpu",
                          dtype="float32", verbose=False)
        return gen.text_completion(["Hi"], temperature=1.0, max_gen_len=6)[0]["generation"]

    first = sample()
    torch.manual_seed(1234)  # build reseeds, whatever happened before
    assert sample() == first
    with pytest.raises(ValueError, match="quantize"):
        Llama.build(generation_checkpoint, llama3_tokenizer_path, quantize="int3")


@pytest.fixture
def llama3_log(caplog):
    """caplog for the package's logger (which configure_logging keeps from propagating); its state is
    restored afterwards."""
    logger = logging.getLogger("llama3")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="llama3")
    yield caplog
    logger.handlers[:], logger.level, logger.propagate = saved


def test_build_checks_that_weights_and_cache_fit_before_loading(generation_checkpoint, llama3_tokenizer_path,
                                                                 monkeypatch, llama3_log):
    from llama3 import checkpoint

    monkeypatch.setattr(checkpoint, "load_model", _no_loading)
    # A cache of 2 layers x 2 KV heads x head_dim 8 x 4 bytes x 2 (keys, values) = 256 bytes per
    # position: 2**31 positions need 512 GiB, more than this machine's RAM.
    with pytest.raises(NotEnoughMemoryError, match=r"KV cache 512.00 GiB"):
        Llama.build(generation_checkpoint, llama3_tokenizer_path, 2**31, 1, device="cpu", dtype="float32",
                    verbose=False)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)  # 1 MiB free
    with pytest.raises(NotEnoughMemoryError, match=r"only 0.00 GiB is free.*max_batch_size"):
        Llama.build(generation_checkpoint, llama3_tokenizer_path, 64, 2, device="cpu", verbose=False)
    with pytest.raises(NotEnoughMemoryError):
        Llama.build(generation_checkpoint, llama3_tokenizer_path, 1024, 4, device="cpu", dtype="float32")
    # 2 layers x 4 rows x 1024 positions x 2 KV heads x 8 x 4 bytes x 2 = 1 MiB
    assert ("KV cache: 0.00 GiB per rank (max_batch_size 4 x max_seq_len 1024 x 2 layers x 2 KV heads"
            in llama3_log.text)


def test_build_sets_the_prefill_chunk(generation_checkpoint, llama3_tokenizer_path):
    gen = Llama.build(generation_checkpoint, llama3_tokenizer_path, 64, 1, device="cpu", prefill_chunk=16,
                      verbose=False)
    assert gen.model.prefill_chunk == 16
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="prefill_chunk"):
            Llama.build(generation_checkpoint, llama3_tokenizer_path, prefill_chunk=bad)


def test_long_generation_reports_progress_unless_quiet(llama, monkeypatch, llama3_log):
    monkeypatch.setattr(generation, "Progress", functools.partial(generation.Progress, interval=0.0))
    configure_logging(True)
    llama.generate(prompts([3]), 4, temperature=0)
    lines = [r.getMessage() for r in llama3_log.records if r.name == "llama3.generation"]
    assert lines[-1].startswith("generating (batch of 1): 4 of 4 new tokens (100%)")
    assert "ETA" in lines[-1]
    assert "tok/s per answer" in lines[-1]
    # Prompts of different lengths: the count is of each answer's new tokens (max_gen_len 6), not of
    # positions after the shortest prompt (6 + 9 - 3).
    llama3_log.clear()
    llama.generate(prompts([3, 9, 5]), 6, temperature=0)
    lines = [r.getMessage() for r in llama3_log.records if r.name == "llama3.generation"]
    counts = [re.match(r"generating \(batch of 3\): (\d+) of 6 new tokens", line) for line in lines]
    assert all(counts)
    assert [int(m.group(1)) for m in counts] == list(range(1, 7))
    llama3_log.clear()
    configure_logging(False)
    llama.generate(prompts([3]), 4, temperature=0)
    assert not [r for r in llama3_log.records if r.name == "llama3.generation"]


def test_build_without_a_tokenizer_says_where_to_get_it(tmp_path, generation_checkpoint):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in Path(generation_checkpoint).iterdir():
        if f.name != "tokenizer.model":
            (bare / f.name).symlink_to(f)
    with pytest.raises(FileNotFoundError, match="llama-models"):
        Llama.build(bare, None, 64, 1, device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py"])
def test_example_scripts_run(script, generation_checkpoint, llama3_tokenizer_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), str(generation_checkpoint),
         "--tokenizer_path", str(llama3_tokenizer_path), "--max_gen_len", "4", "--max_seq_len", "128",
         "--device", "cpu", "--temperature", "0"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("==================================") == 4
