"""The one table of named model shapes.

``PRESETS`` holds ModelArgs keyword arguments (params.json values; no ``max_batch_size`` /
``max_seq_len``) for Meta's released text models and for small shapes used by the tests, the
benchmark and the demo. It sits at the model's level (the checkpoint readers consult it to
recognise Llama 3.2); checkpoints of random weights in any of these shapes are written by
:mod:`llama3.checkpoint.random_weights`.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidArgumentError
from .model import ModelArgs

__all__ = ["PRESETS", "preset_args"]

_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0)
_SCALED = dict(use_scaled_rope=True)  # Llama 3.1 RoPE scaling, factor 8 (3.1, 3.3)
_LLAMA32 = dict(use_scaled_rope=True, rope_scale_factor=32.0, tie_word_embeddings=True)

PRESETS: dict[str, dict[str, Any]] = {
    # Meta's releases (params.json; 3.1 and 3.3 share 3.0's shapes and add RoPE scaling).
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
                       ffn_dim_multiplier=1.3, **_LLAMA3),
    "llama-3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                        ffn_dim_multiplier=1.3, **_LLAMA3),
    "llama-3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
                         ffn_dim_multiplier=1.3, **_LLAMA3, **_SCALED),
    "llama-3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                          ffn_dim_multiplier=1.3, **_LLAMA3, **_SCALED),
    "llama-3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
                           ffn_dim_multiplier=1.2, **_LLAMA3, **_SCALED),
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256,
                         ffn_dim_multiplier=1.5, **_LLAMA3, **_LLAMA32),
    "llama-3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256,
                         ffn_dim_multiplier=1.0, **_LLAMA3, **_LLAMA32),
    # Small shapes. "tiny": the benchmark's (small vocabulary, enough layers to time).
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=4096, multiple_of=64,
                 norm_eps=1e-5, rope_theta=500000.0),
    # The real 128,256-token vocabulary, so the real tokenizer works: demo and make_tiny_checkpoint.
    "tiny-chat": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, **_LLAMA3, **_SCALED),
    # Tests: GQA with 8 query heads on 2 KV heads, a non-trivial FFN rule and 3.2's RoPE scaling.
    "test-gqa": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=32,
                     ffn_dim_multiplier=1.3, use_scaled_rope=True, rope_scale_factor=32.0),
    # Tests of generation: the real vocabulary, as small as it gets.
    "test-chat": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, **_LLAMA3),
}


def preset_args(name: str, **overrides: Any) -> ModelArgs:
    """ModelArgs of preset ``name`` with ``overrides`` (e.g. ``n_layers=2, max_seq_len=512``)."""
    if name not in PRESETS:
        raise InvalidArgumentError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})
