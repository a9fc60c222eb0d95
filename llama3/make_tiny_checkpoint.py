"""``llama3-make-tiny-checkpoint OUT_DIR``: a checkpoint of random weights, for trying things out,
tests and benchmarks without real weights (``python -m llama3.make_tiny_checkpoint`` is the same).

    llama3-make-tiny-checkpoint /tmp/tiny                        # tiny-chat preset, Meta layout
    llama3-make-tiny-checkpoint /tmp/tiny2 --num-shards 2        # two model-parallel shards
    llama3-make-tiny-checkpoint /tmp/tiny-hf --format hf         # Hugging Face safetensors
    llama3-make-tiny-checkpoint /tmp/1b --preset llama-3.2-1b --dtype bf16
    llama3-make-tiny-checkpoint /tmp/x --dim 128 --n-layers 4 --n-heads 8 --n-kv-heads 2

The default preset keeps the real 128,256-token vocabulary, so the real tokenizer works with it; a
``tokenizer.model`` is copied in (``--tokenizer PATH``, else the one in an installed llama-models
wheel). An existing non-empty OUT_DIR is refused unless ``--overwrite``. The work is done by
:func:`llama3.checkpoint.write_random_checkpoint`.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m llama3.make_tiny_checkpoint: Ctrl-C quiet from the first import
    from llama3.programs import run_module

    run_module("llama3.make_tiny_checkpoint")

import dataclasses
import time
from pathlib import Path

from .cli import UsageError, make_parser, run_main

__all__ = ["main"]

PROG = "llama3-make-tiny-checkpoint"
DEFAULT_PRESET = "tiny-chat"
LONG_WRITE_BYTES = 200_000_000  # a start line before writes this large
# ModelArgs fields that describe a run, not a checkpoint.
_RUN_FIELDS = ("max_batch_size", "max_seq_len")
_SHAPE_HELP = {
    "dim": "model width", "n_layers": "transformer blocks", "n_heads": "query heads",
    "n_kv_heads": "key/value heads (grouped-query attention)",
    "vocab_size": "vocabulary size (128256 for the real Llama 3 tokenizer)",
    "multiple_of": "the SwiGLU hidden size is rounded up to a multiple of this",
    "ffn_dim_multiplier": "SwiGLU hidden size multiplier", "norm_eps": "RMSNorm epsilon",
    "rope_theta": "RoPE base frequency", "use_scaled_rope": "Llama 3.1 RoPE scaling (true/false)",
    "rope_scale_factor": "RoPE scaling factor (8: Llama 3.1/3.3, 32: Llama 3.2)",
    "tie_word_embeddings": "the output projection is the token embedding (true/false)",
}


def boolean(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off) for a flag such as ``--use-scaled-rope``."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _model_fields() -> list[dataclasses.Field]:
    from .model import ModelArgs

    return [f for f in dataclasses.fields(ModelArgs) if f.name not in _RUN_FIELDS]


def _parser():
    parser = make_parser(PROG, "Write a checkpoint of random weights (Meta or Hugging Face layout). "
                               "Every --dashed-flag also accepts the --underscore_spelling.")
    parser.add_argument("out_dir", help="directory to write (refused if not empty, unless --overwrite)")
    parser.add_argument("--preset", default=DEFAULT_PRESET,
                        help="named shape from llama3.presets.PRESETS")
    parser.add_argument("--format", choices=["meta", "hf"], default="meta", help="checkpoint layout")
    parser.add_argument("--num-shards", type=int, default=1, help="model-parallel shards (Meta layout)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 (bf16) or float16 (fp16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    parser.add_argument("--std", type=float, default=0.02, help="standard deviation of the weights")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.model to copy in (default: the llama-models wheel's, if installed)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    shape = parser.add_argument_group("model shape (overrides the preset's values)")
    for f in _model_fields():
        annotation = str(f.type)
        kind = boolean if "bool" in annotation else float if "float" in annotation else int
        shape.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                           metavar="BOOL" if kind is boolean else None,
                           help=_SHAPE_HELP.get(f.name, f"ModelArgs.{f.name}"))
    return parser


def _make(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    from .presets import PRESETS as presets

    if args.preset not in presets:
        raise UsageError(f"unknown --preset {args.preset!r}; choose one of {', '.join(presets)}")
    overrides = {f.name: getattr(args, f.name) for f in _model_fields() if getattr(args, f.name) is not None}
    out = Path(args.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{args.out_dir} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{args.out_dir} is not empty; choose a new directory or pass --overwrite")
    from .bpe import load_bpe_ranks
    from .checkpoint import write_random_checkpoint
    from .distributed import select_dtype
    from .files import check_regular_file
    from .model import ModelArgs
    from .progress import configure_logging
    from .tokenizer import llama_models_tokenizer

    # Warnings only: this program prints its own start line and one summary line.
    configure_logging(False)
    dtype = select_dtype(None, args.dtype)  # type: ignore[arg-type]
    model_args = ModelArgs(**{**presets[args.preset], **overrides})
    tokenizer = Path(args.tokenizer).expanduser() if args.tokenizer else llama_models_tokenizer()
    if args.tokenizer:  # copied in: a regular file (never a pipe or device); a symlink must lead to
        check_regular_file(tokenizer, "--tokenizer file")  # a tokenizer (as conversion checks it)
        if tokenizer.is_symlink():
            load_bpe_ranks(tokenizer)
    n_params, n_bytes = _size(model_args, dtype)
    what = (f"{args.format} checkpoint ({shape_name(args.preset, presets[args.preset], overrides)}, "
            f"{n_params / 1e6:,.1f}M random parameters, {str(dtype).removeprefix('torch.')}, "
            f"{n_bytes / 1e6:,.0f} MB)")
    if n_bytes >= LONG_WRITE_BYTES:  # seconds of silence otherwise
        print(f"writing a {what} to {out} ...", flush=True)
    start = time.perf_counter()
    write_random_checkpoint(out, model_args, format=args.format, num_shards=args.num_shards, seed=args.seed,
                            std=args.std, dtype=dtype, tokenizer=tokenizer, overwrite=args.overwrite)
    copied = "" if tokenizer is None else f", with {tokenizer.name} from {tokenizer.parent}"
    print(f"wrote {what} to {out} in {time.perf_counter() - start:.1f} s{copied}")
    if tokenizer is None:
        print("no tokenizer.model copied: pass --tokenizer PATH, or `pip install --no-deps llama-models` "
              "(it ships llama_models/llama3/tokenizer.model) and run again")
    return 0


def shape_name(preset: str, preset_values: dict, overrides: dict) -> str:
    """How the shape written is named: the preset's name, or, where flags changed it, what changed."""
    changed = {k: v for k, v in overrides.items() if preset_values.get(k) != v}
    if not changed:
        return f"{preset} shape"
    return f"custom shape: {preset} with " + ", ".join(f"{k}={v}" for k, v in changed.items())


def _size(model_args, dtype) -> tuple[int, int]:
    """Parameters and bytes of a checkpoint of ``model_args`` in ``dtype`` (a tied output counted once)."""
    import math

    from .checkpoint.layout import canonical_shape, param_names

    names = [n for n in param_names(model_args)
             if not (n == "output.weight" and model_args.tie_word_embeddings)]
    n_params = sum(math.prod(canonical_shape(n, model_args)) for n in names)
    return n_params, n_params * dtype.itemsize


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``llama3-make-tiny-checkpoint`` and ``python -m llama3.make_tiny_checkpoint``."""
    return run_main(lambda: _make(argv), PROG)

