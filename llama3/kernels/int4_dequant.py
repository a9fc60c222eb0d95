"""int4 prefill on the CPU: dequantize the packed int4 weight chunk by chunk, then torch's matmul.

A prefill multiplies hundreds of rows by each weight, so it is bound by arithmetic, and torch's int4
kernel (``_weight_int4pack_mm_for_cpu``, :mod:`llama3.kernels.int4`) converts every weight again
for every few rows. Here each chunk of ``CHUNK_WEIGHTS`` weights is dequantized once to the
activations' dtype and multiplied by all rows through ``F.linear`` (oneDNN, AMX with bfloat16 on
CPUs that have it); the conversion is amortized over the rows. The chunk is freed right after: the
layer holds only its int4 weight, the very buffers the decode kernel "int4" reads (kernel family
"int4-dequant" is a subclass of it, and :func:`~llama3.kernels.phases.phase_kernel` shares one
layout between them).

The packed layout is the one ``torch._convert_weight_to_int4pack_for_cpu`` makes for this CPU:
rows in blocks of ``block`` (64 on AVX-512 for widths it divides, else 32 or 16), and per block and
input column ``block / 2`` bytes holding two rows each, either the block's first and second half
("halves") or neighbouring rows ("pairs"). Which one is found per layer at load by unpacking and
comparing with the quantized values (:func:`packed_layout`); a layer whose layout is none of these
is computed by the "int4" kernel instead.

The dequantization of a chunk is one small function compiled by inductor once per chunk shape
(``torch.compile(fullgraph=True, dynamic=False)``; inductor's FX graph cache keeps it across
processes; the compile time is logged). Where compiling is impossible (no C++ compiler) it runs
eagerly, logged once: the same values, slower.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .int4 import Int4WeightOnlyLinear

__all__ = ["CHUNK_WEIGHTS", "LAYOUTS", "Int4DequantLinear", "dequantize_packed", "int4_dequant_linear",
           "packed_layout", "unpack_int4_cpu"]

logger = logging.getLogger(__name__)

# Weights dequantized at a time: 4 Mi weights (8 MB in bfloat16) stays in a core's L2 + L3 share
# while torch's matmul reads it, and bounds the transient memory.
CHUNK_WEIGHTS = 4 * 1024 * 1024
# The layouts torch's CPU packing produced on the capabilities tried (AVX-512, AVX2, default).
LAYOUTS: tuple[tuple[int, str], ...] = ((64, "halves"), (32, "halves"), (32, "pairs"), (16, "pairs"),
                                        (64, "pairs"), (16, "halves"))


def _unpack(packed: torch.Tensor, block: int, order: str) -> torch.Tensor:
    """uint8 values 0..15 [n, k] from ``packed`` [n, k / 2] in layout (block, order)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    v = packed.view(n // block, k, block // 2)
    lo, hi = v & 15, v >> 4
    q = torch.cat([lo, hi], -1) if order == "halves" else torch.stack([lo, hi], -1).view(n // block, k, block)
    return q.permute(0, 2, 1).reshape(n, k)


def unpack_int4_cpu(packed: torch.Tensor, layout: tuple[int, str]) -> torch.Tensor:
    """The int4 values (uint8, 0..15, [n, k]) of a weight packed for this CPU in ``layout``."""
    return _unpack(packed, *layout)


@torch.no_grad()
def packed_layout(packed: torch.Tensor, q: torch.Tensor) -> tuple[int, str] | None:
    """The layout (of :data:`LAYOUTS`) in which ``packed`` holds ``q`` [n, k], or None."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] * 2 != q.shape[1]:
        return None
    for block, order in LAYOUTS:
        if q.shape[0] % block == 0 and torch.equal(_unpack(packed, block, order), q.to(torch.uint8)):
            return block, order
    return None


def _dequantize(packed: torch.Tensor, sz: torch.Tensor, block: int, halves: bool, group_size: int,
                dtype: torch.dtype) -> torch.Tensor:
    # Written for inductor: one fused loop from the packed bytes to the weight in ``dtype``.
    n, k = packed.shape[0], packed.shape[1] * 2
    v = packed.view(n // block, k, block // 2)
    lo, hi = v & 15, v >> 4
    q = torch.cat([lo, hi], -1) if halves else torch.stack([lo, hi], -1).view(n // block, k, block)
    q = q.permute(0, 2, 1).reshape(n, k // group_size, group_size).to(torch.float32)
    scales, zeros = sz[..., 0].t().float(), sz[..., 1].t().float()
    w = (q - 8) * scales[..., None] + zeros[..., None]
    return w.reshape(n, k).to(dtype)


_COMPILED: dict[tuple, Callable[..., torch.Tensor]] = {}
_COMPILED_ONCE: set[tuple] = set()  # shapes whose compile time was logged
_EAGER_REASON: list[str] = []  # why compiling failed (once per process): the eager fallback is in use


def _dequantizer(key: tuple) -> Callable[..., torch.Tensor]:
    """``_dequantize`` compiled for one chunk shape (``key``), or eager where compiling failed."""
    if _EAGER_REASON:
        return _dequantize
    fn = _COMPILED.get(key)
    if fn is None:
        # A code object of its own per chunk shape: dynamo keeps its compiled entries per code object
        # with a recompile limit; each shape compiles once and is never guarded against the others.
        code = _dequantize.__code__.replace()
        fresh = types.FunctionType(code, _dequantize.__globals__, "_dequantize")
        fn = _COMPILED[key] = torch.compile(fresh, fullgraph=True, dynamic=False)
    return fn


def dequantize_packed(packed: torch.Tensor, sz: torch.Tensor, layout: tuple[int, str], group_size: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """The weight [n, k] in ``dtype`` of an int4 weight packed for this CPU (``sz``: [k / group_size,
    n, 2] scale and offset; see :mod:`llama3.kernels.int4`), through the compiled dequantizer."""
    block, order = layout
    # bfloat16 scale and offset, as the "int4" kernel reads them (and holds them): both phases compute
    # one weight. Rounded here, outside compiled code: inductor drops a float -> bfloat16 -> float trip.
    sz = sz.to(torch.bfloat16)
    args = (packed, sz, block, order == "halves", group_size, dtype)
    key = (tuple(packed.shape), sz.dtype, block, order, group_size, dtype)
    fn = _dequantizer(key)
    if fn is _dequantize:
        return _dequantize(*args)
    first = key not in _COMPILED_ONCE
    start = time.perf_counter()
    try:
        w = fn(*args)
    except Exception as e:  # noqa: BLE001 -- inductor raises many types (no compiler, build errors)
        _EAGER_REASON.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        logger.warning("int4-dequant: cannot compile the int4 dequantizer (%s); dequantizing eagerly "
                       "(same values, slower prefill)", _EAGER_REASON[0])
        return _dequantize(*args)
    if first:
        _COMPILED_ONCE.add(key)
        logger.info("int4-dequant: compiled the dequantizer for a %dx%d chunk in %.2f s (inductor's "
                    "cache keeps it for the next process)", packed.shape[0], packed.shape[1] * 2,
                    time.perf_counter() - start)
    return w


def _chunk_rows(n: int, k: int, block: int) -> int:
    rows = max(block, CHUNK_WEIGHTS // k // block * block)
    return min(n, rows)


def int4_dequant_linear(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, layout: tuple[int, str],
                        group_size: int) -> torch.Tensor:
    """``x Wᵀ`` in x's dtype, the int4 weight dequantized to x's dtype chunk by chunk (see module doc)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    x2 = x.reshape(-1, k)
    rows = _chunk_rows(n, k, layout[0])
    parts = [F.linear(x2, dequantize_packed(packed[i:i + rows], sz[:, i:i + rows], layout, group_size,
                                            x.dtype)) for i in range(0, n, rows)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return y.view(*x.shape[:-1], n)


@torch.library.custom_op("llama3::int4_dequant_linear", mutates_args=())
def _int4_dequant_op(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, block: int, order: str,
                     group_size: int) -> torch.Tensor:
    """The prefill product behind an opaque op: a compiled model runs this very code (measured)."""
    return int4_dequant_linear(x, packed, sz, (block, order), group_size)


@_int4_dequant_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, block: int, order: str,
      group_size: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])


class Int4DequantLinear(Int4WeightOnlyLinear):
    """Kernel family "int4-dequant": the "int4" layer's packed weight, dequantized to the activations'
    dtype chunk by chunk and multiplied by torch (many rows: prefill). ``layout``: the packed layout
    found at load (None: this layer computes with the "int4" kernel)."""

    name: ClassVar[str] = "int4-dequant"
    layout: tuple[int, str] | None

    @classmethod
    def applies(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> bool:
        """The CPU (where the weight is packed by ``_convert_weight_to_int4pack_for_cpu``), inputs in
        multiples of 32 and outputs in multiples of 16 (the smallest packing block)."""
        if torch.device(device).type != "cpu" or not super().applies(layer, device, dtype):
            return False
        return layer is None or layer.weight.shape[0] % min(block for block, _ in LAYOUTS) == 0

    @classmethod
    def refusal(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> str:
        return "" if cls.applies(layer, device, dtype) else (
            f"int4-dequant runs on the CPU, with inputs in multiples of 32 and outputs in multiples of 16; "
            f"this is {dtype} on {device}{'' if layer is None else f', {tuple(layer.weight.shape)}'}")

    def _packed_from(self, q: torch.Tensor) -> None:
        """Find the packed layout by unpacking and comparing with the int4 values ``q``."""
        self.layout = packed_layout(self.weight, q) if self.weight.device.type == "cpu" else None
        if self.layout is None:
            logger.warning("int4-dequant: unknown int4 packing for a %dx%d weight on this CPU; this layer "
                           "keeps the int4 kernel for prefill too", self.local_out, self.local_in)

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's ``x Wᵀ`` in x's dtype."""
        layout = getattr(self, "layout", None)
        if layout is None:
            return super().local_product(x)
        return _int4_dequant_op(x, self.weight, self.scales_and_zeros, layout[0], layout[1], self.group_size)
