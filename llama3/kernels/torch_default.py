"""torch's own kernel: ``F.linear`` on the float weight (cuBLAS on CUDA, oneDNN / MKL on the CPU)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from .base import LinearKernel

__all__ = ["TorchKernel"]


class TorchKernel(LinearKernel):
    """The layers as built: nothing to swap."""

    name: ClassVar[str] = "torch"

    @classmethod
    def from_float(cls, layer: nn.Module, **settings: Any) -> nn.Module:
        return layer
