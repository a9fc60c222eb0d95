"""Int8 weight-only linear layers: per-output-channel scales.

Decoding one token reads every weight once, so its speed is set by the bytes of weights crossing
the memory bus. Storing the linear layers' weights as int8 with one float scale per output channel
halves them compared with bfloat16; activations, norms, the KV cache and the embedding keep the
model's dtype.

Per output channel (row of W), symmetric:  scale_i = max_j |W_ij| / 127,  q_ij = round(W_ij / scale_i),
so  |W_ij - q_ij · scale_i| <= scale_i / 2.  Then  y = x Wᵀ ≈ (x qᵀ) · scale, computed by

* ``torch._weight_int8pack_mm`` on the CPU (a fused int8-weight GEMM/GEMV, no dequantized copy);
* on CUDA, :func:`~llama3.kernels.int8_cuda.int8_linear_cuda`: a decoding step's few rows read the
  int8 weight directly (compiled: one fused multiply-and-sum over a materialised input; eager:
  ``torch._weight_int8pack_mm``), prefill dequantizes for cuBLAS (compute-bound anyway);
* ``F.linear(x, q.to(x.dtype)) * scale`` elsewhere.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import LinearKernel
from .int8_cuda import int8_linear_cuda

__all__ = ["Int8Kernel", "int8_product", "quantize_per_channel"]


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
        return int8_linear_cuda(x, q, scale)
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
