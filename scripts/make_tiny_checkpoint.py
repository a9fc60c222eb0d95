"""Write a checkpoint of random weights, for tests, demos and benchmarks without real weights.

    python scripts/make_tiny_checkpoint.py OUT_DIR                      # tiny preset, Meta layout
    python scripts/make_tiny_checkpoint.py OUT_DIR --num_shards 2       # two model-parallel shards
    python scripts/make_tiny_checkpoint.py OUT_DIR --format hf          # Hugging Face safetensors
    python scripts/make_tiny_checkpoint.py /tmp/1b --preset llama-3.2-1b --dtype bf16
    python scripts/make_tiny_checkpoint.py OUT_DIR --dim 128 --n_layers 4 --n_heads 8 --n_kv_heads 2

The tiny preset keeps the real 128,256-token vocabulary, so the real tokenizer works with it; a
tokenizer.model is copied in (``--tokenizer PATH``, else the one in an installed llama-models wheel).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import fire

from llama3 import ModelArgs
from llama3.checkpoint import (
    PRESETS,
    llama_models_tokenizer,
    random_state_dict,
    save_hf_checkpoint,
    save_meta_checkpoint,
)
from llama3.distributed import select_dtype


def main(out_dir: str, preset: str = "tiny", format: str = "meta", num_shards: int = 1,
         dtype: str = "float32", seed: int = 0, std: float = 0.02, tokenizer: str | None = None,
         **overrides) -> None:
    """Random weights for ``preset`` (one of PRESETS) with ModelArgs ``overrides`` (--dim 64 ...)."""
    if preset not in PRESETS:
        sys.exit(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if format not in ("meta", "hf"):
        sys.exit(f"--format must be meta or hf, got {format!r}")
    args = ModelArgs(**{**PRESETS[preset], **overrides})
    torch_dtype = select_dtype(None, dtype)  # type: ignore[arg-type]
    out = Path(out_dir)
    sd = random_state_dict(args, seed=seed, dtype=torch_dtype, std=std)
    if format == "meta":
        save_meta_checkpoint(sd, args, out, num_shards=num_shards)
    else:
        if num_shards != 1:
            sys.exit("--num_shards applies to the Meta layout only")
        save_hf_checkpoint(sd, args, out)
    n_params = sum(t.numel() for name, t in sd.items()
                   if not (name == "output.weight" and args.tie_word_embeddings))
    print(f"wrote {format} checkpoint, {n_params / 1e6:.1f}M parameters ({dtype}), to {out}")

    source = Path(tokenizer) if tokenizer else llama_models_tokenizer()
    if source is None:
        print("no tokenizer.model copied: pass --tokenizer PATH, or `pip install --no-deps llama-models` "
              "(it ships llama_models/llama3/tokenizer.model) and run again")
    elif not source.is_file():
        sys.exit(f"tokenizer file {source} does not exist")
    else:
        shutil.copyfile(source, out / "tokenizer.model")
        print(f"copied {source} to {out / 'tokenizer.model'}")


if __name__ == "__main__":
    fire.Fire(main)
