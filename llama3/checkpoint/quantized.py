"""Quantized checkpoints: recognise Meta's and Hugging Face's quantized formats, read a rank's
slice of their tensors and scales, refuse every other scheme by name; tiny writers for tests.

Formats understood (:func:`detect_quantization`):

* Meta ``fp8_mixed`` (Llama 3.1 405B on one 8-GPU node): ``consolidated.NN.pth`` shards whose
  feed-forward w1/w2/w3 of layers 1 .. n-2 are float8 e4m3, plus ``fp8_scales_{rank}.pt`` beside
  them holding one float32 scale per output row of each, keyed ``"{layer}_feed_forward.{w}_{rank}"``.
* Meta ``INT4_EO8`` (Llama 3.2 1B/3B QLoRA and SpinQuant): ``params.json`` has
  ``quantization_args`` (``scheme: "int4_weight_int8_dynamic_activation"``, ``group_size``) and,
  for QLoRA, ``lora_args`` (``rank``, ``scale``). Every linear layer of the blocks has ``weight``
  (int8 holding int4), ``scales`` [out, in/group], optional ``zeros``, and for QLoRA
  ``adaptor.A.weight`` / ``adaptor.B.weight``; ``tok_embeddings`` and ``output`` are int8
  ``weight`` with per-row ``scales``.
* Hugging Face ``fbgemm_fp8`` (``Llama-3.1-405B-Instruct-FP8``): ``config.json``'s
  ``quantization_config.quant_method == "fbgemm_fp8"``; each converted linear has a float8
  ``weight`` and float32 ``weight_scale`` [out, 1]; ``activation_scale_ub``;
  ``modules_to_not_convert`` names the layers left in bfloat16.

:func:`read_quantized_rank` returns the state dict of the model *after* its layers are swapped to
the kernels of ``llama3.kernels.fp8`` / ``llama3.kernels.int4`` (names ``<layer>.weight`` +
``<layer>.weight_scale`` for fp8; ``<layer>.weight/.scales/.zeros/.adaptor.A.weight/...`` for
int4), resharded from M shards to N ranks like the float loader does: scales travel with their
rows. One exception: merging several shards of a row-parallel fp8 layer (w2), whose shards were
quantized each with their own row scales, requantizes the merged rows (one scale per row).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..kernels.fp8 import (
    DEFAULT_ACTIVATION_SCALE_UB,
    fp8_bytes_per_weight,
    meta_fp8_layers,
    quantize_fp8_rowwise,
)
from ..kernels.int4 import dequantize_int8_rows, int4_bytes_per_weight
from ..model import ModelArgs
from ..validation import positive_int
from .base import CheckpointInfo, ConfigReader, atomic_directory, file_mode, regular_file
from .errors import CheckpointFormatError
from .hf import meta_to_hf_state_dict, model_args_to_hf_config, to_hf_name, unpermute_rotate_half
from .layout import canonical_shape, check_shard_layout, interval, param_names, source_shards, split_dim
from .meta import meta_params, save_meta_checkpoint, torch_load

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
    "reshard_fp8_mixed",
    "write_fp8_mixed_checkpoint",
    "write_fbgemm_fp8_checkpoint",
    "write_int4_eo8_checkpoint",
]

logger = logging.getLogger(__name__)

FP8_MIXED, FBGEMM_FP8, INT4_EO8 = "fp8_mixed", "fbgemm_fp8", "int4_eo8"
INT4_EO8_SCHEME = "int4_weight_int8_dynamic_activation"
_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                 "float8_e5m2fnuz") if hasattr(torch, n))


class QuantizedCheckpointError(CheckpointFormatError):
    """A quantized checkpoint that is incomplete or inconsistent (a scale file or tensor missing,
    a shape that disagrees with the config)."""


class UnsupportedQuantizationError(QuantizedCheckpointError):
    """The checkpoint uses a quantization scheme this package does not read (named in the message)."""


class UnknownQuantizedTensorError(QuantizedCheckpointError):
    """A float8 or integer tensor where the loader expects ordinary floating-point weights: casting
    it would silently compute wrong numbers, so it is refused."""


@dataclass(frozen=True)
class QuantizedFormat:
    """What :func:`detect_quantization` found: the scheme and its settings."""

    scheme: str  # FP8_MIXED, FBGEMM_FP8 or INT4_EO8
    activation_scale_ub: float | None = None  # fp8
    group_size: int | None = None  # int4
    lora_rank: int | None = None  # int4 QLoRA
    lora_scale: float | None = None
    modules_to_not_convert: tuple[str, ...] = ()  # fbgemm_fp8, Hugging Face names

    @property
    def kernel(self) -> str:
        """The kernel family (``LinearKernel.name``) its quantized layers need."""
        return "int4-int8act" if self.scheme == INT4_EO8 else "fp8-rowwise"

    def kernel_settings(self, dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments of that kernel's ``empty`` for a model run in ``dtype`` (the LoRA
        adaptor's dtype; fp8 needs none)."""
        if self.scheme == INT4_EO8:
            return {"group_size": self.group_size, "lora_rank": self.lora_rank, "lora_scale": self.lora_scale,
                    "dtype": dtype}
        return {"activation_scale_ub": self.activation_scale_ub}

    def quantized_layers(self, args: ModelArgs) -> list[str]:
        """Our names of the linear layers stored quantized (``layers.3.feed_forward.w1``...)."""
        if self.scheme == FP8_MIXED:
            return meta_fp8_layers(args.n_layers)
        if self.scheme == INT4_EO8:
            return block_linears(args)
        return [m for m in block_linears(args) + ["output"] if not _hf_not_converted(m, self)]

    def describe(self) -> str:
        if self.scheme == INT4_EO8:
            lora = (f", LoRA rank {self.lora_rank} scale {self.lora_scale}" if self.lora_rank is not None
                    else " (no LoRA: SpinQuant)")
            return f"Meta INT4_EO8: int4 weights group {self.group_size}, int8 dynamic activations{lora}"
        what = "Meta fp8_mixed" if self.scheme == FP8_MIXED else "Hugging Face fbgemm_fp8"
        return f"{what}: float8 row-wise weights, activation scale bound {self.activation_scale_ub}"


