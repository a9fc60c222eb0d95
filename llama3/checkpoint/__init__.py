"""Reading, writing and converting Llama 3 checkpoints, on any number of model-parallel ranks.

Two formats are understood, told apart once by :func:`inspect_checkpoint`, whose
:class:`CheckpointInfo` carries the reader of the format it found:

* Meta's (:mod:`.meta`): ``params.json`` plus ``consolidated.NN.pth``, one shard per rank.
* Hugging Face's (:mod:`.hf`): ``config.json`` plus ``model.safetensors`` or indexed shards. An HF
  download's ``original/`` folder holds Meta's layout and is used when no safetensors exist.

:mod:`.layout` does the shard arithmetic that lets M shards load on N ranks; :mod:`.hub` turns a
Hugging Face Hub id into a local folder; :mod:`.random_weights` writes checkpoints of random
weights. Every problem raises a :class:`CheckpointError` subclass (:mod:`.errors`) whose message
names the file, tensor or key and the numbers.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..bpe import load_bpe_ranks
from ..distributed import init_model_parallel, model_parallel_rank, select_device, select_dtype
from ..errors import InvalidArgumentError
from ..files import check_regular_file, copy_checked
from ..kernels import KERNELS, swap_linears
from ..model import ModelArgs, Transformer
from ..progress import Progress, configure_logging
from ..validation import optional, positive_int
from .base import (
    CheckpointInfo,
    atomic_directory,
    check_output_dir,
    exists_at_all,
    read_json,
    validate_overrides,
)
from .errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    ConfigValueError,
    ConversionOverflowError,
    HubError,
    KVReplicaMismatchError,
    NotARegularFileError,
    ParamsMismatchError,
    ShardFilesError,
    ShardMismatchError,
    TensorDtypeError,
    TiedWeightsMismatchError,
    UnsafeCheckpointError,
    UnsafePathError,
)
from .finite import FiniteCheck, NonFiniteWeightsError, stored_tensors
from .hf import (
    HF,
    hf_config_to_model_args,
    hf_rope_scaling,
    meta_to_hf_state_dict,
    model_args_to_hf_config,
    permute_for_rotate_half,
    save_hf_checkpoint,
    unpermute_rotate_half,
)
from .hf_tokenizer import write_hf_extras
from .hub import resolve_checkpoint_dir
from .layout import check_shard_layout, param_names, shard_shape
from .meta import META, save_meta_checkpoint
from .quantized import (
    QuantizedCheckpointError,
    QuantizedFormat,
    UnknownQuantizedTensorError,
    UnsupportedQuantizationError,
    detect_quantization,
    read_quantized_rank,
)
from .quantized_write import reshard_fp8_mixed
from .random_weights import random_state_dict, write_random_checkpoint

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointFormatError",
    "ConfigValueError",
    "ConversionOverflowError",
    "HubError",
    "KVReplicaMismatchError",
    "NonFiniteWeightsError",
    "NotARegularFileError",
    "ParamsMismatchError",
    "ShardFilesError",
    "ShardMismatchError",
    "TensorDtypeError",
    "TiedWeightsMismatchError",
    "UnsafeCheckpointError",
    "UnsafePathError",
    "QuantizedCheckpointError",
    "UnsupportedQuantizationError",
    "UnknownQuantizedTensorError",
    "QuantizedFormat",
    "detect_quantization",
    "CheckpointInfo",
    "inspect_checkpoint",
    "read_model_args",
    "resolve_checkpoint_dir",
    "check_shard_layout",
    "load_rank_state_dict",
    "load_model",
    "load_full_state_dict",
    "permute_for_rotate_half",
    "unpermute_rotate_half",
    "meta_to_hf_state_dict",
    "model_args_to_hf_config",
    "hf_config_to_model_args",
    "save_meta_checkpoint",
    "save_hf_checkpoint",
    "convert_checkpoint",
    "random_state_dict",
    "write_random_checkpoint",
]

logger = logging.getLogger(__name__)

_READERS = (META, HF)


def inspect_checkpoint(ckpt_dir: str | Path) -> CheckpointInfo:
    """Find out which format ``ckpt_dir`` holds, without reading any weights. ``ckpt_dir`` is a
    directory or a Hugging Face Hub id (``"meta-llama/Llama-3.1-8B-Instruct"``, needs
    ``pip install 'llama3[hub]'``); an existing directory always wins."""
    root = resolve_checkpoint_dir(ckpt_dir)
    if not root.exists():
        raise CheckpointNotFoundError(f"checkpoint directory {root} does not exist; pass the folder "
                                      "holding params.json + consolidated.*.pth, or config.json + "
                                      "*.safetensors (or a Hugging Face Hub id such as "
                                      "meta-llama/Llama-3.1-8B)")
    if not root.is_dir():
        raise CheckpointNotFoundError(f"{root} is a file; pass the directory that contains it")

    for reader in _READERS:
        info = reader.detect(root)
        if info is not None:
            return info

    original = root / "original"
    if exists_at_all(original / "params.json") and any(original.glob("consolidated.*.pth")):
        info = META.detect(original)
        if info is None:  # unreachable: shards exist, so detect returns or raises
            raise RuntimeError(f"internal error: no Meta checkpoint detected in {original}")
        info.root = root
        # A Hugging Face download's config.json is the authority on its RoPE scaling (3.2 says 32):
        # hand its values to the Meta reader (which knows nothing of the HF format).
        config = root / "config.json"
        if info.config.get("use_scaled_rope") is True and exists_at_all(config):
            scaling = hf_rope_scaling(read_json(config), config)
            if scaling is not None:
                info.extra["rope_scaling"] = (scaling, f"from {config}")
        return info

    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    raise CheckpointFormatError(
        f"no checkpoint weights in {root}: expected params.json + consolidated.NN.pth (Meta) or "
        f"config.json + model.safetensors[.index.json] (Hugging Face), or an original/ folder with "
        f"Meta's files; found: {', '.join(found) if found else 'nothing (empty directory)'}"
    )


def read_model_args(ckpt_dir: str | Path | CheckpointInfo, **overrides: Any) -> ModelArgs:
    """ModelArgs of the checkpoint in ``ckpt_dir`` (either format); ``overrides`` (e.g.
    ``max_seq_len=``, ``rope_scale_factor=``) replace what the files say, ``None`` values ignored.
    A bad override raises ``ValueError`` naming the argument; a bad file value ``ConfigValueError``."""
    info = ckpt_dir if isinstance(ckpt_dir, CheckpointInfo) else inspect_checkpoint(ckpt_dir)
    return info.reader.model_args(info, overrides)


def load_rank_state_dict(ckpt_dir: str | Path | CheckpointInfo, args: ModelArgs, rank: int, world_size: int,
                         *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
                         ) -> dict[str, torch.Tensor]:
    """The weights model-parallel rank ``rank`` of ``world_size`` holds, in our (Meta's) names,
    resharded from however many shards the checkpoint has, cast to ``dtype`` on ``device`` tensor
    by tensor. Only the shards this rank needs are read; progress (GB/s, ETA) is logged."""
    info = ckpt_dir if isinstance(ckpt_dir, CheckpointInfo) else inspect_checkpoint(ckpt_dir)
    if not 0 <= rank < world_size:
        raise InvalidArgumentError(f"rank {rank} is outside 0..{world_size - 1}")
    check_shard_layout(info.num_shards, world_size, args)
    elements = sum(math.prod(shard_shape(n, args, rank, world_size)) for n in param_names(args)
                   if not (n == "output.weight" and args.tie_word_embeddings))
    # Lines every few seconds with GB/s and ETA; load_model logs the total time.
    with Progress("loading weights", unit="B", logger=logger, final=False) as progress:
        finite = FiniteCheck()  # every tensor checked for NaN/inf while it is hot

        def convert(t: torch.Tensor) -> torch.Tensor:
            if progress.total is None:
                progress.total = elements * t.element_size()
            out = t.to(device=device, dtype=dtype or t.dtype).contiguous()
            finite.see(out)
            progress.update(t.numel() * t.element_size())
            return out

        sd = info.reader.read_rank(info, args, rank, world_size, convert)
        finite.verify(sd, info, lambda name: stored_tensors(info, name))
        return sd


def load_full_state_dict(ckpt_dir: str | Path, *, dtype: torch.dtype | None = None,
                         rope_scale_factor: float | None = None
                         ) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """The whole (one-shard) state dict of a checkpoint in our names, and its ModelArgs."""
    info = inspect_checkpoint(ckpt_dir)
    args = read_model_args(info, rope_scale_factor=rope_scale_factor)
    return load_rank_state_dict(info, args, 0, 1, dtype=dtype), args


def load_model(ckpt_dir: str | Path | CheckpointInfo, *, max_seq_len: int, max_batch_size: int,
               device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               model_parallel_size: int | None = None, rope_scale_factor: float | None = None,
               verbose: bool = True) -> Transformer:
    """Build a Transformer from a checkpoint (a directory in Meta or Hugging Face format, a Hub id,
    or what :func:`inspect_checkpoint` returned) on this process's model-parallel rank, resharding
    as needed.

    The model is built on the meta device and the weights assigned in place, so a rank holds at
    most its own share of the weights (plus memory-mapped file pages). ``device``/``dtype`` default
    to ``select_device``/``select_dtype``. ``rope_scale_factor`` overrides the Llama 3.1 RoPE
    scaling factor (for Meta's params.json, which has none: 32 when the model is recognised as
    Llama 3.2 1B/3B, else 8; a config.json's value is used as it is). ``verbose`` is the log
    level switch (:func:`llama3.progress.configure_logging`): progress on stderr, rank 0 only.
    """
    configure_logging(verbose)
    # Before any process group: a wrong path fails at once.
    info = ckpt_dir if isinstance(ckpt_dir, CheckpointInfo) else inspect_checkpoint(ckpt_dir)
    validate_overrides({"max_seq_len": max_seq_len, "max_batch_size": max_batch_size,
                        "rope_scale_factor": rope_scale_factor})
    args = read_model_args(info, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                           rope_scale_factor=rope_scale_factor)
    target_device = select_device(device)
    world = init_model_parallel(model_parallel_size,
                                backend="nccl" if target_device.type == "cuda" else "gloo")
    rank = model_parallel_rank()
    target_dtype = select_dtype(target_device, dtype)
    check_shard_layout(info.num_shards, world, args)
    with Progress(f"Loading {info.describe()}", logger=logger) as total:
        logger.info("Loading %s on %d model-parallel rank%s, %s on %s", info.describe(), world,
                    "" if world == 1 else "s", str(target_dtype).removeprefix("torch."), target_device)
        if args.use_scaled_rope:
            logger.info("  RoPE scaling: factor %g (%s), low/high freq factor %g/%g, original context %d",
                        args.rope_scale_factor, info.extra.get("rope_note") or "given",
                        args.rope_low_freq_factor, args.rope_high_freq_factor, args.rope_original_max_seq_len)
        with torch.device("meta"):
            model = Transformer(args)
        fmt = detect_quantization(info)
        if fmt is None:
            sd = load_rank_state_dict(info, args, rank, world, dtype=target_dtype, device=target_device)
        else:
            # Shipped quantized: those layers become their kernel's empty buffers, then the
            # checkpoint's tensors (and scales) are assigned as they are stored.
            logger.info("  %s", fmt.describe())
            layers = set(fmt.quantized_layers(args))
            swap_linears(model, KERNELS[fmt.kernel], select=lambda name, _m: name in layers, empty=True,
                         **fmt.kernel_settings(target_dtype))
            sd = read_quantized_rank(info, args, fmt, rank, world, dtype=target_dtype, device=target_device)
        expected = model.state_dict()
        for name, t in sd.items():
            if tuple(t.shape) != tuple(expected[name].shape):  # the shard checks make this unreachable
                raise RuntimeError(f"internal error: {name} is {list(t.shape)} but the model wants "
                                   f"{list(expected[name].shape)} on rank {rank} of {world}")
        model.load_state_dict(sd, assign=True, strict=True)
        if args.tie_word_embeddings:
            model.output.weight = model.tok_embeddings.weight  # assign=True replaced them separately
        del sd
        model.setup_kv_cache(device=target_device, dtype=target_dtype)
        model.eval()
        total.what = "Loaded"
    return model


# --- Conversion --------------------------------------------------------------------------------


def _check_fits(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    """Refuse weights whose magnitude exceeds ``dtype``'s range (they would become inf)."""
    if dtype is None:
        return
    limit = torch.finfo(dtype).max
    for name, t in sd.items():
        if t.dtype == dtype or torch.finfo(t.dtype).max <= limit or t.numel() == 0:
            continue
        biggest = t.abs().max().item()
        if biggest > limit:
            count = int((t.abs() > limit).sum())
            raise ConversionOverflowError(
                f"tensor {name} holds values up to {biggest:.6g} ({count} element(s) beyond "
                f"{str(dtype).removeprefix('torch.')}'s largest finite value {limit:.6g}); converting "
                "would turn them into inf. Choose a wider dtype (bfloat16 or float32).")


def _validate_convert_args(to: Any, num_shards: Any, dtype: Any, max_shard_bytes: Any) -> None:
    if to not in ("meta", "hf"):
        raise InvalidArgumentError(f"to must be 'meta' or 'hf', got {to!r}")
    positive_int(num_shards, "num_shards")
    if to == "hf" and num_shards != 1:
        raise InvalidArgumentError(f"num_shards={num_shards} applies to the Meta format only (an HF "
                                   "checkpoint is one logical shard; use max_shard_bytes to split its files)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidArgumentError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    optional(positive_int, max_shard_bytes, "max_shard_bytes")


def convert_checkpoint(src: str | Path, dst: str | Path, *, to: str, num_shards: int = 1,
                       dtype: torch.dtype | None = None, rope_scale_factor: float | None = None,
                       max_shard_bytes: int | None = None, overwrite: bool = False) -> list[Path]:
    """Convert the checkpoint ``src`` (either format, or a Hub id) to ``to`` = "meta" (with
    ``num_shards`` shards: resharding) or "hf", written to ``dst`` atomically (a temporary
    directory renamed into place; a non-empty ``dst`` is refused unless ``overwrite``).

    Every argument is checked before anything is read or written. A ``tokenizer.model`` found in
    ``src`` is copied; for "hf" the folder also gets ``generation_config.json`` and the tokenizer
    files transformers needs (``tokenizer.json`` is built when transformers is installed).
    Converting to a narrower ``dtype`` refuses weights that would overflow it.
    """
    _validate_convert_args(to, num_shards, dtype, max_shard_bytes)
    validate_overrides({"rope_scale_factor": rope_scale_factor})
    dst = Path(dst).expanduser()
    check_output_dir(dst, overwrite)
    info = inspect_checkpoint(src)
    root = info.root
    if dst.resolve() in (root.resolve(), info.path.resolve()):
        raise InvalidArgumentError(f"the output {dst} is the source checkpoint; choose another directory")
    args = read_model_args(info, rope_scale_factor=rope_scale_factor)
    check_shard_layout(1, num_shards, args)  # fail before minutes of reading
    fmt = detect_quantization(info)
    if fmt is not None:
        return _convert_quantized(info, args, fmt, dst, to=to, num_shards=num_shards, dtype=dtype,
                                  overwrite=overwrite)
    tokenizer = _checked_tokenizer(root)
    sd = load_rank_state_dict(info, args, 0, 1)
    _check_fits(sd, dtype)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        if to == "meta":
            paths = save_meta_checkpoint(sd, args, tmp, num_shards=num_shards, dtype=dtype)
        else:
            paths = save_hf_checkpoint(sd, args, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes)
            write_hf_extras(tmp, args, tokenizer)
        if tokenizer is not None:
            copy_checked(tokenizer, tmp / "tokenizer.model", "tokenizer file",
                         validate=load_bpe_ranks if tokenizer.is_symlink() else None)
    return [dst / p.name for p in paths]


def _checked_tokenizer(root: Path) -> Path | None:
    """The ``tokenizer.model`` a conversion copies, checked before minutes of work: it must be a
    regular file of sane size (a pipe or device is refused, never read), and a symlink, which may
    point anywhere, must lead to a file that reads as a tiktoken BPE file (not, say, a key file)."""
    for candidate in (root / "tokenizer.model", root / "original" / "tokenizer.model"):
        if os.path.lexists(candidate):
            check_regular_file(candidate, "tokenizer file")
            if candidate.is_symlink():
                load_bpe_ranks(candidate)
            return candidate
    return None


def _convert_quantized(info: CheckpointInfo, args: ModelArgs, fmt: QuantizedFormat, dst: Path, *, to: str,
                       num_shards: int, dtype: torch.dtype | None, overwrite: bool) -> list[Path]:
    """A quantized source: Meta's fp8_mixed reshards to ``num_shards`` (scales with their rows);
    any other conversion would have to dequantize, which is refused by name."""
    if fmt.scheme != "fp8_mixed" or to != "meta" or dtype is not None:
        raise UnsupportedQuantizationError(
            f"{info.path} is a quantized checkpoint ({fmt.describe()}); convert_checkpoint only reshards "
            "Meta fp8_mixed checkpoints (to='meta', num_shards=N, no dtype). Load it as it is, or convert "
            "the model's bf16 release instead.")
    out = reshard_fp8_mixed(info, args, dst, num_shards, overwrite=overwrite)
    return sorted(out.glob("consolidated.*.pth"))
