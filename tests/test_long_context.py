"""Long context (issue 11): chunked prefill, per-token log-probabilities in bounded memory, the
fixed-shape decode step over part of the cache, the memory arithmetic, and the model's own
reliability checks (misuse of forward, a failed setup_kv_cache).

Chunked results are checked against the same model run in one shot, against a naive attention
written out here, and at positions past 8,192 against Meta's reference model.
"""

from __future__ import annotations

import functools
import logging
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import random_model

import llama3.attention as attention_module
import llama3.memory as memory
import llama3.model as model_module
from llama3 import ModelArgs, Transformer
from llama3.attention import attention
from llama3.decoding import forward_logprobs
from llama3.memory import kv_cache_bytes

CHUNK = 16
BASE = dict(dim=64, n_layers=2, n_heads=8, vocab_size=256, multiple_of=32, max_batch_size=2, max_seq_len=128)
CONFIGS = {
    "mha": dict(n_kv_heads=8),
    "gqa": dict(n_kv_heads=2),
    "gqa_rope_3.1": dict(n_kv_heads=2, use_scaled_rope=True),
}


def make_model(seed: int = 0, **overrides) -> Transformer:
    # Larger than the default init so that eps, norm gains, head grouping and every position's
    # attention pattern all move the logits.
    return random_model(ModelArgs(**{**BASE, **overrides}), seed=seed, std=0.08, norm_gains=True)


