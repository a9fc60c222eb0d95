"""``llama3-convert``: convert checkpoints between Meta's and Hugging Face's layouts, or reshard
Meta's (``python -m llama3.convert`` is the same).

    llama3-convert to-hf   SRC DST [--dtype bf16] [--max-shard-gb 5]
    llama3-convert to-meta SRC DST [--num-shards 8]
    llama3-convert reshard SRC DST --num-shards 2

SRC may be either layout (an HF download's ``original/`` folder is found by itself). A
``tokenizer.model`` in SRC is copied. The whole model passes through host memory once
(memory-mapped on the way in). A non-empty DST is refused unless ``--overwrite``. The work is done
by :func:`llama3.checkpoint.convert_checkpoint`; ``to_hf`` / ``to_meta`` and every
``--underscore_flag`` spelling are accepted too.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m llama3.convert: Ctrl-C is quiet (status 130) from the first import on
    from llama3.programs import run_module

    run_module("llama3.convert")

from pathlib import Path
from typing import Any

from .cli import UsageError, add_subparsers, make_parser, require_dir, run_main

__all__ = ["main"]

PROG = "llama3-convert"


def _parser():
    parser = make_parser(PROG, "Convert a checkpoint between the Meta and Hugging Face layouts, or "
                               "reshard a Meta checkpoint. Every --dashed-flag also accepts the "
                               "--underscore_spelling.")
    commands = add_subparsers(parser, dest="command", required=True, metavar="{to-hf,to-meta,reshard}")

    def command(name: str, help: str, aliases: list[str]):
        sub = commands.add_parser(name, aliases=aliases, help=help, description=help,
                                  formatter_class=parser.formatter_class, allow_abbrev=False)
        sub.add_argument("src", help="source checkpoint directory (either layout)")
        sub.add_argument("dst", help="output directory (refused if not empty, unless --overwrite)")
        sub.add_argument("--dtype", default=None, help="bfloat16 / bf16, float16 / fp16 or float32 "
                                                       "(default: keep the source's)")
        sub.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
        return sub

    to_hf = command("to-hf", "Meta (or HF) -> Hugging Face safetensors + config.json", ["to_hf"])
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file, in GB")
    to_hf.add_argument("--rope-scale-factor", type=float, default=None,
                       help="RoPE scaling factor to record (default: the source's; 32 for Llama 3.2)")
    to_meta = command("to-meta", "HF (or Meta) -> Meta params.json + consolidated.NN.pth", ["to_meta"])
    to_meta.add_argument("--num-shards", type=int, default=1, help="model-parallel shards to write")
    to_meta.add_argument("--rope-scale-factor", type=float, default=None,
                         help="RoPE scaling factor of the source (default: the source's)")
    reshard = command("reshard", "a Meta checkpoint with any number of shards -> NUM_SHARDS shards", [])
    reshard.add_argument("--num-shards", type=int, required=True, help="model-parallel shards to write")
    return parser


def _convert(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    src = require_dir(args.src, "source checkpoint")
    dst = Path(args.dst).expanduser()
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"{args.dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not args.overwrite:
        raise UsageError(f"{args.dst} is not empty; choose a new directory or pass --overwrite")
    num_shards = getattr(args, "num_shards", 1)
    if num_shards < 1:
        raise UsageError(f"--num-shards must be a positive integer, got {num_shards}")
    max_shard_gb = getattr(args, "max_shard_gb", None)
    if max_shard_gb is not None and not max_shard_gb > 0:
        raise UsageError(f"--max-shard-gb must be positive, got {max_shard_gb}")

    from .checkpoint import convert_checkpoint, inspect_checkpoint
    from .distributed import select_dtype
    from .progress import configure_logging

    configure_logging(True)
    dtype = None if args.dtype is None else select_dtype(None, args.dtype)  # type: ignore[arg-type]
    to = "hf" if args.command in ("to-hf", "to_hf") else "meta"
    options: dict[str, Any] = {"num_shards": num_shards, "dtype": dtype,
                               "rope_scale_factor": getattr(args, "rope_scale_factor", None)}
    if max_shard_gb is not None:
        options["max_shard_bytes"] = int(max_shard_gb * 1e9)
    options["overwrite"] = args.overwrite
    before = inspect_checkpoint(src).num_shards if args.command == "reshard" else None
    paths = convert_checkpoint(src, dst, to=to, **options)
    if to == "hf":
        print(f"wrote {len(paths)} safetensors file(s) and config.json to {dst}")
    else:
        print(f"wrote {len(paths)} shard(s) and params.json to {dst}")
    if before is not None:
        print(f"resharded {before} -> {num_shards}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``llama3-convert`` and ``python -m llama3.convert``."""
    return run_main(lambda: _convert(argv), PROG)

