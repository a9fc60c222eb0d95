"""Int8 weight-only linear layers on CUDA: y = (x qᵀ) · scale, q int8 [out, in], scale [out].

A decoding step reads every weight once, so int8 is only worth having if the kernel reads one
byte per weight and nothing else of note. Two defects kept the previous CUDA path from that:

* Compiled, the multiply-and-sum over the input features took its input straight from the
  pointwise code that produced it (residual add and RMSNorm), and inductor inlines such a
  producer into the reduction: the whole normalisation of the input row was recomputed once per
  *output* row. Here the input passes through ``llama3::int8_gemv_input`` first (an opaque custom
  op, like ``llama3::gemv_input`` of the CPU path in llama3/distributed.py, but copying float32
  inputs too, where that one returns its input), so it is written to memory once, in float32, and
  the reduction reads it.
* Eagerly, the weight was dequantized into a bfloat16 copy for cuBLAS: read 1 byte, write 2, read
  2 per weight. Here a decoding step's few rows go to ``torch._weight_int8pack_mm``, PyTorch's
  fused int8-weight kernel (CUDA since 2.4, the CPU path's kernel too), which converts as it reads.
  Prefill (many rows) stays dequantize-then-cuBLAS: compute-bound, the copy is noise there.

The reduction's launch configuration matters as much: inductor's default reduction configs for a
[out, in] GEMV may leave bandwidth on the table; inductor's coordinate-descent tuner searches block
sizes per kernel at compile time (``llama3.decoding.cuda_decode_compile_options``; off in the decode
step, ``TUNE_CUDA_REDUCTIONS``, until the GPU check has measured its gain and its compile time).

:class:`~llama3.kernels.int8.Int8Kernel` calls :func:`int8_linear_cuda` for every CUDA input: the
one CUDA int8 product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FUSED_MAX_ROWS", "int8_linear_cuda"]

# Up to this many rows of x (a decoding step's batch) the weight is read directly (compiled: the
# fused multiply-and-sum; eager: the int8-weight kernel). Beyond, a GEMM: dequantize for cuBLAS.
FUSED_MAX_ROWS = 8


@torch.library.custom_op("llama3::int8_gemv_input", mutates_args=())
def _gemv_input(x: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``x``: an op inductor cannot see into, so it writes the input to memory
    instead of inlining its producer into the GEMV's reduction loop (once per output row)."""
    return x.to(torch.float32, copy=True)


@_gemv_input.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.float32)


def _has_int8pack_kernel(device_type: str) -> bool:
    key = {"cuda": "CUDA", "cpu": "CPU"}.get(device_type)
    op = "aten::_weight_int8pack_mm"
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def int8_linear_cuda(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x qᵀ · scale for x [..., in] (bf16/fp16/fp32), q int8 [out, in], scale [out] → [..., out]
    in x's dtype, accumulated in float32.

    Under ``torch.compile`` with at most :data:`FUSED_MAX_ROWS` rows: one fused kernel per layer
    that converts each int8 weight as it streams it and reads the float32 input from memory.
    Eagerly with few rows: ``torch._weight_int8pack_mm`` where the device has it. Otherwise (or
    with more rows): dequantize and ``F.linear``. Written for CUDA; runs on any device (the CPU
    runs the same code in tests).
    """
    n_in = x.shape[-1]
    rows = x.numel() // n_in
    out_shape = (*x.shape[:-1], q.shape[0])
    if rows <= FUSED_MAX_ROWS:
        if torch.compiler.is_compiling():
            x32 = _gemv_input(x.reshape(rows, n_in))  # [rows, in] float32, written once
            y = (x32[:, None, :] * q.float()).sum(-1)  # fused: int8 read, converted, multiplied, summed
            return (y * scale.float()).to(x.dtype).view(out_shape)
        if x.dtype in (torch.bfloat16, torch.float16, torch.float32) and _has_int8pack_kernel(x.device.type):
            y = torch._weight_int8pack_mm(x.reshape(rows, n_in), q, scale.to(x.dtype))
            return y.view(out_shape)
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