def random_tokens(bsz: int, seqlen: int, vocab: int = BASE["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (bsz, seqlen), generator=torch.Generator().manual_seed(seed))


def one_shot(model: Transformer, fn, *args):
    """Run ``fn(*args)`` with chunking switched off (the whole input as one chunk)."""
    chunk, model.prefill_chunk = model.prefill_chunk, 1 << 30
    try:
        return fn(*args)
    finally:
        model.prefill_chunk = chunk


def relative_gap(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference relative to the range of the reference logits."""
    return ((got - want).abs().max() / (want.max() - want.min())).item()


# --- chunked prefill == one-shot prefill --------------------------------------------------------


@pytest.mark.parametrize("length", [CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
@pytest.mark.parametrize("name", CONFIGS)
def test_chunked_prefill_equals_one_shot(name, length):
    model = make_model(**CONFIGS[name])
    tokens = random_tokens(2, length)
    want = one_shot(model, model.forward, tokens, 0)
    model.prefill_chunk = CHUNK
    got = model(tokens, 0)
    assert got.shape == want.shape == (2, length, BASE["vocab_size"])
    assert relative_gap(got, want) <= 1e-5
    # The cache the chunks left behind serves the next token exactly as the one-shot cache does.
    nxt = random_tokens(2, 1, seed=2)
    step = model(nxt, length)
    one_shot(model, model.forward, tokens, 0)
    assert relative_gap(step, model(nxt, length)) <= 1e-5
    assert relative_gap(model(tokens, 0, last_only=True), want[:, -1:]) <= 1e-5


def test_chunks_after_a_cached_prefix_equal_one_shot():
    """Chunks need not start at 0 or at multiples of the chunk size."""
    model = make_model(**CONFIGS["gqa_rope_3.1"])
    tokens = random_tokens(2, 21 + 3 * CHUNK + 2)
    want = one_shot(model, model.forward, tokens, 0)
    model.prefill_chunk = CHUNK
    model(tokens[:, :21], 0)
    assert relative_gap(model(tokens[:, 21:], 21), want[:, 21:]) <= 1e-5


@pytest.mark.parametrize("use_fused_cpu_kernel", [True, False])
@pytest.mark.parametrize("n_kv_heads", [8, 2, 1])
def test_causal_attention_equals_naive_attention(monkeypatch, n_kv_heads, use_fused_cpu_kernel):
    """The attention kernels against softmax(q kᵀ/√d + mask) v written out with Meta's repeat_kv,
    for one query, a square chunk and chunks over a longer cache. Without the fused CPU kernel the
    lower-right causal bias path (the one CUDA takes) runs."""
    if not use_fused_cpu_kernel:
        monkeypatch.setattr(attention_module, "_cpu_flash_attention", None)
    gen = torch.Generator().manual_seed(0)
    n_heads, hd, kv_len = 8, 16, 40
    keys = torch.randn(2, n_kv_heads, kv_len, hd, generator=gen)
    values = torch.randn(2, n_kv_heads, kv_len, hd, generator=gen)
    for s in (1, 7, 23, kv_len):
        q = torch.randn(2, n_heads, s, hd, generator=gen)
        n_rep = n_heads // n_kv_heads
        k, v = keys.repeat_interleave(n_rep, dim=1), values.repeat_interleave(n_rep, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        visible = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - s, kv_len)[:, None]
        want = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v
        assert (attention(q, keys, values) - want).abs().max().item() <= 1e-5, s
        assert (attention(q, keys, values, mask=visible) - want).abs().max().item() <= 1e-5, s


def test_ragged_batch_crossing_chunk_boundaries_decodes_identically():
    """Generation's pattern: prefill up to the shortest prompt, then one position per step, rows
    still inside their (longer) prompt keeping the prompt token. Chunked and one-shot prefill give
    the same greedy tokens and logits."""
    model = make_model(**CONFIGS["gqa_rope_3.1"])
    lens, total = [2 * CHUNK + 3, 3 * CHUNK + 4], 3 * CHUNK + 12
    prompts = random_tokens(2, total, seed=3)

    def greedy(chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        model.prefill_chunk = chunk
        tokens = prompts.clone()
        in_prompt = torch.arange(total)[None, :] < torch.tensor(lens)[:, None]
        logits = [model(tokens[:, :lens[0]], 0, last_only=True)]
        for pos in range(lens[0], total):
            nxt = logits[-1][:, -1].argmax(-1)
            tokens[:, pos] = torch.where(in_prompt[:, pos], tokens[:, pos], nxt)
            if pos + 1 < total:
                logits.append(model(tokens[:, pos:pos + 1], pos, last_only=True))
        return tokens, torch.cat(logits, 1)

    tokens, logits = greedy(CHUNK)
    want_tokens, want_logits = greedy(1 << 30)
    assert torch.equal(tokens, want_tokens)
    assert relative_gap(logits, want_logits) <= 1e-5


def test_generate_is_unchanged_by_chunking(llama3_tokenizer):
    """End to end through Llama.generate: greedy tokens identical, echo + logprobs equal."""
    from llama3.generation import Llama

    model = make_model(vocab_size=128256, n_kv_heads=2, use_scaled_rope=True, max_seq_len=96)
    generator = Llama(model, llama3_tokenizer)
    gen = torch.Generator().manual_seed(5)
    prompts = [[128000] + torch.randint(100, 100000, (n,), generator=gen).tolist()
               for n in (CHUNK + 3, 2 * CHUNK + 9)]

    def run(chunk: int):
        model.prefill_chunk = chunk
        return generator.generate(prompts, max_gen_len=6, temperature=0.0, logprobs=True, echo=True)

    tokens, logprobs = run(CHUNK)
    want_tokens, want_logprobs = run(1 << 30)
    assert tokens == want_tokens
    for got, want in zip(logprobs, want_logprobs, strict=True):
        assert len(got) == len(want)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-5


# --- per-token log-probabilities ---------------------------------------------------------------


@pytest.mark.parametrize("start_pos", [0, 7])
def test_forward_logprobs_equal_log_softmax_of_full_logits(start_pos):
    model = make_model(**CONFIGS["gqa"])
    tokens = random_tokens(2, start_pos + 3 * CHUNK + 5)
    logits = one_shot(model, model.forward, tokens, 0)[:, start_pos:]
    want = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, start_pos + 1:, None])[..., 0]

    model.prefill_chunk = CHUNK
    if start_pos:
        model(tokens[:, :start_pos], 0)
    rows = []
    hook = model.output.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[1]))
    logprobs, last_logits = forward_logprobs(model, tokens[:, start_pos:], start_pos)
    hook.remove()
    assert logprobs.dtype == last_logits.dtype == torch.float32
    assert logprobs.shape == want.shape
    assert last_logits.shape == (2, 1, BASE["vocab_size"])
    assert (logprobs - want).abs().max().item() <= 1e-5
    assert relative_gap(last_logits, logits[:, -1:]) <= 1e-5
    assert max(rows) <= CHUNK  # never more than one chunk of logits at a time
    # It fills the cache like forward: the next step continues from it.
    nxt = random_tokens(2, 1, seed=9)
    step = model(nxt, tokens.shape[1])
    one_shot(model, model.forward, tokens, 0)
    assert relative_gap(step, model(nxt, tokens.shape[1])) <= 1e-5


def test_forward_logprobs_of_one_token_has_no_scores():
    model = make_model(**CONFIGS["gqa"])
    tokens = random_tokens(2, 1)
    logprobs, last_logits = forward_logprobs(model, tokens, 0)
    assert logprobs.shape == (2, 0)
    assert torch.equal(last_logits, model(tokens, 0))


def test_last_only_projects_one_position():
    """forward(last_only=True) runs the vocabulary projection on the last position only."""
    model = make_model(**CONFIGS["gqa"])
    model.prefill_chunk = CHUNK
    rows = []
    hook = model.output.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[1]))
    model(random_tokens(1, 3 * CHUNK + 5), 0, last_only=True)
    hook.remove()
    assert rows == [1]


# --- long positions against Meta's reference ---------------------------------------------------


@pytest.mark.slow
def test_positions_past_8192_with_rope_scaling_match_meta_reference():
    """A 9,000-token prompt with Llama 3.1 RoPE scaling, through our chunked prefill (default
    2,048-token chunks) and through Meta's model (fed 1,500 tokens per call, its own KV-cache
    path, so that its quadratic mask stays small): the logits agree at every position."""
    meta_model = pytest.importorskip("llama_models.llama3.model", reason="pip install --no-deps llama-models")
    from llama_models.llama3.args import ModelArgs as MetaModelArgs

    from llama3.distributed import init_model_parallel

    length = 9000
    shape = dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32,
                 use_scaled_rope=True, max_batch_size=1, max_seq_len=length)
    model = make_model(**shape)
    assert model.prefill_chunk == 2048
    init_model_parallel()  # Meta's fairscale layers need it; ours do not
    ref = meta_model.Transformer(MetaModelArgs(**shape))
    ref.load_state_dict(model.state_dict(), strict=True)

    tokens = random_tokens(1, length, vocab=128)
    ours = model(tokens, 0)
    theirs = torch.cat([ref(tokens[:, i:i + 1500], i) for i in range(0, length, 1500)], dim=1)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours[:, 8192:] - theirs[:, 8192:]).abs().max().item() <= 1e-4


# --- memory -------------------------------------------------------------------------------------

PREFILL_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from llama3 import ModelArgs, Transformer
    length = int(sys.argv[1])
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=1024,
                                  max_batch_size=1, max_seq_len=length))
    tokens = torch.randint(0, 1024, (1, length))
    model(tokens[:, :64], 0, last_only=True)  # load kernels and thread pools before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logits = model(tokens, 0, last_only=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - base) * 1024, bool(torch.isfinite(logits).all()))
""")


@pytest.mark.slow
def test_prefill_memory_above_model_and_cache_is_bounded():
    """A 16,384-token prompt on the tiny long-context shape, in a fresh process: peak RSS above
    weights + KV cache stays under 0.5 GiB. Prefill with one mask over the whole prompt peaked at
    5.3 GiB here (and grows with the square of the length); chunked prefill needs ~0.06 GiB."""
    result = subprocess.run([sys.executable, "-c", PREFILL_MEMORY_SCRIPT, "16384"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    extra, finite = result.stdout.split()
    assert finite == "True"
    assert int(extra) < 0.5 * 1024**3, f"prefill used {int(extra) / 1024**3:.2f} GiB above the model"


def test_kv_cache_bytes_is_what_the_model_allocates():
    for dtype in (torch.float32, torch.bfloat16):
        args = ModelArgs(**{**BASE, "n_kv_heads": 2, "max_seq_len": 40, "max_batch_size": 3})
        model = Transformer(args).to(dtype)
        allocated = sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                        if "kv_cache" in name)
        assert kv_cache_bytes(args, dtype) == allocated


def test_kv_cache_bytes_of_released_shapes():
    """The README's figures: Llama 3 8B (8 KV heads of 128 dims, 32 layers) in bfloat16 needs
    128 KiB per position, so 1 GiB at 8K, 4 GiB at 32K, 16 GiB at 128K; model parallelism splits
    the KV heads, and ranks beyond the number of KV heads hold copies."""
    llama_8b = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, max_batch_size=1)
    for seq, gib in ((8192, 1), (32768, 4), (131072, 16)):
        assert kv_cache_bytes(ModelArgs(**llama_8b, max_seq_len=seq), torch.bfloat16) == gib * 1024**3
    llama_70b = ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, max_batch_size=1, max_seq_len=8192)
    whole = kv_cache_bytes(llama_70b, torch.bfloat16)
    assert whole == 80 * 1024 * 8192 * 2 * 2  # 2.5 GiB
    assert kv_cache_bytes(llama_70b, torch.bfloat16, world_size=8) == whole // 8
    assert kv_cache_bytes(llama_70b, torch.bfloat16, world_size=16) == whole // 8


