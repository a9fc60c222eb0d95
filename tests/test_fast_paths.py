"""The fast paths give the same answers as the plain model: the compiled decoding step
(``torch.compile`` of ``model.forward`` with ``kv_len``) and int8 weight-only quantization. Speed itself is
measured by scripts/benchmark.py, not here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_model

from llama3 import Transformer
from llama3.distributed import ColumnParallelLinear, RowParallelLinear
from llama3.generation import make_decode_step
from llama3.kernels import (
    CpuGemvKernel,
    CpuGemvNativeKernel,
    Int8Kernel,
    apply_kernels,
    choose_kernels,
    kernel_of,
    quantize_per_channel,
    swap_linear,
)
from llama3.presets import PRESETS

TINY = dict(PRESETS["test-gqa"], max_batch_size=2, max_seq_len=48)
PROMPT, STEPS = 8, 12
# CUDA cases join in on a machine with a GPU (scripts/gpu_check.sh); nothing is skipped on CPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
               **overrides) -> Transformer:
    # The shared helper; larger than the default init: logits spread out, clear greedy margins.
    return tiny_model("test-gqa", seed=seed, std=0.08, dtype=dtype, device=device, **{**TINY, **overrides})


def quantize_int8(model: Transformer) -> Transformer:
    """int8 weight-only linear layers, through the library's chooser (as Llama.build does)."""
    weight = model.output.weight
    apply_kernels(model, choose_kernels(model, weight.device, weight.dtype, quantize="int8"))
    return model


def with_default_kernels(model: Transformer) -> Transformer:
    """The kernels the chooser picks for the model's device and dtype (CPU bf16/fp16: cpu-gemv)."""
    weight = model.output.weight
    apply_kernels(model, choose_kernels(model, weight.device, weight.dtype))
    return model


def gemv_layer(weight: torch.Tensor, kernel: type = CpuGemvKernel) -> torch.nn.Module:
    """A column-parallel layer holding ``weight``, swapped to a CPU GEMV kernel."""
    layer = ColumnParallelLinear(weight.shape[1], weight.shape[0])
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return swap_linear(layer, kernel)


def prompt(batch: int = 2, seed: int = 1, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, PROMPT), generator=g).to(device)


def greedy(model: Transformer, tokens: torch.Tensor, step) -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS greedy tokens after ``tokens`` with ``step(token, pos) -> logits``; also the logits."""
    token = model.forward(tokens, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)
    out, logits = [token], []
    for pos in range(tokens.shape[1], tokens.shape[1] + STEPS - 1):
        # Cloned: a CUDA graph's output buffer is overwritten (or freed) by the next replay.
        step_logits = step(token, pos)[:, -1].clone()
        token = step_logits.argmax(-1, keepdim=True)
        out.append(token)
        logits.append(step_logits)
    return torch.cat(out, dim=1), torch.stack(logits, dim=1)


def eager_step(model: Transformer):
    return lambda token, pos: model.forward(token, pos, last_only=True)


# --- torch.compile ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decode_gives_the_eager_tokens(device):
    """The fixed-shape step under torch.compile (inductor) decodes the same greedy tokens, with
    logits equal to float32 rounding, step after step through the KV cache."""
    torch._dynamo.reset()
    model = make_model(device=device)
    tokens = prompt(device=device)
    want, want_logits = greedy(model, tokens, eager_step(model))

    got, got_logits = greedy(model, tokens, make_decode_step(model, compile=True))
    assert torch.equal(got, want)
    assert (got_logits - want_logits).abs().max().item() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_cpu_decode_in_reduced_precision_gives_the_eager_tokens(dtype):
    """Batch-1 bfloat16/float16 decoding on the CPU computes each linear layer as a GEMV: eagerly
    with torch.mv, compiled as inductor's fused multiply-and-sum over a float32 input row. Both
    accumulate in float32, so the compiled step decodes eager's greedy tokens, logits equal up to
    the rounding of the activations to ``dtype``."""
    torch._dynamo.reset()
    model = with_default_kernels(make_model(dtype=dtype))
    assert {kernel_of(m) for m in model.modules() if isinstance(m, ColumnParallelLinear)} == {CpuGemvKernel}
    tokens = prompt(batch=1)  # one row: the GEMV paths
    want, want_logits = greedy(model, tokens, eager_step(model))

    got, got_logits = greedy(model, tokens, make_decode_step(model, compile=True))
    assert torch.equal(got, want)
    step = torch.finfo(dtype).eps * want_logits.abs().max().item()  # one unit of the dtype's rounding
    assert (got_logits - want_logits).abs().max().item() <= 4 * step


GEMV_KERNELS = pytest.mark.parametrize("kernel", [CpuGemvKernel, CpuGemvNativeKernel], ids=lambda k: k.name)


@GEMV_KERNELS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_cpu_gemv_accumulates_in_float32(dtype, kernel):
    """The compiled single-row product equals x Wᵀ computed in float64 to within the final rounding
    to ``dtype`` (plus float32 summation error): no intermediate rounding to ``dtype``. Rows of
    4096 and 8192 inputs, the shapes of the 8B model's projections."""
    g = torch.Generator().manual_seed(0)
    for n_in in (4096, 8192):
        x = torch.randn(1, 1, n_in, generator=g).to(dtype)
        weight = (torch.randn(96, n_in, generator=g) / n_in**0.5).to(dtype)
        exact = (x.double() @ weight.double().T)
        layer = gemv_layer(weight, kernel)
        torch._dynamo.reset()
        gemv = torch.compile(layer, fullgraph=True)
        with torch.no_grad():
            results = (gemv(x), layer(x))
        assert torch.backends.mkldnn.enabled  # cpu-gemv-native turns oneDNN off for its call only
        for got in results:  # compiled, eager (torch.mv)
            assert got.dtype == dtype
            assert got.shape == (1, 1, 96)
            ulp = torch.finfo(dtype).eps * exact.abs()
            assert ((got.double() - exact).abs() <= ulp + 1e-5).all()


