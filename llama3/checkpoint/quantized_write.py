"""Writing quantized checkpoints: Meta fp8_mixed resharded M -> N shards (scales with their rows),
and tiny checkpoints in each format :mod:`.quantized` reads (for tests and examples)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..kernels.fp8 import DEFAULT_ACTIVATION_SCALE_UB, meta_fp8_layers, quantize_fp8_rowwise
from ..model import ModelArgs
from ..validation import positive_int
from .base import CheckpointInfo, atomic_directory, file_mode
from .hf import meta_to_hf_state_dict, model_args_to_hf_config, to_hf_name
from .layout import check_shard_layout, param_names
from .meta import meta_params, save_meta_checkpoint
from .quantized import (
    FBGEMM_FP8,
    FP8_MIXED,
    INT4_EO8_SCHEME,
    QuantizedCheckpointError,
    QuantizedFormat,
    block_linears,
    detect_quantization,
    read_quantized_rank,
)

__all__ = ["reshard_fp8_mixed", "write_fbgemm_fp8_checkpoint", "write_fp8_mixed_checkpoint",
           "write_int4_eo8_checkpoint"]


def reshard_fp8_mixed(info: CheckpointInfo, args: ModelArgs, dst: str | Path, num_shards: int, *,
                      overwrite: bool = False) -> Path:
    """Rewrite the Meta fp8_mixed checkpoint ``info`` (``inspect_checkpoint``'s result; ``args``
    from ``read_model_args``) as ``num_shards`` shards in ``dst`` (same
    layout: bfloat16 shards with float8 feed-forward weights, ``fp8_scales_{rank}.pt``), each
    shard exactly what :func:`read_quantized_rank` gives that rank; written atomically. Splitting
    keeps every stored value; merging requantizes w2 rows (see the module docstring)."""
    positive_int(num_shards, "num_shards")
    fmt = detect_quantization(info)
    if fmt is None or fmt.scheme != FP8_MIXED:
        raise QuantizedCheckpointError(f"{info.path} is not a Meta fp8_mixed checkpoint (no fp8_scales_N.pt)")
    check_shard_layout(info.num_shards, num_shards, args)
    fp8_layers = set(fmt.quantized_layers(args))
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        for rank in range(num_shards):
            sd = read_quantized_rank(info, args, fmt, rank, num_shards, dtype=torch.bfloat16)
            scales = {}
            for module in sorted(fp8_layers):
                layer, w = module.split(".")[1], module.rsplit(".", 1)[1]
                scales[f"{layer}_feed_forward.{w}_{rank}"] = sd.pop(module + ".weight_scale").clone()
            if args.tie_word_embeddings:
                sd["output.weight"] = sd["tok_embeddings.weight"]
            torch.save({k: v.clone() for k, v in sd.items()}, tmp / f"consolidated.{rank:02d}.pth")
            torch.save(scales, tmp / f"fp8_scales_{rank}.pt")
            for name in (f"consolidated.{rank:02d}.pth", f"fp8_scales_{rank}.pt"):
                (tmp / name).chmod(file_mode())
        (tmp / "params.json").write_text(json.dumps(info.config, indent=2) + "\n")
        tokenizer = info.path / "tokenizer.model"
        if tokenizer.is_file():
            (tmp / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return Path(dst)


# --- tiny checkpoints for tests ----------------------------------------------------------------


def write_fp8_mixed_checkpoint(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path,
                               num_shards: int = 1) -> Path:
    """Meta's fp8_mixed layout from a whole float state dict: ``save_meta_checkpoint``'s bf16
    shards, then each shard's slice of Meta's fp8 layers quantized row-wise on its own (as each
    rank of Meta's 8-shard release is) and its scales written to ``fp8_scales_{rank}.pt``."""
    out = Path(out_dir)
    save_meta_checkpoint(state_dict, args, out, num_shards=num_shards, dtype=torch.bfloat16)
    for s in range(num_shards):
        path = out / f"consolidated.{s:02d}.pth"
        shard = torch.load(path, weights_only=True)
        scales: dict[str, torch.Tensor] = {}
        for module in meta_fp8_layers(args.n_layers):
            q, scale = quantize_fp8_rowwise(shard[module + ".weight"])
            shard[module + ".weight"] = q
            layer, w = module.split(".")[1], module.rsplit(".", 1)[1]
            scales[f"{layer}_feed_forward.{w}_{s}"] = scale
        torch.save(shard, path)
        torch.save(scales, out / f"fp8_scales_{s}.pt")
        (out / f"fp8_scales_{s}.pt").chmod(file_mode())
    return out


def write_fbgemm_fp8_checkpoint(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path,
                                *, modules_to_not_convert: list[str] | None = None,
                                activation_scale_ub: float = DEFAULT_ACTIVATION_SCALE_UB) -> Path:
    """Hugging Face's fbgemm_fp8 layout (one ``model.safetensors``) from a whole float state dict:
    every block linear and ``lm_head`` not in ``modules_to_not_convert`` (default: Meta's 405B-FP8
    choice, i.e. attention, the first and last layers' MLP and ``lm_head`` stay bfloat16)."""
    from safetensors.torch import save_file

    if modules_to_not_convert is None:
        modules_to_not_convert = ["lm_head"] + [f"model.layers.{i}.self_attn" for i in range(args.n_layers)]
        modules_to_not_convert += [f"model.layers.{i}.mlp" for i in (0, args.n_layers - 1)]
    fmt = QuantizedFormat(FBGEMM_FP8, activation_scale_ub=activation_scale_ub,
                          modules_to_not_convert=tuple(modules_to_not_convert))
    hf_sd = {k: v.to(torch.bfloat16).contiguous() for k, v in meta_to_hf_state_dict(state_dict, args).items()}
    for module in fmt.quantized_layers(args):
        key = to_hf_name(module + ".weight")
        if key in hf_sd:
            q, scale = quantize_fp8_rowwise(hf_sd[key])
            hf_sd[key], hf_sd[key + "_scale"] = q.contiguous(), scale[:, None].contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model_args_to_hf_config(args, torch.bfloat16)
    config["quantization_config"] = {"quant_method": FBGEMM_FP8, "activation_scale_ub": activation_scale_ub,
                                     "modules_to_not_convert": modules_to_not_convert}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _int4_symmetric(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per group (SpinQuant/QLoRA export style): q in -8..7, scale = max|w| / 7.5."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    scale = (wg.abs().amax(dim=-1) / 7.5).clamp(min=1e-8)
    q = torch.round(wg / scale[..., None]).clamp(-8, 7).to(torch.int8)
    return q.reshape(n, k), scale


def write_int4_eo8_checkpoint(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path, *,
                              group_size: int = 32, lora_rank: int | None = None, lora_scale: float = 2.0,
                              with_zeros: bool = False, seed: int = 0) -> Path:
    """Meta's INT4_EO8 layout (one shard) from a whole float state dict: block linears as int4 in
    int8 with group scales (and ``zeros`` when ``with_zeros``: a random offset per group), random
    LoRA adaptors when ``lora_rank`` (QLoRA; none = SpinQuant), int8 embedding and output with
    per-row scales, and params.json with ``quantization_args`` / ``lora_args``."""
    gen = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    linears = set(block_linears(args))
    for name in param_names(args):
        module = name.removesuffix(".weight")
        t = state_dict[name].float()
        if module in linears:
            q, scale = _int4_symmetric(t, group_size)
            shard[name], shard[module + ".scales"] = q, scale
            if with_zeros:
                shard[module + ".zeros"] = torch.randint(-2, 3, scale.shape, generator=gen).float()
            if lora_rank is not None:
                a = torch.randn(lora_rank, t.shape[1], generator=gen) * 0.05
                b = torch.randn(t.shape[0], lora_rank, generator=gen) * 0.05
                shard[module + ".adaptor.A.weight"] = a.to(torch.bfloat16)
                shard[module + ".adaptor.B.weight"] = b.to(torch.bfloat16)
        elif module in ("tok_embeddings", "output"):
            scale = (t.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-8)
            shard[name] = torch.round(t / scale).clamp(-127, 127).to(torch.int8)
            shard[module + ".scales"] = scale
        else:
            shard[name] = t.to(torch.bfloat16)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(shard, out / "consolidated.00.pth")
    params = meta_params(args)
    params["quantization_args"] = {"scheme": INT4_EO8_SCHEME, "group_size": group_size}
    if lora_rank is not None:
        params["lora_args"] = {"rank": lora_rank, "scale": lora_scale}
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    return out