def test_check_fits_device_names_the_numbers(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\n"
                       "MemAvailable:    8388608 kB\n")  # 8 GiB
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    assert memory.available_bytes("cpu") == 8 * 1024**3
    memory.check_fits_device(4 * 1024**3, 3 * 1024**3, "cpu")  # 7 GiB fits in 8
    with pytest.raises(memory.NotEnoughMemoryError) as err:
        memory.check_fits_device(4 * 1024**3, 5 * 1024**3, torch.device("cpu"))
    message = str(err.value)
    for expected in ("weights 4.00 GiB", "KV cache 5.00 GiB", "9.00 GiB", "8.00 GiB is free", "max_seq_len",
                     "max_batch_size"):
        assert expected in message
    meminfo.write_text("MemTotal: 1 kB\n")  # no MemAvailable line: unknown, so no check
    assert memory.available_bytes("cpu") is None
    memory.check_fits_device(10**15, 10**15, "cpu")


# --- the fixed-shape decode step ---------------------------------------------------------------


def test_forward_static_over_part_of_the_cache_equals_forward():
    """At several fill levels, a step attending over the first kv_len positions (any kv_len past
    the position) gives forward's logits, also when the cache beyond holds an older, longer
    sequence that must stay invisible."""
    model = make_model(**CONFIGS["gqa"])
    stale = random_tokens(2, BASE["max_seq_len"], seed=7)
    model(stale, 0)  # fill the whole cache with another sequence
    tokens = random_tokens(2, 64)
    want = model(tokens, 0)
    model(tokens[:, :20], 0)
    for pos in range(20, 64):
        kv_lens = [pos + 1, 32 if pos < 32 else 64, None] if pos in (20, 31, 32, 47, 63) else [64]
        for kv_len in kv_lens:
            step = model(tokens[:, pos:pos + 1], torch.tensor([pos]), kv_len=kv_len or BASE["max_seq_len"])
            assert relative_gap(step[:, 0], want[:, pos]) <= 1e-5, (pos, kv_len)


