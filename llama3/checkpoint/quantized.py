"""Quantized checkpoints: read a model-parallel rank's slice of their tensors and scales; their
weight bytes per rank. The formats and their detection are :mod:`.quantized_format` (re-exported
here); writing them (resharding, tiny test checkpoints) is :mod:`.quantized_write`.

:func:`read_quantized_rank` returns the state dict of the model *after* its layers are swapped to
the kernels of ``llama3.kernels.fp8`` / ``llama3.kernels.int4`` (names ``<layer>.weight`` +
``<layer>.weight_scale`` for fp8; ``<layer>.weight/.scales/.zeros/.adaptor.A.weight/...`` for
int4), resharded from M shards to N ranks like the float loader does: scales travel with their
rows. One exception: merging several shards of a row-parallel fp8 layer (w2), whose shards were
quantized each with their own row scales, requantizes the merged rows (one scale per row).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..kernels.fp8 import fp8_bytes_per_weight, meta_fp8_layers, quantize_fp8_rowwise
from ..kernels.int4 import dequantize_int8_rows, int4_bytes_per_weight
from ..model import ModelArgs
from ..presets import preset_args
from .base import CheckpointInfo
from .hf import to_hf_name, unpermute_rotate_half
from .layout import canonical_shape, interval, param_names, shard_shape, source_shards, split_dim
from .meta import torch_load
from .quantized_format import (
    _FP8_DTYPES,
    FBGEMM_FP8,
    FP8_MIXED,
    INT4_EO8,
    INT4_EO8_SCHEME,
    QuantizedCheckpointError,
    QuantizedFormat,
    UnknownQuantizedTensorError,
    UnsupportedQuantizationError,
    block_linears,
    detect_quantization,
)

__all__ = [
    "QuantizedCheckpointError",
    "UnsupportedQuantizationError",
    "UnknownQuantizedTensorError",
    "QuantizedFormat",
    "FP8_MIXED",
    "FBGEMM_FP8",
    "INT4_EO8",
    "INT4_EO8_SCHEME",
    "detect_quantization",
    "read_quantized_rank",
    "block_linears",
    "weight_bytes_per_rank",
    "fit_note",
    "memory_table",
]

logger = logging.getLogger(__name__)


# --- reading -----------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _refuse_unknown(path: Path, key: str, t: torch.Tensor, fmt: QuantizedFormat | None) -> None:
    """A tensor that must hold ordinary weights but is float8 or integer: refuse, never cast."""
    if t.dtype.is_floating_point and t.dtype not in _FP8_DTYPES:
        return
    where = f"a {fmt.describe()} checkpoint" if fmt else "a float checkpoint"
    raise UnknownQuantizedTensorError(
        f"{path}: tensor {key} is {_dtype_name(t.dtype)} (shape {list(t.shape)}), but in {where} it must "
        "hold bfloat16/float16/float32 weights; the loader does not know this tensor's quantization and "
        "will not cast it (that would compute wrong numbers). Use the checkpoint's bf16 release.")


class _Shards:
    """Lazily loaded shards (and fp8 scale files) of a Meta checkpoint."""

    def __init__(self, info: CheckpointInfo, fp8: bool) -> None:
        self.info, self.fp8 = info, fp8
        self._sd: dict[int, dict[str, torch.Tensor]] = {}
        self._scales: dict[int, dict[str, torch.Tensor]] = {}

    def sd(self, s: int) -> dict[str, torch.Tensor]:
        if s not in self._sd:
            path = self.info.files[s]
            logger.info("  reading %s (%.2f GB)", path.name, path.stat().st_size / 1e9)
            self._sd[s] = torch_load(path)
        return self._sd[s]

    def tensor(self, s: int, key: str) -> torch.Tensor:
        sd = self.sd(s)
        if key not in sd:
            raise QuantizedCheckpointError(f"{self.info.files[s]} lacks tensor {key}")
        return sd[key]

    def scale(self, s: int, module: str) -> torch.Tensor:
        if s not in self._scales:
            self._scales[s] = torch_load(self.info.path / f"fp8_scales_{s}.pt")
        layer, w = module.split(".")[1], module.rsplit(".", 1)[1]
        key = f"{layer}_feed_forward.{w}_{s}"
        if key not in self._scales[s]:
            raise QuantizedCheckpointError(f"{self.info.path / f'fp8_scales_{s}.pt'} lacks the scales {key}")
        return self._scales[s][key]


def _pieces(name: str, args: ModelArgs, rank: int, world: int, num_shards: int, div: int = 1
            ) -> list[tuple[int, int, int]]:
    """(shard, offset, length) along ``split_dim(name)`` in stored elements, covering rank's
    interval of ``name``; ``div`` is how many canonical columns share one stored element (a
    group's scale)."""
    start, stop, unit = interval(name, args, rank, world)
    out, covered = [], start
    for s in source_shards(rank, world, num_shards):
        s_start, s_stop, _ = interval(name, args, s, num_shards)
        lo, hi = max(covered, s_start), min(stop, s_stop)
        if lo < hi:
            if ((lo - s_start) * unit) % div or ((hi - lo) * unit) % div:
                raise QuantizedCheckpointError(
                    f"{name}: the slice for rank {rank} of {world} does not fall on whole groups of {div}; "
                    "choose a model-parallel size that keeps each rank's columns a multiple of the group "
                    "size")
            out.append((s, (lo - s_start) * unit // div, (hi - lo) * unit // div))
            covered = hi
    return out


def _gather(shards: _Shards, key: str, name: str, dim: int | None, args: ModelArgs, rank: int, world: int,
            div: int = 1) -> torch.Tensor:
    """Rank ``rank``'s part of stored tensor ``key`` (laid out like parameter ``name`` along ``dim``)."""
    if dim is None:
        return shards.tensor(source_shards(rank, world, len(shards.info.files))[0], key)
    parts = [shards.tensor(s, key).narrow(dim, off, n)
             for s, off, n in _pieces(name, args, rank, world, len(shards.info.files), div)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _check_shape(path: Path, key: str, t: torch.Tensor, want: tuple[int, ...]) -> None:
    if tuple(t.shape) != want:
        raise QuantizedCheckpointError(f"{path}: tensor {key} has shape {list(t.shape)} but the config "
                                       f"implies {list(want)} here; is the config from the same model?")


def read_quantized_rank(info: CheckpointInfo, args: ModelArgs, fmt: QuantizedFormat, rank: int, world: int,
                        *, dtype: torch.dtype, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The state dict model-parallel rank ``rank`` of ``world`` holds after its layers are swapped
    to ``fmt``'s kernel (``fmt.quantized_layers``): quantized tensors and scales as stored (fp8
    weights float8_e4m3fn, int4 values int8, scales float32), every other weight cast to
    ``dtype``; all on ``device``. Only the shards this rank needs are read."""
    device = torch.device(device)
    if fmt.scheme == FBGEMM_FP8:
        out = _read_hf_fp8(info, args, fmt, rank, world, dtype)
    else:
        out = _read_meta(info, args, fmt, rank, world, dtype)
    return {k: v.to(device=device).contiguous() for k, v in out.items()}


def _read_meta(info: CheckpointInfo, args: ModelArgs, fmt: QuantizedFormat, rank: int, world: int,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    quantized = set(fmt.quantized_layers(args))
    shards = _Shards(info, fmt.scheme == FP8_MIXED)
    first = info.files[0]
    out: dict[str, torch.Tensor] = {}
    for name in param_names(args):
        module = name.removesuffix(".weight")
        dim = split_dim(name)
        if name == "output.weight" and args.tie_word_embeddings and fmt.scheme != INT4_EO8:
            out[name] = out["tok_embeddings.weight"]
            continue
        if name == "output.weight" and fmt.scheme == INT4_EO8 and name not in shards.sd(0):
            out[name] = out["tok_embeddings.weight"]  # tied and stored once (Llama 3.2 1B/3B)
            continue
        if fmt.scheme == INT4_EO8 and module in ("tok_embeddings", "output"):
            # Meta's loader multiplies the int8 rows by their scales at load; so do we (rows first).
            weight = _gather(shards, name, name, dim, args, rank, world)
            scales = _gather(shards, f"{module}.scales", name, dim, args, rank, world)
            if weight.dtype != torch.int8:
                raise QuantizedCheckpointError(f"{first}: {name} must be int8 in an INT4_EO8 checkpoint, "
                                               f"found {_dtype_name(weight.dtype)}")
            out[name] = dequantize_int8_rows(weight, scales, dtype)
            continue
        if module in quantized and fmt.scheme == FP8_MIXED:
            out[name], out[f"{module}.weight_scale"] = _meta_fp8(shards, name, args, rank, world)
            continue
        if module in quantized:
            out.update(_meta_int4(shards, name, args, fmt, rank, world, dtype))
            continue
        t = _gather(shards, name, name, dim, args, rank, world)
        _refuse_unknown(first, name, t, fmt)
        out[name] = t.to(dtype)
    for name in param_names(args):
        if name.removesuffix(".weight") not in quantized:
            _check_shape(first, name, out[name], shard_shape(name, args, rank, world))
    return out


def _meta_fp8(shards: _Shards, name: str, args: ModelArgs, rank: int, world: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    module = name.removesuffix(".weight")
    dim = split_dim(name)
    num_shards = len(shards.info.files)
    pieces = _pieces(name, args, rank, world, num_shards)
    weights, scales = [], []
    for s, off, n in pieces:
        w = shards.tensor(s, name)
        if not w.dtype.is_floating_point:
            raise UnknownQuantizedTensorError(f"{shards.info.files[s]}: {name} is {_dtype_name(w.dtype)}; an "
                                              "fp8_mixed weight must be float8_e4m3fn")
        scale = shards.scale(s, module).float().reshape(-1)
        if scale.shape[0] != w.shape[0]:
            raise QuantizedCheckpointError(f"fp8_scales_{s}.pt: the scales of {module} have {scale.shape[0]} "
                                           f"rows but its weight has {w.shape[0]}")
        w = w.to(torch.float8_e4m3fn).narrow(dim, off, n)  # Meta's load_fp8 casts the same way
        weights.append(w)
        scales.append(scale.narrow(0, off, n) if dim == 0 else scale)
    if len(pieces) == 1:
        return weights[0], scales[0]
    if dim == 0:
        return torch.cat(weights, 0), torch.cat(scales, 0)
    # Row-parallel slices merged onto one rank: each was quantized with its own row scales; one
    # row scale per merged row needs requantizing (dequantized exactly in float32 first).
    merged = torch.cat([w.float() * sc[:, None] for w, sc in zip(weights, scales, strict=True)], dim=1)
    return quantize_fp8_rowwise(merged)


def _meta_int4(shards: _Shards, name: str, args: ModelArgs, fmt: QuantizedFormat, rank: int, world: int,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
    module = name.removesuffix(".weight")
    dim = split_dim(name)
    g = fmt.group_size
    path = shards.info.files[0]
    out_f, in_f = canonical_shape(name, args)
    stored = shards.tensor(0, name)
    if stored.dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32):
        raise QuantizedCheckpointError(f"{path}: {name} is {_dtype_name(stored.dtype)}; an INT4_EO8 linear "
                                       "weight holds int4 values in an int8 tensor")
    q = _gather(shards, name, name, dim, args, rank, world).to(torch.int8)
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise QuantizedCheckpointError(f"{path}: {name} holds values outside int4's -8..7 "
                                       f"({int(q.min())}..{int(q.max())}); the file is not INT4_EO8")
    if in_f % g:
        raise QuantizedCheckpointError(f"{path}: group_size {g} does not divide {name}'s {in_f} columns")
    res = {name: q, f"{module}.scales": _gather(shards, f"{module}.scales", name, dim, args, rank, world,
                                                div=g if dim == 1 else 1).float()}
    if f"{module}.zeros" in shards.sd(0):
        res[f"{module}.zeros"] = _gather(shards, f"{module}.zeros", name, dim, args, rank, world,
                                         div=g if dim == 1 else 1).float()
    else:  # Meta's load hook: absent zeros are zeros
        res[f"{module}.zeros"] = torch.zeros_like(res[f"{module}.scales"])
    _check_shape(path, f"{module}.scales", res[f"{module}.scales"], (q.shape[0], q.shape[1] // g))
    if fmt.lora_rank is not None:
        # A [rank, in] follows the layer's columns, B [out, rank] its rows.
        a = _gather(shards, f"{module}.adaptor.A.weight", name, 1 if dim == 1 else None, args, rank, world)
        b = _gather(shards, f"{module}.adaptor.B.weight", name, 0 if dim == 0 else None, args, rank, world)
        _check_shape(path, f"{module}.adaptor.A.weight", a, (fmt.lora_rank, q.shape[1]))
        _check_shape(path, f"{module}.adaptor.B.weight", b, (q.shape[0], fmt.lora_rank))
        res[f"{module}.adaptor.A.weight"], res[f"{module}.adaptor.B.weight"] = a.to(dtype), b.to(dtype)
    return res


def _hf_handles(info: CheckpointInfo) -> dict[str, Path]:
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for path in info.files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                where[key] = path
    return where


def _read_hf_fp8(info: CheckpointInfo, args: ModelArgs, fmt: QuantizedFormat, rank: int, world: int,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    quantized = set(fmt.quantized_layers(args))
    where = _hf_handles(info)

    def read(hf_key: str, name: str, rows_only: bool = False) -> torch.Tensor:
        if hf_key not in where:
            raise QuantizedCheckpointError(f"{info.path}: tensor {hf_key} missing from the safetensors files")
        with safe_open(str(where[hf_key]), framework="pt", device="cpu") as f:
            sl = f.get_slice(hf_key)
            dim = split_dim(name)
            if dim is None or (rows_only and dim == 1):
                t = sl[:]
            else:
                start, stop, unit = interval(name, args, rank, world)
                t = sl[start * unit:stop * unit] if dim == 0 else sl[:, start * unit:stop * unit]
        if name.endswith(("wq.weight", "wk.weight")):
            t = unpermute_rotate_half(t, t.shape[0] // args.head_dim)
        return t

    out: dict[str, torch.Tensor] = {}
    for name in param_names(args):
        module = name.removesuffix(".weight")
        hf_name = to_hf_name(name)
        if name == "output.weight" and args.tie_word_embeddings and hf_name not in where:
            out[name] = out["tok_embeddings.weight"]
            continue
        t = read(hf_name, name)
        if module in quantized and t.dtype in _FP8_DTYPES:
            scale_key = hf_name + "_scale"
            scale = read(scale_key, name, rows_only=True).float().reshape(-1, 1)
            out[name] = t.to(torch.float8_e4m3fn)
            out[f"{module}.weight_scale"] = scale.reshape(-1)
            continue
        if module in quantized:
            raise QuantizedCheckpointError(
                f"{where[hf_name]}: {hf_name} is {_dtype_name(t.dtype)}, but config.json's fbgemm_fp8 "
                "quantization_config converts it (not in modules_to_not_convert); expected float8_e4m3fn")
        _refuse_unknown(where[hf_name], hf_name, t, fmt)
        out[name] = t.to(dtype)
    for name in param_names(args):
        want = shard_shape(name, args, rank, world)
        _check_shape(where.get(to_hf_name(name), info.path), name, out[name], want)
    return out


# --- memory ------------------------------------------------------------------------------------


def weight_bytes_per_rank(args: ModelArgs, scheme: str | None, world: int = 1, *,
                          float_bytes: int = 2, group_size: int = 128) -> int:
    """Bytes of weights one of ``world`` model-parallel ranks holds in ``scheme``: None (the
    model's ``float_bytes`` dtype), ``"fp8_mixed"`` or ``"fp8"`` (Meta's selection float8 + row
    scales, as shipped or quantized at load), ``"int4"`` (every linear, the output projection too,
    int4 group-wise, bfloat16 scale + offset per group; quantize-at-load: a tied output gets its own
    int4 copy beside the float embedding) or ``"int4_eo8"`` (Meta's
    mobile layout as we hold it: int4 values one per int8 byte, float32 scales, int8 embedding and
    output multiplied out to ``float_bytes``). Layers not quantized stay ``float_bytes``."""
    if scheme not in (None, "fp8_mixed", "fp8", "int4", "int4_eo8"):
        raise ValueError(f"scheme must be None, 'fp8_mixed', 'fp8', 'int4' or 'int4_eo8', got {scheme!r}")
    quant = {"fp8_mixed": set(meta_fp8_layers(args.n_layers)), "fp8": set(meta_fp8_layers(args.n_layers)),
             "int4": {*block_linears(args), "output"},
             "int4_eo8": set(block_linears(args))}.get(scheme or "", set())
    total = 0.0
    for name in param_names(args):
        if name == "output.weight" and args.tie_word_embeddings and "output" not in quant:
            continue  # the embedding's own bytes
        shape = shard_shape(name, args, 0, world)
        n = shape[0] * (shape[1] if len(shape) > 1 else 1)
        if name.removesuffix(".weight") not in quant:
            total += n * float_bytes
        elif scheme in ("fp8", "fp8_mixed"):
            total += n * fp8_bytes_per_weight(shape[1])
        elif scheme == "int4":
            total += n * int4_bytes_per_weight(group_size)
        else:
            total += n * (1 + 8 / group_size)
    return int(total)


def fit_note(args: ModelArgs, world: int, free_bytes: int | None = None) -> str:
    """One line for a fit check's message: the weights per rank in bf16 and in each quantized
    format, e.g. "weights per rank on 8 ranks: bf16 101.5 GB; fp8_mixed 60.9 GB; int4 27.3 GB",
    followed by which formats fit ``free_bytes`` (the KV cache not counted) when it is given."""
    sizes = {"bf16": weight_bytes_per_rank(args, None, world), "fp8_mixed": weight_bytes_per_rank(
        args, "fp8_mixed", world), "int4": weight_bytes_per_rank(args, "int4", world)}
    line = f"weights per rank on {world} rank{'s' if world != 1 else ''}: " + "; ".join(
        f"{k} {v / 1e9:.1f} GB" for k, v in sizes.items())
    if free_bytes is not None:
        fitting = [k for k, v in sizes.items() if v <= free_bytes]
        line += (f"; {free_bytes / 1e9:.1f} GB free: " + (f"{', '.join(fitting)} would fit" if fitting
                                                          else "none fits; add ranks"))
    return line


# (preset, model-parallel ranks) rows of the README's table: one GPU, one 8-GPU node, two nodes.
MEMORY_TABLE_ROWS = (("llama-3.1-8b", 1), ("llama-3.1-70b", 1), ("llama-3.1-70b", 8), ("llama-3.1-405b", 8),
                     ("llama-3.1-405b", 16))


def memory_table(rows: tuple[tuple[str, int], ...] = MEMORY_TABLE_ROWS) -> str:
    """A Markdown table of the weights one rank holds, in GB, for each (preset, ranks) row in
    bf16, fp8 (Meta's selection, as shipped or quantized at load) and int4 (group 128, every
    block linear): :func:`weight_bytes_per_rank`. The KV cache and scratch come on top."""
    lines = ["| model | ranks | bf16 | fp8 (fp8_mixed) | int4 (group 128) |", "|---|---|---|---|---|"]
    for preset, world in rows:
        args = preset_args(preset)
        sizes = [weight_bytes_per_rank(args, scheme, world) / 1e9 for scheme in (None, "fp8", "int4")]
        lines.append(f"| {preset} | {world} | " + " | ".join(f"{gb:.1f} GB" for gb in sizes) + " |")
    return "\n".join(lines)
