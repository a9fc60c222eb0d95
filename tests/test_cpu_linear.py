"""FBGEMM-packed float16 linear layers (llama3/kernels/fbgemm.py) compute the model's products: each
layer equals x Wᵀ in float64 up to the final rounding, the packed model decodes the unpacked model's
greedy tokens, and the cases it must not touch stay as they are. Speed is measured by
scripts/benchmark.py, not here."""

from __future__ import annotations

import gc
import logging
from unittest import mock

import pytest
import torch
from helpers import tiny_model

from llama3.distributed import ColumnParallelLinear, RowParallelLinear
from llama3.generation import Llama, make_decode_step
from llama3.kernels import (
    FbgemmFp16Kernel,
    UnknownKernelError,
    W8A8IntMmKernel,
    W8A8Kernel,
    choose_kernels,
    fbgemm_is_the_fast_path,
    kernel_of,
    swap_linear,
    swap_linears,
)
from llama3.presets import PRESETS

pytestmark = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                reason="this torch build has no FBGEMM (x86 builds do)")

TINY = dict(PRESETS["test-gqa"], max_batch_size=2, max_seq_len=48)
REDUCED = [torch.bfloat16, torch.float16]


def make_model(dtype: torch.dtype, seed: int = 0, **overrides):
    # Weights 4x the default init: logits spread out, clear greedy margins.
    return tiny_model("test-gqa", seed=seed, std=0.08, dtype=dtype, **{**TINY, **overrides})


def pack_linear_layers(model) -> int:
    """Every linear layer swapped to the FBGEMM kernel (where it applies); how many were."""
    return swap_linears(model, FbgemmFp16Kernel)


def is_packed(module) -> bool:
    return kernel_of(module) is FbgemmFp16Kernel


def greedy(model, tokens: torch.Tensor, steps: int = 10, step=None) -> tuple[torch.Tensor, torch.Tensor]:
    step = step or (lambda token, pos: model.forward(token, pos, last_only=True))
    logits = [model.forward(tokens, 0, last_only=True)[:, -1]]
    out = [logits[-1].argmax(-1, keepdim=True)]
    for pos in range(tokens.shape[1], tokens.shape[1] + steps):
        logits.append(step(out[-1], pos)[:, -1])
        out.append(logits[-1].argmax(-1, keepdim=True))
    return torch.cat(out, dim=1), torch.stack(logits, dim=1)


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("rows", [1, 5])  # a decoding step's GEMV, and a prefill's GEMM
def test_packed_layer_equals_the_product_up_to_the_final_rounding(dtype, rows):
    """x float32 (exact from the dtype), W float16 (exact for these weights), float32 sums, one
    rounding to ``dtype`` at the end: within one unit of ``dtype`` of the float64 product."""
    g = torch.Generator().manual_seed(0)
    n_in, n_out = 4096, 40_000  # three packs of rows (16384 per pack): the outputs are concatenated
    layer = ColumnParallelLinear(n_in, n_out)
    layer.weight.data = (torch.randn(n_out, n_in, generator=g) / n_in**0.5).to(dtype)
    x = torch.randn(1, rows, n_in, generator=g).to(dtype)
    exact = x.double() @ layer.weight.double().T

    packed = swap_linear(layer, FbgemmFp16Kernel)
    assert len(packed.packs) == 3
    assert not hasattr(packed, "weight")
    got = packed(x)
    assert got.dtype == dtype
    assert got.shape == (1, rows, n_out)
    ulp = torch.finfo(dtype).eps * exact.abs()
    assert ((got.double() - exact).abs() <= ulp + 1e-5).all()


