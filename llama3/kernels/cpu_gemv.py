"""Single-row bfloat16 / float16 products on the CPU as ``torch.mv`` GEMVs (float32 accumulation).

A decoding step's one row is a GEMV; ``torch.mv`` streams the weight once and accumulates in
float32. Where the chooser measures it fastest for one row (``llama3.kernels.choose``), the
compiled step runs the same kernel: ``torch.mv`` behind an opaque op (``llama3::gemv``), because
inductor's own fused multiply-and-sum, which it would generate otherwise, is a different kernel that
was never measured (on the AMX Xeon of README "Speed" it made the compiled bf16 step 0.65x the
eager one: 14.3 against 22.0 tok/s; through ``llama3::gemv`` it runs at 21.6).

Several rows (prefill, batches) go to ``F.linear``. The weight stays the layer's float Parameter.

``torch.mv`` itself is two kernels: where oneDNN is on (torch's default) a bfloat16 / float16 GEMV
goes to oneDNN's matmul on CPUs it supports, else to torch's own GEMV. Which is faster depends on the
CPU and dtype, so both are candidates: ``cpu-gemv`` (torch's default) and ``cpu-gemv-native``
(oneDNN off for the one call). Measured: on an AMD Zen 5 (AVX512-BF16), oneDNN's bf16 GEMV streamed
~19 GB/s and torch's own ~40-43; on the AMX Xeon oneDNN's bf16 21-24 GB/s against 10-13, its fp16
8.5 against 12.1 (2 threads, weights from memory, ``scripts/bench/kernels.py``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .base import LinearKernel

__all__ = ["CpuGemvKernel", "CpuGemvNativeKernel", "gemv", "gemv_native", "mv_without_onednn"]

_DTYPES = (torch.bfloat16, torch.float16)


@torch.library.custom_op("llama3::gemv", mutates_args=())
def gemv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``torch.mv`` behind an opaque op: the compiled step runs the kernel the chooser measured."""
    return torch.mv(weight, x)


@gemv.register_fake
def _(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(weight.shape[0])


def mv_without_onednn(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``torch.mv`` with oneDNN off for this one call: torch's own GEMV."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return torch.mv(weight, x)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


@torch.library.custom_op("llama3::gemv_native", mutates_args=())
def gemv_native(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:func:`mv_without_onednn` behind an opaque op, for the compiled step."""
    return mv_without_onednn(weight, x)


@gemv_native.register_fake
def _(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(weight.shape[0])


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
            f"{cls.name} computes bfloat16/float16 on the CPU; this is {dtype} on {device}")

    # The GEMV eagerly, and the opaque op running it in a compiled step.
    mv: ClassVar = staticmethod(torch.mv)
    compiled_mv: ClassVar = staticmethod(gemv)

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.numel() != x.shape[-1] or x.device.type != "cpu" or x.dtype not in _DTYPES:
            return F.linear(x, weight)
        out_shape = (*x.shape[:-1], weight.shape[0])
        mv = self.compiled_mv if torch.compiler.is_compiling() else self.mv
        return mv(weight, x.reshape(-1)).view(out_shape)


class CpuGemvNativeKernel(CpuGemvKernel):
    """As :class:`CpuGemvKernel`, with torch's own GEMV (oneDNN off) for one row."""

    name: ClassVar[str] = "cpu-gemv-native"
    decode: ClassVar[str] = "cpu-gemv-native"
    mv: ClassVar = staticmethod(mv_without_onednn)
    compiled_mv: ClassVar = staticmethod(gemv_native)
