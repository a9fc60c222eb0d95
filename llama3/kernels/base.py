"""The linear-layer kernel seam: a kernel family overrides a layer's local product and weight.

A model-parallel linear layer (:mod:`llama3.distributed`) is ``communicate(local_product(x))``;
the communication is written once there. A kernel family is a :class:`LinearKernel` subclass that
changes only the arithmetic (``local_product``) and how the weight is held (float, packed, int8...).
:func:`swap_linear` combines a kernel with the layer's parallel role (column or row), kernel first
in the MRO, so the swapped layer inherits the communication unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ..distributed import ColumnParallelLinear, RowParallelLinear

__all__ = ["LinearKernel", "ParallelLinear", "empty_linear", "is_linear", "kernel_of", "swap_linear",
           "swap_linears"]

logger = logging.getLogger(__name__)

ParallelLinear = ColumnParallelLinear | RowParallelLinear


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a model-parallel linear layer (swapped or not)."""
    return isinstance(module, (ColumnParallelLinear, RowParallelLinear))


class LinearKernel:
    """Mixin of a linear-layer kernel family; subclass it and override what differs.

    The defaults describe torch's own kernel: ``F.linear`` on the float weight, kept as the
    layer's ``weight`` Parameter (so a tied output projection still shares the embedding's table).
    """

    name: ClassVar[str] = "torch"
    # What computes a decoding step (one row) and a prefill (many rows): a kernel may route by phase.
    decode: ClassVar[str | None] = None  # None: this kernel's name
    prefill: ClassVar[str | None] = None
    # True when the swapped layer keeps ``weight`` as the float Parameter it was given (no copy).
    shares_float_weight: ClassVar[bool] = True

    @classmethod
    def applies(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> bool:
        """Can this family serve ``layer`` (None: any layer of a model) on ``device`` in ``dtype``?"""
        return True

    @classmethod
    def refusal(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> str:
        """Why :meth:`applies` is False, for the user (empty when it applies)."""
        return "" if cls.applies(layer, device, dtype) else f"{cls.name} cannot run {dtype} on {device}"

    @classmethod
    def nbytes_for(cls, out_features: int, in_features: int, dtype: torch.dtype) -> int:
        """Bytes a weight of that shape takes in this kernel's format (for the fit check)."""
        return out_features * in_features * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def blank(cls, layer: nn.Module) -> Any:
        """An instance of ``cls`` (a swapped class) with ``layer``'s shape and role, built on the meta
        device, without a weight."""
        with torch.device("meta"):
            if isinstance(layer, ColumnParallelLinear):
                new = cls(layer.in_features, layer.out_features, gather_output=layer.gather_output)
            else:
                new = cls(layer.in_features, layer.out_features)
        del new.weight
        return new

    @classmethod
    def from_float(cls, layer: nn.Module, **settings: Any) -> Any:
        """The swapped layer computing what ``layer`` does; the default keeps the float weight."""
        new = cls.blank(layer)
        new.weight = layer.weight
        return new

    @classmethod
    def empty(cls, layer: nn.Module, **settings: Any) -> Any:
        """The swapped layer on the meta device with this format's buffers, for loading a checkpoint
        that ships them already converted (then assign the state dict)."""
        new = cls.blank(layer)
        with torch.device("meta"):
            new.weight = nn.Parameter(torch.empty_like(layer.weight, device="meta"))
        return new

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_local] → [..., out_local] in x's dtype."""
        return torch.nn.functional.linear(x, self.weight)

    def weight_nbytes(self) -> int:
        """Bytes a decoding step reads for this layer's weight (memory accounting, rooflines)."""
        return sum(t.numel() * t.element_size() for t in self._weight_tensors())

    def _weight_tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, "weight", None), getattr(self, "scale", None))
                if isinstance(t, torch.Tensor)]

    @classmethod
    def phases(cls) -> tuple[str, str]:
        """(decode kernel, prefill kernel) names."""
        return cls.decode or cls.name, cls.prefill or cls.name


_VARIANTS: dict[tuple[type, type], type] = {}


def _variant(kernel_cls: type[LinearKernel], role: type) -> type:
    """``kernel_cls`` combined with a parallel role, kernel first in the MRO (cached)."""
    key = (kernel_cls, role)
    if key not in _VARIANTS:
        suffix = "ColumnParallelLinear" if role is ColumnParallelLinear else "RowParallelLinear"
        _VARIANTS[key] = type(f"{kernel_cls.__name__}{suffix}", (kernel_cls, role),
                              {"__module__": kernel_cls.__module__})
    return _VARIANTS[key]


def _role(layer: nn.Module) -> type:
    if isinstance(layer, ColumnParallelLinear):
        return ColumnParallelLinear
    if isinstance(layer, RowParallelLinear):
        return RowParallelLinear
    raise TypeError(f"{type(layer).__name__} is not a model-parallel linear layer")


def swap_linear(layer: nn.Module, kernel_cls: type[LinearKernel], **settings: Any) -> nn.Module:
    """``layer`` (a float Column/RowParallelLinear) as a ``kernel_cls`` layer of the same role."""
    return _variant(kernel_cls, _role(layer)).from_float(layer, **settings)


def empty_linear(layer: nn.Module, kernel_cls: type[LinearKernel], **settings: Any) -> nn.Module:
    """``layer``'s ``kernel_cls`` twin on the meta device, with the buffers of that kernel's format
    (:meth:`LinearKernel.empty`): assign a checkpoint that ships them already converted."""
    return _variant(kernel_cls, _role(layer)).empty(layer, **settings)


def kernel_of(layer: nn.Module) -> type[LinearKernel]:
    """The kernel family computing ``layer`` (torch's default for an unswapped layer)."""
    for cls in type(layer).__mro__:
        if issubclass(cls, LinearKernel) and cls is not LinearKernel and not is_linear_class(cls):
            return cls
    return LinearKernel


def is_linear_class(cls: type) -> bool:
    return issubclass(cls, (ColumnParallelLinear, RowParallelLinear))


@torch.no_grad()
def swap_linears(model: nn.Module, kernel_cls: type[LinearKernel],
                 select: Callable[[str, nn.Module], bool] | None = None, *, empty: bool = False,
                 **settings: Any) -> int:
    """Swap, in place, every float model-parallel linear layer of ``model`` that ``select(name,
    layer)`` accepts (default: all) to ``kernel_cls``; returns how many were swapped.

    One layer at a time, so each float weight is freed before the next is converted. A layer the
    kernel does not apply to (:meth:`LinearKernel.applies`) keeps torch's kernel, logged.
    ``empty``: build the kernel's buffers on the meta device instead of converting (a model built
    on the meta device, about to be assigned a checkpoint quantized ahead of time).
    """
    names = [name for name, module in model.named_modules()
             if type(module) in (ColumnParallelLinear, RowParallelLinear)
             and (select is None or select(name, module))]
    swapped = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        device, dtype = module.weight.device, module.weight.dtype
        if not kernel_cls.applies(module, device, dtype):
            logger.warning("%s: %s; this layer keeps torch's kernels", name,
                           kernel_cls.refusal(module, device, dtype))
            continue
        swap = empty_linear if empty else swap_linear
        setattr(parent, child, swap(module, kernel_cls, **settings))
        del module
        swapped += 1
    return swapped
