"""Int8 weight-only linear layers: per-output-channel scales.

Decoding one token reads every weight once, so its speed is set by the bytes of weights crossing
the memory bus. Storing the linear layers' weights as int8 with one float scale per output channel
halves them compared with bfloat16; activations, norms, the KV cache and the embedding keep the
model's dtype.

Per output channel (row of W), symmetric:  scale_i = max_j |W_ij| / 127,  q_ij = round(W_ij / scale_i),
so  |W_ij - q_ij · scale_i| <= scale_i / 2.  Then  y = x Wᵀ ≈ (x qᵀ) · scale, computed by

* ``torch._weight_int8pack_mm`` on the CPU (a fused int8-weight GEMM/GEMV, no dequantized copy);
* on CUDA under ``torch.compile``, for a decoding step's few rows, a multiply-and-sum that inductor
  fuses with the int8 conversion into one kernel reading int8 from memory (1 byte per weight
  instead of the 5 that dequantizing into a bfloat16 copy for cuBLAS costs);
* ``F.linear(x, q.to(x.dtype)) * scale`` elsewhere (prefill on CUDA is compute-bound anyway).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import LinearKernel

__all__ = ["CUDA_FUSED_MAX_ROWS", "Int8Kernel", "cuda_int8_product", "int8_product", "quantize_per_channel"]

# Rows of x up to which the compiled CUDA step reads the int8 weight directly.
CUDA_FUSED_MAX_ROWS = 4


@torch.no_grad()
def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row of ``weight`` [out, in].

    Returns (q int8 [out, in], scale [out] in weight's dtype) with weight ≈ q * scale[:, None].
    The scale is rounded to the weight's dtype *before* q is computed, so q is the best int8 for
    the scale actually used at run time.
    """
    w = weight.float()
    amax = w.abs().amax(dim=1)
    scale = (amax / 127.0).clamp(min=torch.finfo(torch.float32).tiny).to(weight.dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_product(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x qᵀ · scale for x [..., in], q int8 [out, in], scale [out] → [..., out] in x's dtype."""
    if x.device.type == "cpu":
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), q, scale.to(x.dtype))
        return y.view(*x.shape[:-1], q.shape[0])
    if x.device.type == "cuda":
        return cuda_int8_product(x, q, scale)
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


def cuda_int8_product(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The CUDA formulation: under ``torch.compile`` a decoding step's few rows as a multiply and
    a sum inductor fuses with the int8 conversion; otherwise dequantize for cuBLAS."""
    rows = x.numel() // x.shape[-1]
    if torch.compiler.is_compiling() and rows <= CUDA_FUSED_MAX_ROWS:
        y = (x.unsqueeze(-2).float() * q.float()).sum(dim=-1)  # never materialised: one fused kernel
        return (y * scale.float()).to(x.dtype)
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


class Int8Kernel(LinearKernel):
    """``weight`` int8 [out, in] and ``scale`` [out] buffers (in the state dict)."""

    name: ClassVar[str] = "int8"
    shares_float_weight: ClassVar[bool] = False
    weight: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def applies(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> bool:
        return dtype.is_floating_point

    @classmethod
    def nbytes_for(cls, out_features: int, in_features: int, dtype: torch.dtype) -> int:
        return out_features * in_features + out_features * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def from_float(cls, layer: nn.Module, **settings: Any) -> Any:
        new = cls.blank(layer)
        q, scale = quantize_per_channel(layer.weight)
        new.register_buffer("weight", q)
        new.register_buffer("scale", scale)
        return new

    @classmethod
    def empty(cls, layer: nn.Module, **settings: Any) -> Any:
        new = cls.blank(layer)
        out, n_in = layer.weight.shape
        new.register_buffer("weight", torch.empty(out, n_in, dtype=torch.int8, device="meta"))
        new.register_buffer("scale", torch.empty(out, dtype=layer.weight.dtype, device="meta"))
        return new

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        return int8_product(x, self.weight, self.scale)
