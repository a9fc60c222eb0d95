"""Convert checkpoints between Meta's and Hugging Face's layouts, or reshard Meta's.

    python scripts/convert_checkpoint.py to_hf   SRC DST [--dtype bf16]
    python scripts/convert_checkpoint.py to_meta SRC DST [--num_shards 8]
    python scripts/convert_checkpoint.py reshard SRC DST --num_shards 2

SRC may be either layout (an HF download's original/ folder is found by itself). A tokenizer.model
in SRC is copied. The whole model passes through host memory once (memory-mapped on the way in).
"""

from __future__ import annotations

import functools
import sys

import fire

from llama3.checkpoint import CheckpointError, convert_checkpoint, inspect_checkpoint
from llama3.distributed import select_dtype


def _user_errors_in_one_line(fn):
    """A user error (bad path, bad argument, bad checkpoint) prints one line and exits 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CheckpointError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    return wrapper


def _dtype(dtype: str | None):
    return None if dtype is None else select_dtype(None, dtype)  # type: ignore[arg-type]


def to_hf(src: str, dst: str, dtype: str | None = None, rope_scale_factor: float | None = None,
          max_shard_gb: float = 5.0, overwrite: bool = False) -> None:
    """Meta (or HF) → Hugging Face safetensors, split into files of at most ``max_shard_gb``, plus
    the tokenizer and generation files transformers reads."""
    paths = convert_checkpoint(src, dst, to="hf", dtype=_dtype(dtype), rope_scale_factor=rope_scale_factor,
                               max_shard_bytes=int(max_shard_gb * 1e9), overwrite=overwrite)
    print(f"wrote {len(paths)} safetensors file(s), config.json, generation_config.json and the tokenizer "
          f"files found to {dst}")


def to_meta(src: str, dst: str, num_shards: int = 1, dtype: str | None = None,
            rope_scale_factor: float | None = None, overwrite: bool = False) -> None:
    """Hugging Face (or Meta) → Meta's params.json + consolidated.NN.pth, ``num_shards`` shards."""
    paths = convert_checkpoint(src, dst, to="meta", num_shards=num_shards, dtype=_dtype(dtype),
                               rope_scale_factor=rope_scale_factor, overwrite=overwrite)
    print(f"wrote {len(paths)} shard(s) and params.json to {dst}")


def reshard(src: str, dst: str, num_shards: int, dtype: str | None = None, overwrite: bool = False) -> None:
    """A Meta checkpoint with any number of shards → one with ``num_shards``."""
    before = inspect_checkpoint(src).num_shards
    to_meta(src, dst, num_shards=num_shards, dtype=dtype, overwrite=overwrite)
    print(f"resharded {before} → {num_shards}")


if __name__ == "__main__":
    fire.Fire({name: _user_errors_in_one_line(fn) for name, fn in
               {"to_hf": to_hf, "to_meta": to_meta, "reshard": reshard}.items()})
