"""Linear layers of bfloat16 / float16 models on x86 CPUs, as FBGEMM-packed float16 weights.

On an x86 CPU without bfloat16 or float16 matrix instructions (no AMX, no AVX512-BF16 — every AVX2
machine and most AVX-512 ones), torch's kernels for these dtypes are slow: ``F.linear`` goes to
oneDNN's reference path (prefill: ~7x slower than FBGEMM on the project's AVX2 machine), and the
batch-1 GEMV converts and multiplies slower than memory delivers the weights. FBGEMM, which ships
inside torch's x86 builds, has a float16-weight GEMM (``linear_dynamic_fp16``) that converts with
F16C as it streams a weight matrix packed into its own blocked layout:

    y = x Wᵀ  with  x float32 (from the model's dtype, exact), W float16, accumulated in float32,
    rounded once to the model's dtype.

The numbers are the model's: float16 weights are used as they are; a bfloat16 weight w converts to
float16 exactly when 2⁻¹⁴ <= |w| <= 65504, and a smaller one is off by at most 2⁻²⁵ (float16's
subnormal step). A layer with any |w| > 65504 keeps torch's kernels.

The packed weight is not a tensor: packed layers have no ``weight`` in ``state_dict()``. Pack after
loading and keep a model you mean to save unpacked. A tied output projection (Llama 3.2 1B/3B)
gets its own packed copy; the token embedding keeps its table.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
from torch import nn

from .base import LinearKernel
from .opaque import opaque_product, register_product

__all__ = ["FbgemmFp16Kernel", "cpu_has_bf16_matrix_units", "fbgemm_available"]

_DTYPES = (torch.bfloat16, torch.float16)
_FP16_MAX = torch.finfo(torch.float16).max
# Rows packed per FBGEMM matrix: bounds the float32 staging copy FBGEMM makes of a weight while
# packing it (an 8B model's 128256-row output projection would need 2.1 GB at once).
ROWS_PER_PACK = 16384


def fbgemm_available() -> bool:
    """Whether this torch build has FBGEMM's float16 GEMM (x86 builds do; ARM ones do not)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_prepack_fp16")


def cpu_has_bf16_matrix_units() -> bool:
    """AMX or AVX512-BF16: oneDNN's bfloat16 kernels run natively there."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in
               ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def _packed_linear(x: torch.Tensor, packs: list, out_features: int) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).float()
    parts = [torch.ops.quantized.linear_dynamic_fp16(rows, pack) for pack in packs]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


def _largest(weight: torch.Tensor) -> float:
    if not weight.numel():
        return 0.0
    low, high = torch.aminmax(weight.detach())
    return max(-float(low), float(high))


class FbgemmFp16Kernel(LinearKernel):
    """W packed as float16 for FBGEMM; x converted to float32, products accumulated in float32."""

    name: ClassVar[str] = "fbgemm-fp16"
    shares_float_weight: ClassVar[bool] = False
    packs: list
    local_out: int
    _nbytes: int
    _handle: int

    @classmethod
    def applies(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> bool:
        return not cls.refusal(layer, device, dtype)

    @classmethod
    def refusal(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> str:
        if torch.device(device).type != "cpu" or dtype not in _DTYPES:
            return f"fbgemm-fp16 packs bfloat16/float16 models on the CPU; this one is {dtype} on {device}"
        if not fbgemm_available():
            return "this torch build has no FBGEMM (x86 builds of torch do)"
        if layer is not None and (largest := _largest(layer.weight)) > _FP16_MAX:
            return f"|weight| reaches {largest:.4g}, beyond float16's {_FP16_MAX:.0f}"
        return ""

    @classmethod
    def nbytes_for(cls, out_features: int, in_features: int, dtype: torch.dtype) -> int:
        return out_features * in_features * 2  # float16

    @classmethod
    def from_float(cls, layer: nn.Module, **settings: Any) -> Any:
        new = cls.blank(layer)
        weight = layer.weight.detach()
        new.packs = [torch.ops.quantized.linear_prepack_fp16(rows, None)
                     for rows in weight.split(ROWS_PER_PACK)]
        new.local_out = weight.shape[0]
        # The bytes of the weight the packs replaced: what a decoding step reads.
        new._nbytes = weight.numel() * weight.element_size()
        # A compiled step calls the product through an opaque op (the packs are not traceable).
        new._handle = register_product(new, functools.partial(_packed_linear, packs=new.packs,
                                                              out_features=new.local_out))
        return new

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return opaque_product(x, self._handle, self.local_out)
        return _packed_linear(x, self.packs, self.local_out)

    def weight_nbytes(self) -> int:
        return self._nbytes

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fbgemm float16"
