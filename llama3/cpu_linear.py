"""Linear layers of bfloat16 / float16 models on x86 CPUs, as FBGEMM-packed float16 weights.

On an x86 CPU without bfloat16 or float16 matrix instructions (no AMX, no AVX512-BF16 — every AVX2
machine and most AVX-512 ones), torch's kernels for these dtypes are slow: ``F.linear`` goes to
oneDNN's reference path (prefill: ~7x slower than FBGEMM below on the project's AVX2 machine), and
the batch-1 GEMV (``torch.mv``) converts and multiplies slower than memory delivers the weights.
FBGEMM, which ships inside torch's x86 builds, has a float16-weight GEMM (``linear_dynamic_fp16``)
that converts with F16C as it streams a weight matrix packed into its own blocked layout, and
multiplies float32 activations with float32 accumulation:

    y = x Wᵀ  with  x float32 (from the model's dtype, exact), W float16, accumulated in float32,
    rounded once to the model's dtype.

The numbers are the model's: float16 weights are used as they are; a bfloat16 weight w converts to
float16 exactly when 2⁻¹⁴ <= |w| <= 65504 (bfloat16 carries 8 significant bits, float16 11), and a
smaller one is off by at most 2⁻²⁵ (float16's subnormal step). A layer with any |w| > 65504 keeps
torch's kernels, as does everything when FBGEMM is missing (ARM, other builds) or the CPU has native
bfloat16 matrix units, where oneDNN is the faster path (:func:`fbgemm_is_the_fast_path`).

The packed weight is not a tensor: packed layers have no ``weight`` in ``state_dict()``. Pack after
loading (``Llama.build`` does, on such CPUs) and keep a model you mean to save unpacked. A tied
output projection (Llama 3.2 1B/3B) gets its own packed copy; the token embedding keeps its table.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .distributed import (
    ColumnParallelLinear,
    RowParallelLinear,
    all_reduce_sum,
    gather_last_dim,
    model_parallel_world_size,
)

__all__ = ["PackedColumnParallelLinear", "PackedRowParallelLinear", "fbgemm_available",
           "fbgemm_is_the_fast_path", "pack_linear_layers", "wants_packing"]

logger = logging.getLogger(__name__)

_PACKED_DTYPES = (torch.bfloat16, torch.float16)
_FP16_MAX = torch.finfo(torch.float16).max
# Rows packed per FBGEMM matrix: bounds the float32 staging copy FBGEMM makes of a weight while
# packing it (an 8B model's 128256-row output projection would need 2.1 GB at once).
_ROWS_PER_PACK = 16384


def fbgemm_available() -> bool:
    """Whether this torch build has FBGEMM's float16 GEMM (x86 builds do; ARM ones do not)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_prepack_fp16")


def _cpu_has_bf16_matrix_units() -> bool:
    """AMX or AVX512-BF16: oneDNN's bfloat16 kernels run natively there."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in
               ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


# Below this model width a layer's product takes a few microseconds and FBGEMM's fixed cost per call
# (float32 copy of the input, dispatch) outweighs its faster arithmetic: the tiny test shapes.
MIN_DIM = 1024


def fbgemm_is_the_fast_path(device: torch.device | str, dtype: torch.dtype, dim: int = MIN_DIM) -> bool:
    """Whether :func:`pack_linear_layers` speeds up a model of width ``dim`` in ``dtype`` on
    ``device``: bfloat16 or float16, on a CPU whose torch has FBGEMM and which lacks bfloat16
    matrix units, and not a tiny test shape (every released Llama 3 model qualifies)."""
    return (torch.device(device).type == "cpu" and dtype in _PACKED_DTYPES and dim >= MIN_DIM
            and fbgemm_available() and not _cpu_has_bf16_matrix_units())


def wants_packing(fbgemm: bool | None, device: torch.device | str, dtype: torch.dtype, dim: int) -> bool:
    """The ``fbgemm`` choice of ``Llama.build``: as asked (``True``/``False``), else (``None``)
    whether packing is the fast path (:func:`fbgemm_is_the_fast_path`). Raises ``ValueError`` for
    ``True`` where packing cannot apply (not a bfloat16/float16 model on the CPU, no FBGEMM)."""
    if fbgemm is None:
        return fbgemm_is_the_fast_path(device, dtype, dim)
    if fbgemm and (torch.device(device).type != "cpu" or dtype not in _PACKED_DTYPES):
        raise ValueError(f"fbgemm=True packs bfloat16/float16 models on the CPU; this one is {dtype} "
                         f"on {device}")
    if fbgemm and not fbgemm_available():
        raise ValueError("fbgemm=True, but this torch build has no FBGEMM (x86 builds of torch do)")
    return fbgemm


@torch.compiler.disable  # the packed weight is an opaque object torch.compile cannot trace
def _packed_linear(x: torch.Tensor, packs: list, out_features: int) -> torch.Tensor:
    """x Wᵀ for x [..., in] in the model's dtype, W given as FBGEMM packs of consecutive rows."""
    rows = x.reshape(-1, x.shape[-1]).float()
    parts = [torch.ops.quantized.linear_dynamic_fp16(rows, pack) for pack in packs]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