# --- int8 weight-only quantization -------------------------------------------------------------------


def test_per_channel_int8_reconstructs_each_row_within_half_a_step():
    torch.manual_seed(0)
    # Rows of very different magnitudes: a per-tensor scale would fail the small rows.
    weight = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]
    weight[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8
    assert q.shape == weight.shape
    assert scale.shape == (48,)
    assert scale.dtype == weight.dtype
    assert q.abs().max().item() <= 127
    assert (q[torch.arange(48) != 5].abs().amax(dim=1) == 127).all()  # each row's largest |w| -> ±127
    error = (weight - q.float() * scale[:, None]).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert (q[5] == 0).all()


def test_quantize_int8_replaces_every_linear_and_keeps_the_embedding():
    model = make_model(dtype=torch.bfloat16, tie_word_embeddings=True)
    embedding = model.tok_embeddings.weight.detach().clone()
    output = model.output.weight.detach().clone()
    assert quantize_int8(model) is model

    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    assert len(linears) == 7 * TINY["n_layers"] + 1
    for m in linears:
        assert kernel_of(m) is Int8Kernel
        assert m.weight.dtype == torch.int8
        assert not isinstance(m.weight, torch.nn.Parameter)
        assert m.scale.shape == (m.weight.shape[0],)
        assert m.scale.dtype == torch.bfloat16
    assert model.output.gather_output
    # The tied embedding keeps its bfloat16 table; the output projection holds an int8 copy of it.
    assert torch.equal(model.tok_embeddings.weight, embedding)
    recon = model.output.weight.float() * model.output.scale.float()[:, None]
    assert (recon - output.float()).abs().max() <= model.output.scale.float().max()
    keys = set(model.state_dict())
    assert {"layers.0.attention.wq.weight", "layers.0.attention.wq.scale", "output.scale"} <= keys
    assert not any(isinstance(p, torch.Tensor) and p.dtype == torch.int8 for p in model.parameters())


# Per-channel int8 leaves every weight within scale/2 = max|row|/254 of its value (~0.7% RMS of a
# normally distributed row). Through two layers of these tiny models (weights 4x the default init,
# |logits| up to ~3) that moves the logits by 1.8-2.5% RMS and at most 3.3% of the largest logit,
# over five seeds in float32 and bfloat16. The bounds leave ~1.5x margin; 4-bit rounding or a lost
# scale miss them by 20x or more.
INT8_MAX_REL = 0.05  # max |Δlogit| / max |logit|
INT8_RMS_REL = 0.04  # ||Δlogits|| / ||logits||


def logits_along(model: Transformer, tokens: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """Logits of the prompt and of each decoding step fed the given ``path`` of tokens."""
    logits = [model.forward(tokens, 0)]
    for i in range(path.shape[1] - 1):
        logits.append(model.forward(path[:, i:i + 1], tokens.shape[1] + i))
    return torch.cat(logits, dim=1).float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_model_decodes_like_the_float_model(dtype, device):
    model = make_model(dtype=dtype, device=device)
    tokens = prompt(device=device)
    path, _ = greedy(model, tokens, eager_step(model))
    want = logits_along(model, tokens, path)

    quantize_int8(model)
    # Same inputs (the float model's greedy path), so the logits compare position by position.
    got = logits_along(model, tokens, path)
    error = got - want
    assert error.abs().max() <= INT8_MAX_REL * want.abs().max()
    assert error.norm() <= INT8_RMS_REL * want.norm()
    # Greedy choice is unchanged wherever the float model's lead over its runner-up is more than
    # twice the largest possible logit shift (near-ties may go either way, as in any dtype change).
    top2 = want.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * INT8_MAX_REL * want.abs().max()
    assert clear.sum() >= 5  # the check is not vacuous
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


# --- CPU half-precision decode (torch.mv for one row) -------------------------------------------------


@GEMV_KERNELS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_single_row_cpu_linear_is_the_product_to_half_precision(dtype, kernel):
    """One bf16/fp16 row on the CPU goes through torch.mv (float32 accumulation); rows in a batch
    through F.linear. Both equal the float64 product to the dtype's rounding of the result."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 2048, generator=g).to(dtype)
    x = torch.randn(3, 2048, generator=g).to(dtype)
    want = x.double() @ weight.double().T
    layer = gemv_layer(weight, kernel)
    one = layer(x[:1, None])  # [1, 1, in]: the decode shape
    batch = layer(x)
    assert one.shape == (1, 1, 300)
    assert one.dtype == dtype
    eps = torch.finfo(dtype).eps
    for got, ref in ((one[0], want[:1]), (batch, want)):
        assert ((got.double() - ref).abs() <= eps * ref.abs() + 1e-3).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cached_decode_gives_the_recomputed_tokens(dtype):
    """Decoding with the KV cache (single-row linears: torch.mv) picks the greedy tokens that
    recomputing the whole sequence at every step (F.linear over all rows, no cache reuse) picks."""
    model = with_default_kernels(make_model(dtype=dtype))
    tokens = prompt(batch=1)
    got, _ = greedy(model, tokens, eager_step(model))
    seq = tokens
    for _ in range(STEPS):
        nxt = model.forward(seq, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(got, seq[:, tokens.shape[1]:])


# --- top-p sampling without a full sort ----------------------------------------------------------


def _meta_sample_top_p():
    """``sample_top_p`` from the llama-models wheel's llama3/generation.py, compiled on its own:
    importing that module pulls in its multimodal code (torchvision), which the tests do not need."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llama-models (Meta's reference, the test oracle)")
    source = Path(spec.submodule_search_locations[0], "llama3", "generation.py")
    tree = ast.parse(source.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "sample_top_p")
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(source), "exec"), namespace)
    return namespace["sample_top_p"]


