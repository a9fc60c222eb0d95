"""quantize="w8a8": int8 weights per output channel, int8 activations per row, int8 x int8 products.

Each kernel's output is checked against the module's formula computed in float64 without any int8
kernel (``w8a8_reference``); inputs are built so that the float32 and float64 row scales are the
same power of two, which makes the integer activations identical and leaves only the final
rounding to the output dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llama3.errors import LlamaError
from llama3.kernels.w8a8 import (
    KERNELS,
    W8A8Error,
    W8A8Linear,
    W8A8Weight,
    onednn_available,
    quantize_rows,
    quantize_weight,
    w8a8_reference,
)

AVAILABLE = [k for k in KERNELS if k != "onednn" or onednn_available()]


def _rows(n: int, k: int, seed: int) -> torch.Tensor:
    """Random rows whose largest |value| is 127 · 2^e exactly (the row scale is then 2^e)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g).clamp(-3, 3)
    exp = torch.randint(-6, 3, (n, 1), generator=g).float()
    x = x * 40 * 2**exp
    x[:, 0] = 127 * 2**exp[:, 0]  # the row maximum
    return x


@pytest.mark.parametrize("kernel", AVAILABLE)
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_product_matches_float64_formula(kernel: str, rows: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 256, generator=g) * torch.rand(96, 1, generator=g)
    x = _rows(rows, 256, seed=rows).to(dtype)
    layer = W8A8Weight.from_float(w.to(dtype), kernel=kernel)
    q, scale = quantize_weight(w.to(dtype))
    y = layer(x)
    ref = w8a8_reference(x, q, scale)
    assert y.dtype == dtype
    assert y.shape == (rows, 96)
    rel = {torch.bfloat16: 2**-8, torch.float32: 2**-20}[dtype]
    assert ((y.double() - ref).abs() <= rel * ref.abs() + 1e-9 * ref.abs().max()).all()


@pytest.mark.parametrize("kernel", AVAILABLE)
def test_batched_input_and_zero_rows(kernel: str) -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    layer = W8A8Linear(W8A8Weight.from_float(w, kernel=kernel))
    x = _rows(6, 128, seed=3).view(2, 3, 128)
    x[1, 2] = 0  # a zero row: scale floors at a tiny number, no NaN
    y = layer(x)
    assert y.shape == (2, 3, 64)
    assert torch.equal(y[1, 2], torch.zeros(64))
    ref = w8a8_reference(x, *quantize_weight(w))
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("kernel", AVAILABLE)
def test_compiled_layer_is_one_graph_with_the_eager_result(kernel: str) -> None:
    from torch._dynamo.utils import counters
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    layer = W8A8Linear(W8A8Weight.from_float(w, kernel=kernel))
    x = _rows(3, 128, seed=3).to(torch.bfloat16)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda v: layer(v) * 2, fullgraph=True)  # fullgraph: a break would raise
    assert torch.equal(compiled(x), layer(x) * 2)
    assert not counters["graph_break"]


def test_quantizers_are_symmetric_per_channel_and_row() -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4)).double()
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8
    assert (q.abs().amax(1) == 127).all()
    assert ((w - q.double() * s.double()[:, None]).abs() <= s.double()[:, None] / 2 + 1e-6).all()
    x = _rows(5, 64, seed=5)
    a, t = quantize_rows(x)
    assert torch.equal(t, x.abs().amax(1) / 127)
    assert torch.equal(a.float(), torch.round(x / t[:, None]))


def test_close_to_the_float_product() -> None:
    """The quantization error itself: a few 0.1 % of the output's scale on Gaussian data."""
    g = torch.Generator().manual_seed(6)
    w, x = torch.randn(256, 512, generator=g), torch.randn(4, 512, generator=g)
    y = W8A8Weight.from_float(w, kernel=AVAILABLE[0])(x)
    exact = x.double() @ w.double().T
    assert (y.double() - exact).abs().max() < 0.02 * exact.abs().max()


def test_errors() -> None:
    w = torch.randn(8, 16)
    with pytest.raises(W8A8Error, match="unknown w8a8 kernel") as info:
        W8A8Weight.from_float(w, kernel="fast")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, LlamaError)
    with pytest.raises(W8A8Error, match="no bias"):
        W8A8Linear.from_linear(nn.Linear(16, 8, bias=True))
    assert W8A8Linear.from_linear(nn.Linear(16, 8, bias=False), kernel="int_mm").out_features == 8