def _pack(weight: torch.Tensor) -> list:
    return [torch.ops.quantized.linear_prepack_fp16(rows, None)
            for rows in weight.detach().split(_ROWS_PER_PACK)]


class _Packed:
    """What the packed layers share: the packs, this rank's output width, and the bytes of the
    weight the packs replaced (what a decoding step reads, for benchmarks' rooflines)."""

    packs: list
    local_out: int
    weight_nbytes: int

    def _take(self, layer: nn.Module, local_out: int) -> None:
        self.packs = _pack(layer.weight)
        self.local_out = local_out
        self.weight_nbytes = layer.weight.numel() * layer.weight.element_size()
        # Fixed at packing time: a plain int keeps torch.compile from tracing process-group calls.
        self.world_size = model_parallel_world_size()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fbgemm float16"


class PackedColumnParallelLinear(_Packed, ColumnParallelLinear):
    """fairscale's column-parallel linear (rows of W split across ranks), W packed for FBGEMM."""

    @classmethod
    def from_float(cls, layer: ColumnParallelLinear) -> PackedColumnParallelLinear:
        with torch.device("meta"):
            new = cls(layer.in_features, layer.out_features, gather_output=layer.gather_output)
        del new.weight
        new._take(layer, layer.output_size_per_partition)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = _packed_linear(x, self.packs, self.local_out)
        if self.world_size == 1 or not self.gather_output:
            return y
        return gather_last_dim(y)


class PackedRowParallelLinear(_Packed, RowParallelLinear):
    """fairscale's row-parallel linear (columns of W split across ranks, partial sums all-reduced),
    W packed for FBGEMM."""

    @classmethod
    def from_float(cls, layer: RowParallelLinear) -> PackedRowParallelLinear:
        with torch.device("meta"):
            new = cls(layer.in_features, layer.out_features)
        del new.weight
        new._take(layer, layer.out_features)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = _packed_linear(x, self.packs, self.local_out)
        if self.world_size == 1:
            return y
        return all_reduce_sum(y)


@torch.no_grad()
def pack_linear_layers(model: nn.Module) -> int:
    """Replace, in place, every bfloat16/float16 model-parallel linear layer of ``model`` on the CPU
    (wq, wk, wv, wo, w1, w2, w3, output) by its FBGEMM-packed twin; returns how many were packed.

    A layer with a weight outside float16's range (|w| > 65504) is left as it is (logged). Raises
    ``RuntimeError`` if this torch has no FBGEMM (see :func:`fbgemm_is_the_fast_path`).
    """
    if not fbgemm_available():
        raise RuntimeError("this torch build has no FBGEMM (x86 builds do): keep torch's kernels")
    start = time.perf_counter()
    names = [name for name, module in model.named_modules()
             if type(module) in (ColumnParallelLinear, RowParallelLinear)
             and module.weight.device.type == "cpu" and module.weight.dtype in _PACKED_DTYPES]
    packed = 0
    for name in names:  # one layer at a time: its weight is freed before the next is packed
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        low, high = torch.aminmax(module.weight.detach()) if module.weight.numel() else (0.0, 0.0)
        largest = max(-float(low), float(high))
        if largest > _FP16_MAX:
            logger.warning(f"{name}: |weight| reaches {largest:.4g}, beyond float16's {_FP16_MAX:.0f}; "
                           "this layer keeps torch's kernels")
            continue
        if isinstance(module, ColumnParallelLinear):
            setattr(parent, child, PackedColumnParallelLinear.from_float(module))
        else:
            setattr(parent, child, PackedRowParallelLinear.from_float(module))
        del module
        packed += 1
    if packed:
        seconds = time.perf_counter() - start
        logger.info(f"Packed {packed} linear layers as float16 for FBGEMM in {seconds:.1f} s (CPU without "
                    "bfloat16 matrix units: FBGEMM's kernels are the fast path)")
    return packed
