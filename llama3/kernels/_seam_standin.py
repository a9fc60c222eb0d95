"""TEMP stand-in for the kernel seam (``llama3/kernels/base.py``, being built on another branch).

Delete this module when the seam is merged: ``fp8.py`` and ``int4.py`` then import ``LinearKernel``
from ``llama3.kernels.base`` instead (one line each). It holds only what the quantized kernels need
to be built and tested before the seam exists:

* :class:`LinearKernel`, the contract's mixin (``name``, ``applies``, ``from_float``, ``empty``,
  ``local_product``, ``weight_nbytes``), with no behaviour of its own;
* :func:`shell`, a new, empty layer of a kernel class that keeps the float layer's plain attributes
  (in/out features, its model-parallel role and sizes) and none of its tensors;
* :func:`swap_layers`, the seam's ``swap_linears`` for the tests (a combined class whose forward is
  ``local_product`` + the layer's communication).

Wiring once the seam is merged (phase 2):

1. ``fp8.py`` / ``int4.py``: import ``LinearKernel`` from ``.base``; keep :func:`shell` (move it to
   base.py) or use the seam's equivalent in ``empty`` / ``from_float``; delete this module and
   replace ``swap_layers`` in tests/_quantized_mp_worker.py and the tests by the seam's
   ``swap_linears(model, kernel_cls, select=...)`` (``empty=True`` -> the seam's meta-device path).
2. Chooser table: "fp8-rowwise" -> ``Fp8RowwiseLinear`` (settings ``activation_scale_ub``),
   "int4" -> ``Int4WeightOnlyLinear`` (``group_size``, default 128), "int4-int8act" ->
   ``Int8DynActInt4Linear`` (``group_size``, ``lora_rank``, ``lora_scale``, ``dtype``).
   ``choose_kernels(..., quantize="fp8")``: Meta's selection ``fp8.meta_fp8_layers(n_layers)``,
   the rest as without quantize; ``quantize="int4"``: every block linear
   (``checkpoint.quantized.block_linears``), output and embedding left as they are.
3. ``checkpoint.load_model``: after ``inspect_checkpoint``, ``fmt = detect_quantization(info)``;
   when not None: build the Transformer on meta, swap ``fmt.quantized_layers(args)`` to the
   kernel named ``fmt.kernel`` with ``empty(**fmt.kernel_settings(dtype))``, then
   ``load_state_dict(read_quantized_rank(info, args, fmt, rank, world, dtype=, device=),
   assign=True, strict=True)`` instead of ``load_rank_state_dict`` (tests/_quantized_mp_worker.py
   ``build_quantized`` is exactly this). ``quantize=`` given for a quantized checkpoint: refuse.
4. ``memory.check_fits_device``: weights from ``checkpoint.quantized.weight_bytes_per_rank(args,
   scheme, world)``; append ``fit_note(args, world, free)`` to NotEnoughMemoryError's message.
5. ``convert_checkpoint(..., to="meta", num_shards=N)`` of an fp8_mixed source:
   ``reshard_fp8_mixed(info, args, dst, N)``; any other quantized source: refuse by name.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["LinearKernel", "shell"]


class LinearKernel:
    """A family of linear-layer kernels: mixed in before a Column/RowParallelLinear class."""

    name: ClassVar[str]

    @classmethod
    def applies(cls, layer: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this family can serve ``layer`` on ``device`` in ``dtype``."""
        raise NotImplementedError

    @classmethod
    def from_float(cls, layer: nn.Module, **settings: Any) -> nn.Module:
        """The swapped layer, its weight converted from ``layer``'s float weight."""
        raise NotImplementedError

    @classmethod
    def empty(cls, layer: nn.Module, **settings: Any) -> nn.Module:
        """The swapped layer with uninitialised buffers of a checkpoint's shapes (meta device)."""
        raise NotImplementedError

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_local] -> [..., out_local]`` in x's dtype, before any communication."""
        raise NotImplementedError

    def weight_nbytes(self) -> int:
        """Bytes a decoding step reads for this layer's weights (scales included)."""
        raise NotImplementedError


def shell(cls: type, layer: nn.Module) -> Any:
    """A new ``cls`` module carrying ``layer``'s plain attributes but none of its tensors.

    The Column/Row constructors differ (``gather_output``, world size read from the process
    group); copying the attributes keeps exactly the layer's model-parallel role without calling
    them, so a kernel can be swapped in on any rank, and on the meta device.
    """
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key, value in vars(layer).items():
        if not key.startswith("_") and not isinstance(value, (torch.Tensor, nn.Module)):
            setattr(new, key, value)
    new.train(layer.training)
    return new


def _combined(kernel_cls: type, layer_cls: type) -> type:
    """``kernel_cls`` mixed in before ``layer_cls`` with the seam's forward: the local product,
    then the model-parallel communication of the layer's role (TEMP: the seam writes it once)."""
    from ..distributed import ColumnParallelLinear, RowParallelLinear, all_reduce_sum, gather_last_dim

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        y = self.local_product(x)
        if isinstance(self, ColumnParallelLinear):
            split = self.output_size_per_partition != self.out_features
            return gather_last_dim(y) if split and self.gather_output else y
        if isinstance(self, RowParallelLinear) and self.input_size_per_partition != self.in_features:
            return all_reduce_sum(y)
        return y

    name = f"{kernel_cls.__name__}{layer_cls.__name__}"
    return type(name, (kernel_cls, layer_cls), {"forward": forward, "__module__": __name__})


def swap_layers(model: nn.Module, names: list[str], kernel_cls: type, *, empty: bool = False,
                **settings: Any) -> nn.Module:
    """Replace each named linear layer of ``model`` by ``kernel_cls`` (``from_float`` of its weight,
    or ``empty`` buffers on the meta device to assign a checkpoint's tensors into), in place."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        cls = _combined(kernel_cls, type(layer))
        setattr(parent, child, cls.empty(layer, **settings) if empty else cls.from_float(layer, **settings))
    return model
