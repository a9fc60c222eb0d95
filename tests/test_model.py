"""The Transformer against implementations we did not write: Meta's reference model (from the
``llama-models`` wheel) and Hugging Face ``transformers``' LlamaForCausalLM."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import random_model

from llama3 import ModelArgs, Transformer
from llama3.distributed import init_model_parallel
from llama3.presets import preset_args

meta_model = pytest.importorskip("llama_models.llama3.model", reason="pip install --no-deps llama-models")
from llama_models.llama3.args import ModelArgs as MetaModelArgs  # noqa: E402

FP32_TOL = 1e-4

BASE = dict(dim=64, n_layers=2, n_heads=8, vocab_size=256, multiple_of=32, norm_eps=1e-5,
            rope_theta=500000.0, max_batch_size=2, max_seq_len=320)
CONFIGS = {
    "mha": dict(n_kv_heads=8),
    "gqa_half": dict(n_kv_heads=4, ffn_dim_multiplier=1.3),
    "gqa_quarter": dict(n_kv_heads=2),
    "scaled_rope": dict(n_kv_heads=2, ffn_dim_multiplier=1.5, use_scaled_rope=True),
}
# 300 positions: with head_dim 8 and theta 500000 the 4440-token wavelength sits in Llama 3.1's
# interpolation band and longer ones are divided by 8; by position 300 the scaled angles are
# ~0.2 rad away from the unscaled ones, so a missing or wrong scaling shows in the logits.
SEQ = 300


def make_model(overrides: dict, seed: int = 0) -> Transformer:
    # Larger than the default init so that eps, norm gains, head grouping and every position's
    # attention pattern all move the logits.
    return random_model(ModelArgs(**{**BASE, **overrides}), seed=seed, std=0.08, norm_gains=True)


def meta_transformer(**kwargs) -> torch.nn.Module:
    """Meta's reference Transformer; its fairscale layers need model parallelism set up first
    (ours do not: they read the state and default to one rank)."""
    init_model_parallel()
    return meta_model.Transformer(MetaModelArgs(**kwargs))


def meta_oracle(model: Transformer, overrides: dict) -> torch.nn.Module:
    ref = meta_transformer(**{**BASE, **overrides})
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref


def to_hf_layout(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta pairs dims (2i, 2i+1) of each head; HF pairs (i, i + head_dim/2)."""
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def hf_oracle(model: Transformer, overrides: dict) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    args = model.params
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope.update(rope_type="llama3", factor=args.rope_scale_factor,
                    low_freq_factor=args.rope_low_freq_factor, high_freq_factor=args.rope_high_freq_factor,
                    original_max_position_embeddings=args.rope_original_max_seq_len)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps,
        max_position_embeddings=16384, rope_parameters=rope, tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    sd = model.state_dict()
    hf_sd = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
             "lm_head.weight": sd["output.weight"]}
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for i in range(args.n_layers):
        for ours, theirs in names.items():
            w = sd[f"layers.{i}.{ours}.weight"]
            if ours == "attention.wq":
                w = to_hf_layout(w, args.n_heads)
            elif ours == "attention.wk":
                w = to_hf_layout(w, args.n_kv_heads)
            hf_sd[f"model.layers.{i}.{theirs}.weight"] = w
    hf.load_state_dict(hf_sd, strict=True)
    return hf


