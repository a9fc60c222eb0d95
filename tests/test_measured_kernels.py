"""The chooser decides on the CPU by measurement (llama3.kernels.choose + autotune + phases).

The timer is stubbed: each kernel's product advances a fake clock by a cost we set for one row
(decode) and for many rows (prefill), so the expected choice is known exactly. Then: the faster
candidate wins each phase, two weight layouts are kept only where the prefill gain pays and the
memory allows, overrides force, the cache answers a second build and is invalidated when the CPU
or torch changes, and a model built with a measured plan gives torch's logits (within the
kernel's tolerance)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import MEASURED_ARGS, FakeClock, stub_kernel_costs, stubbed_tuning

from llama3 import ModelArgs, Transformer
from llama3.decoding import make_decode_step
from llama3.kernels import (
    FAMILIES,
    CpuGemvKernel,
    CpuGemvNativeKernel,
    FbgemmFp16Kernel,
    PhaseKernel,
    TorchKernel,
    Tuning,
    UnknownKernelError,
    W8A8IntMmKernel,
    W8A8Kernel,
    apply_kernels,
    choose_kernels,
    is_linear,
    kernel_of,
    kernels_in,
)
from llama3.kernels.autotune import KernelCache
from llama3.memory import NotEnoughMemoryError, check_fits, weight_bytes

ARGS = MEASURED_ARGS
MACHINE = {"cpu": "Test CPU 9000", "flags": "avx2 fma", "torch": "2.13.0", "capability": "AVX2"}
needs_fbgemm = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                  reason="this torch build has no FBGEMM")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def costs(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> dict[str, tuple[float, float]]:
    """kernel name -> (seconds for one row, seconds for many rows); fill it in the test."""
    return stub_kernel_costs(monkeypatch, clock,
                             (W8A8IntMmKernel, W8A8Kernel, TorchKernel, CpuGemvNativeKernel, CpuGemvKernel,
                              FbgemmFp16Kernel))


def tuning(tmp_path: Path, clock: FakeClock, machine: dict | None = None) -> Tuning:
    return stubbed_tuning(tmp_path, clock, machine or MACHINE)


def phases(plan, family: str) -> tuple[str, str]:
    choice = plan.families[family]
    return choice.decode, choice.prefill


def make_model(dtype: torch.dtype, **overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**ARGS, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.03)
    return model.to(dtype)


@needs_fbgemm
def test_the_faster_candidate_wins_each_phase(tmp_path, clock, costs, caplog):
    costs.update({"torch": (3e-3, 1e-2), "cpu-gemv": (2e-3, 1e-2), "fbgemm-fp16": (1e-3, 4e-2)})
    args = ModelArgs(**ARGS)
    with caplog.at_level(logging.INFO, logger="llama3.kernels"):
        plan = choose_kernels(args, "cpu", torch.bfloat16, tuning=tuning(tmp_path, clock))
    for family in ("attention", "feed-forward"):
        # FBGEMM decodes, torch's kernel prefills: two layouts (4x faster prefill pays).
        assert phases(plan, family) == ("fbgemm-fp16", "torch")
        assert issubclass(plan.kernel(family), PhaseKernel)
        assert plan.families[family].one_layout.kernel is FbgemmFp16Kernel
    # The output projection is timed for decoding only (a prefill needs its last row): one layout.
    assert plan.kernel("output") is FbgemmFp16Kernel
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernels:")]
    assert len(lines) == 1  # the one log line, with each candidate's measured rate
    # The attention family is timed as one pass through wq, wk, wv, wo (1024 x 1024, 256 x 1024 twice,
    # 1024 x 1024 weights), four products of 1 ms each for FBGEMM.
    rate = (2 * 1024 * 1024 + 2 * 256 * 1024) / 4e-3 / 1e9
    assert f"attention measured: decode fbgemm-fp16 {rate:.3g}, cpu-gemv {rate / 2:.3g}, torch" in lines[0]
    assert "GFLOP/s" in lines[0]


def test_a_small_prefill_gain_keeps_one_layout(tmp_path, clock, costs):
    costs.update({"torch": (3e-3, 1.0e-2), "cpu-gemv": (1e-3, 1.2e-2), "fbgemm-fp16": (2e-3, 9e-2)})
    plan = choose_kernels(ModelArgs(**ARGS), "cpu", torch.bfloat16, tuning=tuning(tmp_path, clock))
    # cpu-gemv decodes; its many-row products are torch's already: 1.2x slower is noise, one kernel.
    assert {f: plan.kernel(f) for f in FAMILIES} == dict.fromkeys(FAMILIES, CpuGemvKernel)
    assert all(c.one_layout is None for c in plan.families.values())


@needs_fbgemm
def test_fbgemm_false_leaves_it_out_and_overrides_force(tmp_path, clock, costs, monkeypatch):
    costs.update({"torch": (3e-3, 1e-2), "cpu-gemv": (2e-3, 1e-2), "fbgemm-fp16": (1e-3, 4e-2)})
    args = ModelArgs(**ARGS)
    plan = choose_kernels(args, "cpu", torch.bfloat16, fbgemm=False, tuning=tuning(tmp_path, clock))
    assert plan.kernel("attention") is CpuGemvKernel
    plan = choose_kernels(args, "cpu", torch.bfloat16, fbgemm=True, tuning=tuning(tmp_path, clock))
    assert plan.kernel("attention") is FbgemmFp16Kernel
    assert plan.families["attention"].reason == "fbgemm=True"
    # A forced phase is kept, the other one measured.
    monkeypatch.setenv("LLAMA3_KERNELS", "decode=torch")
    plan = choose_kernels(args, "cpu", torch.bfloat16, tuning=tuning(tmp_path, clock))
    assert phases(plan, "attention") == ("torch", "torch")  # prefill: torch measured fastest
    assert "decode=torch forced" in plan.families["attention"].reason
    monkeypatch.setenv("LLAMA3_KERNELS", "feed-forward:prefill=fbgemm-fp16,output=torch")
    plan = choose_kernels(args, "cpu", torch.bfloat16, tuning=tuning(tmp_path, clock))
    assert phases(plan, "feed-forward") == ("fbgemm-fp16", "fbgemm-fp16")
    assert phases(plan, "attention") == ("fbgemm-fp16", "torch")
    assert plan.kernel("output") is TorchKernel
    assert plan.families["output"].reason == "override"
    with pytest.raises(UnknownKernelError, match="PHASE one of decode, prefill"):
        choose_kernels(args, "cpu", torch.bfloat16, override="warmup=torch", tuning=tuning(tmp_path, clock))


def test_w8a8_variants_are_measured(tmp_path, clock, costs):
    costs.update({"w8a8": (1e-3, 5e-2), "w8a8-int_mm": (2e-3, 1e-2)})
    plan = choose_kernels(ModelArgs(**ARGS), "cpu", torch.bfloat16, "w8a8", tuning=tuning(tmp_path, clock))
    assert phases(plan, "feed-forward") == ("w8a8", "w8a8-int_mm")
    # Two int8 layouts: both counted by the fit check.
    assert plan.nbytes("layers.0.feed_forward.w1", 4096, 1024, torch.bfloat16) == 2 * (4096 * 1024 + 4 * 4096)
    assert plan.kernel("output") is W8A8Kernel


def test_each_round_starts_from_memory_and_float_candidates_have_their_own_weight(tmp_path, clock, costs,
                                                                                monkeypatch):
    from llama3.kernels import measure
    costs.update({"torch": (3e-3, 1e-2), "cpu-gemv": (1e-3, 1e-2)})
    flushes: list[int] = []
    real_flush = measure._cache_flush

    def recording_flush(nbytes: int):
        flush = real_flush(nbytes)

        def run() -> None:
            flushes.append(nbytes)
            flush()
        return run
    monkeypatch.setattr(measure, "_cache_flush", recording_flush)
    seen: dict[str, list[torch.Tensor]] = {"torch": [], "cpu-gemv": []}  # kept alive: no address reused
    for cls in (TorchKernel, CpuGemvKernel):
        stubbed = cls.local_product

        def record(self, x, stubbed=stubbed, name=cls.name):
            seen[name].append(self.weight)
            return stubbed(self, x)
        monkeypatch.setattr(cls, "local_product", record)
    plan = choose_kernels(ModelArgs(**ARGS), "cpu", torch.bfloat16, fbgemm=False,
                          tuning=tuning(tmp_path, clock))
    assert plan.kernel("attention") is CpuGemvKernel
    # Three families, each the minimum of three rounds, each round after reading the flush buffer.
    assert flushes == [2**16] * 9
    # torch and cpu-gemv compute from a float weight each: neither reads the other's from the cache.
    addresses = {name: {w.data_ptr() for w in weights} for name, weights in seen.items()}
    assert addresses["torch"]
    assert addresses["cpu-gemv"]
    assert not addresses["torch"] & addresses["cpu-gemv"]


def test_cache_size_from_sysfs_sizes_the_flush(tmp_path, monkeypatch):
    from llama3.kernels import measure
    for index, (kind, level, size) in enumerate([("Data", 1, "48K"), ("Instruction", 1, "32K"),
                                                 ("Unified", 2, "2048K"), ("Unified", 3, "307200K")]):
        entry = tmp_path / f"index{index}"
        entry.mkdir()
        for name, value in (("type", kind), ("level", level), ("size", size)):
            (entry / name).write_text(f"{value}\n")
    assert measure.last_level_cache_bytes(str(tmp_path)) == 307200 * 1024
    assert measure.last_level_cache_bytes(str(tmp_path / "missing")) is None
    low, high = measure.FLUSH_BYTES_BOUNDS
    for cache, expected in ((300 * 2**20, 600 * 2**20), (2**20, low), (2**30, high), (None, high)):
        monkeypatch.setattr(measure, "last_level_cache_bytes", lambda cache=cache: cache)
        assert measure.flush_bytes() == expected


def test_cache_answers_the_second_build_and_a_new_cpu_or_torch_measures_again(tmp_path, clock, costs):
    costs.update({"torch": (3e-3, 1e-2), "cpu-gemv": (1e-3, 1e-2)})
    args = ModelArgs(**ARGS)
    choose_kernels(args, "cpu", torch.bfloat16, fbgemm=False, tuning=tuning(tmp_path, clock))
    costs.update({"torch": (1e-3, 1e-2), "cpu-gemv": (3e-3, 1e-2)})  # would now pick torch
    spent = clock.now
    plan = choose_kernels(args, "cpu", torch.bfloat16, fbgemm=False, tuning=tuning(tmp_path, clock))
    assert clock.now == spent  # nothing ran
    assert plan.kernel("attention") is CpuGemvKernel
    assert plan.families["attention"].reason.startswith("attention measured (cached)")
    for change in ({"cpu": "Other CPU 1"}, {"torch": "2.14.0"}, {"flags": "avx2 fma avx512f"}):
        plan = choose_kernels(args, "cpu", torch.bfloat16, fbgemm=False,
                              tuning=tuning(tmp_path, clock, {**MACHINE, **change}))
        assert plan.kernel("attention") is TorchKernel
        assert "(cached)" not in plan.families["attention"].reason


def test_not_measured_off_the_cpu_for_test_shapes_or_when_off(tmp_path, clock, costs):
    costs.update({"torch": (3e-3, 1e-2), "cpu-gemv": (1e-3, 1e-2)})
    small = ModelArgs(**{**ARGS, "dim": 256})
    choose_kernels(small, "cpu", torch.bfloat16, tuning=tuning(tmp_path, clock))
    choose_kernels(ModelArgs(**ARGS), "cpu", torch.bfloat16,
                   tuning=Tuning(enabled=False, timer=clock, cache=KernelCache(tmp_path / "k.json")))
    assert choose_kernels(ModelArgs(**ARGS), "cuda", torch.bfloat16).kernel("attention") is TorchKernel
    assert clock.now == 0.0
    assert not (tmp_path / "kernels.json").exists()


@needs_fbgemm
def test_fit_check_drops_the_second_layout_when_both_do_not_fit(tmp_path, clock, costs, monkeypatch):
    costs.update({"torch": (3e-3, 1e-2), "cpu-gemv": (2e-3, 1e-2), "fbgemm-fp16": (1e-3, 4e-2)})
    args = ModelArgs(**ARGS)
    plan = choose_kernels(args, "cpu", torch.bfloat16, tuning=tuning(tmp_path, clock))
    two = weight_bytes(args, torch.bfloat16, plan)
    one = weight_bytes(args, torch.bfloat16, plan.with_one_layout())
    assert two > one
    monkeypatch.setattr("llama3.memory.available_bytes", lambda device: 10**12)
    assert check_fits(args, torch.bfloat16, torch.device("cpu"), 1, plan) is plan
    room = one + (two - one) // 2 + 2 * 32 * 2 * 2 * 128 * 2  # + the KV cache; short of both layouts
    monkeypatch.setattr("llama3.memory.available_bytes", lambda device: room)
    fitted = check_fits(args, torch.bfloat16, torch.device("cpu"), 1, plan)
    assert phases(fitted, "attention") == ("fbgemm-fp16", "fbgemm-fp16")
    monkeypatch.setattr("llama3.memory.available_bytes", lambda device: one // 2)
    with pytest.raises(NotEnoughMemoryError):
        check_fits(args, torch.bfloat16, torch.device("cpu"), 1, plan)


def _held_bytes(model: Transformer) -> int:
    """The state dict's tensors (once each) plus the layouts kept outside it (FBGEMM packs)."""
    seen, total = set(), 0
    for module in model.modules():
        if is_linear(module) and not kernel_of(module).shares_float_weight:
            total += module.weight_nbytes()  # FBGEMM: packed, not in the state dict
        elif is_linear(module) and issubclass(kernel_of(module), PhaseKernel):
            total += module.held_nbytes() - module.weight.numel() * module.weight.element_size()
            assert module.weight_nbytes() == module.weight.numel() * 2  # decoding reads the fp16 pack
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


