"""quantize="int4" on the CPU: the prefill kernel "int4-dequant" (the packed int4 weight dequantized
chunk by chunk, torch's matmul) against float64 arithmetic on the same quantized values; a model
using it for prefill against the same model with torch's int4 kernel only; the measured choice
(stubbed clock) and the override; the compiled decode step (torch's int4 kernel behind an opaque op)
against the eager one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import MEASURED_ARGS, FakeClock, stub_kernel_costs, stubbed_tuning
from torch import nn

from llama3 import ModelArgs, Transformer
from llama3.decoding import make_decode_step
from llama3.distributed import ColumnParallelLinear
from llama3.kernels import apply_kernels, choose_kernels, kernels_in
from llama3.kernels import int4_dequant as dq
from llama3.kernels.base import kernel_of, swap_linear
from llama3.kernels.int4 import (
    INT4_GROUP_SIZES,
    Int4WeightOnlyLinear,
    UnsupportedGroupSizeError,
    quantize_int4_groupwise,
)
from llama3.kernels.int4_dequant import Int4DequantLinear
from llama3.kernels.measure import Tuning
from llama3.kernels.phases import DECODE_ROWS, PhaseKernel

ARGS = MEASURED_ARGS
MACHINE = {"cpu": "Test CPU 9000", "flags": "avx512f", "torch": "2.13.0", "capability": "AVX512"}


def _layer(n: int, k: int, seed: int = 0) -> nn.Module:
    with torch.device("meta"):
        layer = ColumnParallelLinear(k, n)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    layer.weight = nn.Parameter(w, requires_grad=False)
    return layer


def _oracle_weight(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """float64 weight of the quantized values, with the bfloat16 scale and offset the kernels read."""
    q, scales, zeros = quantize_int4_groupwise(weight, group_size)
    n, k = q.shape
    s = scales.to(torch.bfloat16).double()[..., None]
    z = zeros.to(torch.bfloat16).double()[..., None]
    return ((q.double().view(n, k // group_size, group_size) - 8) * s + z).view(n, k)


@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES)
@pytest.mark.parametrize(("n", "k"), [(64, 256), (128, 512), (32, 256), (16, 256), (192, 768)])
def test_the_dequantized_product_is_the_float64_product(group_size, n, k):
    if k % group_size:
        pytest.skip("the group does not divide k")
    layer = _layer(n, k)
    new = swap_linear(layer, Int4DequantLinear, group_size=group_size)
    want_w = _oracle_weight(layer.weight, group_size)
    x = torch.randn(3, 20, k, generator=torch.Generator().manual_seed(1))  # 60 rows: a prefill
    want = x.double() @ want_w.t()
    bound = (x.double().abs() @ want_w.abs().t())  # |x| |W|: the scale of each output's rounding
    got = new.local_product(x)
    assert got.shape == (3, 20, n)
    assert got.dtype == torch.float32
    assert ((got.double() - want).abs() <= 1e-5 * bound + 1e-7).all()
    got16 = new.local_product(x.to(torch.bfloat16))  # weights rounded to bfloat16: 2^-8 relative
    assert got16.dtype == torch.bfloat16
    assert ((got16.double() - x.to(torch.bfloat16).double() @ want_w.t()).abs() <= 1e-2 * bound + 1e-3).all()
    if new.layout is not None:  # the packing read back gives the quantized values exactly
        q = quantize_int4_groupwise(layer.weight, group_size)[0]
        assert torch.equal(dq.unpack_int4_cpu(new.weight, new.layout), q.to(torch.uint8))
    # torch's int4 kernel on the same buffers computes the same weights (in bfloat16).
    ref = Int4WeightOnlyLinear.local_product(new, x.to(torch.bfloat16))
    assert ((ref.double() - got16.double()).abs() <= 2e-2 * bound + 2e-3).all()


def test_shapes_it_cannot_take_are_refused():
    cpu = torch.device("cpu")
    assert not Int4DequantLinear.applies(_layer(64, 48), cpu, torch.float32)  # k not in 32s
    assert not Int4DequantLinear.applies(_layer(40, 64), cpu, torch.float32)  # n not in 16s
    assert "multiples of 16" in Int4DequantLinear.refusal(_layer(40, 64), cpu, torch.float32)
    assert not Int4DequantLinear.applies(None, torch.device("meta"), torch.float32)
    with pytest.raises(UnsupportedGroupSizeError, match="one of 32, 64, 128, 256"):
        swap_linear(_layer(64, 96), Int4DequantLinear, group_size=48)
    with pytest.raises(UnsupportedGroupSizeError, match="does not divide"):
        swap_linear(_layer(64, 96), Int4DequantLinear, group_size=64)


def test_an_unknown_packing_falls_back_to_the_int4_kernel(monkeypatch, caplog):
    monkeypatch.setattr(dq, "LAYOUTS", ())
    layer = _layer(64, 128)
    with caplog.at_level(logging.WARNING, logger="llama3.kernels.int4_dequant"):
        new = swap_linear(layer, Int4DequantLinear, group_size=32)
    assert new.layout is None
    assert "unknown int4 packing" in caplog.text
    x = torch.randn(12, 128, generator=torch.Generator().manual_seed(2))
    assert torch.equal(new.local_product(x), Int4WeightOnlyLinear.local_product(new, x))


def test_without_a_compiler_it_dequantizes_eagerly(monkeypatch, caplog):
    def no_compiler(fn, **_):
        def fail(*args):
            raise RuntimeError("no C++ compiler found")
        return fail
    monkeypatch.setattr(dq, "_COMPILED", {})
    monkeypatch.setattr(dq, "_EAGER_REASON", [])
    monkeypatch.setattr(torch, "compile", no_compiler)
    layer = _layer(64, 128)
    new = swap_linear(layer, Int4DequantLinear, group_size=32)
    x = torch.randn(12, 128, generator=torch.Generator().manual_seed(3))
    with caplog.at_level(logging.WARNING, logger="llama3.kernels.int4_dequant"):
        got = new.local_product(x)
        again = new.local_product(x)
    assert "dequantizing eagerly" in caplog.text
    assert "no C++ compiler" in caplog.text
    want = x.double() @ _oracle_weight(layer.weight, 32).t()
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(got, again)


# --- the chooser -------------------------------------------------------------------------------


@pytest.fixture
def stubbed(monkeypatch):
    """(clock, costs): kernel name -> (seconds for one row, for many rows), advanced on a fake clock."""
    clock = FakeClock()
    return clock, stub_kernel_costs(monkeypatch, clock, (Int4DequantLinear, Int4WeightOnlyLinear))


def _tuning(tmp_path: Path, clock: FakeClock) -> Tuning:
    return stubbed_tuning(tmp_path, clock, MACHINE)


def _model(dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**ARGS))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.03)
    return model.to(dtype)


def test_the_prefill_kernel_is_chosen_by_measurement_with_one_layout(tmp_path, stubbed):
    clock, costs = stubbed
    # Only 1.1x faster at prefill: a second layout would not pay, but this one shares int4's.
    costs.update({"int4": (1e-3, 1.1e-2), "int4-dequant": (5e-3, 1e-2)})
    args = ModelArgs(**ARGS)
    plan = choose_kernels(args, "cpu", torch.bfloat16, "int4", int4_group_size=32,
                          tuning=_tuning(tmp_path, clock))
    # The output projection is int4 too (every linear, as Q4_0); it sees one row per sequence in
    # prefill as well (only the last position's logits), so its decode winner does both.
    assert (plan.families["output"].decode, plan.families["output"].prefill) == ("int4", "int4")
    for family in ("attention", "feed-forward"):
        choice = plan.families[family]
        assert (choice.decode, choice.prefill) == ("int4", "int4-dequant"), choice.reason
        assert choice.settings == {"group_size": 32}
        assert choice.one_layout is None
        assert "measured" in choice.reason
    # The fit check counts the int4 layout once.
    assert plan.nbytes("layers.0.feed_forward.w1", 4096, 1024, torch.bfloat16) == (
        Int4WeightOnlyLinear.nbytes_for(4096, 1024, torch.bfloat16, group_size=32))
    # The slower prefill loses; the decode winner does both.
    costs.update({"int4": (1e-3, 1e-2), "int4-dequant": (5e-3, 2e-2)})
    plan = choose_kernels(args, "cpu", torch.bfloat16, "int4", int4_group_size=64,  # another cache key
                          tuning=_tuning(tmp_path, clock))
    assert plan.kernel("attention") is Int4WeightOnlyLinear


def test_the_override_forces_either_int4_kernel(tmp_path, stubbed, monkeypatch):
    clock, costs = stubbed
    costs.update({"int4": (1e-3, 1.1e-2), "int4-dequant": (5e-3, 1e-2)})
    args = ModelArgs(**ARGS)
    monkeypatch.setenv("LLAMA3_KERNELS", "int4")
    plan = choose_kernels(args, "cpu", torch.bfloat16, "int4", tuning=_tuning(tmp_path, clock))
    assert plan.kernel("attention") is Int4WeightOnlyLinear
    assert plan.kernel("output") is Int4WeightOnlyLinear
    assert plan.families["output"].settings == {"group_size": 128}
    monkeypatch.setenv("LLAMA3_KERNELS", "feed-forward:prefill=int4,attention=int4-dequant")
    plan = choose_kernels(args, "cpu", torch.bfloat16, "int4", tuning=_tuning(tmp_path, clock))
    assert plan.kernel("attention") is Int4DequantLinear
    assert (plan.families["feed-forward"].decode, plan.families["feed-forward"].prefill) == ("int4", "int4")


@torch.no_grad()
def test_a_model_prefilling_with_it_matches_the_int4_kernel(tmp_path, stubbed):
    """Same quantized values (identical buffers); only the prefill product differs."""
    clock, costs = stubbed
    costs.update({"int4": (1e-3, 2e-2), "int4-dequant": (5e-3, 1e-2)})
    want_model, model = _model(), _model()
    apply_kernels(want_model, choose_kernels(want_model, "cpu", torch.float32, "int4", int4_group_size=32,
                                             tuning=Tuning(enabled=False)))  # the rule: "int4" only
    assert {k for n, k in kernels_in(want_model).items() if n != "output"} == {"int4"}
    apply_kernels(model, choose_kernels(model, "cpu", torch.float32, "int4", int4_group_size=32,
                                        tuning=_tuning(tmp_path, clock)))
    costs.clear()
    assert {k for n, k in kernels_in(model).items() if n != "output"} == {"int4+int4-dequant"}
    w1 = model.layers[0].feed_forward.w1
    assert issubclass(kernel_of(w1), PhaseKernel)
    assert w1._parts[0] is w1._parts[1]
    assert w1.held_nbytes() == w1.weight_nbytes() == want_model.layers[0].feed_forward.w1.weight_nbytes()
    for name in ("attention.wq", "attention.wk", "feed_forward.w1", "feed_forward.w2"):
        want_layer = want_model.layers[0].get_submodule(name)
        part = model.layers[0].get_submodule(name)._parts[0]
        assert torch.equal(part.weight, want_layer.weight)
        assert torch.equal(part.scales_and_zeros, want_layer.scales_and_zeros)
    tokens = torch.randint(0, ARGS["vocab_size"], (2, DECODE_ROWS + 4),
                           generator=torch.Generator().manual_seed(2))
    want, got = want_model(tokens, 0), model(tokens, 0)  # 24 rows: the prefill kernel
    # float32 activations here against bfloat16 in torch's int4 kernel: bfloat16's rounding apart.
    assert (got - want).abs().max() <= 0.02 * want.std()
    top2 = want[:, -1].topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (got - want).abs().max()
    assert torch.equal(got[:, -1].argmax(-1)[clear], want[:, -1].argmax(-1)[clear])
    # Decoding steps go through torch's int4 kernel in both models: identical.
    token = want[:, -1].argmax(-1, keepdim=True)
    for pos in range(tokens.shape[1], tokens.shape[1] + 3):
        a, b = want_model(token, pos), model(token, pos)
        assert (a - b).abs().max() <= 0.02 * a.std()
        token = a[:, -1].argmax(-1, keepdim=True)


@pytest.mark.slow
@torch.no_grad()
def test_the_compiled_int4_decode_step_gives_the_eager_tokens():
    """torch's int4 kernel behind llama3::int4pack_mm_cpu: one graph, the same products."""
    model = _model(torch.bfloat16)
    plan = choose_kernels(model, "cpu", torch.bfloat16, "int4", "attention:prefill=int4-dequant",
                          int4_group_size=32)
    apply_kernels(model, plan)
    torch._dynamo.reset()
    tokens = torch.randint(0, ARGS["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(4))
    eager, compiled = make_decode_step(model, compile=False), make_decode_step(model, compile=True)
    model(tokens, 0)
    token = tokens[:, -1:]
    for pos in range(12, 16):
        want = eager(token, pos)[:, -1].clone()
        got = compiled(token, pos)[:, -1].clone()
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()
        token = want.argmax(-1, keepdim=True)
