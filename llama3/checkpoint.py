"""Reading, writing and converting Llama 3 checkpoints, on any number of model-parallel ranks.

Two layouts are understood, told apart by the files in the directory:

* Meta's: ``params.json`` plus ``consolidated.NN.pth``, one shard per model-parallel rank of the
  run that saved it. Read with ``torch.load(mmap=True, weights_only=True)``: nothing is read until
  a tensor is touched, and a pickle that would run code is refused.
* Hugging Face's: ``config.json`` plus ``model.safetensors`` (or shards listed in
  ``model.safetensors.index.json``). Read tensor by tensor, slice by slice, with ``safe_open``.
  An HF download's ``original/`` folder holds Meta's layout and is used when no safetensors exist.

Resharding: think of every weight as one "canonical" tensor (what a one-shard checkpoint holds).
A checkpoint with M shards stores slices of it; a model on N ranks needs other slices. Each rank
works out which canonical interval it needs and copies it out of the few shards that cover it, so
no rank ever assembles a whole weight it does not keep. This works whenever M divides N or N
divides M. Key/value projections are the one twist: with more ranks than KV heads, every rank
holds a copy of the single KV head its query heads read (as Meta's 405B MP16 shards do).
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .distributed import init_model_parallel, model_parallel_rank, select_device, select_dtype
from .model import ModelArgs, Transformer

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointFormatError",
    "ParamsMismatchError",
    "ShardMismatchError",
    "UnsafeCheckpointError",
    "TokenizerNotFoundError",
    "CheckpointInfo",
    "PRESETS",
    "inspect_checkpoint",
    "read_model_args",
    "find_tokenizer",
    "require_tokenizer",
    "llama_models_tokenizer",
    "check_shard_layout",
    "load_rank_state_dict",
    "load_model",
    "load_full_state_dict",
    "permute_for_rotate_half",
    "unpermute_rotate_half",
    "meta_to_hf_state_dict",
    "hf_to_meta_state_dict",
    "model_args_to_hf_config",
    "hf_config_to_model_args",
    "save_meta_checkpoint",
    "save_hf_checkpoint",
    "convert_checkpoint",
    "random_state_dict",
]


# --- Errors ------------------------------------------------------------------------------------


class CheckpointError(Exception):
    """Base class of every problem with a checkpoint directory or file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint directory does not exist."""


class CheckpointFormatError(CheckpointError, ValueError):
    """The directory or a file in it is not a checkpoint this package can read."""


class ParamsMismatchError(CheckpointFormatError):
    """params.json / config.json disagrees with the tensors actually stored."""


class ShardMismatchError(CheckpointError, ValueError):
    """The checkpoint's shard count cannot be mapped onto the model-parallel world size."""


class UnsafeCheckpointError(CheckpointError):
    """A .pth file holds a pickle that would import or call code; it was refused, not run."""


class TokenizerNotFoundError(CheckpointError, FileNotFoundError):
    """No tokenizer.model where one was expected."""


# --- Layout detection --------------------------------------------------------------------------

_HF_INDEX = "model.safetensors.index.json"


@dataclass
class CheckpointInfo:
    """What ``inspect_checkpoint`` found: layout, the directory holding the weights, the files."""

    format: str  # "meta" or "hf"
    path: Path  # directory holding the weight files (may be ckpt_dir/original)
    files: list[Path]  # Meta: shards in rank order; HF: safetensors files
    config: dict[str, Any]  # params.json or config.json, as read
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        """Model-parallel shards (Meta); an HF checkpoint is one logical shard however many files."""
        return len(self.files) if self.format == "meta" else 1


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"cannot read {path}: {e}") from e


