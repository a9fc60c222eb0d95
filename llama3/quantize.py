"""Int8 weight-only quantization of the linear layers.

Decoding one token reads every weight once and does two floating-point operations per weight, so
its speed is set by how many bytes of weights cross the memory bus. Storing the weights of the
linear layers as int8 with one float scale per output channel halves those bytes compared with
bfloat16; activations, norms, the KV cache and the token embedding keep the model's dtype.

Per output channel (row of W), symmetric:  scale_i = max_j |W_ij| / 127,  q_ij = round(W_ij / scale_i),
so  |W_ij - q_ij · scale_i| <= scale_i / 2.  Then  y = x Wᵀ ≈ (x qᵀ) · scale, computed by

* ``torch._weight_int8pack_mm`` on the CPU (a fused int8-weight GEMM/GEMV; in bfloat16 it is the
  fastest CPU kernel we measured, see README "Speed"),
* on CUDA under ``torch.compile``, for a decoding step's few rows, a multiply-and-sum that inductor
  fuses with the int8 conversion into one kernel reading int8 from memory (``_int8_linear_cuda``),
* ``F.linear(x, q.to(x.dtype)) * scale`` elsewhere.

The quantized layers keep fairscale's model-parallel layout: column-parallel layers own a slice of
the rows (gathered at the output projection), row-parallel layers own a slice of the columns and
all-reduce their partial sums, through the functional collectives of ``llama3.distributed`` (int8
layers hold no gradients), so a compiled step stays one graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import (
    ColumnParallelLinear,
    RowParallelLinear,
    all_reduce_sum,
    gather_last_dim,
    model_parallel_world_size,
)

__all__ = ["Int8ColumnParallelLinear", "Int8RowParallelLinear", "int8_linear", "quantize_int8",
           "quantize_per_channel"]


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


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x qᵀ · scale for x [..., in], q int8 [out, in], scale [out] → [..., out] in x's dtype."""
    if x.device.type == "cpu":
        # One fused kernel: converts int8 rows on the fly, no dequantized copy of W in memory.
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), q, scale.to(x.dtype))
        return y.view(*x.shape[:-1], q.shape[0])
    if x.device.type == "cuda":
        return _int8_linear_cuda(x, q, scale)
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


# CUDA (owned by the GPU work; the CPU kernels above are separate). Rows of x up to which the
# compiled step reads the int8 weight directly (see _int8_linear_cuda).
CUDA_FUSED_MAX_ROWS = 4


def _int8_linear_cuda(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x qᵀ · scale on CUDA.

    Under ``torch.compile``, a decoding step's few rows are written as a multiply and a sum over
    the input features: inductor fuses the int8 → float conversion, the products and the reduction
    into one kernel that reads each int8 weight once (1 byte per weight instead of the 5 that
    dequantizing into a bfloat16 copy and handing it to cuBLAS costs: read int8, write and read
    bfloat16). With more rows (prefill), or eagerly, the weight is dequantized for cuBLAS, whose
    matrix products are compute-bound there anyway.
    """
    rows = x.numel() // x.shape[-1]
    if torch.compiler.is_compiling() and rows <= CUDA_FUSED_MAX_ROWS:
        y = (x.unsqueeze(-2).float() * q.float()).sum(dim=-1)  # never materialised: one fused kernel
        return (y * scale.float()).to(x.dtype)
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


def _int8_buffers(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace ``module.weight`` (a float Parameter) by int8 ``weight`` and ``scale`` buffers."""
    q, scale = quantize_per_channel(weight)
    del module.weight
    module.register_buffer("weight", q)
    module.register_buffer("scale", scale)
    # Fixed at quantization time: a plain int keeps torch.compile from tracing process-group calls.
    module.world_size = model_parallel_world_size()


class Int8ColumnParallelLinear(ColumnParallelLinear):
    """fairscale's column-parallel linear (rows of W split across ranks) with int8 weights."""

    weight: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_float(cls, layer: ColumnParallelLinear) -> Int8ColumnParallelLinear:
        with torch.device("meta"):  # no throw-away float weight
            new = cls(layer.in_features, layer.out_features, gather_output=layer.gather_output)
        _int8_buffers(new, layer.weight)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = int8_linear(x, self.weight, self.scale)
        if self.world_size == 1 or not self.gather_output:  # nothing to communicate
            return y
        return gather_last_dim(y)  # a functional collective: no torch.compile graph break


class Int8RowParallelLinear(RowParallelLinear):
    """fairscale's row-parallel linear (columns of W split across ranks, partial sums all-reduced)
    with int8 weights."""

    weight: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_float(cls, layer: RowParallelLinear) -> Int8RowParallelLinear:
        with torch.device("meta"):
            new = cls(layer.in_features, layer.out_features)
        _int8_buffers(new, layer.weight)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = int8_linear(x, self.weight, self.scale)
        if self.world_size == 1:
            return y
        return all_reduce_sum(y)


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize every model-parallel linear layer of ``model`` (wq, wk, wv, wo, w1, w2, w3 and
    output) to int8 weights with per-output-channel scales, in place; returns ``model``.

    Call it after the weights are loaded and cast to the run dtype (scales take the weights'
    dtype) and after moving to the device. The token embedding stays as it is, even when the output
    projection shares it (Llama 3.2 1B/3B): the output gets its own int8 copy.
    """
    names = [name for name, module in model.named_modules()
             if type(module) in (ColumnParallelLinear, RowParallelLinear)]
    for name in names:  # one layer at a time: its float weight is freed before the next is quantized
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        cls = Int8ColumnParallelLinear if isinstance(module, ColumnParallelLinear) else Int8RowParallelLinear
        setattr(parent, child, cls.from_float(module).to(module.weight.device))
        del module
    return model