def meta_nucleus(probs: torch.Tensor, p: float) -> torch.Tensor:
    """The renormalised top-p distribution [batch, vocab] of Meta's own ``sample_top_p`` (the
    llama-models wheel): its ``torch.multinomial`` is swapped for a stub that hands every sorted
    position to its final ``gather``, so the function returns its whole sorted order and the
    distribution it would have drawn from is captured."""
    captured = {}

    def stub(weights, num_samples):
        captured["weights"] = weights.clone()
        return torch.arange(weights.shape[-1]).expand(weights.shape[0], -1)

    original = torch.multinomial
    torch.multinomial = stub
    try:
        order = _meta_sample_top_p()(probs.clone(), p)
    finally:
        torch.multinomial = original
    return torch.zeros_like(probs).scatter_(-1, order, captured["weights"])


def our_nucleus(probs: torch.Tensor, p: float) -> torch.Tensor:
    from llama3.sampling import top_p_mask

    kept = torch.where(top_p_mask(probs, p), probs, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def assert_same_nucleus(probs: torch.Tensor, p: float) -> None:
    """Same kept tokens, same renormalised probabilities (to float32 rounding of the sum). Meta's
    sort is unstable, so which members of a group of *equal* probabilities at the cut it keeps is
    unspecified: there only the count and the values must agree (ours keeps the lowest ids)."""
    want, got = meta_nucleus(probs, p), our_nucleus(probs, p)
    for w, g, row in zip(want, got, probs, strict=True):
        smallest_kept = row[g > 0].min()
        untied = row != smallest_kept
        assert torch.equal(w[untied] > 0, g[untied] > 0)
        torch.testing.assert_close(g, w, rtol=2e-6, atol=0) if torch.equal(w > 0, g > 0) else (
            torch.testing.assert_close(g.sort().values, w.sort().values, rtol=2e-6, atol=0))
        tied_kept = torch.nonzero((row == smallest_kept) & (g > 0)).flatten()
        tied_all = torch.nonzero(row == smallest_kept).flatten()
        assert torch.equal(tied_kept, tied_all[: tied_kept.numel()])


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.95, 0.999, 1.0])
def test_top_p_keeps_exactly_metas_nucleus(p):
    g = torch.Generator().manual_seed(int(p * 1000))
    # From nearly flat to very peaked logits, at the real vocabulary size and a small one.
    for vocab, rows in ((128256, 4), (5000, 16)):
        scales = torch.logspace(-2, 1.3, rows)[:, None]
        logits = torch.randn(rows, vocab, generator=g) * scales
        assert_same_nucleus(torch.softmax(logits / 0.6, dim=-1), p)


