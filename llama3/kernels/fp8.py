"""Row-wise float8 linear layers: Meta's ``fp8_mixed`` and Hugging Face's ``fbgemm_fp8``.

The weight W [out, in] is stored as float8 e4m3 with one float32 scale per output row; the input
is quantized the same way per token (row) on the fly, its row maximum clamped to an upper bound
(Meta: 1200), and the product accumulated in float32:

    s_w[o] = max_k |W[o, k]| / 448            W8 = fp8(W / s_w)          (at load, once)
    m[t]   = clamp(max_k |x[t, k]|, eps, ub)  s_x[t] = m[t] / 448        x8 = fp8(clamp(x / s_x, ±448))
    y[t, o] = (Σ_k x8[t, k] · W8[o, k]) · s_x[t] · s_w[o]                 (float32 sum)

448 is e4m3's largest finite value. The division is done as fbgemm does it, a multiplication by
448 / m, with the stored scale its reciprocal. This is ``torch.ops.fbgemm.quantize_fp8_per_row`` +
``f8f8bf16_rowwise`` (llama-models ``quantize_impls.py``, transformers' ``FbgemmFp8Linear``), which
only exist for CUDA. Here the same numbers come from:

* ``torch._scaled_mm`` with row-wise scales on CUDA GPUs with float8 tensor cores (compute
  capability 8.9+: Ada, Hopper and later), bfloat16 out, like fbgemm;
* elsewhere (CPU, older GPUs) a reference path: the float8 values are exact in float32 and so are
  their products, so one float32 matrix product gives fbgemm's sum up to summation order.

Meta's layer selection (:func:`meta_fp8_layers`): the feed-forward w1/w2/w3 of every layer except
the first and the last; attention, embedding and output stay in the model's dtype.

Model parallelism is the loader's and the seam's: a column-parallel layer holds its rows and their
scales; a row-parallel layer (w2) holds a slice of the columns with scales of that slice (as each
rank of Meta's 8-shard 405B checkpoint does) and quantizes its slice of the activations, exactly
Meta's computation at that world size.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import finite_float
from .base import LinearKernel

__all__ = [
    "FP8_E4M3_MAX",
    "DEFAULT_ACTIVATION_SCALE_UB",
    "Fp8RowwiseLinear",
    "quantize_fp8_rowwise",
    "fp8_rowwise_linear",
    "fp8_reference_linear",
    "scaled_mm_supported",
    "meta_fp8_layers",
    "fp8_bytes_per_weight",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
DEFAULT_ACTIVATION_SCALE_UB = 1200.0  # Meta's fp8_activation_scale_ub, HF's activation_scale_ub
# fbgemm's floor on a row maximum (an all-zero row would divide by zero).
EPS = 1e-12


@torch.no_grad()
def quantize_fp8_rowwise(x: torch.Tensor, scale_ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise float8 e4m3 quantization of ``x`` [..., k] (fbgemm's ``quantize_fp8_per_row``).

    Returns (float8 [..., k], float32 scale [...]) with x ≈ q.float() * scale[..., None]. A row's
    maximum |value| is clamped to ``scale_ub`` when given (activations; never for weights), so an
    outlier token saturates at ±448 instead of crushing its other values towards zero.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    amax = amax.clamp(min=EPS, max=scale_ub) if scale_ub is not None else amax.clamp(min=EPS)
    inv = FP8_E4M3_MAX / amax
    q = (xf * inv).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    return q, (1.0 / inv).squeeze(-1)


@functools.cache
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def scaled_mm_supported(device: torch.device | str) -> bool:
    """True where ``torch._scaled_mm`` takes float8 with row-wise scales: CUDA, capability 8.9+."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_capability(index) >= (8, 9)


