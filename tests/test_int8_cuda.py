"""The CUDA int8 weight-only product (llama3/kernels/int8_cuda.py), run on the CPU: eager and
compiled it equals x (q · scale)ᵀ in float64, and the compiled form reads a materialised input
(the ``llama3::int8_gemv_input`` boundary) instead of recomputing its producer per output row."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from llama3.decoding import cuda_decode_compile_options
from llama3.kernels.int8 import quantize_per_channel
from llama3.kernels.int8_cuda import FUSED_MAX_ROWS, int8_linear_cuda


def _weights(n_out: int = 48, n_in: int = 256):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n_out, n_in, generator=g) * torch.logspace(-2, 1, n_out)[:, None]
    q, scale = quantize_per_channel(w)
    return q, scale, g


def _want(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.double() @ (q.double() * scale.double()[:, None]).T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_int8_product_is_the_dequantized_product(dtype):
    q, scale, g = _weights()
    scale = scale.to(dtype)
    for rows in (1, FUSED_MAX_ROWS, FUSED_MAX_ROWS + 3):  # int8-weight kernel, then dequantize + GEMM
        x = torch.randn(rows, 1, 256, generator=g).to(dtype)
        got = int8_linear_cuda(x, q, scale)
        assert got.shape == (rows, 1, 48)
        assert got.dtype == dtype
        want = _want(x, q, scale)
        tol = 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        assert ((got.double() - want).abs() <= tol * want.abs().amax() + 1e-5).all()


def test_compiled_int8_product_reads_a_materialised_input():
    q, scale, g = _weights()
    norm_weight = torch.rand(256, generator=g) + 0.5

    def step(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h = x + residual  # the pointwise producer a GEMV must not recompute per output row
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_weight
        return int8_linear_cuda(h, q, scale)

    x, residual = torch.randn(2, 1, 256, generator=g), torch.randn(2, 1, 256, generator=g)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    got, code = run_and_get_code(compiled, x, residual)
    torch.testing.assert_close(got, step(x, residual), rtol=1e-4, atol=1e-4)
    h = x + residual
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_weight
    assert ((got.double() - _want(h, q, scale)).abs() <= 1e-4).all()
    assert any("int8_gemv_input" in c for c in code), "the input is no longer materialised before the GEMV"


def test_cuda_decode_compile_options_are_inductor_options():
    options = cuda_decode_compile_options()
    assert options == {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
    known = torch._inductor.config.get_config_copy()
    assert set(options) <= set(known)
    assert cuda_decode_compile_options(cudagraphs=False, tune_reductions=False) == {}