def block_linears(args: ModelArgs) -> list[str]:
    """Our names of every linear layer inside the transformer blocks."""
    return [f"layers.{i}.{p}" for i in range(args.n_layers) for p in _LINEARS]


def _hf_not_converted(module: str, fmt: QuantizedFormat) -> bool:
    # transformers' should_convert_module: a listed name matches the module or any module under it.
    hf = to_hf_name(module + ".weight").removesuffix(".weight")
    return any(hf == n or hf.startswith(n + ".") or n == hf.removeprefix("model.")
               or hf.removeprefix("model.").startswith(n + ".") for n in fmt.modules_to_not_convert)


# --- detection ---------------------------------------------------------------------------------


def _fp8_scale_files(root: Path) -> list[Path]:
    return sorted(root.glob("fp8_scales_*.pt"), key=lambda p: p.name)


def detect_quantization(info: CheckpointInfo) -> QuantizedFormat | None:
    """The quantized format of the checkpoint ``info`` describes, or None for a float checkpoint.

    Raises :class:`UnsupportedQuantizationError` for any other scheme (named), and
    :class:`QuantizedCheckpointError` when a recognised format is incomplete. Reads no weights.
    """
    if info.format == "hf":
        return _detect_hf(info)
    cfg = ConfigReader(info.config, info.path / "params.json")
    scale_files = _fp8_scale_files(info.path)
    qargs = info.config.get("quantization_args")
    if qargs is not None:
        if scale_files:
            raise QuantizedCheckpointError(f"{info.path} has both quantization_args in params.json and "
                                           f"{scale_files[0].name}; they are different formats")
        return _detect_int4(info, cfg, qargs)
    if info.config.get("lora_args") is not None:
        raise QuantizedCheckpointError(f"{info.path / 'params.json'} has lora_args but no quantization_args; "
                                       "only Meta's quantized QLoRA checkpoints (INT4_EO8) carry an adaptor")
    if not scale_files:
        return None
    expected = [info.path / f"fp8_scales_{r}.pt" for r in range(len(info.files))]
    if [p.name for p in scale_files] != sorted(p.name for p in expected):
        raise QuantizedCheckpointError(
            f"{info.path} is a Meta fp8_mixed checkpoint ({scale_files[0].name} found) with "
            f"{len(info.files)} shard(s), so it needs {', '.join(p.name for p in expected)}; found "
            f"{', '.join(p.name for p in scale_files)}. Re-download the fp8_scales files.")
    for p in expected:
        regular_file(p, "fp8 scale file")
    return QuantizedFormat(FP8_MIXED, activation_scale_ub=DEFAULT_ACTIVATION_SCALE_UB)