@pytest.mark.parametrize("dtype", REDUCED)
def test_packed_model_decodes_the_unpacked_models_tokens(dtype):
    tokens = torch.randint(0, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    model = make_model(dtype)
    want, want_logits = greedy(model, tokens)

    assert pack_linear_layers(model) == 7 * TINY["n_layers"] + 1
    got, got_logits = greedy(model, tokens)
    assert torch.equal(got, want)
    # The same products, summed in another order and with float32 (not dtype) inputs to the norms'
    # consumers: a few units of dtype's rounding of the largest logit.
    step = torch.finfo(dtype).eps * want_logits.abs().max()
    assert (got_logits - want_logits).abs().max() <= 8 * step


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [FbgemmFp16Kernel, W8A8Kernel, W8A8IntMmKernel], ids=lambda k: k.name)
def test_packed_model_compiles_whole_around_the_packed_products(kernel):
    """torch.compile cannot trace FBGEMM's or oneDNN's packed weights: the compiled step calls each
    product through one opaque op (llama3::opaque_product), with no graph break, and decodes the
    eager tokens. A layer collected takes its product out of the registry."""
    from torch._dynamo.utils import counters

    from llama3.kernels import opaque
    if kernel is W8A8Kernel and kernel.refusal(None, "cpu", torch.bfloat16):
        pytest.skip(kernel.refusal(None, "cpu", torch.bfloat16))
    torch._dynamo.reset()
    counters.clear()
    tokens = torch.randint(0, TINY["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(2))
    model = make_model(torch.bfloat16)
    registered = len(opaque._PRODUCTS)
    assert swap_linears(model, kernel) == 7 * TINY["n_layers"] + 1
    assert len(opaque._PRODUCTS) == registered + 7 * TINY["n_layers"] + 1
    want, _ = greedy(model, tokens)
    got, _ = greedy(model, tokens, step=make_decode_step(model, compile=True))
    assert torch.equal(got, want)
    assert not counters["graph_break"], dict(counters["graph_break"])
    del model
    torch._dynamo.reset()  # compiled code holds the model too
    gc.collect()
    assert len(opaque._PRODUCTS) == registered


def test_every_linear_is_packed_and_the_tied_embedding_kept():
    model = make_model(torch.bfloat16, tie_word_embeddings=True)
    embedding = model.tok_embeddings.weight.detach().clone()
    pack_linear_layers(model)
    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    assert len(linears) == 7 * TINY["n_layers"] + 1
    assert all(is_packed(m) for m in linears)
    assert model.output.gather_output
    assert torch.equal(model.tok_embeddings.weight, embedding)  # lookups still read the table
    # The packed weights are not tensors: no linear weight is left in the state dict.
    assert not any(k.endswith(("wq.weight", "w2.weight", "output.weight")) for k in model.state_dict())


def test_a_layer_beyond_float16s_range_keeps_torchs_kernels(caplog):
    model = make_model(torch.bfloat16)
    with torch.no_grad():
        model.layers[0].feed_forward.w2.weight[3, 5] = 1e6  # representable in bfloat16, not float16
    with caplog.at_level(logging.WARNING, logger="llama3.kernels.base"):
        packed = pack_linear_layers(model)
    assert packed == 7 * TINY["n_layers"]  # all but that one
    assert type(model.layers[0].feed_forward.w2) is RowParallelLinear
    assert "layers.0.feed_forward.w2" in caplog.text
    assert "65504" in caplog.text


def test_other_dtypes_and_devices_are_left_alone():
    model = make_model(torch.float32)
    assert pack_linear_layers(model) == 0
    assert not fbgemm_is_the_fast_path("cpu", torch.float32)
    assert not fbgemm_is_the_fast_path("cuda", torch.bfloat16)
    with mock.patch("llama3.kernels.fbgemm.cpu_has_bf16_matrix_units", return_value=True):
        assert not fbgemm_is_the_fast_path("cpu", torch.bfloat16)  # oneDNN's native kernels instead
    with mock.patch("llama3.kernels.fbgemm.cpu_has_bf16_matrix_units", return_value=False):
        assert fbgemm_is_the_fast_path("cpu", torch.bfloat16, dim=2048)  # Llama 3.2 1B and up
        assert fbgemm_is_the_fast_path("cpu", torch.float16, dim=4096)
        assert not fbgemm_is_the_fast_path("cpu", torch.bfloat16, dim=256)  # tiny test shapes


@pytest.mark.parametrize(("amx", "avx512_bf16"), [(True, False), (False, True), (False, False)])
def test_bf16_matrix_units_are_read_from_torchs_cpu_probes(amx, avx512_bf16):
    from llama3.kernels import cpu_has_bf16_matrix_units

    with (mock.patch("torch.cpu._is_amx_tile_supported", return_value=amx),
          mock.patch("torch.cpu._is_avx512_bf16_supported", return_value=avx512_bf16)):
        assert cpu_has_bf16_matrix_units() == (amx or avx512_bf16)


def test_without_fbgemm_packing_says_so():
    model = make_model(torch.bfloat16)
    with mock.patch("llama3.kernels.fbgemm.fbgemm_available", return_value=False):
        assert not fbgemm_is_the_fast_path("cpu", torch.bfloat16)
        with pytest.raises(UnknownKernelError, match="no FBGEMM"):
            choose_kernels(model, "cpu", torch.bfloat16, override="fbgemm-fp16")


def test_build_packs_on_request_and_generates_what_torchs_kernels_do(generation_checkpoint,
                                                                     llama3_tokenizer_path):
    """``Llama.build(fbgemm=True)`` packs every linear layer of a float16 model; greedy generation
    gives the unpacked model's text. (The automatic choice leaves tiny test shapes unpacked.)"""
    def build(**kw) -> Llama:
        return Llama.build(generation_checkpoint, llama3_tokenizer_path, 64, 1, device="cpu",
                           dtype="float16", verbose=False, **kw)

    plain, packed, auto = build(fbgemm=False), build(fbgemm=True), build()
    linear = (ColumnParallelLinear, RowParallelLinear)
    layers = [type(m) for m in packed.model.modules() if isinstance(m, linear)]
    assert layers
    assert all(issubclass(t, FbgemmFp16Kernel) for t in layers)
    assert not any(is_packed(m) for m in [*plain.model.modules(), *auto.model.modules()])
    prompt = ["The capital of France is"]
    want = plain.text_completion(prompt, temperature=0, max_gen_len=12)
    assert packed.text_completion(prompt, temperature=0, max_gen_len=12) == want
    with pytest.raises(ValueError, match="quantize"):
        build(fbgemm=True, quantize="int8")
    with pytest.raises(ValueError, match="float32"):
        Llama.build(generation_checkpoint, llama3_tokenizer_path, 64, 1, device="cpu", dtype="float32",
                    fbgemm=True, verbose=False)
    with mock.patch("llama3.kernels.fbgemm.fbgemm_available", return_value=False), \
            pytest.raises(ValueError, match="no FBGEMM"):
        build(fbgemm=True)