@needs_fbgemm
@pytest.mark.parametrize("tie", [False, True])
def test_a_measured_two_layout_model_gives_torchs_logits(tmp_path, clock, costs, tie):
    costs.update({"torch": (3e-3, 1e-2), "cpu-gemv": (2e-3, 1e-2), "fbgemm-fp16": (1e-3, 4e-2)})
    dtype = torch.float16  # FBGEMM's float16 weights are then exact: only the summation order differs
    want_model = make_model(dtype, tie_word_embeddings=tie)
    model = make_model(dtype, tie_word_embeddings=tie)
    plan = choose_kernels(model, "cpu", dtype, tuning=tuning(tmp_path, clock))
    apply_kernels(model, plan)
    names = kernels_in(model)
    assert names["layers.0.attention.wq"] == "fbgemm-fp16+torch"
    assert weight_bytes(model.params, dtype, plan) == _held_bytes(model)
    tokens = torch.randint(0, ARGS["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    costs.clear()
    with torch.no_grad():
        for start, chunk in ((0, tokens), (9, tokens[:, :1])):  # a prefill, then a decoding step
            want, got = want_model(chunk, start), model(chunk, start)
            scale = want.float().std()
            assert (got.float() - want.float()).abs().max() <= 2e-3 * scale + 1e-3
    assert torch.equal(model.tok_embeddings.weight, want_model.tok_embeddings.weight)  # the table kept


def test_a_w8a8_model_is_close_to_the_float_model(tmp_path, clock, costs):
    """w8a8's own tolerance: int8 weights and rows move logits by a few % of their spread."""
    costs.update({"w8a8": (1e-3, 5e-2), "w8a8-int_mm": (2e-3, 1e-2)})
    want_model, model = make_model(torch.float32), make_model(torch.float32)
    plan = choose_kernels(model, "cpu", torch.float32, "w8a8", tuning=tuning(tmp_path, clock))
    apply_kernels(model, plan)
    assert set(kernels_in(model).values()) == {"w8a8", "w8a8+w8a8-int_mm"}
    assert not any(k.endswith(("wq.weight", "w1.weight", "output.weight")) for k in model.state_dict())
    tokens = torch.randint(0, ARGS["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(2))
    costs.clear()
    with torch.no_grad():
        for start, chunk in ((0, tokens), (9, tokens[:, :1])):
            want, got = want_model(chunk, start), model(chunk, start)
            err = (got - want).abs()
            assert err.max() <= 0.15 * want.std()  # cpu_bench.md: ~0.3 std on 4 random 1B-shape layers
            assert err.mean() <= 0.03 * want.std()


@needs_fbgemm
@pytest.mark.slow
def test_a_two_layout_model_decodes_the_same_compiled(tmp_path, clock, costs):
    """torch.compile traces the phase switch (a shape test) and the opaque FBGEMM product."""
    costs.update({"torch": (3e-3, 1e-2), "cpu-gemv": (2e-3, 1e-2), "fbgemm-fp16": (1e-3, 4e-2)})
    model = make_model(torch.float16)
    apply_kernels(model, choose_kernels(model, "cpu", torch.float16, tuning=tuning(tmp_path, clock)))
    assert issubclass(kernel_of(model.layers[0].feed_forward.w1), PhaseKernel)
    costs.clear()
    torch._dynamo.reset()
    tokens = torch.randint(0, ARGS["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(3))
    eager, compiled = make_decode_step(model, compile=False), make_decode_step(model, compile=True)
    with torch.no_grad():
        model(tokens, 0)
        token = tokens[:, -1:]
        for pos in range(6, 10):
            want = eager(token, pos)[:, -1].clone()
            got = compiled(token, pos)[:, -1].clone()
            assert (got.float() - want.float()).abs().max() <= 1e-3 * want.float().abs().max()
            token = want.argmax(-1, keepdim=True)


def test_forcing_the_quantize_kernel_on_another_family_keeps_its_settings(monkeypatch):
    monkeypatch.delenv("LLAMA3_KERNELS", raising=False)
    args = ModelArgs(**{**ARGS, "dim": 256})
    plan = choose_kernels(args, "cpu", torch.bfloat16, "int4", override="output=int4", int4_group_size=32)
    assert plan.kernel("output") is plan.kernel("attention")
    assert plan.families["output"].settings == {"group_size": 32}
    assert plan.nbytes("output", 256, 256, torch.bfloat16) == plan.nbytes("layers.0.attention.wq", 256, 256,
                                                                          torch.bfloat16)
