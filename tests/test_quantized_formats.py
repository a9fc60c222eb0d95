"""Quantized formats (issue 20): the fp8 and int4 kernels and the quantized checkpoint readers,
against oracles we did not write.

* fp8 (Meta fp8_mixed, HF fbgemm_fp8): fbgemm's kernels only run on CUDA, so the oracle is a
  float64 emulation of the documented formula (llama-models ``quantize_impls.py``): row maxima
  clamped to the bound, scale = max / 448, values rounded to the e4m3 grid by our own float64
  rounding (not torch's float8 cast), exact products, scales applied after the sum.
* INT4_EO8: torchao 0.18's ``Int8DynActInt4WeightLinear`` (the layer Meta's loader builds) plus
  the loader's LoRA adaptor and int8 embedding/output; whole models against Meta's reference
  Transformer (llama-models) with those layers swapped in the way Meta's loader swaps them. The
  loader itself cannot be imported with torchao 0.18 (it imports ``torchao.quantization.GPTQ``,
  since renamed), so the few lines of its module swap are restated here.
* int4 weight-only: torch's int4 CPU kernel against the float32 product of the dequantized
  weights; quantize-at-load error against the float layer within a bound derived from the scales.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _quantized_mp_worker import build_quantized

from llama3 import ModelArgs, Transformer
from llama3.checkpoint import (
    inspect_checkpoint,
    load_model,
    load_rank_state_dict,
    random_state_dict,
    read_model_args,
)
from llama3.checkpoint.errors import CheckpointFormatError, TensorDtypeError
from llama3.checkpoint.quantized import (
    FBGEMM_FP8,
    FP8_MIXED,
    INT4_EO8,
    QuantizedCheckpointError,
    UnsupportedQuantizationError,
    detect_quantization,
    fit_note,
    read_quantized_rank,
    weight_bytes_per_rank,
)
from llama3.checkpoint.quantized_write import (
    reshard_fp8_mixed,
    write_fbgemm_fp8_checkpoint,
    write_fp8_mixed_checkpoint,
    write_int4_eo8_checkpoint,
)
from llama3.distributed import ColumnParallelLinear, RowParallelLinear, init_model_parallel
from llama3.errors import LlamaError
from llama3.kernels import apply_kernels, choose_kernels, kernels_in
from llama3.kernels.base import swap_linear
from llama3.kernels.fp8 import (
    Fp8RowwiseLinear,
    fp8_rowwise_linear,
    meta_fp8_layers,
    quantize_fp8_rowwise,
)
from llama3.kernels.int4 import (
    INT4_GROUP_SIZES,
    Int4WeightOnlyLinear,
    Int8DynActInt4Linear,
    UnsupportedGroupSizeError,
    dequantize_int4_groupwise,
    int4_bytes_per_weight,
)
from llama3.presets import preset_args

# n_kv_heads 2 (GQA), ffn hidden 256 (multiple_of 64: splits into 2 ranks in whole int4 groups of 32).
ARGS = dict(dim=64, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=64, norm_eps=1e-5,
            rope_theta=500000.0, use_scaled_rope=False, max_batch_size=2, max_seq_len=64)
TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def tiny_args(**overrides) -> ModelArgs:
    return ModelArgs(**{**ARGS, **overrides})


def float_state_dict(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    # std 0.08: large enough that attention patterns and the feed-forward matter to the logits.
    return random_state_dict(args, seed=seed, std=0.08)


# --- the float64 oracle of Meta's fp8 formula ------------------------------------------------------


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """float64 values rounded to float8 e4m3fn's grid (3 mantissa bits, subnormals below 2^-6,
    ties to even), saturating at 448: written from the format's definition, not torch's cast."""
    a = v.abs()
    exponent = torch.floor(torch.log2(a.clamp(min=2.0**-12))).clamp(min=-6)
    step = torch.exp2(exponent - 3)
    return torch.sign(v) * (torch.round(a / step) * step).clamp(max=448.0)


def emulate_quantize(x: torch.Tensor, ub: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fbgemm's quantize_fp8_per_row: (values on the e4m3 grid in float64, float64 row scales)."""
    x = x.float()
    m = x.abs().amax(-1, keepdim=True).clamp(min=1e-12, max=ub if ub is not None else math.inf)
    inv = 448.0 / m  # float32, as fbgemm computes it
    return e4m3_round((x * inv).double()), (1.0 / inv).double().squeeze(-1)


def emulate_fp8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, ub: float | None = 1200.0
                       ) -> torch.Tensor:
    """f8f8bf16_rowwise(quantize_fp8_per_row(x, ub), W) in float64: x [m, k], wq float8 [n, k]."""
    xq, sx = emulate_quantize(x, ub)
    return (xq @ wq.double().t()) * sx[:, None] * w_scale.double()[None, :]


# --- fp8 kernels -------------------------------------------------------------------------------


