"""Single-row bfloat16 / float16 products on the CPU as float32-accumulating GEMVs.

On a CPU without AVX512-BF16/FP16 or AMX, oneDNN's matmul for these dtypes falls back to reference
kernels (half to a third of the speed). A decoding step's one row is a GEMV, computed with float32
accumulation by the fastest kernel each mode has:

* eager: ``torch.mv``, whose kernel converts W to float32 on the fly;
* under ``torch.compile``: a multiply and a sum over the float32 input row, which inductor turns
  into one vectorised kernel that converts each weight as it streams it (~10-15% faster than
  ``torch.mv`` on the AVX2 machine of README "CPU decode").

Several rows (prefill, batches) go to ``F.linear``. The weight stays the layer's float Parameter.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import LinearKernel

__all__ = ["CpuGemvKernel", "gemv_input"]

_DTYPES = (torch.bfloat16, torch.float16)


@torch.library.custom_op("llama3::gemv_input", mutates_args=())
def gemv_input(x: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``x`` that inductor writes to memory instead of recomputing.

    Inductor inlines the pointwise producer of a reduction's input into the reduction loop. For a
    GEMV that means recomputing the residual add and RMSNorm of the whole input row once per
    *output* row (128K times for the output projection), which made the compiled bfloat16 step
    slower than eager. An opaque op is a boundary inductor does not fuse across.
    """
    return x.float()


@gemv_input.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.float32)


class CpuGemvKernel(LinearKernel):
    """One bf16/fp16 row on the CPU: GEMV with float32 accumulation; more rows: ``F.linear``."""

    name: ClassVar[str] = "cpu-gemv"
    decode: ClassVar[str] = "cpu-gemv"
    prefill: ClassVar[str] = "torch"

    @classmethod
    def applies(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> bool:
        return torch.device(device).type == "cpu" and dtype in _DTYPES

    @classmethod
    def refusal(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> str:
        return "" if cls.applies(layer, device, dtype) else (
            f"cpu-gemv computes bfloat16/float16 on the CPU; this is {dtype} on {device}")

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.numel() != x.shape[-1] or x.device.type != "cpu" or x.dtype not in _DTYPES:
            return F.linear(x, weight)
        out_shape = (*x.shape[:-1], weight.shape[0])
        if torch.compiler.is_compiling():
            row = gemv_input(x.reshape(1, -1))  # [1, in] float32, in memory
            return (row * weight.float()).sum(-1).to(x.dtype).view(out_shape)  # one fused kernel
        return torch.mv(weight, x.reshape(-1)).view(out_shape)
