"""The one table of named model shapes, and checkpoints of random weights in any of them.

``PRESETS`` holds ModelArgs keyword arguments (params.json values; no ``max_batch_size`` /
``max_seq_len``) for Meta's released text models and for small shapes used by the tests, the
benchmark and the demo. Random checkpoints let everything run without real weights.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from .model import ModelArgs

__all__ = ["PRESETS", "preset_args", "random_state_dict", "write_random_checkpoint"]

logger = logging.getLogger(__name__)

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
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})


def random_state_dict(args: ModelArgs, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      std: float = 0.02) -> dict[str, torch.Tensor]:
    """A whole state dict of random weights for ``args``: matrices ~ N(0, std²), norm gains
    ~ U(0.5, 1.5) (not all ones, so a norm applied to the wrong tensor changes the output).
    Made tensor by tensor in ``dtype``, so a 1B model never exists in float32 at once."""
    from .checkpoint.layout import canonical_shape, param_names

    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name in param_names(args):
        if name == "output.weight" and args.tie_word_embeddings:
            sd[name] = sd["tok_embeddings.weight"]
            continue
        shape = canonical_shape(name, args)
        if name.endswith("norm.weight"):
            t = torch.rand(shape, generator=gen) + 0.5
        else:
            t = torch.randn(shape, generator=gen) * std
        sd[name] = t.to(dtype)
    return sd


def write_random_checkpoint(out_dir: str | Path, args: ModelArgs | str, *, format: str = "meta",
                            num_shards: int = 1, seed: int = 0, std: float = 0.02,
                            dtype: torch.dtype = torch.bfloat16, tokenizer: str | Path | None = None,
                            overwrite: bool = False) -> Path:
    """Write a checkpoint of random weights (``random_state_dict``) for ``args`` (a ModelArgs or a
    preset name) to ``out_dir`` in ``format`` "meta" (``num_shards`` shards) or "hf", copying
    ``tokenizer`` (a tokenizer.model path) in when given. Every argument is checked first; the
    directory is written atomically (temporary directory, then rename), and a non-empty
    ``out_dir`` is refused unless ``overwrite``. Returns ``out_dir``."""
    from .checkpoint import check_shard_layout, save_hf_checkpoint, save_meta_checkpoint
    from .checkpoint.base import (
        atomic_directory,
        check_output_dir,
        check_positive_float,
        check_positive_int,
        regular_file,
    )
    from .checkpoint.hf import write_hf_extras

    if isinstance(args, str):
        args = preset_args(args)
    if format not in ("meta", "hf"):
        raise ValueError(f"format must be 'meta' or 'hf', got {format!r}")
    check_positive_int("num_shards", num_shards)
    if format == "hf" and num_shards != 1:
        raise ValueError("num_shards applies to the Meta format only")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    check_positive_float("std", std)
    tokenizer_path = None if tokenizer is None else regular_file(Path(tokenizer).expanduser(), "tokenizer")
    out = Path(out_dir).expanduser()
    check_output_dir(out, overwrite)
    check_shard_layout(1, num_shards, args)

    sd = random_state_dict(args, seed=seed, dtype=dtype, std=std)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if format == "meta":
            save_meta_checkpoint(sd, args, tmp, num_shards=num_shards)
        else:
            save_hf_checkpoint(sd, args, tmp)
            write_hf_extras(tmp, args, tokenizer_path)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    n_params = sum(t.numel() for name, t in sd.items()
                   if not (name == "output.weight" and args.tie_word_embeddings))
    logger.info("wrote a %s checkpoint of %.1fM random parameters (%s) to %s", format, n_params / 1e6,
                str(dtype).removeprefix("torch."), out)
    return out
