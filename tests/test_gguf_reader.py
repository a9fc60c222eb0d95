"""scripts/accuracy.py's GGUF -> our checkpoint mapping (scripts/bench/gguf_reader.py), checked by a
round trip through the benchmark's own GGUF writer (scripts/bench/gguf_writer.py) on tiny random
models; skipped without the gguf package (the bench extra). The measurement itself (SmolLM2 against
llama.cpp) is the script's, not a test's: no download here. The metrics: test_logit_metrics.py."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model

from llama3.errors import LlamaError
from llama3.model import ModelArgs, Transformer

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install -e .[bench]) reads GGUF files")

from scripts.bench.gguf_reader import GGUFModelError, read_gguf  # noqa: E402
from scripts.bench.gguf_writer import write_gguf  # noqa: E402

ARG_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta",
              "tie_word_embeddings", "ffn_hidden_dim", "head_dim")


def tiny(tied: bool, **overrides) -> Transformer:
    args = ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=32,
                               norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=tied,
                               max_seq_len=32, max_batch_size=1), **overrides})
    return random_model(args, seed=3, norm_gains=True).eval()


def expected_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    sd = {k: v.float() for k, v in model.state_dict().items()}
    if model.params.tie_word_embeddings:
        del sd["output.weight"]  # a tied GGUF file holds the embedding once
    return sd


@pytest.mark.parametrize("tied", [True, False])
def test_bf16_round_trip_is_exact(tmp_path, tied):
    """ours (bf16) -> GGUF BF16 -> ours: the same tensors bit for bit, the same ModelArgs, and a model
    built from them computes the same logits."""
    model = tiny(tied).to(torch.bfloat16)
    path = str(tmp_path / "m.gguf")
    write_gguf(model, path, "BF16")
    args, sd = read_gguf(path, max_seq_len=32, max_batch_size=1)
    for field in ARG_FIELDS:
        assert getattr(args, field) == getattr(model.params, field), field
    expected = expected_state_dict(model)
    assert sd.keys() == expected.keys()
    for name, t in expected.items():
        assert sd[name].dtype == torch.float32
        assert torch.equal(sd[name], t), name

    rebuilt = Transformer(args).to(torch.bfloat16).eval()
    rebuilt.load_state_dict({**sd, **({"output.weight": sd["tok_embeddings.weight"]} if tied else {})})
    tokens = torch.tensor([[5, 77, 300, 12, 9, 141, 2, 64]])
    assert torch.equal(rebuilt.forward(tokens, 0), model.forward(tokens, 0))


def test_q8_0_round_trip_is_within_half_a_step(tmp_path):
    """A quantized file (Q8_0: 32 weights per scale, along the input dimension) dequantizes to within
    half a quantization step of every original weight: the blocks are read in the right orientation."""
    model = tiny(False)
    path = str(tmp_path / "m.gguf")
    write_gguf(model, path, "Q8_0")
    _, sd = read_gguf(path)
    for name, t in expected_state_dict(model).items():
        if t.dim() == 1:
            assert torch.equal(sd[name], t), name  # norms are stored F32
            continue
        blocks = t.reshape(t.shape[0], -1, 32)
        step = blocks.abs().amax(dim=-1, keepdim=True) / 127  # Q8_0's scale
        err = (sd[name].reshape(blocks.shape) - blocks).abs()
        # half a step of rounding, plus the scale's own rounding to fp16 (2^-11) times |q| <= 127
        assert bool((err <= step * (0.5 + 127 * 2.0**-11) + 1e-7).all()), name
        assert not torch.equal(sd[name], t)  # quantized, so not the original


def test_feed_forward_width_rule_round_trips(tmp_path):
    """A Llama-3-style feed-forward rule (ffn_dim_multiplier 1.3, multiple_of 32) gives back the width."""
    model = tiny(True, ffn_dim_multiplier=1.3).to(torch.bfloat16)
    path = str(tmp_path / "m.gguf")
    write_gguf(model, path, "BF16")
    args, sd = read_gguf(path)
    assert model.params.ffn_hidden_dim != ModelArgs(dim=64, multiple_of=32).ffn_hidden_dim  # not the default
    width = sd["layers.0.feed_forward.w1.weight"].shape[0]
    assert args.ffn_hidden_dim == model.params.ffn_hidden_dim == width


def test_rope_scaling_is_refused(tmp_path):
    """Llama 3.1 RoPE scaling (rope_freqs.weight) is not mapped: refused, not silently dropped."""
    model = tiny(True, use_scaled_rope=True).to(torch.bfloat16)
    path = str(tmp_path / "m.gguf")
    write_gguf(model, path, "BF16")
    with pytest.raises(GGUFModelError, match="rope_freqs") as info:
        read_gguf(path)
    assert isinstance(info.value, LlamaError)
    assert isinstance(info.value, ValueError)
