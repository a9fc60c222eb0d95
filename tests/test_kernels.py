"""The kernel seam (llama3/kernels): the chooser follows its rule and says why in one line, honours
overrides and refuses unknown names; a new kernel is one subclass (a float64 test kernel swapped in
gives the float model's logits); the weight bytes the fit check counts per kernel are the bytes
the swapped model holds."""

from __future__ import annotations

import logging
from typing import ClassVar
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from llama3 import ModelArgs, Transformer
from llama3.errors import LlamaError
from llama3.kernels import (
    FAMILIES,
    KERNELS,
    CpuGemvKernel,
    FbgemmFp16Kernel,
    Int8Kernel,
    LinearKernel,
    TorchKernel,
    Tuning,
    UnknownKernelError,
    apply_kernels,
    choose_kernels,
    kernel_of,
    kernels_in,
    swap_linears,
)
from llama3.memory import weight_bytes

SMALL = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=32, max_batch_size=2,
             max_seq_len=32)
WIDE = ModelArgs(**{**SMALL, "dim": 2048, "n_heads": 16, "n_kv_heads": 8})
RULE = Tuning(enabled=False)  # the rule without measuring (measured choices: tests/test_measured_kernels.py)


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**SMALL, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    return model.to(dtype)


def kernels(plan) -> dict[str, str]:
    return {family: choice.kernel.name for family, choice in plan.families.items()}


def every(name: str) -> dict[str, str]:
    return dict.fromkeys(FAMILIES, name)


@pytest.fixture
def x86_without_bf16_units():
    """A CPU where FBGEMM is the fast path for wide bf16/fp16 models (today's rule)."""
    with (mock.patch("llama3.kernels.fbgemm.fbgemm_available", return_value=True),
          mock.patch("llama3.kernels.fbgemm.cpu_has_bf16_matrix_units", return_value=False)):
        yield


# --- the rule ----------------------------------------------------------------------------------


def test_chooser_follows_the_rule_when_not_measuring(x86_without_bf16_units, monkeypatch):
    monkeypatch.delenv("LLAMA3_KERNELS", raising=False)
    cpu = torch.device("cpu")
    assert kernels(choose_kernels(WIDE, cpu, torch.bfloat16, tuning=RULE)) == every("fbgemm-fp16")
    assert kernels(choose_kernels(WIDE, cpu, torch.float16, tuning=RULE)) == every("fbgemm-fp16")
    # Tiny widths, fbgemm=False, or CPUs with bf16 matrix units: single rows as GEMVs.
    assert kernels(choose_kernels(ModelArgs(**SMALL), cpu, torch.bfloat16)) == every("cpu-gemv")
    assert kernels(choose_kernels(WIDE, cpu, torch.bfloat16, fbgemm=False, tuning=RULE)) == every("cpu-gemv")
    with mock.patch("llama3.kernels.fbgemm.cpu_has_bf16_matrix_units", return_value=True):
        assert kernels(choose_kernels(WIDE, cpu, torch.bfloat16, tuning=RULE)) == every("cpu-gemv")
    assert kernels(choose_kernels(WIDE, cpu, torch.float32)) == every("torch")
    assert kernels(choose_kernels(WIDE, torch.device("cuda"), torch.bfloat16)) == every("torch")
    assert kernels(choose_kernels(WIDE, cpu, torch.bfloat16, quantize="int8")) == every("int8")
    assert kernels(choose_kernels(WIDE, torch.device("cuda"), torch.bfloat16, "int8")) == every("int8")
    packed = choose_kernels(ModelArgs(**SMALL), cpu, torch.float16, fbgemm=True)
    assert kernels(packed) == every("fbgemm-fp16")
    # A decode/prefill split is part of the plan.
    gemv = choose_kernels(ModelArgs(**SMALL), cpu, torch.bfloat16).families["attention"]
    assert (gemv.decode, gemv.prefill) == ("cpu-gemv", "torch")


