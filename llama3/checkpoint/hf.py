"""Hugging Face's checkpoint format: ``config.json`` plus ``model.safetensors`` (or shards listed
in ``model.safetensors.index.json``), read tensor by tensor, slice by slice, with ``safe_open``.

Hugging Face stores wq/wk rows permuted for "rotate-half" RoPE (pairs i, i + head_dim/2), Meta
rotates adjacent pairs (2i, 2i+1); :func:`permute_for_rotate_half` converts one into the other.
What ``AutoTokenizer`` and ``generate`` need besides the weights is written by
:mod:`.hf_tokenizer`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..model import ModelArgs
from ..tokenizer import special_token_ids
from .base import (
    CheckpointInfo,
    ConfigReader,
    Convert,
    build_args,
    exists_at_all,
    file_mode,
    read_json,
    regular_file,
    validate_overrides,
)
from .errors import (
    CheckpointFormatError,
    ParamsMismatchError,
    TensorDtypeError,
    TiedWeightsMismatchError,
    UnsafePathError,
)
from .layout import canonical_shape, interval, param_names, split_dim

__all__ = [
    "HFFormat",
    "HF",
    "HF_INDEX",
    "hf_config_to_model_args",
    "hf_rope_scaling",
    "model_args_to_hf_config",
    "permute_for_rotate_half",
    "unpermute_rotate_half",
    "meta_to_hf_state_dict",
    "to_hf_name",
    "save_hf_checkpoint",
    "max_positions",
]

logger = logging.getLogger(__name__)

HF_INDEX = "model.safetensors.index.json"
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# Special-token ids of the Llama 3 vocabulary, from the tokenizer's one table.
SPECIAL_IDS = special_token_ids()
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

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


def to_hf_name(name: str) -> str:
    """Hugging Face's name for one of ours (Meta's)."""
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    _, i, tail = name.split(".", 2)
    return f"model.layers.{i}.{_HF_LAYER_NAMES[tail]}"


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
    for name in param_names(args):
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        t = state_dict[name]
        if name.endswith("wq.weight"):
            t = permute_for_rotate_half(t, args.n_heads)
        elif name.endswith("wk.weight"):
            t = permute_for_rotate_half(t, args.n_kv_heads)
        out[to_hf_name(name)] = t
    return out


# --- config.json -------------------------------------------------------------------------------

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
    return HF.config_to_args(config, "config.json", overrides)


def _rope_block(cfg: ConfigReader) -> dict[str, Any]:
    # Newer transformers releases write "rope_parameters", older ones "rope_scaling".
    rope = cfg.data.get("rope_parameters") or cfg.data.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise cfg._bad("rope_scaling", "an object", rope)
    return rope


def hf_rope_scaling(config: dict[str, Any], source: Path | str) -> dict[str, Any] | None:
    """Llama 3.1 RoPE scaling of a config.json as ModelArgs values (``rope_scale_factor``,
    ``rope_low_freq_factor``, ``rope_high_freq_factor``, ``rope_original_max_seq_len``), or None
    when it asks for plain RoPE. Errors name ``source``."""
    cfg = ConfigReader(config, source)
    rope = _rope_block(cfg)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("default", None):
        return None
    if rope_type != "llama3":
        raise CheckpointFormatError(f"{source}: RoPE type {rope_type!r} is not supported "
                                    "(only 'default' and Llama 3.1's 'llama3')")
    return dict(rope_scale_factor=cfg.float("factor", data=rope),
                rope_low_freq_factor=cfg.float("low_freq_factor", data=rope),
                rope_high_freq_factor=cfg.float("high_freq_factor", data=rope),
                rope_original_max_seq_len=cfg.int("original_max_position_embeddings", data=rope))


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
        "max_position_embeddings": max_positions(args),
        "tie_word_embeddings": bool(args.tie_word_embeddings),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": SPECIAL_IDS[BOS], "eos_token_id": SPECIAL_IDS[EOS],
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def max_positions(args: ModelArgs) -> int:
    """``max_position_embeddings`` of a config.json: 131072 with Llama 3.1 RoPE scaling, else 8192."""
    return 131072 if args.use_scaled_rope else 8192


def _check_index_entry(root: Path, index: Path, name: Any) -> Path:
    """An index entry must name a file inside the checkpoint directory: a relative path without
    ``..``. (Symlinks are fine: the Hub's cache links snapshot files to its blob store.)"""
    if not isinstance(name, str) or not name:
        raise CheckpointFormatError(f"{index}: weight_map values must be file names, got {name!r}")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name or p.drive:
        raise UnsafePathError(f"{index} points at {name!r}, outside the checkpoint directory {root}; "
                              "refused. Index entries must be file names inside the directory "
                              "(re-download it).")
    return root / p


class HFFormat:
    """Reader of Hugging Face's format (see the module docstring)."""

    name = "hf"
    title = "Hugging Face"

    def detect(self, root: Path) -> CheckpointInfo | None:
        index, single = root / HF_INDEX, root / "model.safetensors"
        if not (exists_at_all(index) or exists_at_all(single)):
            return None
        if not exists_at_all(root / "config.json"):
            raise CheckpointFormatError(f"{root} has safetensors weights but no config.json")
        if exists_at_all(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointFormatError(f"{index} has no weight_map object")
            files = sorted({_check_index_entry(root, index, name) for name in weight_map.values()})
            missing = [str(f.relative_to(root)) for f in files if not exists_at_all(f)]
            if missing:
                raise CheckpointFormatError(f"{index} lists files that are not there: {', '.join(missing)}")
        else:
            files = [single]
        for f in files:
            regular_file(f, "weight file")
        return CheckpointInfo(self, root, files, read_json(root / "config.json"))

    def num_shards(self, info: CheckpointInfo) -> int:
        return 1

    def model_args(self, info: CheckpointInfo, overrides: dict[str, Any]) -> ModelArgs:
        overrides = validate_overrides(overrides)
        args = self.config_to_args(info.config, info.path / "config.json", overrides)
        info.extra["rope_note"] = ("rope_scale_factor argument" if "rope_scale_factor" in overrides
                                   else "from config.json")
        return args

    @staticmethod
    def config_to_args(config: dict[str, Any], source: Path | str,
                       overrides: dict[str, Any] | None = None) -> ModelArgs:
        """ModelArgs from a config.json dict, every value type-checked (errors name ``source``)."""
        cfg = ConfigReader(config, source)
        dim, n_heads = cfg.int("hidden_size"), cfg.int("num_attention_heads")
        intermediate = cfg.int("intermediate_size")
        params: dict[str, Any] = dict(
            dim=dim, n_layers=cfg.int("num_hidden_layers"), n_heads=n_heads,
            n_kv_heads=cfg.int("num_key_value_heads", n_heads), vocab_size=cfg.int("vocab_size"),
            norm_eps=cfg.float("rms_norm_eps", 1e-5),
            tie_word_embeddings=cfg.bool("tie_word_embeddings", False),
        )
        if config.get("head_dim") is not None and cfg.int("head_dim") != dim // n_heads:
            raise CheckpointFormatError(f"{source}: head_dim={config['head_dim']} differs from "
                                        f"hidden_size/num_attention_heads={dim // n_heads}; not supported")
        if cfg.bool("attention_bias", False) or cfg.bool("mlp_bias", False):
            raise CheckpointFormatError(f"{source} asks for attention/MLP biases; Llama 3 has none")
        params["multiple_of"], params["ffn_dim_multiplier"] = _ffn_rule_for(dim, intermediate)

        rope = _rope_block(cfg)
        theta_source = rope if rope.get("rope_theta") is not None else None
        params["rope_theta"] = cfg.float("rope_theta", 500000.0, data=theta_source)
        scaling = hf_rope_scaling(config, source)
        if scaling is not None:
            params.update(use_scaled_rope=True, **scaling)
        args = build_args(params, validate_overrides(overrides or {}), source)
        if args.ffn_hidden_dim != intermediate:  # the rule above should make this impossible
            raise CheckpointFormatError(f"cannot express intermediate_size={intermediate} with multiple_of="
                                        f"{args.multiple_of}, ffn_dim_multiplier={args.ffn_dim_multiplier}")
        return args

    def read_rank(self, info: CheckpointInfo, args: ModelArgs, rank: int, world: int,
                  convert: Convert) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        tied = args.tie_word_embeddings
        wanted = {to_hf_name(n): n for n in param_names(args)}
        out: dict[str, torch.Tensor] = {}
        stored_output: tuple[Path, torch.Tensor] | None = None  # lm_head of a tied model, to check
        raw_embedding: torch.Tensor | None = None
        found: set[str] = set()
        for path in info.files:
            logger.info("  reading %s (%.2f GB)", path.name, path.stat().st_size / 1e9)
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own SafetensorError
                raise CheckpointFormatError(f"cannot read {path} as safetensors: {e}") from e
            with handle as f:
                for hf_name in f.keys():
                    if hf_name not in wanted:
                        if hf_name.endswith("rotary_emb.inv_freq"):
                            continue
                        raise ParamsMismatchError(f"{path}: unexpected tensor {hf_name} for a Llama model "
                                                  f"with n_layers={args.n_layers} (config.json)")
                    name = wanted[hf_name]
                    found.add(hf_name)
                    tensor_slice = f.get_slice(hf_name)
                    dtype = tensor_slice.get_dtype()
                    want = canonical_shape(name, args)
                    got = tuple(tensor_slice.get_shape())
                    if dtype not in _FLOAT_DTYPES:
                        raise TensorDtypeError(
                            f"{path}: tensor {hf_name} has dtype {dtype} (shape {list(got)}); weights "
                            "must be floating point (BF16, F16, F32). The file is corrupt or not a Llama "
                            "checkpoint.")
                    if got != want:
                        raise ParamsMismatchError(
                            f"{path}: tensor {hf_name} ({name}) has shape {list(got)} but config.json "
                            f"implies {list(want)}; is config.json from the same model as the weights?")
                    dim = split_dim(name)
                    if dim is None:
                        t = tensor_slice[:]
                    else:
                        start, stop, unit = interval(name, args, rank, world)
                        lo, hi = start * unit, stop * unit
                        t = tensor_slice[lo:hi] if dim == 0 else tensor_slice[:, lo:hi]
                    if name.endswith(("wq.weight", "wk.weight")):
                        t = unpermute_rotate_half(t, t.shape[0] // args.head_dim)
                    if tied and name == "output.weight":
                        stored_output = (path, t)
                        continue
                    if tied and name == "tok_embeddings.weight":
                        raw_embedding = t
                    out[name] = convert(t)
        expected = {h for h, n in wanted.items() if not (tied and n == "output.weight")}
        missing = sorted(expected - found)
        if missing:
            raise ParamsMismatchError(f"{info.path}: tensors missing from the safetensors files: "
                                      f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if tied:
            if stored_output is not None and not torch.equal(stored_output[1], raw_embedding):
                diff = (stored_output[1].float() - raw_embedding.float()).abs().max().item()
                raise TiedWeightsMismatchError(
                    f"{stored_output[0]}: config.json says tie_word_embeddings=true, but the stored "
                    f"lm_head.weight differs from model.embed_tokens.weight (max |difference| {diff:.4g}); "
                    "set tie_word_embeddings to false if the model has its own output projection")
            out["output.weight"] = out["tok_embeddings.weight"]
        return out


HF = HFFormat()


# --- Writing -----------------------------------------------------------------------------------


def save_hf_checkpoint(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path,
                       dtype: torch.dtype | None = None, max_shard_bytes: int | None = None) -> list[Path]:
    """Write ``config.json`` and ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` +
    index when the weights exceed ``max_shard_bytes``) from a state dict in our names. Files get
    the ordinary permissions of the process's umask."""
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
    names = (["model.safetensors"] if len(groups) == 1
             else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map = {}
    for name, group in zip(names, groups, strict=True):
        path = out / name
        save_file(group, str(path), metadata={"format": "pt"})
        os.chmod(path, file_mode())  # safetensors creates its files 0600
        weight_map.update(dict.fromkeys(group, name))
        paths.append(path)
    if len(groups) > 1:
        total = sum(v.numel() * v.element_size() for v in hf_sd.values())
        (out / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                "weight_map": weight_map}, indent=2) + "\n")
    config = model_args_to_hf_config(args, first.dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return paths