def _detect_int4(info: CheckpointInfo, cfg: ConfigReader, qargs: Any) -> QuantizedFormat:
    source = info.path / "params.json"
    if not isinstance(qargs, dict):
        raise cfg._bad("quantization_args", "an object", qargs)
    scheme = qargs.get("scheme")
    if scheme != INT4_EO8_SCHEME:
        raise UnsupportedQuantizationError(
            f"{source}: quantization_args scheme {scheme!r} is not supported; this package reads Meta's "
            f"{INT4_EO8_SCHEME!r} (Llama 3.2 QLoRA/SpinQuant INT4_EO8) and fp8_mixed checkpoints. Use "
            "the bf16 release of this model instead.")
    group_size = cfg.int("group_size", data=qargs)
    lora = info.config.get("lora_args")
    rank = scale = None
    if lora is not None:
        if not isinstance(lora, dict):
            raise cfg._bad("lora_args", "an object", lora)
        rank = cfg.int("rank", data=lora)
        scale = cfg.float("scale", data=lora, positive=False)
    return QuantizedFormat(INT4_EO8, group_size=group_size, lora_rank=rank, lora_scale=scale)


def _detect_hf(info: CheckpointInfo) -> QuantizedFormat | None:
    qc = info.config.get("quantization_config")
    if qc is None:
        return None
    source = info.path / "config.json"
    cfg = ConfigReader(info.config, source)
    if not isinstance(qc, dict):
        raise cfg._bad("quantization_config", "an object", qc)
    method = qc.get("quant_method")
    if method != FBGEMM_FP8:
        raise UnsupportedQuantizationError(
            f"{source}: quantization_config.quant_method {method!r} is not supported; this package reads "
            "'fbgemm_fp8' (Llama-3.1-405B-Instruct-FP8) among Hugging Face's quantized formats. Use the "
            "bf16 release of this model, or a Meta fp8_mixed / INT4_EO8 checkpoint.")
    ub = cfg.float("activation_scale_ub", DEFAULT_ACTIVATION_SCALE_UB, data=qc)
    skip = qc.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise cfg._bad("modules_to_not_convert", "a list of module names", skip)
    return QuantizedFormat(FBGEMM_FP8, activation_scale_ub=ub, modules_to_not_convert=tuple(skip))


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


def _local_shape(name: str, args: ModelArgs, rank: int, world: int) -> tuple[int, ...]:
    shape = list(canonical_shape(name, args))
    dim = split_dim(name)
    if dim is not None:
        start, stop, unit = interval(name, args, rank, world)
        shape[dim] = (stop - start) * unit
    return tuple(shape)


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
            _check_shape(first, name, out[name], _local_shape(name, args, rank, world))
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
        want = _local_shape(name, args, rank, world)
        _check_shape(where.get(to_hf_name(name), info.path), name, out[name], want)
    return out


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


# --- memory ------------------------------------------------------------------------------------


def weight_bytes_per_rank(args: ModelArgs, scheme: str | None, world: int = 1, *,
                          float_bytes: int = 2, group_size: int = 128) -> int:
    """Bytes of weights one of ``world`` model-parallel ranks holds in ``scheme``: None (the
    model's ``float_bytes`` dtype), ``"fp8_mixed"`` or ``"fp8"`` (Meta's selection float8 + row
    scales, as shipped or quantized at load), ``"int4"`` (every block linear int4
    group-wise, bfloat16 scale + offset per group; quantize-at-load) or ``"int4_eo8"`` (Meta's
    mobile layout as we hold it: int4 values one per int8 byte, float32 scales, int8 embedding and
    output multiplied out to ``float_bytes``). Layers not quantized stay ``float_bytes``."""
    if scheme not in (None, "fp8_mixed", "fp8", "int4", "int4_eo8"):
        raise ValueError(f"scheme must be None, 'fp8_mixed', 'fp8', 'int4' or 'int4_eo8', got {scheme!r}")
    quant = {"fp8_mixed": set(meta_fp8_layers(args.n_layers)), "fp8": set(meta_fp8_layers(args.n_layers)),
             "int4": set(block_linears(args)), "int4_eo8": set(block_linears(args))}.get(scheme or "", set())
    total = 0.0
    for name in param_names(args):
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        shape = _local_shape(name, args, 0, world)
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