def test_chooser_says_what_and_why_in_one_line(x86_without_bf16_units, monkeypatch, caplog):
    monkeypatch.delenv("LLAMA3_KERNELS", raising=False)
    with caplog.at_level(logging.INFO, logger="llama3.kernels"):
        choose_kernels(WIDE, "cpu", torch.bfloat16, tuning=RULE)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernels:")]
    assert lines == ["kernels: attention wq/wk/wv/wo=fbgemm-fp16, feed-forward w1/w2/w3=fbgemm-fp16, "
                     "output=fbgemm-fp16 (CPU without bf16 matrix units: FBGEMM's float16 GEMM is the "
                     "fast path)"]


# --- overrides and errors ----------------------------------------------------------------------


def test_override_by_argument_and_environment(monkeypatch):
    monkeypatch.delenv("LLAMA3_KERNELS", raising=False)
    args = ModelArgs(**SMALL)
    assert kernels(choose_kernels(args, "cpu", torch.bfloat16, override="torch")) == every("torch")
    plan = choose_kernels(args, "cpu", torch.bfloat16, override={"attention": "int8"})
    assert kernels(plan) == {"attention": "int8", "feed-forward": "cpu-gemv", "output": "cpu-gemv"}
    assert plan.families["attention"].reason == "override"
    monkeypatch.setenv("LLAMA3_KERNELS", "attention=int8, output=torch")
    assert kernels(choose_kernels(args, "cpu", torch.float32)) == {
        "attention": "int8", "feed-forward": "torch", "output": "torch"}
    monkeypatch.setenv("LLAMA3_KERNELS", "int8")
    assert kernels(choose_kernels(args, "cpu", torch.float32)) == every("int8")


@pytest.mark.parametrize(("override", "message"), [
    ("fp4", r"unknown kernel 'fp4'.*torch, cpu-gemv, cpu-gemv-native, fbgemm-fp16, int8"),
    ({"mlp": "int8"}, r"unknown layer family 'mlp'.*attention, feed-forward, output"),
    ("attention=int8,output=nope", "unknown kernel 'nope' for output"),
    ("cpu-gemv", "cpu-gemv computes bfloat16/float16 on the CPU; this is torch.float32"),
    ("fbgemm-fp16", "fbgemm-fp16 packs bfloat16/float16 models on the CPU"),
])
def test_unknown_or_impossible_kernels_are_refused_by_name(override, message, monkeypatch):
    monkeypatch.delenv("LLAMA3_KERNELS", raising=False)
    with pytest.raises(UnknownKernelError, match=message) as info:
        choose_kernels(ModelArgs(**SMALL), "cpu", torch.float32, override=override)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, LlamaError)
    monkeypatch.setenv("LLAMA3_KERNELS", "fp4")
    with pytest.raises(UnknownKernelError, match="LLAMA3_KERNELS"):
        choose_kernels(ModelArgs(**SMALL), "cpu", torch.float32)
    with pytest.raises(UnknownKernelError, match="quantize='int3'"):
        choose_kernels(ModelArgs(**SMALL), "cpu", torch.float32, quantize="int3", override="torch")


def test_apply_swaps_each_family_to_its_kernel(monkeypatch):
    monkeypatch.delenv("LLAMA3_KERNELS", raising=False)
    model = make_model(torch.bfloat16)
    plan = choose_kernels(model, "cpu", torch.bfloat16, override={"attention": "int8", "output": "torch"})
    assert apply_kernels(model, plan) == {"attention": 4 * SMALL["n_layers"],
                                          "feed-forward": 3 * SMALL["n_layers"], "output": 0}
    names = kernels_in(model)
    assert {n for n, k in names.items() if k == "int8"} == {
        f"layers.{i}.attention.{w}" for i in range(SMALL["n_layers"]) for w in FAMILIES["attention"]}
    assert {n for n, k in names.items() if k == "cpu-gemv"} == {
        f"layers.{i}.feed_forward.{w}" for i in range(SMALL["n_layers"]) for w in FAMILIES["feed-forward"]}
    assert names["output"] == "torch"
    assert kernel_of(model.output) is LinearKernel
    assert kernel_of(model.layers[0].feed_forward.w2) is CpuGemvKernel
    assert model.output.gather_output