def inspect_checkpoint(ckpt_dir: str | Path) -> CheckpointInfo:
    """Find out which layout ``ckpt_dir`` holds, without reading any weights."""
    root = Path(ckpt_dir).expanduser()
    if not root.exists():
        raise CheckpointNotFoundError(f"checkpoint directory {root} does not exist; pass the folder "
                                      "holding params.json + consolidated.*.pth, or config.json + "
                                      "*.safetensors")
    if not root.is_dir():
        raise CheckpointNotFoundError(f"{root} is a file; pass the directory that contains it")

    shards = sorted(root.glob("consolidated.*.pth"))
    if shards:
        if not (root / "params.json").is_file():
            raise CheckpointFormatError(f"{root} has {len(shards)} consolidated.*.pth shard(s) but no "
                                        "params.json next to them")
        return CheckpointInfo("meta", root, shards, _read_json(root / "params.json"))

    if (root / _HF_INDEX).is_file() or (root / "model.safetensors").is_file():
        if not (root / "config.json").is_file():
            raise CheckpointFormatError(f"{root} has safetensors weights but no config.json")
        if (root / _HF_INDEX).is_file():
            weight_map = _read_json(root / _HF_INDEX).get("weight_map", {})
            files = [root / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointFormatError(f"{root / _HF_INDEX} lists files that are not there: "
                                            f"{', '.join(missing)}")
        else:
            files = [root / "model.safetensors"]
        return CheckpointInfo("hf", root, files, _read_json(root / "config.json"))

    original = root / "original"
    if (original / "params.json").is_file() and any(original.glob("consolidated.*.pth")):
        info = inspect_checkpoint(original)
        # A Hugging Face download's config.json is the authority on its RoPE scaling (3.2 says 32).
        if (root / "config.json").is_file():
            info.extra["hf_config"] = _read_json(root / "config.json")
        return info

    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    raise CheckpointFormatError(
        f"no checkpoint weights in {root}: expected params.json + consolidated.NN.pth (Meta) or "
        f"config.json + model.safetensors[.index.json] (Hugging Face), or an original/ folder with "
        f"Meta's files; found: {', '.join(found) if found else 'nothing (empty directory)'}"
    )


# --- Model arguments ---------------------------------------------------------------------------

# (multiple_of, ffn_dim_multiplier) pairs Meta's params.json files use; tried first so a converted
# checkpoint gets the familiar values back.
_META_FFN_RULES = [(256, None), (1024, 1.3), (256, 1.5), (4096, 1.2), (1024, 1.5), (256, 1.3)]


def _ffn_rule_for(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    for multiple_of, mult in _META_FFN_RULES:
        if ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of,
                     ffn_dim_multiplier=mult).ffn_hidden_dim == intermediate_size:
            return multiple_of, mult
    # Otherwise round up to a multiple of intermediate_size itself: any hidden size in
    # (0, intermediate_size] then lands exactly on it.
    base = int(2 * (4 * dim) / 3)
    mult = None if base <= intermediate_size else intermediate_size / base
    return intermediate_size, mult


def hf_config_to_model_args(config: dict[str, Any], **overrides: Any) -> ModelArgs:
    """ModelArgs from a Hugging Face Llama ``config.json`` (``rope_scaling`` or ``rope_parameters``)."""
    try:
        dim = int(config["hidden_size"])
        n_heads = int(config["num_attention_heads"])
        intermediate = int(config["intermediate_size"])
        params: dict[str, Any] = dict(
            dim=dim, n_layers=int(config["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            vocab_size=int(config["vocab_size"]), norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise CheckpointFormatError(f"config.json lacks {e.args[0]!r}; is this a Llama checkpoint?") from e
    if config.get("head_dim") not in (None, dim // n_heads):
        raise CheckpointFormatError(f"config.json head_dim={config['head_dim']} differs from "
                                    f"hidden_size/num_attention_heads={dim // n_heads}; not supported")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise CheckpointFormatError("config.json asks for attention/MLP biases; Llama 3 has none")
    params["multiple_of"], params["ffn_dim_multiplier"] = _ffn_rule_for(dim, intermediate)

    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    params["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", 500000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        params.update(
            use_scaled_rope=True, rope_scale_factor=float(rope["factor"]),
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_seq_len=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type not in ("default", None):
        raise CheckpointFormatError(f"config.json RoPE type {rope_type!r} is not supported "
                                    "(only 'default' and Llama 3.1's 'llama3')")
    params.update({k: v for k, v in overrides.items() if v is not None})
    args = ModelArgs(**params)
    if args.ffn_hidden_dim != intermediate:  # the rule above should make this impossible
        raise CheckpointFormatError(f"cannot express intermediate_size={intermediate} with multiple_of="
                                    f"{args.multiple_of}, ffn_dim_multiplier={args.ffn_dim_multiplier}")
    return args


def model_args_to_hf_config(args: ModelArgs, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """A Hugging Face ``config.json`` for ``args`` (readable by transformers 4.45+ and 5.x)."""
    rope_scaling = None
    if args.use_scaled_rope:
        rope_scaling = dict(rope_type="llama3", factor=args.rope_scale_factor,
                            low_freq_factor=args.rope_low_freq_factor,
                            high_freq_factor=args.rope_high_freq_factor,
                            original_max_position_embeddings=args.rope_original_max_seq_len)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "rope_scaling": rope_scaling,
        "max_position_embeddings": 131072 if args.use_scaled_rope else 8192,
        "tie_word_embeddings": bool(args.tie_word_embeddings),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128001,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# Keys our params.json may carry beyond Meta's; written only when they differ from the defaults so
# an ordinary checkpoint's params.json stays exactly Meta's.
_EXTRA_PARAMS = ("rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                 "rope_original_max_seq_len")


def _meta_params(args: ModelArgs) -> dict[str, Any]:
    params: dict[str, Any] = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                                  n_kv_heads=args.n_kv_heads, vocab_size=args.vocab_size,
                                  multiple_of=args.multiple_of, ffn_dim_multiplier=args.ffn_dim_multiplier,
                                  norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                                  use_scaled_rope=args.use_scaled_rope)
    if params["ffn_dim_multiplier"] is None:
        del params["ffn_dim_multiplier"]
    defaults = ModelArgs()
    if args.use_scaled_rope:
        params.update({k: getattr(args, k) for k in _EXTRA_PARAMS
                       if getattr(args, k) != getattr(defaults, k)})
    return params


def _args_from_info(info: CheckpointInfo, overrides: dict[str, Any]) -> ModelArgs:
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if info.format == "hf":
        return hf_config_to_model_args(info.config, **overrides)
    params = dict(info.config)
    hf_config = info.extra.get("hf_config")
    if hf_config and params.get("use_scaled_rope"):
        # HF download: take the scaling constants from its config.json (Meta's files have none).
        hf_args = hf_config_to_model_args(hf_config)
        if hf_args.use_scaled_rope:
            params.update({k: getattr(hf_args, k) for k in _EXTRA_PARAMS})
    if "tie_word_embeddings" not in params and info.files:
        params["tie_word_embeddings"] = _meta_shard_is_tied(_torch_load(info.files[0]))
    params.update(overrides)
    try:
        return ModelArgs(**params)
    except (TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{info.path / 'params.json'}: {e}") from e


def read_model_args(ckpt_dir: str | Path, **overrides: Any) -> ModelArgs:
    """ModelArgs of the checkpoint in ``ckpt_dir`` (either layout); ``overrides`` (e.g.
    ``max_seq_len=``, ``rope_scale_factor=``) replace what the files say, ``None`` values ignored."""
    return _args_from_info(inspect_checkpoint(ckpt_dir), overrides)


# --- Tokenizer ---------------------------------------------------------------------------------

_TOKENIZER_HELP = (
    "The Llama 3 tokenizer.model comes with Meta's weights download (also in a Hugging Face "
    "download's original/ folder), or from the llama-models wheel: `pip install --no-deps "
    "llama-models` ships llama_models/llama3/tokenizer.model."
)


def find_tokenizer(ckpt_dir: str | Path) -> Path | None:
    """``ckpt_dir/tokenizer.model`` or ``ckpt_dir/original/tokenizer.model``, whichever exists."""
    root = Path(ckpt_dir).expanduser()
    for candidate in (root / "tokenizer.model", root / "original" / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def require_tokenizer(ckpt_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """``tokenizer_path`` if given (it must exist), else ``find_tokenizer(ckpt_dir)``; raises
    ``TokenizerNotFoundError`` saying where to get the file."""
    if tokenizer_path is not None:
        path = Path(tokenizer_path).expanduser()
        if path.is_file():
            return path
        raise TokenizerNotFoundError(f"tokenizer file {path} does not exist. {_TOKENIZER_HELP}")
    found = find_tokenizer(ckpt_dir)
    if found is None:
        raise TokenizerNotFoundError(f"no tokenizer.model in {ckpt_dir} or {Path(ckpt_dir) / 'original'}. "
                                     f"{_TOKENIZER_HELP}")
    return found


def llama_models_tokenizer() -> Path | None:
    """The tokenizer.model inside an installed ``llama-models`` wheel, if there is one."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "llama3" / "tokenizer.model"
        if path.is_file():
            return path
    return None


# --- Canonical weights and their shards -------------------------------------------------------

_LAYER_PARAMS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                 "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm")
# Keys some Meta checkpoints carry that the model computes itself.
_IGNORED_META_KEYS = ("rope.freqs",)


def _param_names(args: ModelArgs) -> list[str]:
    names = ["tok_embeddings.weight"]
    names += [f"layers.{i}.{p}.weight" for i in range(args.n_layers) for p in _LAYER_PARAMS]
    return names + ["norm.weight", "output.weight"]


def _split_dim(name: str) -> int | None:
    """The dimension a weight is split along across model-parallel ranks (None: replicated)."""
    if name.endswith(("wo.weight", "w2.weight")):
        return 1
    if name.endswith("norm.weight"):
        return None
    return 0


def _is_kv(name: str) -> bool:
    return name.endswith(("wk.weight", "wv.weight"))


def _canonical_shape(name: str, args: ModelArgs) -> tuple[int, ...]:
    d, hd, ffn = args.dim, args.head_dim, args.ffn_hidden_dim
    tail = name.split(".", 2)[-1] if name.startswith("layers.") else name
    return {
        "tok_embeddings.weight": (args.vocab_size, d), "output.weight": (args.vocab_size, d),
        "norm.weight": (d,), "attention_norm.weight": (d,), "ffn_norm.weight": (d,),
        "attention.wq.weight": (args.n_heads * hd, d), "attention.wk.weight": (args.n_kv_heads * hd, d),
        "attention.wv.weight": (args.n_kv_heads * hd, d), "attention.wo.weight": (d, args.n_heads * hd),
        "feed_forward.w1.weight": (ffn, d), "feed_forward.w3.weight": (ffn, d),
        "feed_forward.w2.weight": (d, ffn),
    }[tail]


def _interval(name: str, args: ModelArgs, rank: int, world: int) -> tuple[int, int, int]:
    """(start, stop, unit): the canonical rows (dim _split_dim) that shard ``rank`` of ``world``
    holds, counted in units of ``unit`` elements (a head for KV projections, else one row)."""
    dim = _split_dim(name)
    if _is_kv(name):
        n_kv = args.n_kv_heads
        if world <= n_kv:
            return rank * n_kv // world, (rank + 1) * n_kv // world, args.head_dim
        head = rank * n_kv // world  # more ranks than KV heads: the one head this rank's queries use
        return head, head + 1, args.head_dim
    size = _canonical_shape(name, args)[dim]
    return rank * size // world, (rank + 1) * size // world, 1


def _shard_shape(name: str, args: ModelArgs, rank: int, world: int) -> tuple[int, ...]:
    shape = list(_canonical_shape(name, args))
    dim = _split_dim(name)
    if dim is not None:
        start, stop, unit = _interval(name, args, rank, world)
        shape[dim] = (stop - start) * unit
    return tuple(shape)


def _splits_evenly(args: ModelArgs, n: int) -> bool:
    return (args.n_heads % n == 0 and args.vocab_size % n == 0 and args.ffn_hidden_dim % n == 0
            and (args.n_kv_heads % n == 0 or n % args.n_kv_heads == 0))


def check_shard_layout(num_shards: int, world_size: int, args: ModelArgs | None = None) -> None:
    """Raise ``ShardMismatchError`` unless M=num_shards shards can be loaded on N=world_size ranks
    (one must divide the other), naming model-parallel sizes that would work."""
    candidates = [n for n in range(1, 8 * num_shards + 1)
                  if (num_shards % n == 0 or n % num_shards == 0)
                  and (args is None or _splits_evenly(args, n))]
    if num_shards % world_size != 0 and world_size % num_shards != 0:
        raise ShardMismatchError(
            f"the checkpoint has {num_shards} shard(s) but the model is split across {world_size} "
            f"model-parallel ranks; one number must divide the other. Model-parallel sizes that would "
            f"work: {', '.join(map(str, candidates))} (torchrun --nproc_per_node N), or reshard with "
            "scripts/convert_checkpoint.py reshard"
        )
    if args is not None and not _splits_evenly(args, world_size):
        raise ShardMismatchError(
            f"this model (n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads}, vocab_size="
            f"{args.vocab_size}, ffn hidden {args.ffn_hidden_dim}) cannot be split evenly into "
            f"{world_size} model-parallel parts; sizes that work with this {num_shards}-shard "
            f"checkpoint: {', '.join(map(str, candidates))}"
        )


def _source_shards(rank: int, world: int, num_shards: int) -> list[int]:
    """The shards rank ``rank`` of ``world`` reads: its own one, or the run of shards it merges."""
    if world >= num_shards:
        return [rank * num_shards // world]
    per_rank = num_shards // world
    return list(range(rank * per_rank, (rank + 1) * per_rank))


# --- Reading files -----------------------------------------------------------------------------


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Files written by torch < 1.6 (legacy format) cannot be memory-mapped.
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"refused to load {path}: it is not a plain tensor checkpoint - its pickle would import or "
            f"call code, which torch.load(weights_only=True) does not run ({first_line}). Only use "
            "checkpoints from a source you trust; re-download the file."
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointFormatError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointFormatError(f"{path} does not hold a flat dict of tensors (name -> tensor)")
    return sd


def _meta_shard_is_tied(sd: dict[str, torch.Tensor]) -> bool:
    """Tied when output.weight is absent or stored as the very same bytes as the embedding."""
    emb, out = sd.get("tok_embeddings.weight"), sd.get("output.weight")
    if emb is None:
        return False
    if out is None:
        return True
    return (out.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr()
            and out.storage_offset() == emb.storage_offset() and out.shape == emb.shape)


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def _meta_rank_state_dict(info: CheckpointInfo, args: ModelArgs, rank: int, world: int,
                          convert, verbose: bool) -> dict[str, torch.Tensor]:
    num_shards = info.num_shards
    shard_ids = _source_shards(rank, world, num_shards)
    shards: dict[int, dict[str, torch.Tensor]] = {}
    for s in shard_ids:
        path = info.files[s]
        _log(verbose, f"  reading {path.name} ({_gb(path.stat().st_size)})")
        shards[s] = _torch_load(path)
        _check_meta_shard(shards[s], path, args, s, num_shards)

    out: dict[str, torch.Tensor] = {}
    for name in _param_names(args):
        dim = _split_dim(name)
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        if dim is None:
            out[name] = convert(shards[shard_ids[0]][name])
            continue
        start, stop, unit = _interval(name, args, rank, world)
        pieces, covered = [], start
        for s in shard_ids:
            s_start, s_stop, _ = _interval(name, args, s, num_shards)
            lo, hi = max(covered, s_start), min(stop, s_stop)
            if lo < hi:
                pieces.append(shards[s][name].narrow(dim, (lo - s_start) * unit, (hi - lo) * unit))
                covered = hi
        if covered != stop:  # the shard arithmetic above guarantees this; a bug if not
            raise RuntimeError(f"internal error: shards {shard_ids} do not cover {name} for rank {rank}")
        out[name] = convert(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim))
    if args.tie_word_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def _check_meta_shard(sd: dict[str, torch.Tensor], path: Path, args: ModelArgs, shard: int,
                      num_shards: int) -> None:
    expected = set(_param_names(args))
    if args.tie_word_embeddings:
        expected.discard("output.weight")
    present = set(sd) - set(_IGNORED_META_KEYS)
    missing = sorted(expected - present)
    unexpected = sorted(present - expected - {"output.weight"})
    if missing or unexpected:
        problems = [f"{what} {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                    for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise ParamsMismatchError(f"{path} does not match params.json (n_layers={args.n_layers}): "
                                  f"{'; '.join(problems)}")
    for name in sorted(expected):
        want = _shard_shape(name, args, shard, num_shards)
        got = tuple(sd[name].shape)
        if got != want:
            raise ParamsMismatchError(
                f"{path}: tensor {name} has shape {list(got)} but params.json implies {list(want)} for "
                f"shard {shard} of {num_shards} (dim={args.dim}, n_heads={args.n_heads}, "
                f"n_kv_heads={args.n_kv_heads}, vocab_size={args.vocab_size}, ffn hidden "
                f"{args.ffn_hidden_dim}); is params.json from the same model as the weights?"
            )


# Hugging Face name of each of our names (within a layer for the per-layer ones).
_HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def _to_hf_name(name: str) -> str:
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    _, i, tail = name.split(".", 2)
    return f"model.layers.{i}.{_HF_LAYER_NAMES[tail]}"


def _hf_rank_state_dict(info: CheckpointInfo, args: ModelArgs, rank: int, world: int,
                        convert, verbose: bool) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    wanted = {_to_hf_name(n): n for n in _param_names(args)
              if not (n == "output.weight" and args.tie_word_embeddings)}
    out: dict[str, torch.Tensor] = {}
    found: set[str] = set()
    for path in info.files:
        _log(verbose, f"  reading {path.name} ({_gb(path.stat().st_size)})")
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CheckpointFormatError(f"cannot read {path} as safetensors: {e}") from e
        with handle as f:
            for hf_name in f.keys():
                if hf_name not in wanted:
                    if hf_name.endswith("rotary_emb.inv_freq"):
                        continue
                    if hf_name == "lm_head.weight" and args.tie_word_embeddings:
                        continue
                    raise ParamsMismatchError(f"{path}: unexpected tensor {hf_name} for a Llama model with "
                                              f"n_layers={args.n_layers} (config.json)")
                name = wanted[hf_name]
                found.add(hf_name)
                tensor_slice = f.get_slice(hf_name)
                want = _canonical_shape(name, args)
                got = tuple(tensor_slice.get_shape())
                if got != want:
                    raise ParamsMismatchError(
                        f"{path}: tensor {hf_name} ({name}) has shape {list(got)} but config.json "
                        f"implies {list(want)}; is config.json from the same model as the weights?")
                dim = _split_dim(name)
                if dim is None:
                    t = tensor_slice[:]
                else:
                    start, stop, unit = _interval(name, args, rank, world)
                    lo, hi = start * unit, stop * unit
                    t = tensor_slice[lo:hi] if dim == 0 else tensor_slice[:, lo:hi]
                if name.endswith(("wq.weight", "wk.weight")):
                    t = unpermute_rotate_half(t, t.shape[0] // args.head_dim)
                out[name] = convert(t)
    missing = sorted(set(wanted) - found)
    if missing:
        raise ParamsMismatchError(f"{info.path}: tensors missing from the safetensors files: "
                                  f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if args.tie_word_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def load_rank_state_dict(ckpt_dir: str | Path | CheckpointInfo, args: ModelArgs, rank: int, world_size: int,
                         *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                         verbose: bool = False) -> dict[str, torch.Tensor]:
    """The weights model-parallel rank ``rank`` of ``world_size`` holds, in our (Meta's) names,
    resharded from however many shards the checkpoint has, cast to ``dtype`` on ``device`` tensor
    by tensor. Only the shards this rank needs are read."""
    info = ckpt_dir if isinstance(ckpt_dir, CheckpointInfo) else inspect_checkpoint(ckpt_dir)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    check_shard_layout(info.num_shards, world_size, args)

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype or t.dtype).contiguous()

    reader = _meta_rank_state_dict if info.format == "meta" else _hf_rank_state_dict
    return reader(info, args, rank, world_size, convert, verbose)


def load_full_state_dict(ckpt_dir: str | Path, *, dtype: torch.dtype | None = None,
                         rope_scale_factor: float | None = None
                         ) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """The whole (one-shard) state dict of a checkpoint in our names, and its ModelArgs."""
    info = inspect_checkpoint(ckpt_dir)
    args = _args_from_info(info, {"rope_scale_factor": rope_scale_factor})
    return load_rank_state_dict(info, args, 0, 1, dtype=dtype), args


def load_model(ckpt_dir: str | Path, *, max_seq_len: int, max_batch_size: int,
               device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               model_parallel_size: int | None = None, rope_scale_factor: float | None = None,
               verbose: bool = True) -> Transformer:
    """Build a Transformer from a checkpoint directory (Meta or Hugging Face layout) on this
    process's model-parallel rank, resharding as needed.

    The model is built on the meta device and the weights assigned in place, so a rank holds at
    most its own share of the weights (plus memory-mapped file pages). ``device``/``dtype`` default
    to ``select_device``/``select_dtype``. ``rope_scale_factor`` overrides the Llama 3.1 RoPE
    scaling factor (Meta's params.json has none: 8 is assumed; Llama 3.2's config.json says 32).
    Progress goes to stderr on model-parallel rank 0 when ``verbose``.
    """
    start = time.perf_counter()
    target_device = select_device(device)
    world = init_model_parallel(model_parallel_size,
                                backend="nccl" if target_device.type == "cuda" else "gloo")
    rank = model_parallel_rank()
    target_dtype = select_dtype(target_device, dtype)
    verbose = verbose and rank == 0
    info = inspect_checkpoint(ckpt_dir)
    args = _args_from_info(info, {"max_seq_len": max_seq_len, "max_batch_size": max_batch_size,
                                  "rope_scale_factor": rope_scale_factor})
    check_shard_layout(info.num_shards, world, args)
    kind = "Meta" if info.format == "meta" else "Hugging Face"
    _log(verbose, f"Loading {kind} checkpoint {info.path} ({info.num_shards} shard(s)) on {world} "
                  f"model-parallel rank(s), {str(target_dtype).removeprefix('torch.')} on {target_device}")
    if args.use_scaled_rope and verbose:
        _log(True, f"  RoPE scaling: factor {args.rope_scale_factor:g}, low/high freq factor "
                   f"{args.rope_low_freq_factor:g}/{args.rope_high_freq_factor:g}, original context "
                   f"{args.rope_original_max_seq_len}")

    with torch.device("meta"):
        model = Transformer(args)
    sd = load_rank_state_dict(info, args, rank, world, dtype=target_dtype, device=target_device,
                              verbose=verbose)
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
    _log(verbose, f"Loaded in {time.perf_counter() - start:.2f} s")
    return model


# --- Conversion between layouts ----------------------------------------------------------------


def permute_for_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of wq/wk from Meta's RoPE layout (each head rotates adjacent pairs 2i, 2i+1)
    to Hugging Face's (pairs i, i + head_dim/2): within each head, even rows first, then odd."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``permute_for_rotate_half``: Hugging Face row order back to Meta's."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_to_hf_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our/Meta names and RoPE layout → Hugging Face's (no lm_head.weight when tied)."""
    out = {}
    for name in _param_names(args):
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        t = state_dict[name]
        if name.endswith("wq.weight"):
            t = permute_for_rotate_half(t, args.n_heads)
        elif name.endswith("wk.weight"):
            t = permute_for_rotate_half(t, args.n_kv_heads)
        out[_to_hf_name(name)] = t
    return out


def hf_to_meta_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Hugging Face names and RoPE layout → ours/Meta's (output.weight shares the embedding when tied)."""
    out = {}
    for name in _param_names(args):
        hf_name = _to_hf_name(name)
        if name == "output.weight" and args.tie_word_embeddings:
            out[name] = out["tok_embeddings.weight"]
            continue
        t = state_dict[hf_name]
        if name.endswith("wq.weight"):
            t = unpermute_rotate_half(t, args.n_heads)
        elif name.endswith("wk.weight"):
            t = unpermute_rotate_half(t, args.n_kv_heads)
        out[name] = t
    return out


def save_meta_checkpoint(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path,
                         num_shards: int = 1, dtype: torch.dtype | None = None) -> list[Path]:
    """Write ``params.json`` and ``consolidated.00.pth`` ... for ``num_shards`` model-parallel ranks
    from a whole (one-shard) state dict in our names. With more shards than KV heads each shard
    gets a copy of its KV head, as Meta's own checkpoints do. A tied output weight is stored as
    the same bytes as the embedding (the file holds it once; Meta's reference still finds it)."""
    check_shard_layout(1, num_shards, args)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank in range(num_shards):
        shard: dict[str, torch.Tensor] = {}
        for name in _param_names(args):
            if name == "output.weight" and args.tie_word_embeddings:
                shard[name] = shard["tok_embeddings.weight"]
                continue
            t = state_dict[name]
            dim = _split_dim(name)
            if dim is not None:
                start, stop, unit = _interval(name, args, rank, num_shards)
                t = t.narrow(dim, start * unit, (stop - start) * unit)
            # clone: torch.save of a view would write the whole underlying storage.
            shard[name] = t.to(dtype=dtype or t.dtype).contiguous().clone()
        path = out / f"consolidated.{rank:02d}.pth"
        torch.save(shard, path)
        paths.append(path)
        del shard
    (out / "params.json").write_text(json.dumps(_meta_params(args), indent=2) + "\n")
    return paths


def save_hf_checkpoint(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path,
                       dtype: torch.dtype | None = None, max_shard_bytes: int | None = None) -> list[Path]:
    """Write ``config.json`` and ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` +
    index when the weights exceed ``max_shard_bytes``) from a state dict in our names."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_sd = meta_to_hf_state_dict(state_dict, args)
    hf_sd = {k: v.to(dtype=dtype or v.dtype).contiguous() for k, v in hf_sd.items()}
    first = next(iter(hf_sd.values()))
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in hf_sd.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes is not None and groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][k] = v
        size += nbytes
    paths = []
    if len(groups) == 1:
        paths.append(out / "model.safetensors")
        save_file(groups[0], str(paths[0]), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, group in enumerate(groups):
            path = out / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file(group, str(path), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, path.name))
            paths.append(path)
        total = sum(v.numel() * v.element_size() for v in hf_sd.values())
        (out / _HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": weight_map}, indent=2) + "\n")
    config = model_args_to_hf_config(args, first.dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return paths


def convert_checkpoint(src: str | Path, dst: str | Path, *, to: str, num_shards: int = 1,
                       dtype: torch.dtype | None = None, rope_scale_factor: float | None = None,
                       max_shard_bytes: int | None = None) -> list[Path]:
    """Convert the checkpoint in ``src`` (either layout) to ``to`` = "meta" (with ``num_shards``
    shards: resharding) or "hf", written to ``dst``. A tokenizer.model found in ``src`` is copied."""
    import shutil

    if to not in ("meta", "hf"):
        raise ValueError(f"to must be 'meta' or 'hf', got {to!r}")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst} exists and is not empty; choose a new output directory")
    info = inspect_checkpoint(src)
    args = _args_from_info(info, {"rope_scale_factor": rope_scale_factor})
    check_shard_layout(1, num_shards if to == "meta" else 1, args)  # fail before minutes of reading
    sd = load_rank_state_dict(info, args, 0, 1)
    if to == "meta":
        paths = save_meta_checkpoint(sd, args, dst, num_shards=num_shards, dtype=dtype)
    else:
        paths = save_hf_checkpoint(sd, args, dst, dtype=dtype, max_shard_bytes=max_shard_bytes)
    tokenizer = find_tokenizer(src)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, dst / "tokenizer.model")
    return paths


# --- Random checkpoints ------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # Small and fast, but with the real vocabulary so the real tokenizer works with it.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                 norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, rope_scale_factor=8.0),
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                         multiple_of=256, ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0,
                         use_scaled_rope=True, rope_scale_factor=32.0, tie_word_embeddings=True),
    "llama-3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256,
                         multiple_of=256, ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=500000.0,
                         use_scaled_rope=True, rope_scale_factor=32.0, tie_word_embeddings=True),
    "llama-3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                         multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                         use_scaled_rope=True),
}


def random_state_dict(args: ModelArgs, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      std: float = 0.02) -> dict[str, torch.Tensor]:
    """A whole state dict of random weights for ``args``: matrices ~ N(0, std²), norm gains
    ~ U(0.5, 1.5) (not all ones, so a norm applied to the wrong tensor changes the output).
    Made tensor by tensor in ``dtype``, so a 1B model never exists in float32 at once."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name in _param_names(args):
        if name == "output.weight" and args.tie_word_embeddings:
            sd[name] = sd["tok_embeddings.weight"]
            continue
        shape = _canonical_shape(name, args)
        if name.endswith("norm.weight"):
            t = torch.rand(shape, generator=gen) + 0.5
        else:
            t = torch.randn(shape, generator=gen) * std
        sd[name] = t.to(dtype)
    return sd

