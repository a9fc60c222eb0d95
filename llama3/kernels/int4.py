"""4-bit linear layers: group-wise int4 weight-only, and Meta's INT4_EO8 (Llama 3.2 QLoRA/SpinQuant).

**int4 weight-only** (kernel family "int4", quantize-at-load): each group of ``group_size``
consecutive weights of a row gets a float scale and offset (asymmetric, min/max):

    s = (max - min) / 15,   q = round((w - min) / s) ∈ [0, 15],   w ≈ (q - 8) · s + z,  z = min + 8 s

the layout of torch's int4 kernels, which read the packed weight directly: on CPU
``torch._weight_int4pack_mm_for_cpu`` (packing ``_convert_weight_to_int4pack_for_cpu``), on CUDA
``torch._weight_int4pack_mm`` (bfloat16 only; packing ``_convert_weight_to_int4pack``). The packed
layout belongs to the device it was made on: quantize after the float weight is on its device.
Scales and offsets are held in bfloat16, as the kernels read them. On the CPU a prefill can instead
dequantize these same buffers and multiply with torch's matmul (kernel family "int4-dequant",
:mod:`llama3.kernels.int4_dequant`), chosen by measurement.

**INT4_EO8** (kernel family "int4-int8act", Meta's checkpoints): ``weight`` is an int8 tensor
holding int4 values (-8..7), ``scales``/``zeros`` are float [out, in / group_size]; the input is
quantized per token to int8, asymmetric, on the fly; QLoRA adds ``lora_scale · B(A(x))``:

    W[o, k] = (q[o, k] - zeros[o, g]) · scales[o, g]                 g = k // group_size
    per token t: lo = min(0, min x), hi = max(0, max x), s = max((hi - lo) / 255, eps)
                 zp = clamp(-128 - round(lo / s), -128, 127),  x̂ = (clamp(round(x · (1/s)) + zp, ±) - zp) · s
    y = x̂ Wᵀ  (float32)  +  lora_scale · B(A(x))

This is torchao's ``Int8DynActInt4WeightLinear`` (``linear_forward_8da4w``), which Meta's loader
(``llama_models/llama3/quantization/loader.py``) uses, plus the loader's LoRA adaptor. The token
embedding and output projection of those checkpoints are int8 with one scale per row; Meta's
loader multiplies them out at load (:func:`dequantize_int8_rows`), and so do we.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError
from ..validation import finite_float, optional, positive_int
from .base import LinearKernel

__all__ = [
    "INT4_GROUP_SIZES",
    "DEFAULT_GROUP_SIZE",
    "Int4WeightOnlyLinear",
    "Int8DynActInt4Linear",
    "quantize_int4_groupwise",
    "dequantize_int4_groupwise",
    "int4_weight_only_linear",
    "fake_quantize_per_token_int8",
    "int8_dynact_int4_linear",
    "dequantize_int8_rows",
    "int4_bytes_per_weight",
    "UnsupportedGroupSizeError",
]

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept
DEFAULT_GROUP_SIZE = 128
# torch's CUDA packing tiles the input dimension in units of inner_k_tiles * 16 columns.
_CUDA_INNER_K_TILES = 8


class UnsupportedGroupSizeError(InvalidArgumentError):
    """The int4 group size is not one the kernels take, or does not divide the layer's inputs."""


def _check_group_size(group_size: int, in_features: int, *, allowed: tuple[int, ...] | None) -> int:
    group_size = positive_int(group_size, "group_size")
    if allowed is not None and group_size not in allowed:
        raise UnsupportedGroupSizeError(f"int4 group_size must be one of {', '.join(map(str, allowed))} "
                                        f"(torch's int4 kernels), got {group_size}")
    if in_features % group_size:
        raise UnsupportedGroupSizeError(
            f"int4 group_size {group_size} does not divide this layer's {in_features} input features "
            "(per model-parallel rank); choose a smaller group size or fewer ranks")
    return group_size


# --- int4 weight-only (torch's tinygemm-layout kernels) --------------------------------------