# --- a new kernel is one class (and one line in KERNELS) ---------------------------------------


class Float64Kernel(LinearKernel):
    """x Wᵀ in float64, rounded once: a kernel written the way a new family would be."""

    name: ClassVar[str] = "test-float64"

    def local_product(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.double(), self.weight.double()).to(x.dtype)


@pytest.mark.parametrize("tie", [False, True])
def test_a_subclassed_kernel_plugs_into_the_chooser_and_gives_the_same_logits(monkeypatch, tie):
    monkeypatch.delenv("LLAMA3_KERNELS", raising=False)
    monkeypatch.setitem(KERNELS, Float64Kernel.name, Float64Kernel)
    model = make_model(tie_word_embeddings=tie)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    want = model(tokens, 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    plan = choose_kernels(model, "cpu", torch.float32, override=Float64Kernel.name)
    apply_kernels(model, plan)
    assert set(kernels_in(model).values()) == {"test-float64"}
    assert all(type(m).__mro__[1] is Float64Kernel for m in model.modules() if kernel_of(m) is Float64Kernel)
    got = model(tokens, 0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    step = model(tokens[:, :1], 9)  # decoding through the swapped layers and the cache
    assert step.shape == (2, 1, SMALL["vocab_size"])
    assert torch.isfinite(step).all()
    # The kernel kept the float weights: same state dict, tied output still the embedding's table.
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert (model.output.weight is model.tok_embeddings.weight) == tie


def test_the_torch_kernel_leaves_the_layers_as_they_are(monkeypatch):
    monkeypatch.delenv("LLAMA3_KERNELS", raising=False)
    model = make_model()
    before = [id(m) for m in model.modules()]
    apply_kernels(model, choose_kernels(model, "cpu", torch.float32))
    assert [id(m) for m in model.modules()] == before
    assert KERNELS["torch"] is TorchKernel


# --- memory: bytes per kernel ------------------------------------------------------------------


def _held_bytes(model: Transformer) -> int:
    seen, total = set(), 0
    for module in model.modules():
        if kernel_of(module) is FbgemmFp16Kernel:
            total += module.weight_nbytes()  # packed: not in the state dict
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kernel", ["torch", "cpu-gemv", "cpu-gemv-native", "int8", "fbgemm-fp16"])
def test_weight_bytes_per_kernel_are_what_the_swapped_model_holds(monkeypatch, kernel, tie):
    monkeypatch.delenv("LLAMA3_KERNELS", raising=False)
    if kernel == "fbgemm-fp16" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no FBGEMM")
    dtype = torch.bfloat16 if kernel != "fbgemm-fp16" else torch.float16  # fp16: packs = weight bytes
    model = make_model(dtype, tie_word_embeddings=tie)
    plan = choose_kernels(model, "cpu", dtype, override=kernel)
    apply_kernels(model, plan)
    assert weight_bytes(model.params, dtype, plan) == _held_bytes(model)
    if kernel == "int8":
        assert weight_bytes(model.params, dtype, plan) < weight_bytes(model.params, dtype)


def test_a_prequantized_state_dict_loads_into_empty_kernel_layers(monkeypatch):
    """Checkpoints that ship int8 tensors: swap to the kernel's empty (meta) layers, assign."""
    monkeypatch.delenv("LLAMA3_KERNELS", raising=False)
    source = make_model(torch.bfloat16)
    apply_kernels(source, choose_kernels(source, "cpu", torch.bfloat16, quantize="int8"))
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(4))
    want = source(tokens, 0)

    with torch.device("meta"):
        target = Transformer(ModelArgs(**SMALL)).to(torch.bfloat16)
    assert swap_linears(target, Int8Kernel, empty=True) == 7 * SMALL["n_layers"] + 1
    assert target.layers[0].attention.wq.weight.is_meta
    target.load_state_dict(source.state_dict(), assign=True)
    target.setup_kv_cache(device="cpu", dtype=torch.bfloat16)
    assert torch.equal(target(tokens, 0), want)
