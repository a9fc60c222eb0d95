"""One layer, two kernels: the decode phase's and the prefill phase's, chosen apart by measurement.

Which kernel computes ``y = x Wᵀ`` fastest differs between one row (a decoding step: bound by how
fast the weight streams) and many rows (a prefill: bound by arithmetic), measured so on the CPU
classes this project ran on (:mod:`llama3.kernels.autotune`). :func:`phase_kernel` combines two
kernel families into one: rows up to :data:`DECODE_ROWS` go to the decode kernel, more to the
prefill kernel. Each keeps its own weight layout, except that a family computing from the float
weight (torch, cpu-gemv) uses the layer's one float ``weight`` Parameter, and two families naming
the same ``layout_name`` (one subclassing the other: "int4" and "int4-dequant") share one layer
object holding that layout once; the bytes of the layouts held are what the fit check counts
(:meth:`PhaseKernel.nbytes_for`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .base import LinearKernel, swap_linear

__all__ = ["DECODE_ROWS", "PhaseKernel", "phase_kernel", "shares_layout"]

# Products of at most this many rows are decoding steps (one row per sequence of a batch): the
# weight-streaming regime the decode kernel was measured in.
DECODE_ROWS = 8


def shares_layout(a: type[LinearKernel], b: type[LinearKernel]) -> bool:
    """Whether kernels ``a`` and ``b`` compute from one weight layout, held once: the same
    ``layout_name``, one a subclass of the other (so one layer object serves both)."""
    name = getattr(a, "layout_name", None)
    return name is not None and name == getattr(b, "layout_name", None) and (
        issubclass(a, b) or issubclass(b, a))


class PhaseKernel(LinearKernel):
    """Base of the classes :func:`phase_kernel` makes; ``kernels`` = (decode kernel, prefill kernel)."""

    name: ClassVar[str] = "phases"
    kernels: ClassVar[tuple[type[LinearKernel], type[LinearKernel]]] = (LinearKernel, LinearKernel)
    _parts: tuple[nn.Module | None, nn.Module | None]

    @classmethod
    def applies(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> bool:
        return all(k.applies(layer, device, dtype) for k in cls.kernels)

    @classmethod
    def refusal(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> str:
        return next((r for k in cls.kernels if (r := k.refusal(layer, device, dtype))), "")

    @classmethod
    def nbytes_for(cls, out_features: int, in_features: int, dtype: torch.dtype, **settings: Any) -> int:
        """Both layouts; the float weight once when both families compute from it."""
        if shares_layout(*cls.kernels):
            return cls.kernels[0].nbytes_for(out_features, in_features, dtype, **settings)
        own = sum(k.nbytes_for(out_features, in_features, dtype) for k in cls.kernels
                  if not k.shares_float_weight)
        shared = LinearKernel.nbytes_for(out_features, in_features, dtype) if cls.shares_float_weight else 0
        return own + shared

    @classmethod
    def from_float(cls, layer: nn.Module, **settings: Any) -> Any:
        new = cls.blank(layer)
        if cls.shares_float_weight:
            new.weight = layer.weight
        # A tuple, not submodules: the converted layouts stay out of state_dict (never saved), and a
        # float-weight family computes from ``new.weight`` itself (None here).
        if shares_layout(*cls.kernels):  # one layer object, of the subclass: it serves both kernels
            derived = max(cls.kernels, key=lambda k: len(k.__mro__))
            part = swap_linear(layer, derived, **settings)
            new._parts = (part, part)
            return new
        new._parts = tuple(None if k.shares_float_weight else swap_linear(layer, k, **settings)
                           for k in cls.kernels)
        return new

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        phase = 0 if x.numel() <= DECODE_ROWS * x.shape[-1] else 1
        part = self._parts[phase]
        # The phase's kernel's own product, on the part holding its layout (itself for a float weight).
        return self.kernels[phase].local_product(self if part is None else part, x)

    def weight_nbytes(self) -> int:
        """Bytes a decoding step reads: the decode kernel's layout."""
        part = self._parts[0]
        return super().weight_nbytes() if part is None else part.weight_nbytes()

    def held_nbytes(self) -> int:
        """Bytes both layouts hold (the float weight once): what :meth:`nbytes_for` predicts."""
        parts = {id(p): p for p in self._parts if p is not None}.values()  # a shared layout once
        own = sum(part.weight_nbytes() for part in parts)
        return own + (super().weight_nbytes() if self.shares_float_weight else 0)


_MADE: dict[tuple[type, type], type[PhaseKernel]] = {}


def phase_kernel(decode: type[LinearKernel], prefill: type[LinearKernel]) -> type[LinearKernel]:
    """The kernel family computing decoding steps with ``decode`` and prefills with ``prefill``
    (``decode`` itself when they are the same)."""
    if decode is prefill or (decode.phases()[1] == prefill.name and prefill.phases() == (prefill.name,) * 2):
        return decode  # e.g. cpu-gemv, whose many-row products are torch's already
    if (decode, prefill) not in _MADE:
        _MADE[decode, prefill] = type(
            f"{decode.__name__}And{prefill.__name__}", (PhaseKernel,),
            {"name": f"{decode.name}+{prefill.name}", "kernels": (decode, prefill),
             "decode": decode.phases()[0], "prefill": prefill.phases()[1],
             "shares_float_weight": decode.shares_float_weight or prefill.shares_float_weight,
             "__module__": __name__})
    return _MADE[decode, prefill]