@torch.no_grad()
def quantize_int4_groupwise(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 of ``weight`` [n, k]: (q int32 [n, k] in 0..15, scales [n, k/g],
    zeros [n, k/g], float32) with weight ≈ (q - 8) · scale + zero group by group."""
    n, k = weight.shape
    group_size = _check_group_size(group_size, k, allowed=None)
    w = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6)  # a constant group keeps a usable scale
    zeros = lo + 8 * scales
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scales, zeros


def dequantize_int4_groupwise(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """float32 weight from :func:`quantize_int4_groupwise`'s output (the kernels' exact meaning)."""
    n, k = q.shape
    groups = scales.shape[-1]
    w = (q.float().reshape(n, groups, k // groups) - 8) * scales[..., None] + zeros[..., None]
    return w.reshape(n, k)


def _pack_for(device: torch.device, q: torch.Tensor) -> torch.Tensor:
    if device.type == "cuda":
        # Two values per byte, even column in the high nibble: the layout _convert_weight_to_int4pack takes.
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        return torch._convert_weight_to_int4pack(pairs.contiguous(), _CUDA_INNER_K_TILES)
    return torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)


def int4_weight_only_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                            group_size: int, out_features: int) -> torch.Tensor:
    """``x Wᵀ`` through torch's int4 kernel for the device ``packed`` was made on."""
    # Computed in bfloat16 on both devices: the CUDA kernel takes nothing else, and on the CPU the
    # float32/float16 variants are 40-60x slower than bfloat16 (measured, 4096x4096, one row:
    # bf16 ~2-3 ms, float32 ~65-115 ms, float16 ~125-160 ms). bfloat16's rounding of the
    # activations (2^-9 relative) is small beside int4's (~8 % per layer).
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    sz = scales_and_zeros.to(torch.bfloat16)
    if x.device.type == "cuda":
        y = torch._weight_int4pack_mm(x2, packed, group_size, sz)
    else:
        y = _int4pack_mm_cpu(x2, packed, group_size, sz)
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


@torch.library.custom_op("llama3::int4pack_mm_cpu", mutates_args=())
def _int4pack_mm_cpu(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor
                     ) -> torch.Tensor:
    # An opaque op, not a graph break: a compiled decode step runs torch's kernel as eager does
    # (inductor's own lowering of it fails in torch 2.13 on an input computed in the same graph:
    # "LoweringException: Pointwise is not a Buffer"; @torch.compiler.disable split the step).
    return torch._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)


@_int4pack_mm_cpu.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0])


