"""Checkpoints of random weights, in either format and any shape (a ModelArgs or a name from
:data:`llama3.presets.PRESETS`), so everything runs without real weights: the tests, the benchmark,
the demo and ``llama3-make-tiny-checkpoint``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from ..errors import InvalidArgumentError
from ..model import ModelArgs
from ..presets import preset_args
from ..validation import finite_float, positive_int
from .base import atomic_directory, check_output_dir, regular_file
from .hf import save_hf_checkpoint
from .hf_tokenizer import write_hf_extras
from .layout import canonical_shape, check_shard_layout, param_names
from .meta import save_meta_checkpoint

__all__ = ["random_state_dict", "write_random_checkpoint"]

logger = logging.getLogger(__name__)


def random_state_dict(args: ModelArgs, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      std: float = 0.02) -> dict[str, torch.Tensor]:
    """A whole state dict of random weights for ``args``: matrices ~ N(0, std²), norm gains
    ~ U(0.5, 1.5) (not all ones, so a norm applied to the wrong tensor changes the output).
    Made tensor by tensor in ``dtype``, so a 1B model never exists in float32 at once."""
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
    if isinstance(args, str):
        args = preset_args(args)
    if format not in ("meta", "hf"):
        raise InvalidArgumentError(f"format must be 'meta' or 'hf', got {format!r}")
    positive_int(num_shards, "num_shards")
    if format == "hf" and num_shards != 1:
        raise InvalidArgumentError("num_shards applies to the Meta format only")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidArgumentError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    finite_float(std, "std", positive=True)
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