def tokens(bsz: int = 2, seqlen: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (bsz, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_meta_reference(name):
    overrides = CONFIGS[name]
    model = make_model(overrides)
    ref = meta_oracle(model, overrides)
    toks = tokens()
    ours = model(toks, 0)
    assert ours.dtype == torch.float32
    assert ours.shape == (2, SEQ, BASE["vocab_size"])
    assert (ours - ref(toks, 0)).abs().max().item() <= FP32_TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    overrides = CONFIGS[name]
    model = make_model(overrides)
    hf = hf_oracle(model, overrides)
    toks = tokens()
    with torch.no_grad():
        theirs = hf(toks).logits
    assert (model(toks, 0) - theirs).abs().max().item() <= FP32_TOL


def _max_diff_vs_meta(model: Transformer, oracle_overrides: dict, transform=None, seqlen: int = 64) -> float:
    """Largest logit gap between our model and Meta's fed the same weights (optionally transformed)."""
    ref = meta_transformer(**{**BASE, **oracle_overrides})
    sd = model.state_dict()
    ref.load_state_dict(transform(sd) if transform else sd, strict=True)
    toks = tokens(seqlen=seqlen)
    return (model(toks, 0) - ref(toks, 0)).abs().max().item()


def _each_layer(sd: dict, n_layers: int, fn) -> dict:
    sd = dict(sd)
    for i in range(n_layers):
        fn(sd, f"layers.{i}.attention.")
    return sd


def test_parity_check_catches_wrong_rope_eps_and_grouping():
    """A test of the tests: each classic mistake, played out in the oracle, moves logits far past
    the parity tolerance, so an implementation making it could not pass."""
    gqa = CONFIGS["gqa_quarter"]
    n_heads, n_kv, n_layers = BASE["n_heads"], gqa["n_kv_heads"], BASE["n_layers"]
    model = make_model(gqa)
    assert _max_diff_vs_meta(model, gqa) <= FP32_TOL

    # Wrong norm epsilon.
    assert _max_diff_vs_meta(model, {**gqa, "norm_eps": 1e-2}) > 100 * FP32_TOL

    # Wrong RoPE layout: rotating (i, i + d/2) pairs instead of adjacent ones is the same as
    # feeding the adjacent-pair oracle weights whose rows were permuted to the other layout.
    def rotate_half_layout(sd):
        def fn(sd, p):
            sd[p + "wq.weight"] = to_hf_layout(sd[p + "wq.weight"], n_heads)
            sd[p + "wk.weight"] = to_hf_layout(sd[p + "wk.weight"], n_kv)
        return _each_layer(sd, n_layers, fn)
    assert _max_diff_vs_meta(model, gqa, rotate_half_layout) > 100 * FP32_TOL

    # Wrong GQA grouping: query head h reading KV head h % n_kv instead of h // n_rep. Reordering
    # the query heads (rows of wq, columns of wo) changes nothing but which KV head each one reads.
    n_rep = n_heads // n_kv
    order = [g * n_rep + r for r in range(n_rep) for g in range(n_kv)]  # head slot -> old head

    def regroup(sd):
        def fn(sd, p):
            head_dim = sd[p + "wq.weight"].shape[0] // n_heads
            sd[p + "wq.weight"] = sd[p + "wq.weight"].view(n_heads, head_dim, -1)[order].flatten(0, 1)
            wo = sd[p + "wo.weight"]
            sd[p + "wo.weight"] = wo.view(wo.shape[0], n_heads, head_dim)[:, order].flatten(1)
        return _each_layer(sd, n_layers, fn)
    assert _max_diff_vs_meta(model, gqa, regroup) > 100 * FP32_TOL

    # Missing Llama 3.1 RoPE scaling (needs long positions to show; see SEQ).
    scaled = make_model({**gqa, "use_scaled_rope": True})
    assert _max_diff_vs_meta(scaled, gqa, seqlen=SEQ) > 100 * FP32_TOL


@pytest.mark.parametrize("name", ["gqa_half", "scaled_rope"])
def test_kv_cache_steps_equal_full_forward(name):
    model = make_model(CONFIGS[name])
    toks = tokens(seqlen=48)
    full = model(toks, 0)
    prefill = 20
    steps = [model(toks[:, :prefill], 0)]
    steps += [model(toks[:, pos:pos + 1], pos) for pos in range(prefill, 48)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5
    last = model(toks[:, :prefill], 0, last_only=True)
    assert (last - steps[0][:, -1:]).abs().max().item() <= 1e-6


def test_forward_static_equals_forward():
    model = make_model(CONFIGS["gqa_half"])
    toks = tokens(seqlen=24)
    full = model(toks, 0)
    model(toks[:, :16], 0)
    for pos in range(16, 24):
        step = model(toks[:, pos:pos + 1], torch.tensor([pos]), kv_len=model.params.max_seq_len)
        assert (step[:, 0] - full[:, pos]).abs().max().item() <= 1e-5


# Parameter counts of Meta's releases (published model cards), checked against the presets'
# params.json values (3.2 ties the output projection to the embedding).
RELEASED_PARAMETER_COUNTS = {
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
}


@pytest.mark.parametrize("name", RELEASED_PARAMETER_COUNTS)
def test_parameter_count_of_released_shapes(name):
    with torch.device("meta"):
        model = Transformer(preset_args(name))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMETER_COUNTS[name]


def test_bfloat16_and_float16_logits_close_to_float32():
    model = make_model(CONFIGS["gqa_half"])
    toks = tokens(seqlen=64)
    ref = model(toks, 0)
    scale = ref.abs().max().item()
    for dtype, tol in ((torch.bfloat16, 0.05), (torch.float16, 0.01)):
        low = make_model(CONFIGS["gqa_half"]).to(dtype)
        assert low.layers[0].attention.kv_cache.k.dtype == dtype
        assert low.rope.dtype == torch.float32  # RoPE angles stay in float32
        out = low(toks, 0)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()
        # Relative to the logit range: bf16 keeps 8 mantissa bits, fp16 11.
        assert (out - ref).abs().max().item() <= tol * scale, dtype


def test_model_args_from_params_json(caplog):
    params = {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True, "vision_chunk_size": 560}
    with caplog.at_level(logging.INFO, logger="llama3.model"):
        args = ModelArgs(max_seq_len=128, max_batch_size=4, **params)
    assert "vision_chunk_size" in caplog.text
    assert args.use_scaled_rope
    assert args.n_kv_heads == 2
    assert args.max_seq_len == 128
    assert args.rope_scale_factor == 8.0
    assert args.rope_original_max_seq_len == 8192
    assert ModelArgs(dim=64, n_heads=4).n_kv_heads == 4


@pytest.mark.parametrize(("bad", "message"), [
    (dict(dim=64, n_heads=5), "must divide dim"),
    (dict(dim=64, n_heads=4, n_kv_heads=3), "must divide n_heads"),
    (dict(dim=64, n_heads=4, max_seq_len=0), "max_seq_len"),
    (dict(dim=60, n_heads=4, n_kv_heads=4), "must be even"),
])
def test_model_args_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**bad)


def test_forward_rejects_too_long_and_too_wide():
    model = make_model(CONFIGS["mha"])
    with pytest.raises(ValueError, match="max_seq_len=320"):
        model(tokens(seqlen=8), 315)
    with pytest.raises(ValueError, match="max_batch_size=2"):
        model(tokens(bsz=3, seqlen=4), 0)


def test_runs_in_a_plain_process_with_nothing_in_the_environment(tmp_path):
    """No torchrun, no MASTER_ADDR/RANK/WORLD_SIZE: the model runs on one rank, and building and
    running it creates no process group (only load_model / Llama.build / explicit calls do)."""
    script = textwrap.dedent("""
        import torch
        import torch.distributed as dist
        from llama3 import ModelArgs, Transformer
        model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=64, max_seq_len=16,
                                      max_batch_size=1))
        out = model(torch.tensor([[1, 2, 3]]), 0)
        print(tuple(out.shape), bool(torch.isfinite(out).all()), dist.is_initialized())
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "(1, 3, 64) True False"