class Int4WeightOnlyLinear(LinearKernel):
    """Kernel family "int4": group-wise int4 weights read by torch's int4 kernels, activations in
    bfloat16 (results in the model's dtype). Buffers: ``weight`` (packed, device-specific) and
    ``scales_and_zeros`` (bfloat16 [in_local / group_size, out_local, 2], torch's layout: the kernels
    read them in bfloat16, and converting a float32 copy on every call cost a decoding step ~25 %:
    14.0 -> 18.3 GB/s for a 2048x2048 group-32 product on two cores of the AMX Xeon)."""

    name: ClassVar[str] = "int4"
    shares_float_weight: ClassVar[bool] = False
    # The weight layout's name: "int4-dequant" (a subclass) reads these very buffers, so a layer
    # decoding with one and prefilling with the other holds them once (llama3.kernels.phases).
    layout_name: ClassVar[str] = "int4-packed"
    weight: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int
    local_out: int
    local_in: int

    @classmethod
    def applies(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> bool:
        """CPU and CUDA (computed in bfloat16 on both); inputs that split into groups of 32 and,
        on CUDA, the kernel's tile of 128 columns and 8 rows."""
        if layer is None:
            return torch.device(device).type in ("cpu", "cuda") and dtype.is_floating_point
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return False
        n, k = weight.shape
        device = torch.device(device)
        if device.type == "cuda":
            return k % (_CUDA_INNER_K_TILES * 16) == 0 and n % 8 == 0
        return device.type == "cpu" and k % 32 == 0 and dtype.is_floating_point

    @classmethod
    def nbytes_for(cls, out_features: int, in_features: int, dtype: torch.dtype,
                   group_size: int = DEFAULT_GROUP_SIZE) -> int:
        """Half a byte per weight plus a bfloat16 scale and offset per group (see weight_nbytes)."""
        return int(out_features * in_features * int4_bytes_per_weight(group_size))

    @classmethod
    @torch.no_grad()
    def from_float(cls, layer: nn.Module, *, group_size: int = DEFAULT_GROUP_SIZE) -> Int4WeightOnlyLinear:
        """Quantize ``layer``'s float weight where it lies (CPU or CUDA)."""
        weight = layer.weight
        n, k = weight.shape
        group_size = _check_group_size(group_size, k, allowed=INT4_GROUP_SIZES)
        q, scales, zeros = quantize_int4_groupwise(weight, group_size)
        new = cls.blank(layer)
        new.register_buffer("weight", _pack_for(weight.device, q))
        new.register_buffer("scales_and_zeros",
                            torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous())
        new.group_size, new.local_out, new.local_in = group_size, n, k
        new._packed_from(q)
        return new

    def _packed_from(self, q: torch.Tensor) -> None:
        """Called once the weight is packed, with its int4 values (a subclass reads the layout)."""

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's ``x Wᵀ`` in x's dtype."""
        return int4_weight_only_linear(x, self.weight, self.scales_and_zeros, self.group_size, self.local_out)

    def weight_nbytes(self) -> int:
        """Half a byte per weight plus, per group, a bfloat16 scale and offset (2+2 bytes)."""
        return self.local_out * self.local_in // 2 + self.scales_and_zeros.numel() * 2

    def extra_repr(self) -> str:
        return f"local {self.local_in} -> {self.local_out}, int4 group {self.group_size}"


# --- INT4_EO8: int4 weights, int8 dynamic per-token activations (Meta's Llama 3.2 quantized) -----


def fake_quantize_per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded through int8 per row, asymmetric: torchao's per_token_dynamic_quant."""
    eps = torch.finfo(torch.float32).eps
    lo = torch.clamp(x.amin(dim=-1, keepdim=True), max=0)
    hi = torch.clamp(x.amax(dim=-1, keepdim=True), min=0)
    scale = ((hi - lo) / 255.0).clamp(min=eps)
    zero = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    q = torch.clamp(torch.round(x * (1.0 / scale)) + zero, -128, 127)
    return (q - zero) * scale


def int8_dynact_int4_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                            zeros: torch.Tensor | None) -> torch.Tensor:
    """``x̂ Wᵀ`` in float32 for x [..., k], int4-in-int8 ``q`` [n, k], group-wise ``scales`` /
    ``zeros`` [n, k / group] (zeros None: 0)."""
    n, k = q.shape
    groups = scales.shape[-1]
    w = q.float().reshape(n, groups, k // groups)
    if zeros is not None:
        w = w - zeros.float()[..., None]
    w = (w * scales.float()[..., None]).reshape(n, k)
    return F.linear(fake_quantize_per_token_int8(x.float()), w)


class Int8DynActInt4Linear(LinearKernel):
    """Kernel family "int4-int8act": Meta's INT4_EO8 linear layer (see module doc), with the
    optional QLoRA adaptor. State-dict names are Meta's: ``weight`` (int8), ``scales``, ``zeros``,
    ``adaptor.A.weight``, ``adaptor.B.weight``."""

    name: ClassVar[str] = "int4-int8act"
    shares_float_weight: ClassVar[bool] = False
    weight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    lora_scale: float | None

    @classmethod
    def applies(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> bool:
        """Any 2-D weight: the computation is plain tensor arithmetic."""
        if layer is None:
            return True
        weight = getattr(layer, "weight", None)
        return isinstance(weight, torch.Tensor) and weight.dim() == 2

    @classmethod
    def nbytes_for(cls, out_features: int, in_features: int, dtype: torch.dtype, group_size: int = 32) -> int:
        """As held here: one int8 byte per int4 value, float32 scale and zero per group (adaptor
        not counted: rank x (in + out), small)."""
        return out_features * in_features + out_features * (in_features // group_size) * 8

    @classmethod
    def empty(cls, layer: nn.Module, *, group_size: int, lora_rank: int | None = None,
              lora_scale: float | None = None, dtype: torch.dtype = torch.float32) -> Int8DynActInt4Linear:
        """The layer with meta-device buffers for a checkpoint's tensors (this rank's slice):
        ``weight`` int8 like ``layer.weight``, ``scales``/``zeros`` float32 per group, the
        adaptor's A [rank, in_local] / B [out_local, rank] in ``dtype`` when ``lora_rank``."""
        out_local, in_local = layer.weight.shape
        group_size = _check_group_size(group_size, in_local, allowed=None)
        lora_rank = optional(positive_int, lora_rank, "lora_args.rank")
        if (lora_rank is None) != (lora_scale is None):
            raise InvalidArgumentError("lora_args needs both rank and scale (got "
                                       f"rank={lora_rank!r}, scale={lora_scale!r})")
        new = cls.blank(layer)
        meta = torch.device("meta")
        new.register_buffer("weight", torch.empty(out_local, in_local, dtype=torch.int8, device=meta))
        groups = in_local // group_size
        new.register_buffer("scales", torch.empty(out_local, groups, dtype=torch.float32, device=meta))
        new.register_buffer("zeros", torch.zeros(out_local, groups, dtype=torch.float32, device=meta))
        new.group_size = group_size
        new.lora_scale = optional(finite_float, lora_scale, "lora_args.scale")
        new.adaptor = None
        if lora_rank is not None:
            new.adaptor = nn.Sequential()
            new.adaptor.add_module("A", nn.Linear(in_local, lora_rank, bias=False, device=meta, dtype=dtype))
            new.adaptor.add_module("B", nn.Linear(lora_rank, out_local, bias=False, device=meta, dtype=dtype))
            new.adaptor.requires_grad_(False)
        return new

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's product (a partial sum for row-parallel layers: the adaptor is linear in x,
        so its partial sums add up too), in x's dtype."""
        y = int8_dynact_int4_linear(x, self.weight, self.scales, self.zeros)
        if self.adaptor is not None:
            y = y + self.adaptor(x.to(self.adaptor.A.weight.dtype)) * self.lora_scale
        return y.to(x.dtype)

    def weight_nbytes(self) -> int:
        """Half a byte per weight as shipped for mobile (stored here one per byte: see
        :func:`int4_bytes_per_weight`), float32 scales and zeros, and the adaptor."""
        adaptor = 0 if self.adaptor is None else sum(
            p.numel() * p.element_size() for p in self.adaptor.parameters())
        return self.weight.numel() + (self.scales.numel() + self.zeros.numel()) * 4 + adaptor

    def extra_repr(self) -> str:
        out_local, in_local = self.weight.shape
        lora = ("" if self.adaptor is None
                else f", LoRA rank {self.adaptor.A.out_features} scale {self.lora_scale}")
        return (f"local {in_local} -> {out_local}, int4 group {self.group_size}, "
                f"int8 per-token activations{lora}")


def dequantize_int8_rows(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An int8 [rows, d] embedding/output weight times its per-row ``scales`` ([rows] or [rows, 1]),
    in ``dtype``: what Meta's loader assigns to those layers."""
    if scales.dim() == 1:
        scales = scales[:, None]
    if scales.shape != (weight.shape[0], 1):
        raise InvalidArgumentError(f"int8 row scales must have shape [{weight.shape[0]}, 1] or "
                                   f"[{weight.shape[0]}], got {list(scales.shape)}")
    return (weight.float() * scales.float()).to(dtype)


def int4_bytes_per_weight(group_size: int = DEFAULT_GROUP_SIZE, scale_bytes: int = 2,
                          *, with_zeros: bool = True) -> float:
    """Bytes per weight of group-wise int4: half a byte plus, per group, a scale (and an offset)
    of ``scale_bytes`` each. 128, bfloat16 scale + offset: 0.53125."""
    group_size = positive_int(group_size, "group_size")
    return 0.5 + scale_bytes * (2 if with_zeros else 1) / group_size
