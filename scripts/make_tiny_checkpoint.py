"""Write a checkpoint of random weights, for tests, demos and benchmarks without real weights.

    python scripts/make_tiny_checkpoint.py OUT_DIR                      # tiny-chat preset, Meta layout
    python scripts/make_tiny_checkpoint.py OUT_DIR --num_shards 2       # two model-parallel shards
    python scripts/make_tiny_checkpoint.py OUT_DIR --format hf          # Hugging Face safetensors
    python scripts/make_tiny_checkpoint.py /tmp/1b --preset llama-3.2-1b --dtype bf16
    python scripts/make_tiny_checkpoint.py OUT_DIR --dim 128 --n_layers 4 --n_heads 8 --n_kv_heads 2

The tiny-chat preset keeps the real 128,256-token vocabulary, so the real tokenizer works with it; a
tokenizer.model is copied in (``--tokenizer PATH``, else the one in an installed llama-models wheel).
A non-empty OUT_DIR is refused unless ``--overwrite``; the directory is written atomically.
"""

from __future__ import annotations

import sys
from dataclasses import fields

import fire

from llama3 import ModelArgs
from llama3.checkpoint import CheckpointError, llama_models_tokenizer
from llama3.distributed import select_dtype
from llama3.presets import PRESETS, preset_args, write_random_checkpoint


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(out_dir: str, preset: str = "tiny-chat", format: str = "meta", num_shards: int = 1,
         dtype: str = "float32", seed: int = 0, std: float = 0.02, tokenizer: str | None = None,
         overwrite: bool = False, **overrides) -> None:
    """Random weights for ``preset`` (one of PRESETS) with ModelArgs ``overrides`` (--dim 64 ...)."""
    known = {f.name for f in fields(ModelArgs)} - {"max_batch_size", "max_seq_len"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        _fail(f"unknown flag(s) {', '.join('--' + k for k in unknown)}; model flags are "
              f"{', '.join('--' + k for k in sorted(known))}")
    if preset not in PRESETS:
        _fail(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    try:
        args = preset_args(preset, **overrides)
        torch_dtype = select_dtype(None, dtype)  # type: ignore[arg-type]
        source = tokenizer or llama_models_tokenizer()
        out = write_random_checkpoint(out_dir, args, format=format, num_shards=num_shards, seed=seed, std=std,
                                      dtype=torch_dtype, tokenizer=source, overwrite=overwrite)
    except (CheckpointError, ValueError) as e:
        _fail(str(e))
    print(f"wrote {format} checkpoint ({dtype}) to {out}")
    if source is None:
        print("no tokenizer.model copied: pass --tokenizer PATH, or `pip install --no-deps llama-models` "
              "(it ships llama_models/llama3/tokenizer.model) and run again")
    else:
        print(f"copied {source} to {out / 'tokenizer.model'}")


if __name__ == "__main__":
    fire.Fire(main)