def fp8_reference_linear(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """The row-scaled float8 product in float32 on any device: xq [m, k], wq [n, k] -> [m, n]."""
    acc = F.linear(xq.float(), wq.float())  # float8 values and their products are exact in float32
    return (acc * x_scale.float()[:, None] * w_scale.float()[None, :]).to(out_dtype)


def fp8_rowwise_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                       activation_scale_ub: float | None = DEFAULT_ACTIVATION_SCALE_UB) -> torch.Tensor:
    """``x Wᵀ`` for x [..., k] and row-wise float8 W (``wq`` [n, k], ``w_scale`` [n]), the input
    quantized per token with the upper bound; result [..., n] in x's dtype (bfloat16 from the
    float8 tensor cores, whose output is bfloat16, then cast)."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_fp8_rowwise(x2, activation_scale_ub)
    k, n = x2.shape[-1], wq.shape[0]
    if scaled_mm_supported(x.device) and k % 16 == 0 and n % 16 == 0:
        y = torch._scaled_mm(xq, wq.t(), scale_a=x_scale[:, None], scale_b=w_scale.float()[None, :],
                             out_dtype=torch.bfloat16, use_fast_accum=True).to(x.dtype)
    else:
        y = fp8_reference_linear(xq, x_scale, wq, w_scale, x.dtype)
    return y.view(*x.shape[:-1], n)


class Fp8RowwiseLinear(LinearKernel):
    """Kernel family "fp8-rowwise": a float8 weight with per-row float32 scales (see module doc).

    Buffers: ``weight`` (float8_e4m3fn [out_local, in_local]) and ``weight_scale`` (float32
    [out_local]), the names of Hugging Face's fbgemm_fp8 tensors; ``activation_scale_ub`` is a
    plain float (a setting, not state).
    """

    name: ClassVar[str] = "fp8-rowwise"
    shares_float_weight: ClassVar[bool] = False
    weight: torch.Tensor
    weight_scale: torch.Tensor
    activation_scale_ub: float | None

    @classmethod
    def applies(cls, layer: nn.Module | None, device: torch.device, dtype: torch.dtype) -> bool:
        """Any 2-D weight on CPU or CUDA: where float8 tensor cores are missing the reference path
        computes it (other devices, e.g. MPS, have no float8 tensors; "meta": a model about to be
        assigned a checkpoint)."""
        if torch.device(device).type not in ("cpu", "cuda", "meta") or not dtype.is_floating_point:
            return False
        weight = getattr(layer, "weight", None) if layer is not None else None
        return layer is None or (isinstance(weight, torch.Tensor) and weight.dim() == 2)

    @classmethod
    def nbytes_for(cls, out_features: int, in_features: int, dtype: torch.dtype) -> int:
        """1 byte per weight plus a float32 scale per row."""
        return out_features * in_features + out_features * 4

    @classmethod
    def empty(cls, layer: nn.Module, *,
              activation_scale_ub: float | None = DEFAULT_ACTIVATION_SCALE_UB) -> Fp8RowwiseLinear:
        """The layer with meta-device buffers of ``layer.weight``'s local shape, for a checkpoint's
        float8 tensors to be assigned (``load_state_dict(..., assign=True)``)."""
        new = cls.blank(layer)
        out_local, in_local = layer.weight.shape
        new.register_buffer("weight", torch.empty(out_local, in_local, dtype=FP8_DTYPE, device="meta"))
        new.register_buffer("weight_scale", torch.empty(out_local, dtype=torch.float32, device="meta"))
        new.activation_scale_ub = _check_ub(activation_scale_ub)
        return new

    @classmethod
    @torch.no_grad()
    def from_float(cls, layer: nn.Module, *,
                   activation_scale_ub: float | None = DEFAULT_ACTIVATION_SCALE_UB) -> Fp8RowwiseLinear:
        """Quantize ``layer``'s float weight (Meta's quantize-at-load from bf16), on its device."""
        new = cls.empty(layer, activation_scale_ub=activation_scale_ub)
        q, scale = quantize_fp8_rowwise(layer.weight)
        new.weight, new.weight_scale = q, scale
        return new

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's ``x Wᵀ`` with per-token float8 activations."""
        return fp8_rowwise_linear(x, self.weight, self.weight_scale, self.activation_scale_ub)

    def weight_nbytes(self) -> int:
        """1 byte per weight plus 4 per row."""
        return self.weight.numel() * self.weight.element_size() + self.weight_scale.numel() * 4

    def extra_repr(self) -> str:
        out_local, in_local = self.weight.shape
        return (f"local {in_local} -> {out_local}, float8_e4m3fn row-wise, "
                f"activation ub {self.activation_scale_ub}")


def _check_ub(value: Any) -> float | None:
    return None if value is None else finite_float(value, "activation_scale_ub", positive=True)


def meta_fp8_layers(n_layers: int) -> list[str]:
    """Names (our/Meta's) of the layers Meta's fp8_mixed quantizes: feed-forward w1, w3, w2 of
    every transformer layer except the first and the last."""
    return [f"layers.{i}.feed_forward.{w}" for i in range(1, n_layers - 1) for w in ("w1", "w3", "w2")]


def fp8_bytes_per_weight(in_features: int) -> float:
    """Bytes per weight of a row-wise float8 layer with ``in_features`` columns (per rank: its
    local columns): 1 for the value plus a float32 scale shared by the row."""
    return 1.0 + 4.0 / in_features
