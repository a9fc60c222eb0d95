"""Benchmark-only swaps for the low-bit modes the kernel chooser does not serve yet on this branch.

``w8a8`` uses the library's :mod:`llama3.kernels.w8a8`; ``int4`` is torch's CPU int4-pack kernel
(groups of 32, asymmetric, bfloat16 scale and zero: the quantized-formats work owns the library's
int4 layer). Both replace single-process linear layers with plain modules; once the chooser
registers ``W8A8Kernel`` and the int4 kernel, ``run_llama3.prepare`` calls the chooser instead and
this module goes.
"""

from __future__ import annotations

import torch
from torch import nn

from llama3.distributed import ColumnParallelLinear, RowParallelLinear, model_parallel_world_size
from llama3.kernels.w8a8 import W8A8Linear


class Int4Linear(nn.Module):
    """y = x Ŵᵀ with Ŵ = (q - 8) · scale + zero per group of ``group`` input columns, q in 0..15."""

    def __init__(self, weight: torch.Tensor, group: int = 32) -> None:
        super().__init__()
        n, k = weight.shape
        wg = weight.detach().float().view(n, k // group, group)
        low, high = wg.amin(-1), wg.amax(-1)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round((wg - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
        # innerKTiles 2: the layout torch's own int4 CPU tests use; packed for this CPU at load.
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        # the kernel computes (q - 8) · scale + zero: the zero is the value of q = 8
        self.scale_zero = torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous().to(
            torch.bfloat16)
        self.group, self.out_features = group, n
        self.weight_nbytes = self.packed.nbytes + self.scale_zero.nbytes

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scale_zero)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class _W8A8(W8A8Linear):
    @property
    def weight_nbytes(self) -> int:
        return self.w8a8.nbytes


@torch.no_grad()
def swap_linear_layers(model: nn.Module, mode: str, **settings: object) -> int:
    """Replace every linear layer of a single-process ``model`` by a ``mode`` ("w8a8", "int4") layer."""
    if model_parallel_world_size() != 1:
        raise RuntimeError("the benchmark's hand swaps are single-process only")
    linear = (ColumnParallelLinear, RowParallelLinear)
    names = [name for name, m in model.named_modules() if type(m) in linear]
    for name in names:  # one at a time: each float weight is freed before the next is converted
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        new = _W8A8.from_linear(layer, **settings) if mode == "w8a8" else Int4Linear(layer.weight)
        setattr(parent, child, new)
    return len(names)