@pytest.mark.parametrize("kv_len", [0, 129, 3.0, True])
def test_reliability_forward_static_rejects_bad_kv_len(kv_len):
    model = make_model(**CONFIGS["gqa"])
    with pytest.raises(ValueError, match="kv_len"):
        model(random_tokens(1, 1), torch.tensor([0]), kv_len=kv_len)


# --- reliability: misuse and failure leave nothing broken --------------------------------------


@pytest.mark.parametrize(("tokens", "start_pos", "message"), [
    (torch.tensor([1, 2, 3]), 0, r"2-D tensor of token ids \[batch, seq\], got \(3,\)"),
    ([[1, 2, 3]], 0, "2-D tensor"),
    (torch.zeros(1, 0, dtype=torch.long), 0, "empty"),
    (torch.tensor([[1.0, 2.0]]), 0, "integer token ids, got dtype torch.float32"),
    (torch.tensor([[True, False]]), 0, "integer token ids"),
    (torch.tensor([[1, 2]]), -1, "start_pos must be >= 0, got -1"),
    (torch.tensor([[1, 2]]), 1.5, "start_pos must be an integer"),
    (torch.tensor([[1, 2]]), torch.tensor(1.0), "start_pos must be an integer"),
    (torch.tensor([[1, 256]]), 0, r"\[0, 256\).*from 1 to 256"),
    (torch.tensor([[-1, 2]]), 0, r"\[0, 256\).*from -1 to 2"),
    (torch.tensor([[300]]), 5, r"\[0, 256\)"),  # one token: still checked on the CPU
    (torch.ones(3, 2, dtype=torch.long), 0, "max_batch_size=2"),
    (torch.ones(1, 8, dtype=torch.long), 125, "max_seq_len=128"),
])
def test_reliability_forward_misuse_raises_value_error(tokens, start_pos, message):
    model = make_model(**CONFIGS["gqa"])
    for fn in (model.forward, functools.partial(forward_logprobs, model)):
        with pytest.raises(ValueError, match=message):
            fn(tokens, start_pos)
    assert torch.isfinite(model(torch.tensor([[1, 2]]), 0)).all()  # still usable


