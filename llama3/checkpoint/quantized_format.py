"""Quantized checkpoint formats: recognise Meta's and Hugging Face's (from the config files and
the file names, reading no weights), and refuse every other scheme by name.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..kernels.fp8 import DEFAULT_ACTIVATION_SCALE_UB, meta_fp8_layers
from ..model import ModelArgs
from .base import CheckpointInfo, ConfigReader, regular_file
from .errors import CheckpointFormatError
from .hf import to_hf_name

__all__ = ["FBGEMM_FP8", "FP8_MIXED", "INT4_EO8", "INT4_EO8_SCHEME", "QuantizedCheckpointError",
           "QuantizedFormat", "UnknownQuantizedTensorError", "UnsupportedQuantizationError", "block_linears",
           "detect_quantization"]


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
