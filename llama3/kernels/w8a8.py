"""``quantize="w8a8"``: int8 weights and int8 dynamic activations, multiplied int8 by int8 on the CPU.

Weight-only int8 (``quantize="int8"``) converts every weight to float before multiplying, which
two CPU cores cannot do as fast as memory delivers the bytes. llama.cpp's Q8_0 instead quantizes
the activation row too and multiplies int8 by int8 (VNNI / AMX-INT8 do 4 such products per lane
per instruction). This module does the same with kernels that ship inside torch:

    weight, per output channel c (symmetric):  s_c = max_k |W_ck| / 127,  q_ck = round(W_ck / s_c)
    activation, per row r (symmetric, dynamic): t_r = max_k |x_rk| / 127,  a_rk = round(x_rk / t_r)
    y_rc = t_r · s_c · Σ_k a_rk q_ck      (the sum exact in int32, the scaling in float32,
                                           rounded once to x's dtype)

One scale per activation row, not per block of 32 as Q8_0: torch's int8 kernels take one scale for
the whole activation matrix (oneDNN) or none (``_int_mm``), so the per-row scale is applied to the
int32 result. That is coarser than Q8_0 for rows with outlier channels: opt-in, the speed mode.

Two kernels compute Σ a q (``kernel=``):

* ``"onednn"``: ``onednn.qlinear_pointwise`` with uint8 activations ``a + 128`` and zero point
  128 (oneDNN's fast int8 path wants unsigned activations; signed ones measured 10-100x slower),
  on a weight packed by ``onednn.qlinear_prepack`` (an opaque oneDNN tensor, not in ``state_dict``);
* ``"int_mm"``: ``torch._int_mm`` (int8 x int8 -> int32) on the plain int8 weight, wherever torch
  runs; slow for one row on the CPUs measured, fine for prefill.

Which is faster is measured, not assumed (:mod:`llama3.kernels.autotune`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import LlamaError
from .base import LinearKernel
from .opaque import opaque_product, register_product

__all__ = ["KERNELS", "W8A8IntMmKernel", "W8A8Kernel", "W8A8Linear", "W8A8Weight", "W8A8Error",
           "onednn_available", "quantize_rows", "quantize_weight", "w8a8_reference"]

KERNELS = ("onednn", "int_mm")
_TINY = torch.finfo(torch.float32).tiny


class W8A8Error(LlamaError, ValueError):
    """A w8a8 layer was asked for something it cannot do (unknown kernel, unavailable kernel)."""


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's quantized linear (x86 builds with oneDNN do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


@torch.no_grad()
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (q int8 [out, in], scale float32 [out]), W ≈ q · scale."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=_TINY)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of x [rows, in]: (a int8 [rows, in], scale float32 [rows])."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1) / 127.0).clamp(min=_TINY)
    a = torch.round(xf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return a, scale


def w8a8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The module's formula in float64, from float x [..., in] (an oracle for tests): the row
    quantization and the products done in float64 arithmetic, no int8 kernel involved."""
    xd = x.double().reshape(-1, x.shape[-1])
    t = (xd.abs().amax(dim=1) / 127.0).clamp(min=_TINY)
    a = torch.round(xd / t[:, None]).clamp(-127, 127)
    y = (a @ q.double().T) * t[:, None] * scale.double()[None, :]
    return y.view(*x.shape[:-1], q.shape[0])