def test_reliability_forward_accepts_integer_likes():
    model = make_model(**CONFIGS["gqa"])
    want = model(torch.tensor([[1, 2, 3]]), 0)
    assert torch.equal(model(torch.tensor([[1, 2, 3]], dtype=torch.int32), torch.tensor(0)), want)
    assert torch.equal(model(torch.tensor([[4]]), torch.tensor(3)), model(torch.tensor([[4]]), 3))


@pytest.mark.parametrize("chunk", [0, -5, 2.5, None])
def test_reliability_bad_prefill_chunk_is_reported(chunk):
    model = make_model(**CONFIGS["gqa"])
    model.prefill_chunk = chunk
    with pytest.raises(ValueError, match="prefill_chunk must be a positive integer"):
        model(random_tokens(1, 4), 0)


@pytest.mark.parametrize("kwargs", [dict(max_batch_size=0), dict(max_seq_len=-1), dict(max_seq_len=2.5),
                                    dict(max_batch_size=True)])
def test_reliability_failed_setup_kv_cache_changes_nothing(kwargs):
    args = ModelArgs(**{**BASE, **CONFIGS["gqa"]})
    model = make_model(**CONFIGS["gqa"])
    model.params = args
    tokens = random_tokens(2, 20)
    want = model(tokens, 0)
    with pytest.raises(ValueError, match="setup_kv_cache: max_"):
        model.setup_kv_cache(**kwargs)
    assert model.params is args
    assert (args.max_batch_size, args.max_seq_len) == (2, 128)
    assert torch.equal(model(tokens, 0), want)


def test_reliability_setup_kv_cache_allocation_failure_changes_nothing(monkeypatch):
    """An allocation failing halfway (out of memory on the second layer) leaves the old caches,
    params and RoPE table in place."""
    model = make_model(**CONFIGS["gqa"])
    tokens = random_tokens(2, 20)
    want = model(tokens, 0)
    before = (model.params, model.rope, [layer.attention.kv_cache for layer in model.layers])
    real_cache = model_module.KVCache
    made = []

    def failing_cache(*args, **kwargs):
        if made:
            raise torch.OutOfMemoryError("simulated: no memory for the second layer's cache")
        made.append(1)
        return real_cache(*args, **kwargs)

    monkeypatch.setattr(model_module, "KVCache", failing_cache)
    with pytest.raises(torch.OutOfMemoryError):
        model.setup_kv_cache(max_seq_len=4096)
    assert before == (model.params, model.rope, [layer.attention.kv_cache for layer in model.layers])
    assert model.params.max_seq_len == 128
    assert torch.equal(model(tokens, 0), want)


def test_setup_kv_cache_copies_the_callers_args():
    args = ModelArgs(**{**BASE, **CONFIGS["gqa"]})
    model = Transformer(args)
    model.setup_kv_cache(max_batch_size=1, max_seq_len=300)
    assert (args.max_batch_size, args.max_seq_len) == (2, 128)  # the caller's object is untouched
    assert model.params is not args
    assert (model.params.max_batch_size, model.params.max_seq_len) == (1, 300)
    assert model.rope.shape[0] == 300
    assert model.layers[0].attention.kv_cache.k.shape == (1, 2, 300, 8)
    assert torch.isfinite(model(random_tokens(1, 4), 290)).all()


# --- attention(): every case against float64 ---------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [8, 2, 1])
@pytest.mark.parametrize(("case", "s", "kv_len"), [("decode", 1, 37), ("prefill", 19, 19), ("chunk", 11, 40),
                                             ("masked", 1, 64)])