def test_fp8_quantization_is_fbgemms_rowwise_rounding():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, generator=gen) * torch.logspace(-3, 2, 16)[:, None]
    x[3, 7] = 5000.0  # above the bound: this row saturates
    q, scale = quantize_fp8_rowwise(x, 1200.0)
    want_q, want_scale = emulate_quantize(x, 1200.0)
    assert q.dtype == torch.float8_e4m3fn
    assert scale.dtype == torch.float32
    assert torch.equal(q.double(), want_q)
    torch.testing.assert_close(scale.double(), want_scale, rtol=1e-7, atol=0)
    assert scale[3].item() == pytest.approx(1200.0 / 448.0)
    assert q[3, 7].float().item() == 448.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_metas_formula(dtype):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(96, 256, generator=gen) * 0.05
    x = (torch.randn(2, 5, 256, generator=gen) * 3).to(dtype)
    wq, ws = quantize_fp8_rowwise(w)
    y = fp8_rowwise_linear(x, wq, ws, 1200.0)
    assert y.dtype == dtype
    assert y.shape == (2, 5, 96)
    want = emulate_fp8_linear(x.reshape(-1, 256), wq, ws).reshape(2, 5, 96)
    # float32 sums of 256 exact products: error <= 256 * 2^-24 of the sum of |terms|;
    # bfloat16 out (like fbgemm's f8f8bf16) adds half a bf16 ulp, 2^-9 relative.
    xq, sx = emulate_quantize(x.reshape(-1, 256), 1200.0)
    terms = ((xq.abs() @ wq.double().abs().t()) * sx[:, None] * ws.double()[None, :]).reshape(2, 5, 96)
    bound = terms * 256 * 2.0**-24 + (want.abs() * 2.0**-8 if dtype == torch.bfloat16 else 0)
    assert ((y.double() - want).abs() <= bound + 1e-30).all()


def _column(in_f: int, out_f: int, seed: int) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(in_f, out_f)
    torch.nn.init.normal_(layer.weight, std=0.05, generator=torch.Generator().manual_seed(seed))
    return layer.requires_grad_(False)


def test_fp8_quantize_at_load_error_is_within_the_rounding_bound():
    layer = _column(256, 128, seed=2)
    fp8 = swap_linear(layer, Fp8RowwiseLinear)
    assert isinstance(fp8, Fp8RowwiseLinear)
    assert isinstance(fp8, ColumnParallelLinear)
    assert fp8.weight_nbytes() == 128 * 256 + 128 * 4
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(3))
    y, exact = fp8(x), x @ layer.weight.t()
    # Each e4m3 value is within 2^-4 relative (normal) or 2^-10 of its row scale (subnormal) of
    # what it stands for; so |x̂ŵ - xw| <= (2^-4|x| + 2^-10 s_x)|ŵ| + |x|(2^-4|w| + 2^-10 s_w).
    _, sx = quantize_fp8_rowwise(x, 1200.0)
    w_hat = fp8.weight.float() * fp8.weight_scale[:, None]
    bound = ((2**-4 * x.abs() + 2**-10 * sx[:, None]) @ w_hat.abs().t()
             + x.abs() @ (2**-4 * layer.weight.abs() + 2**-10 * fp8.weight_scale[:, None]).t())
    assert ((y - exact).abs() <= bound * 1.0001 + 1e-6).all()
    assert ((y - exact).norm() / exact.norm()).item() < 0.05  # measured ~0.03 on random data


def test_fp8_model_parallel_slices():
    """Column-parallel: rows and their scales split, the concatenation is the one-rank result
    exactly. Row-parallel (w2): each rank quantizes its slice of weights and of activations, and
    the partial sums add up to Meta's computation at that world size (float64 emulation)."""
    w = _column(256, 64, seed=4).weight
    full_q, full_s = quantize_fp8_rowwise(w)
    for part in range(2):
        q, s = quantize_fp8_rowwise(w[part * 32:(part + 1) * 32])
        assert torch.equal(q.float(), full_q[part * 32:(part + 1) * 32].float())
        assert torch.equal(s, full_s[part * 32:(part + 1) * 32])
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(5))
    row = RowParallelLinear(256, 64)
    row.weight = torch.nn.Parameter(w, requires_grad=False)
    halves = []
    for part in range(2):
        local = RowParallelLinear(128, 64)
        local.weight = torch.nn.Parameter(w[:, part * 128:(part + 1) * 128].clone(), requires_grad=False)
        halves.append(type("K", (Fp8RowwiseLinear, RowParallelLinear), {}).from_float(local))
    total = sum(h.local_product(x[:, i * 128:(i + 1) * 128]) for i, h in enumerate(halves))
    want = sum(emulate_fp8_linear(x[:, i * 128:(i + 1) * 128], h.weight, h.weight_scale)
               for i, h in enumerate(halves))
    torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-6)


def test_fp8_settings_are_checked():
    with pytest.raises(LlamaError, match="activation_scale_ub"):
        type("K", (Fp8RowwiseLinear, ColumnParallelLinear), {}).empty(_column(32, 32, 0),
                                                                      activation_scale_ub=float("nan"))


# --- int4 kernels ------------------------------------------------------------------------------


