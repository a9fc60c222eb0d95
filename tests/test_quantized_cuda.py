"""The CUDA paths of the quantized kernels against their CPU reference (skipped without a GPU).

A lent GPU runs this file as its fp8/int4 stage: ``pytest -q tests/test_quantized_cuda.py``.

* fp8: ``torch._scaled_mm`` with row-wise scales (compute capability 8.9+) against the float32
  reference path on the same float8 tensors. Both sum exact products; the tensor cores' fast
  accumulation and the bfloat16 output (fbgemm's f8f8bf16 has the same) allow one bf16 rounding
  plus float32-level summation error.
* int4: ``torch._weight_int4pack_mm`` on the CUDA-packed weight against the float32 product of
  the dequantized weight (activations, scales and offsets in bfloat16 on the GPU).
"""

from __future__ import annotations

import pytest
import torch

from llama3.distributed import ColumnParallelLinear
from llama3.kernels.base import swap_linear
from llama3.kernels.fp8 import (
    Fp8RowwiseLinear,
    fp8_reference_linear,
    quantize_fp8_rowwise,
    scaled_mm_supported,
)
from llama3.kernels.int4 import Int4WeightOnlyLinear, dequantize_int4_groupwise, quantize_int4_groupwise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _layer(in_f: int, out_f: int) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(in_f, out_f)
    torch.nn.init.normal_(layer.weight, std=0.02, generator=torch.Generator().manual_seed(0))
    return layer.requires_grad_(False)


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_fp8_scaled_mm_matches_the_reference_path(rows):
    if not scaled_mm_supported("cuda"):
        pytest.skip("float8 row-wise scaled matmul needs compute capability 8.9+")
    layer = _layer(1024, 512).cuda().to(torch.bfloat16)
    fp8 = swap_linear(layer, Fp8RowwiseLinear)
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16) * 2
    got = fp8(x)
    xq, sx = quantize_fp8_rowwise(x, 1200.0)
    want = fp8_reference_linear(xq, sx, fp8.weight, fp8.weight_scale, torch.float32)
    terms = (xq.float().abs() @ fp8.weight.float().abs().t()) * sx[:, None] * fp8.weight_scale[None, :]
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).abs() <= 2**-8 * want.abs() + 1e-3 * terms).all()


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_int4_cuda_kernel_matches_the_dequantized_product(group_size):
    layer = _layer(1024, 256).cuda().to(torch.bfloat16)
    q, scales, zeros = quantize_int4_groupwise(layer.weight, group_size)
    int4 = swap_linear(layer, Int4WeightOnlyLinear, group_size=group_size)
    x = torch.randn(5, 1024, device="cuda", dtype=torch.bfloat16)
    got = int4(x)
    w_hat = dequantize_int4_groupwise(q, scales.to(torch.bfloat16).float(), zeros.to(torch.bfloat16).float())
    want = x.float() @ w_hat.t()
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).abs() <= 2**-6 * (x.float().abs() @ w_hat.abs().t()) + 1e-3).all()
