"""Warming up the compiled decode step (llama3/warmup.py): every kv-length bucket is compiled up
front and logged, decoding afterwards compiles nothing more and gives eager's greedy tokens (the
throw-away cache entries the warm-up wrote are never read)."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import LogLines, tiny_model
from torch._dynamo.utils import counters

from llama3.decoding import make_decode_step
from llama3.presets import PRESETS
from llama3.warmup import warm_up_decode_step

ARGS = dict(PRESETS["test-gqa"], n_layers=1, max_batch_size=1, max_seq_len=300)  # buckets 256, 300


@torch.no_grad()  # as llama3.decoding.decode runs: dynamo guards on the grad mode
def _greedy(model, tokens, step, n):
    token = model.forward(tokens, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)
    out = [token]
    for pos in range(tokens.shape[1], tokens.shape[1] + n):
        token = step(token, pos)[:, -1].clone().argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)




def test_warm_up_compiles_every_bucket_once_and_decoding_then_compiles_nothing():
    torch._dynamo.reset()
    model = tiny_model("test-gqa", seed=0, std=0.08, **ARGS)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, ARGS["vocab_size"], (1, 250), generator=g)
    step = make_decode_step(model, compile=True)
    log, lines = logging.getLogger("test_warmup"), LogLines()
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    records = warm_up_decode_step(step, batch_sizes=(1,), log=log)
    assert [(r.batch_size, r.kv_len) for r in records] == [(1, 256), (1, 300)]
    assert all(r.seconds > 0 for r in records)
    text = "\n".join(lines.lines)
    assert "kv length 256 compiled" in text
    assert "kv length 300 compiled" in text

    frames = counters["stats"]["unique_graphs"]
    got = _greedy(model, tokens, step, 12)  # crosses from bucket 256 into bucket 300
    assert counters["stats"]["unique_graphs"] == frames  # no compile during decoding
    want = _greedy(model, tokens, make_decode_step(model, compile=False), 12)
    assert torch.equal(got, want)
    torch._dynamo.reset()


def test_only_a_compiled_step_is_warmed_and_max_kv_len_limits_the_buckets():
    class FakeStep:
        compiled, buckets, device = True, [256, 512, 1024, 2048], torch.device("cpu")

        def __init__(self):
            self.calls = []

        def __call__(self, tokens, pos):
            self.calls.append((tokens.shape[0], pos))

    step = FakeStep()
    records = warm_up_decode_step(step, batch_sizes=(1, 4), max_kv_len=600)
    assert [(r.batch_size, r.kv_len) for r in records] == [(1, 256), (1, 512), (1, 1024),
                                                           (4, 256), (4, 512), (4, 1024)]
    assert step.calls[:2] == [(1, 255), (1, 255)]  # the last position of the bucket, twice
    model = tiny_model("test-gqa", seed=0, **ARGS)
    assert warm_up_decode_step(make_decode_step(model, compile=False)) == []
    assert warm_up_decode_step(make_decode_step(model, compile=False, static=True)) == []


def test_build_with_warm_up_compiles_every_bucket_before_the_first_call(generation_checkpoint):
    """``Llama.build(..., compile=True, warm_up=True)`` compiles each bucket for ``max_batch_size``
    at start-up, logging each with its time; generating afterwards compiles nothing and gives the
    eager model's greedy tokens. ``warm_up`` without ``compile`` is refused before any loading."""
    from llama3.generation import Llama

    with pytest.raises(ValueError, match="compile=True"):
        Llama.build("/nonexistent", warm_up=True)
    with pytest.raises(ValueError, match="boolean"):
        Llama.build("/nonexistent", compile=True, warm_up="yes")
    torch._dynamo.reset()
    lines = LogLines()
    logging.getLogger("llama3.warmup").addHandler(lines)
    try:
        llama = Llama.build(generation_checkpoint, max_seq_len=300, max_batch_size=1, device="cpu",
                            dtype="float32", compile=True, warm_up=True)
    finally:
        logging.getLogger("llama3.warmup").removeHandler(lines)
    compiled = [line for line in lines.lines if line.startswith("warm-up: decode step")]
    assert [line.split("kv length ")[1].split()[0] for line in compiled] == ["256", "300"], lines.lines
    frames = counters["stats"]["unique_graphs"]
    prompt = [list(range(128000, 128000 + 1)) + list(range(1000, 1249))]  # 250 tokens: crosses 256
    got, _ = llama.generate(prompt, 12, temperature=0)
    assert len(got[0]) >= 8  # decoded past position 256, into the second bucket
    assert counters["stats"]["unique_graphs"] == frames  # nothing compiled while generating
    want, _ = Llama(llama.model, llama.tokenizer).generate(prompt, 12, temperature=0)
    assert got == want
    torch._dynamo.reset()


def test_chat_refuses_warm_up_without_compile_before_loading(tmp_path, capsys):
    from llama3.chat import main

    assert main([str(tmp_path), "--warm-up"]) == 2  # an empty directory: never loaded
    err = capsys.readouterr().err
    assert "--warm-up" in err
    assert "add --compile" in err