def _torchao_8da4w(q, scales, zeros, group_size, lora=None):
    """What Meta's loader builds: torchao's Int8DynActInt4WeightLinear (+ its LoRA forward)."""
    linear_quant_modules = pytest.importorskip("torchao.quantization.linear_quant_modules")
    out_f, in_f = q.shape
    layer = linear_quant_modules.Int8DynActInt4WeightLinear(in_f, out_f, bias=False, groupsize=group_size,
                                                            precision=torch.float32)
    layer.weight.copy_(q)
    layer.scales.copy_(scales)
    layer.zeros.copy_(zeros if zeros is not None else torch.zeros_like(scales))

    def forward(x):
        out = layer(x)
        if lora is None:
            return out
        a, b, scale = lora
        return out + F.linear(F.linear(x, a), b) * scale  # Meta: self.adaptor(input_) * self.lora_scale
    return forward


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("kind", [ColumnParallelLinear, RowParallelLinear])
def test_int4_eo8_layer_matches_torchao(kind, lora):
    gen = torch.Generator().manual_seed(6)
    out_f, in_f, g = 48, 128, 32
    q = torch.randint(-8, 8, (out_f, in_f), generator=gen, dtype=torch.int8)
    scales = torch.rand(out_f, in_f // g, generator=gen) * 0.02 + 0.001
    zeros = torch.randint(-2, 3, (out_f, in_f // g), generator=gen).float()
    a, b = torch.randn(4, in_f, generator=gen) * 0.1, torch.randn(out_f, 4, generator=gen) * 0.1
    layer = kind(in_f, out_f)
    cls = type("K", (Int8DynActInt4Linear, kind), {})
    ours = cls.empty(layer, group_size=g, lora_rank=4 if lora else None, lora_scale=2.0 if lora else None)
    sd = {"weight": q, "scales": scales, "zeros": zeros}
    if lora:
        sd.update({"adaptor.A.weight": a, "adaptor.B.weight": b})
    ours.load_state_dict(sd, assign=True, strict=True)
    x = torch.randn(3, 7, in_f, generator=gen) * 2
    x[0, 0, :5] = 30.0  # a token with an outlier: its int8 step is coarse
    oracle = _torchao_8da4w(q, scales, zeros, g, (a, b, 2.0) if lora else None)
    torch.testing.assert_close(ours.local_product(x), oracle(x), rtol=1e-5, atol=1e-5)


def test_int4_eo8_bad_settings_are_refused():
    layer = ColumnParallelLinear(96, 32)
    cls = type("K", (Int8DynActInt4Linear, ColumnParallelLinear), {})
    with pytest.raises(UnsupportedGroupSizeError, match="does not divide"):
        cls.empty(layer, group_size=64)
    with pytest.raises(LlamaError, match="rank and scale"):
        cls.empty(layer, group_size=32, lora_rank=4)


@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_weight_only_cpu_kernel(group_size, dtype):
    layer = _column(512, 96, seed=7)
    int4 = swap_linear(layer, Int4WeightOnlyLinear, group_size=group_size)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(8))
    y = int4(x.to(dtype))
    assert y.dtype == dtype
    assert y.shape == (5, 96)
    # The kernel computes x times the dequantized weight, (q - 8) * scale + zero group by group,
    # with activations, scales and offsets in bfloat16 (see int4_weight_only_linear).
    s = int4.scales_and_zeros.to(torch.bfloat16).float()
    w_hat = dequantize_int4_groupwise(_unpacked(layer.weight, group_size), s[..., 0].t(), s[..., 1].t())
    xb = x.to(torch.bfloat16).double()
    want = xb @ w_hat.double().t()
    # bfloat16 rounding of the result and of the partial sums: a few bf16 ulps of sum |x w|.
    slack = 2**-6 * (xb.abs() @ w_hat.abs().double().t())
    assert ((y.double() - want).abs() <= slack).all()
    # Error against the float layer: each weight is within half a step (scale / 2) of its value.
    step = int4.scales_and_zeros[..., 0].float().t().repeat_interleave(group_size, dim=1)
    exact = x @ layer.weight.t()
    bound = (x.abs() @ (step / 2).t()).double() * 1.0001 + 2 * slack
    assert ((y.double() - exact.double()).abs() <= bound).all()
    rel = ((y.float() - exact).norm() / exact.norm()).item()
    # Rounding to a 16-level grid over each group's range: error ~ step / sqrt(12) per weight,
    # relative ~ 0.27 (32 values span ~4 sigma) .. 0.4 (256: ~5.5 sigma) / sqrt(12) = 0.08 .. 0.11;
    # measured 0.079 / 0.093 / 0.106 / 0.112 for group 32 / 64 / 128 / 256, float32 and bfloat16.
    assert rel < {32: 0.09, 64: 0.105, 128: 0.12, 256: 0.13}[group_size]


def _unpacked(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    from llama3.kernels.int4 import quantize_int4_groupwise

    return quantize_int4_groupwise(weight, group_size)[0]


def test_int4_weight_only_refuses_unsupported_group_sizes():
    with pytest.raises(UnsupportedGroupSizeError, match="one of 32, 64, 128, 256"):
        swap_linear(_column(512, 32, 0), Int4WeightOnlyLinear, group_size=48)


# --- memory ------------------------------------------------------------------------------------


def test_bytes_per_rank_405b_on_8_ranks():
    """The issue's numbers: 405B needs ~101 GB per rank on 8 ranks in bf16, ~61 GB in fp8_mixed."""
    args = preset_args("llama-3.1-405b")
    bf16 = weight_bytes_per_rank(args, None, 8)
    fp8 = weight_bytes_per_rank(args, "fp8_mixed", 8)
    assert round(bf16 / 1e9) == 101
    assert round(fp8 / 1e9) == 61
    # Every FFN weight Meta quantizes costs 1 byte + its row's 4-byte scale instead of 2 bytes.
    ffn = 3 * args.dim * args.ffn_hidden_dim // 8 * (args.n_layers - 2)
    scales = (2 * args.ffn_hidden_dim // 8 + args.dim) * 4 * (args.n_layers - 2)
    assert bf16 - fp8 == ffn - scales
    assert int4_bytes_per_weight(128) == 0.53125
    note = fit_note(args, 8, free_bytes=80 * 10**9)
    assert note.startswith("weights per rank on 8 ranks: bf16 101.5 GB; fp8_mixed 60.9 GB; int4 ")
    assert note.endswith("80.0 GB free: fp8_mixed, int4 would fit")


# --- checkpoints: detection and refusal --------------------------------------------------------


def test_detects_each_format_and_its_settings(tmp_path):
    args = tiny_args()
    sd = float_state_dict(args)
    fp8 = inspect_checkpoint(write_fp8_mixed_checkpoint(sd, args, tmp_path / "fp8", num_shards=2))
    hf = inspect_checkpoint(write_fbgemm_fp8_checkpoint(sd, args, tmp_path / "hf",
                                                        activation_scale_ub=1000.0))
    qlora = inspect_checkpoint(write_int4_eo8_checkpoint(sd, args, tmp_path / "qlora", group_size=32,
                                                         lora_rank=4, lora_scale=2.0))
    spin = inspect_checkpoint(write_int4_eo8_checkpoint(sd, args, tmp_path / "spin", group_size=64))
    float_ckpt = inspect_checkpoint(tmp_path / "fp8")
    assert detect_quantization(fp8).scheme == FP8_MIXED
    assert detect_quantization(fp8).quantized_layers(args) == meta_fp8_layers(4)
    h = detect_quantization(hf)
    assert (h.scheme, h.activation_scale_ub) == (FBGEMM_FP8, 1000.0)
    assert h.quantized_layers(args) == [f"layers.{i}.feed_forward.{w}" for i in (1, 2)
                                        for w in ("w1", "w2", "w3")]
    q = detect_quantization(qlora)
    assert (q.scheme, q.group_size, q.lora_rank, q.lora_scale) == (INT4_EO8, 32, 4, 2.0)
    s = detect_quantization(spin)
    assert (s.scheme, s.group_size, s.lora_rank) == (INT4_EO8, 64, None)
    assert float_ckpt.format == "meta"
    for path in (tmp_path / "fp8").glob("fp8_scales_*.pt"):
        path.unlink()
    assert detect_quantization(inspect_checkpoint(tmp_path / "fp8")) is None  # now unrecognised as fp8


def test_other_schemes_are_refused_by_name(tmp_path):
    args = tiny_args()
    sd = float_state_dict(args)
    meta = write_int4_eo8_checkpoint(sd, args, tmp_path / "m", group_size=32)
    params = json.loads((meta / "params.json").read_text())
    params["quantization_args"]["scheme"] = "int8_weight_only"
    (meta / "params.json").write_text(json.dumps(params))
    with pytest.raises(UnsupportedQuantizationError, match="'int8_weight_only' is not supported") as e:
        detect_quantization(inspect_checkpoint(meta))
    assert isinstance(e.value, CheckpointFormatError)
    assert isinstance(e.value, ValueError)
    hf = write_fbgemm_fp8_checkpoint(sd, args, tmp_path / "h")
    config = json.loads((hf / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedQuantizationError, match="'gptq' is not supported"):
        detect_quantization(inspect_checkpoint(hf))


def test_fp8_mixed_with_a_missing_scale_file_is_refused(tmp_path):
    args = tiny_args()
    ckpt = write_fp8_mixed_checkpoint(float_state_dict(args), args, tmp_path / "c", num_shards=2)
    (ckpt / "fp8_scales_1.pt").unlink()
    with pytest.raises(QuantizedCheckpointError, match="needs fp8_scales_0.pt, fp8_scales_1.pt"):
        detect_quantization(inspect_checkpoint(ckpt))


def test_float_loader_refuses_float8_tensors_instead_of_casting_them(tmp_path):
    """Before: a fp8_mixed checkpoint loaded silently with its float8 weights cast up and its
    scales ignored. The float loader now refuses any float8 tensor by name: the float reader
    itself, and load_model when the scale files that make it fp8_mixed are gone."""
    args = tiny_args()
    ckpt = write_fp8_mixed_checkpoint(float_state_dict(args), args, tmp_path / "c")
    with pytest.raises(TensorDtypeError, match="float8_e4m3fn.*fp8_scales"):
        load_rank_state_dict(ckpt, args, 0, 1)
    (ckpt / "fp8_scales_0.pt").unlink()
    with pytest.raises(TensorDtypeError, match="float8_e4m3fn.*fp8_scales"):
        load_model(ckpt, max_seq_len=32, max_batch_size=1, device="cpu", dtype="float32", verbose=False)


# --- checkpoints: whole models against Meta's computation -------------------------------------------


def meta_reference(args: ModelArgs, float_sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    meta_model = pytest.importorskip("llama_models.llama3.model")
    from llama_models.llama3.args import ModelArgs as MetaModelArgs

    init_model_parallel()
    ref = meta_model.Transformer(MetaModelArgs(**ARGS))
    ref.load_state_dict({k: v.float() for k, v in float_sd.items()}, strict=True)
    return ref.eval()


def _fp8_ffn_oracle(w1, w3, w2, ub):
    """Meta's ffn_swiglu_dynamic (quantize_impls.py) in float64: three row-scaled fp8 products.
    ``w2`` is one (weight, scale) pair, or a list of them, one per model-parallel rank: each rank
    quantizes its slice of z and the partial sums are all-reduced (Meta's row-parallel w2)."""
    w2 = w2 if isinstance(w2, list) else [w2]

    def forward(x):
        flat = x.reshape(-1, x.shape[-1])
        x1 = emulate_fp8_linear(flat, *w1, ub)
        x3 = emulate_fp8_linear(flat, *w3, ub)
        z = (F.silu(x1) * x3).float()
        out, start = 0, 0
        for q, scale in w2:
            out = out + emulate_fp8_linear(z[:, start:start + q.shape[1]], q, scale, ub)
            start += q.shape[1]
        return out.float().reshape(*x.shape[:-1], -1)
    return forward


def test_fp8_mixed_logits_equal_metas_computation(tmp_path):
    args = tiny_args()
    sd = float_state_dict(args)
    ckpt = write_fp8_mixed_checkpoint(sd, args, tmp_path / "c")
    shard = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    scales = torch.load(ckpt / "fp8_scales_0.pt", weights_only=True)
    ref = meta_reference(args, {k: (v if v.dtype == torch.bfloat16 else sd[k]) for k, v in shard.items()})
    for i in range(1, args.n_layers - 1):
        ws = {w: (shard[f"layers.{i}.feed_forward.{w}.weight"], scales[f"{i}_feed_forward.{w}_0"])
              for w in ("w1", "w2", "w3")}
        ref.layers[i].feed_forward.forward = _fp8_ffn_oracle(ws["w1"], ws["w3"], ws["w2"], 1200.0)
    with torch.no_grad():
        want = ref(TOKENS, 0)
        got = build_quantized(ckpt)(TOKENS, 0)
    _assert_logits_close(got, want)


def _assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> None:
    # The float parts agree to ~1e-5 (tests/test_model.py); an activation whose float32 value
    # differs by that much can land on the other side of a rounding boundary of its quantization
    # step, which moves a logit by about one step times a weight. 1 % of the logits' range covers
    # a few such flips and is ten times below the error of quantizing (measured ~10 %).
    span = (want.max() - want.min()).item()
    assert (got - want).abs().max().item() <= 0.01 * span
    # Until the first flip, positions agree to float32 rounding (a flip reaches later positions
    # through attention). Measured: 100 % / 98 % / 100 % / 73 % of positions for fp8_mixed /
    # fbgemm_fp8 / QLoRA / SpinQuant, the largest difference 0.6 % of the range.
    exact = ((got - want).abs().amax(-1) <= 1e-5 * span).float().mean().item()
    assert exact >= 0.5
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.95


@pytest.mark.parametrize("world", [1, 2])
def test_fp8_mixed_rank_slices_are_the_shards_and_resharding_keeps_scales_with_rows(tmp_path, world):
    args = tiny_args()
    sd = float_state_dict(args)
    two = write_fp8_mixed_checkpoint(sd, args, tmp_path / "two", num_shards=2)
    info = inspect_checkpoint(two)
    fmt = detect_quantization(info)
    shards = [torch.load(two / f"consolidated.{s:02d}.pth", weights_only=True) for s in range(2)]
    scales = [torch.load(two / f"fp8_scales_{s}.pt", weights_only=True) for s in range(2)]
    ranks = [read_quantized_rank(info, args, fmt, r, world, dtype=torch.float32) for r in range(world)]
    for w, dim in (("w1", 0), ("w3", 0), ("w2", 1)):
        key = f"layers.1.feed_forward.{w}"
        if world == 2:  # each rank reads its own shard exactly, scales included
            for r in range(2):
                assert torch.equal(ranks[r][key + ".weight"].float(), shards[r][key + ".weight"].float())
                assert torch.equal(ranks[r][key + ".weight_scale"], scales[r][f"1_feed_forward.{w}_{r}"])
        else:  # merged: the rows keep their values; w2's two column halves are requantized per row
            deq = torch.cat([shards[s][key + ".weight"].float()
                             * scales[s][f"1_feed_forward.{w}_{s}"][:, None] for s in range(2)], dim)
            got = ranks[0][key + ".weight"].float() * ranks[0][key + ".weight_scale"][:, None]
            if dim == 0:
                assert torch.equal(got, deq)
            else:
                step = 2**-9 * ranks[0][key + ".weight_scale"][:, None]  # e4m3 subnormal half step
                assert ((got - deq).abs() <= 2**-4 * deq.abs() + step).all()


def _fp8_linear_oracle(q, s):
    def forward(x):
        return emulate_fp8_linear(x.reshape(-1, x.shape[-1]), q, s, 1200.0).float().reshape(*x.shape[:-1], -1)
    return forward


@pytest.mark.parametrize(("src", "dst"), [(1, 2), (2, 1)])
def test_fp8_mixed_reshards_to_another_shard_count(tmp_path, src, dst):
    """The written shards and scale files hold exactly what each rank of ``dst`` would read from
    the source, so the resharded checkpoint loads on ``dst`` ranks as the source does."""
    args = tiny_args()
    ckpt = write_fp8_mixed_checkpoint(float_state_dict(args), args, tmp_path / "src", num_shards=src)
    info = inspect_checkpoint(ckpt)
    out = reshard_fp8_mixed(info, read_model_args(info), tmp_path / "dst", dst)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"consolidated.{r:02d}.pth" for r in range(dst)] + [f"fp8_scales_{r}.pt" for r in range(dst)]
        + ["params.json"])
    before, after = inspect_checkpoint(ckpt), inspect_checkpoint(out)
    assert detect_quantization(after).scheme == FP8_MIXED
    for rank in range(dst):
        want = read_quantized_rank(before, args, detect_quantization(before), rank, dst, dtype=torch.bfloat16)
        got = read_quantized_rank(after, args, detect_quantization(after), rank, dst, dtype=torch.bfloat16)
        assert want.keys() == got.keys()
        for k in want:
            assert want[k].dtype == got[k].dtype, k
            assert torch.equal(want[k].float(), got[k].float()), k


def test_fbgemm_fp8_logits_equal_metas_computation(tmp_path):
    args = tiny_args()
    sd = float_state_dict(args)
    ckpt = write_fbgemm_fp8_checkpoint(sd, args, tmp_path / "c", modules_to_not_convert=["lm_head"])
    from safetensors.torch import load_file

    hf = load_file(ckpt / "model.safetensors")
    float_sd = {k: v.to(torch.bfloat16).float() for k, v in sd.items()}
    ref = meta_reference(args, float_sd)
    from llama3.checkpoint.hf import to_hf_name, unpermute_rotate_half

    for i in range(args.n_layers):
        for name, heads in (("attention.wq", args.n_heads), ("attention.wk", args.n_kv_heads),
                            ("attention.wv", None), ("attention.wo", None), ("feed_forward.w1", None),
                            ("feed_forward.w2", None), ("feed_forward.w3", None)):
            key = to_hf_name(f"layers.{i}.{name}.weight")
            q, s = hf[key], hf[key + "_scale"].reshape(-1, 1)
            if heads:  # HF's rotate-half row order back to Meta's, scales with their rows
                q, s = unpermute_rotate_half(q, heads), unpermute_rotate_half(s, heads)
            module = ref.layers[i].get_submodule(name)
            module.forward = _fp8_linear_oracle(q, s.reshape(-1))
    with torch.no_grad():
        want = ref(TOKENS, 0)
        got = build_quantized(ckpt)(TOKENS, 0)
    _assert_logits_close(got, want)


class _MetaInt4Oracle(torch.nn.Module):
    def __init__(self, forward):
        super().__init__()
        self._forward = forward

    def forward(self, x):
        return self._forward(x)


def _swap_meta_int4(ref: torch.nn.Module, shard: dict, prefix: str, group_size: int, lora_scale) -> None:
    """Meta's _prepare_model_int4_weight_int8_dynamic_activation, restated: every linear of the
    blocks becomes torchao's 8da4w layer (+ LoRA), embedding/output get int8 weight x scales."""
    for name, child in ref.named_children():
        full = f"{prefix}{name}"
        if full in ("output", "tok_embeddings"):
            child.weight.data = shard[f"{full}.weight"].float() * shard[f"{full}.scales"].float()
        elif f"{full}.scales" in shard:
            lora = None
            if f"{full}.adaptor.A.weight" in shard:
                lora = (shard[f"{full}.adaptor.A.weight"].float(), shard[f"{full}.adaptor.B.weight"].float(),
                        lora_scale)
            setattr(ref, name, _MetaInt4Oracle(_torchao_8da4w(
                shard[f"{full}.weight"], shard[f"{full}.scales"], shard.get(f"{full}.zeros"), group_size,
                lora)))
        else:
            _swap_meta_int4(child, shard, full + ".", group_size, lora_scale)


@pytest.mark.parametrize("variant", ["qlora", "spinquant"])
def test_int4_eo8_logits_equal_metas_reference(tmp_path, variant):
    args = tiny_args()
    sd = float_state_dict(args)
    qlora = variant == "qlora"
    ckpt = write_int4_eo8_checkpoint(sd, args, tmp_path / "c", group_size=32, lora_rank=4 if qlora else None,
                                     lora_scale=2.0, with_zeros=qlora)
    shard = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    float_sd = {k: (shard[k].float() if shard[k].dtype.is_floating_point else sd[k]) for k in sd}
    ref = meta_reference(args, float_sd)
    _swap_meta_int4(ref, shard, "", 32, 2.0)
    with torch.no_grad():
        want = ref(TOKENS, 0)
        got = build_quantized(ckpt)(TOKENS, 0)
    _assert_logits_close(got, want)


def test_int4_eo8_two_ranks_add_up_to_one(tmp_path):
    """Rank slices of an INT4_EO8 checkpoint: column-parallel layers' outputs concatenate and
    row-parallel partial sums add up to the one-rank layer (the adaptor too). Row-parallel
    layers quantize their slice of the activations, so those agree up to that rounding."""
    args = tiny_args()
    ckpt = write_int4_eo8_checkpoint(float_state_dict(args), args, tmp_path / "c", group_size=32, lora_rank=4,
                                     with_zeros=True)
    one = build_quantized(ckpt)
    init_model_parallel()
    info = inspect_checkpoint(ckpt)
    fmt = detect_quantization(info)
    halves = [read_quantized_rank(info, args, fmt, r, 2, dtype=torch.float32) for r in range(2)]
    x = torch.randn(3, args.dim, generator=torch.Generator().manual_seed(9))
    layer = one.layers[1].feed_forward.w1
    for r in range(2):
        local = type(layer).empty(_with_shape(layer, halves[r]["layers.1.feed_forward.w1.weight"].shape),
                                  group_size=32, lora_rank=4, lora_scale=2.0)
        local.load_state_dict({k.removeprefix("layers.1.feed_forward.w1."): v for k, v in halves[r].items()
                               if k.startswith("layers.1.feed_forward.w1.")}, assign=True, strict=True)
        n = local.weight.shape[0]
        rows = slice(r * n, (r + 1) * n)
        torch.testing.assert_close(local.local_product(x), layer.local_product(x)[:, rows],
                                   rtol=1e-5, atol=1e-5)


def _with_shape(layer, shape):
    stub = torch.nn.Module()
    stub.weight = torch.empty(shape, device="meta")
    for k, v in vars(layer).items():
        if not k.startswith("_") and not isinstance(v, (torch.Tensor, torch.nn.Module)):
            setattr(stub, k, v)
    return stub


# --- quantize-at-load against the float model ---------------------------------------------------


def _prompts(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["fp8", "int4"])
def test_quantize_at_load_stays_close_to_the_float_model(mode):
    args = tiny_args(max_batch_size=4)
    sd = {k: v.to(torch.bfloat16).float() for k, v in float_state_dict(args, seed=11).items()}
    model = Transformer(args)
    model.load_state_dict(sd)
    model.setup_kv_cache(device="cpu", dtype=torch.float32)
    model.eval()
    prompts = _prompts(4, 32, 12)
    with torch.no_grad():
        want = model(prompts, 0)
        # The chooser's selection: fp8 = Meta's (FFN of the middle layers), int4 = every linear,
        # output included, group 32 (the tiny model's 64 inputs).
        apply_kernels(model, choose_kernels(model, "cpu", torch.float32, mode,
                                                 int4_group_size=32 if mode == "int4" else None))
        chosen = kernels_in(model)
        assert chosen == {name: _expected_kernel(mode, name, args.n_layers) for name in chosen}
        got = model(prompts, 0)
    rel = ((got - want).norm() / want.norm()).item()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    # Stated distances. Measured on this random 4-layer model (whose logit margins are small, so
    # greedy choices flip easily): fp8 0.043 relative logit error, 94 % of 128 greedy tokens
    # equal; int4 group 32 on every block linear 0.30 and 68 %.
    assert rel <= {"fp8": 0.06, "int4": 0.4}[mode]
    assert agree >= {"fp8": 0.9, "int4": 0.6}[mode]


def _expected_kernel(mode: str, name: str, n_layers: int) -> str:
    if mode == "int4":
        return "int4"  # every linear, the output projection too
    if name == "output":
        return "torch"
    layer = int(name.split(".")[1])
    return "fp8-rowwise" if "feed_forward" in name and 0 < layer < n_layers - 1 else "torch"


def test_quantized_errors_are_llama_errors():
    assert issubclass(UnsupportedQuantizationError, LlamaError)
    assert issubclass(UnsupportedGroupSizeError, ValueError)


# --- two model-parallel ranks (torchrun, gloo) ------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Logits of each tiny quantized checkpoint loaded on 2 ranks (one torchrun job for all)."""
    root = tmp_path_factory.mktemp("quantized-mp")
    args = tiny_args()
    sd = float_state_dict(args)
    ckpts = {"fp8-1": write_fp8_mixed_checkpoint(sd, args, root / "fp8-1", num_shards=1),
             "fp8-2": write_fp8_mixed_checkpoint(sd, args, root / "fp8-2", num_shards=2),
             "fbgemm": write_fbgemm_fp8_checkpoint(sd, args, root / "fbgemm"),
             "qlora": write_int4_eo8_checkpoint(sd, args, root / "qlora", group_size=32, lora_rank=4,
                                                with_zeros=True)}
    torch.save(TOKENS, root / "tokens.pt")
    jobs = [{"ckpt": str(d), "out": str(root / f"{k}.pt")} for k, d in ckpts.items()]
    (root / "jobs.json").write_text(json.dumps({"tokens": str(root / "tokens.pt"), "jobs": jobs}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(REPO / "tests" / "_quantized_mp_worker.py"),
           str(root / "jobs.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return args, sd, ckpts, {k: torch.load(root / f"{k}.pt", weights_only=True) for k in ckpts}


@pytest.mark.parametrize("name", ["fp8-1", "fp8-2"])
def test_fp8_mixed_on_two_ranks_is_metas_computation_at_two_ranks(two_ranks, name):
    """Meta's 405B runs its 8-shard checkpoint on 8 ranks: w1/w3 rows and scales split, w2's
    columns split with each rank quantizing its slice of the activations. From a 2-shard
    checkpoint the ranks hold the shards' own scales; from a 1-shard one, w2's halves keep the
    whole rows' scales."""
    args, sd, ckpts, logits = two_ranks
    ckpt = ckpts[name]
    shards = sorted(ckpt.glob("consolidated.*.pth"))
    loaded = [torch.load(p, weights_only=True) for p in shards]
    scales = [torch.load(ckpt / f"fp8_scales_{s}.pt", weights_only=True) for s in range(len(shards))]
    ref = meta_reference(args, {k: sd[k].to(torch.bfloat16).float() for k in sd})  # the shards' bf16
    for i in range(1, args.n_layers - 1):
        def pair(w, s, i=i):
            return loaded[s][f"layers.{i}.feed_forward.{w}.weight"], scales[s][f"{i}_feed_forward.{w}_{s}"]
        if len(shards) == 2:
            w1, w3 = ([torch.cat(t) for t in zip(pair(w, 0), pair(w, 1), strict=True)] for w in ("w1", "w3"))
            w2 = [pair("w2", 0), pair("w2", 1)]
        else:
            w1, w3 = pair("w1", 0), pair("w3", 0)
            q, scale = pair("w2", 0)
            half = q.shape[1] // 2
            w2 = [(q[:, :half], scale), (q[:, half:], scale)]
        ref.layers[i].feed_forward.forward = _fp8_ffn_oracle(w1, w3, w2, 1200.0)
    with torch.no_grad():
        want = ref(TOKENS, 0)
    _assert_logits_close(logits[name], want)


def test_fbgemm_fp8_on_two_ranks_is_the_formula_at_two_ranks(two_ranks):
    from safetensors.torch import load_file

    args, sd, ckpts, logits = two_ranks
    hf = load_file(ckpts["fbgemm"] / "model.safetensors")
    ref = meta_reference(args, {k: v.to(torch.bfloat16).float() for k, v in sd.items()})
    for i in range(1, args.n_layers - 1):  # the writer's default: Meta's 405B-FP8 selection
        mlp = {w: (hf[f"model.layers.{i}.mlp.{n}.weight"],
                   hf[f"model.layers.{i}.mlp.{n}.weight_scale"].reshape(-1))
               for w, n in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))}
        q, scale = mlp["w2"]
        half = q.shape[1] // 2
        w2 = [(q[:, :half], scale), (q[:, half:], scale)]
        ref.layers[i].feed_forward.forward = _fp8_ffn_oracle(mlp["w1"], mlp["w3"], w2, 1200.0)
    with torch.no_grad():
        want = ref(TOKENS, 0)
    _assert_logits_close(logits["fbgemm"], want)


def test_int4_eo8_on_two_ranks_stays_with_one_rank(two_ranks):
    """Meta runs INT4_EO8 on one rank only. On two, the row-parallel layers (wo, w2) quantize each
    rank's half of the activations to int8 with its own range, a slightly finer rounding than
    Meta's; the logits stay within the rounding tolerance of the one-rank model."""
    _, _, ckpts, logits = two_ranks
    with torch.no_grad():
        want = build_quantized(ckpts["qlora"])(TOKENS, 0)
    span = (want.max() - want.min()).item()
    assert (logits["qlora"] - want).abs().max().item() <= 0.02 * span
    assert (logits["qlora"].argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9