def test_top_p_with_ties_at_the_cut():
    g = torch.Generator().manual_seed(5)
    # Logits on a coarse grid: thousands of exactly equal probabilities, so the cut falls inside
    # a tied group; and a row whose mass is exactly p after its first two tokens (0.5 + 0.25).
    logits = (torch.randn(6, 128256, generator=g) * 2).round()
    for p in (0.3, 0.8, 0.9):
        assert_same_nucleus(torch.softmax(logits, dim=-1), p)
    # What a bf16 model hands over: logits with a few thousand distinct values, flat enough that
    # each token carries ~1e-5 of the mass, so the cut often lands within a few float32 ulps of p.
    flat = torch.randn(64, 8192, generator=g).bfloat16().float()
    for p in (0.5, 0.9):
        assert_same_nucleus(torch.softmax(flat / 0.6, dim=-1), p)
    exact = torch.full((1, 8192), 0.125 / 8190)
    exact[0, :3] = torch.tensor([0.5, 0.25, 0.125])
    assert_same_nucleus(exact, 0.75)  # third token: 0.75 before it <= p, kept
    assert_same_nucleus(exact, 0.7499999)


def test_top_p_draws_are_seeded_and_follow_the_nucleus():
    from llama3.sampling import sample_top_p, top_p_mask

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 128256, generator=g) * torch.tensor([[1.0], [6.0]])
    probs = torch.softmax(logits, dim=-1)
    torch.manual_seed(11)
    first = torch.cat([sample_top_p(probs, 0.9) for _ in range(50)], dim=1)
    torch.manual_seed(11)
    again = torch.cat([sample_top_p(probs, 0.9) for _ in range(50)], dim=1)
    assert torch.equal(first, again)
    assert top_p_mask(probs, 0.9).gather(1, first).all()


@pytest.mark.parametrize("path", ["buckets", "full sort"])
def test_top_p_draw_frequencies_match_the_renormalised_nucleus(path, monkeypatch):
    from llama3 import sampling

    # Each path forced on the same row: the bucket search serves vocabularies from _SORT_BELOW up
    # on a CPU, the reference's sort the rest. A 1,024-token row keeps each draw cheap, so the
    # statistics can afford many draws (one batched call of identical rows).
    monkeypatch.setattr(sampling, "_SORT_BELOW", 1 if path == "buckets" else 1 << 30)
    g = torch.Generator().manual_seed(3)
    row = torch.softmax(torch.randn(1, 1024, generator=g) * 4.0, dim=-1)
    want = our_nucleus(row, 0.9)[0]
    torch.testing.assert_close(want, meta_nucleus(row, 0.9)[0], rtol=2e-6, atol=0)
    assert 4 <= int((want > 0).sum()) <= 64  # a nucleus of a handful of tokens, not one or all
    # Frequencies match the renormalised probabilities: 6000 draws, each count within 5 standard
    # deviations; nothing outside the nucleus is ever drawn.
    n = 6000
    torch.manual_seed(11)
    drawn = sampling.sample_top_p(row.expand(n, -1).contiguous(), 0.9).flatten()
    counts = torch.bincount(drawn, minlength=row.shape[-1]).double()
    expected = want.double() * n
    assert counts[want == 0].sum() == 0
    assert ((counts - expected).abs() <= 5 * expected.sqrt() + 1).all()