def test_attention_equals_float64_reference_in_every_case(case, s, kv_len, n_kv_heads):
    """softmax(q kᵀ/√d + mask) v computed in float64 with Meta's repeat_kv grouping. The masked case
    is the static step: one query at position 29 of a 64-position window, later positions stale."""
    from llama3.attention import attention_case

    gen = torch.Generator().manual_seed(3)
    n_heads, hd, b = 8, 16, 2
    q = torch.randn(b, n_heads, s, hd, generator=gen)
    keys = torch.randn(b, n_kv_heads, kv_len, hd, generator=gen)
    values = torch.randn(b, n_kv_heads, kv_len, hd, generator=gen)
    if case == "masked":
        mask = torch.arange(kv_len)[None, :] <= torch.tensor([29])[:, None]
    else:
        mask = None
        visible = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - s, kv_len)[:, None]
    assert attention_case(s, kv_len, mask is not None) == case
    n_rep = n_heads // n_kv_heads
    k = keys.double().repeat_interleave(n_rep, dim=1)
    v = values.double().repeat_interleave(n_rep, dim=1)
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(hd)
    want = scores.masked_fill(~(mask if mask is not None else visible), float("-inf")).softmax(-1) @ v
    got = attention(q, keys, values, mask=mask)
    assert got.shape == (b, n_heads, s, hd)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() <= 2e-6


# --- the fit check covers building a Transformer and setup_kv_cache ----------------------------


def _limit_address_space(monkeypatch, tmp_path, limit: int, used: int = 0) -> None:
    """A process under `ulimit -v` (RLIMIT_AS) with plenty of free RAM."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemAvailable: {64 * 1024**2} kB\n")  # 64 GiB free
    status = tmp_path / "status"
    status.write_text(f"VmSize:\t{used // 1024} kB\n")
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    monkeypatch.setattr(memory, "PROC_STATUS", status)
    monkeypatch.setattr(memory.resource, "getrlimit", lambda which: (limit, memory.resource.RLIM_INFINITY))


def test_building_a_transformer_checks_the_cache_against_the_address_space_limit(monkeypatch, tmp_path):
    args = ModelArgs(**{**BASE, **CONFIGS["gqa"], "max_seq_len": 1 << 20, "max_batch_size": 4})
    assert kv_cache_bytes(args, torch.float32) == 1024**3  # 4 x 1M positions x 256 bytes
    _limit_address_space(monkeypatch, tmp_path, limit=3 * 1024**3 // 2, used=1024**3)
    assert memory.available_bytes("cpu") == 1024**3 // 2
    with pytest.raises(memory.NotEnoughMemoryError, match=r"does not fit on cpu.*KV cache 1\.00 GiB.*"
                                                          r"only 0\.50 GiB is free.*max_batch_size"):
        Transformer(args)
    with torch.device("meta"):  # nothing is allocated on the meta device: no check
        Transformer(args)


def test_setup_kv_cache_checks_the_new_cache_and_keeps_the_old_one(monkeypatch, tmp_path):
    model = make_model(**CONFIGS["gqa"])
    tokens = random_tokens(2, 20)
    want = model(tokens, 0)
    before = (model.params, model.rope, [layer.attention.kv_cache for layer in model.layers])
    _limit_address_space(monkeypatch, tmp_path, limit=3 * 1024**3 // 2, used=1024**3)
    with pytest.raises(memory.NotEnoughMemoryError, match="does not fit on cpu"):
        model.setup_kv_cache(max_batch_size=2, max_seq_len=(1 << 20) + 1024)  # 0.5 GiB free, more asked
    assert before == (model.params, model.rope, [layer.attention.kv_cache for layer in model.layers])
    assert torch.equal(model(tokens, 0), want)
    model.setup_kv_cache(max_seq_len=256)  # small enough
    assert model.params.max_seq_len == 256


@pytest.mark.parametrize(("scaled", "trained"), [(False, 8192), (True, 131072)])
def test_a_context_beyond_the_trained_one_is_allowed_and_said_once(caplog, scaled, trained):
    seq = trained + 1 + int(scaled)  # a value no other test uses: "once" is per process
    small = dict(BASE, n_kv_heads=2, max_batch_size=1, n_layers=1, use_scaled_rope=scaled)
    with caplog.at_level(logging.WARNING, logger="llama3.memory"):
        Transformer(ModelArgs(**{**small, "max_seq_len": trained}))
        assert not caplog.records
        model = Transformer(ModelArgs(**{**small, "max_seq_len": seq}))
        model.setup_kv_cache(max_seq_len=seq)
        Transformer(ModelArgs(**{**small, "max_seq_len": seq}))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1
    assert f"{seq}" in said[0]
    assert f"{trained} positions" in said[0]
    assert torch.isfinite(model(random_tokens(1, 3), seq - 3)).all()