class W8A8Weight:
    """One linear layer's int8 weight in the layout of one kernel, and its product.

    Not an ``nn.Module``: the oneDNN layout is an opaque tensor that cannot be saved or moved, so
    a layer holding it is built from float weights at load time (as FBGEMM packs are)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, kernel: str) -> None:
        if kernel not in KERNELS:
            raise W8A8Error(f"unknown w8a8 kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        if kernel == "onednn" and not onednn_available():
            raise W8A8Error("the w8a8 kernel 'onednn' needs a torch build with oneDNN (x86 builds "
                            "have it); use kernel='int_mm'")
        self.kernel = kernel
        self.out_features, self.in_features = q.shape
        self.scale = scale.float().contiguous()
        if kernel == "onednn":
            # Packed for a one-row input: decoding is the phase whose speed is bound by the weight.
            self.packed = torch.ops.onednn.qlinear_prepack(q.contiguous(), [1, self.in_features])
            self._zeros = torch.zeros(self.out_features, dtype=torch.long)
            self.q_t = None
        else:
            self.packed = None
            self.q_t = q.t()  # [in, out] view of the row-major weight: _int_mm's fast layout
        self.nbytes = q.numel() + self.scale.nbytes

    @classmethod
    def from_float(cls, weight: torch.Tensor, kernel: str = "onednn") -> W8A8Weight:
        """Quantize a float weight [out, in] (:func:`quantize_weight`) into ``kernel``'s layout."""
        q, scale = quantize_weight(weight)
        return cls(q, scale, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] float -> [..., out] in x's dtype (see the module's formula)."""
        rows = x.reshape(-1, self.in_features)
        a, t = quantize_rows(rows)
        if self.kernel == "onednn":
            # a + 128 as uint8 (the sign bit flipped) with zero point 128 is exactly a; s_c is
            # applied inside the kernel, t_r after it.
            y = torch.ops.onednn.qlinear_pointwise(
                a.view(torch.uint8).bitwise_xor(0x80), 1.0, 128, self.packed, self.scale, self._zeros,
                None, 1.0, 0, torch.float32, "none", [], "")
            y = y * t[:, None]
        else:
            y = torch._int_mm(a, self.q_t).float() * (t[:, None] * self.scale[None, :])
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    __call__ = forward


class W8A8Kernel(LinearKernel):
    """The w8a8 linear-layer family (``quantize="w8a8"``), oneDNN's kernel on a weight packed for
    one-row products; :class:`W8A8IntMmKernel` is the same numbers through ``torch._int_mm``.

    ``from_float`` quantizes the layer's float weight at load (the packed layout is opaque: it is
    never in ``state_dict`` and never saved); ``local_product`` replaces ``F.linear``."""

    name: ClassVar[str] = "w8a8"
    kernel: ClassVar[str] = "onednn"
    shares_float_weight: ClassVar[bool] = False
    w8a8: W8A8Weight
    _handle: int

    @classmethod
    def applies(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> bool:
        """CPU, floating-point models (the int8 kernels here are CPU kernels)."""
        return not cls.refusal(layer, device, dtype)

    @classmethod
    def refusal(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> str:
        if torch.device(device).type != "cpu" or not dtype.is_floating_point:
            return f"{cls.name} computes floating-point models on the CPU; this one is {dtype} on {device}"
        if cls.kernel == "onednn" and not onednn_available():
            return f"{cls.name} needs a torch build with oneDNN (x86 builds have it); use w8a8-int_mm"
        return ""

    @classmethod
    def nbytes_for(cls, out_features: int, in_features: int, dtype: torch.dtype) -> int:
        """int8 weight plus one float32 scale per output channel."""
        return out_features * in_features + 4 * out_features

    @classmethod
    def from_float(cls, layer: nn.Module, **settings: Any) -> Any:
        """The swapped layer: ``layer``'s shape and parallel role, its weight quantized."""
        new = cls.blank(layer)
        new.w8a8 = W8A8Weight.from_float(layer.weight.detach(), kernel=cls.kernel)
        # A compiled step calls the product through an opaque op (oneDNN's packed weight is not traceable).
        new._handle = register_product(new, new.w8a8.forward)
        return new

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_local] -> [..., out_local] in x's dtype."""
        if torch.compiler.is_compiling():
            return opaque_product(x, self._handle, self.w8a8.out_features)
        return self.w8a8.forward(x)

    def weight_nbytes(self) -> int:
        """Bytes one decoding step reads: the int8 weight and its scales."""
        return self.w8a8.nbytes

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8 {self.kernel}"


class W8A8IntMmKernel(W8A8Kernel):
    """w8a8 through ``torch._int_mm`` on the plain int8 weight (wherever oneDNN's is missing or slower)."""

    name: ClassVar[str] = "w8a8-int_mm"
    kernel: ClassVar[str] = "int_mm"


class W8A8Linear(nn.Module):
    """A plain (single-process) w8a8 linear layer, for use and tests without the kernel seam."""

    def __init__(self, weight: W8A8Weight) -> None:
        super().__init__()
        self.w8a8 = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self._handle = register_product(self, weight.forward)

    @classmethod
    def from_linear(cls, layer: nn.Module, kernel: str = "onednn") -> W8A8Linear:
        """Quantize any module with a float ``weight`` [out, in] and no bias."""
        if getattr(layer, "bias", None) is not None:
            raise W8A8Error("w8a8 layers have no bias (Llama's linear layers have none)")
        return cls(W8A8Weight.from_float(layer.weight, kernel=kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        if torch.compiler.is_compiling():
            return opaque_product(x, self._handle, self.out_features)
        return self.w8a8.forward(x)
