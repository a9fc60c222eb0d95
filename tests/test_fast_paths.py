"""The fast paths give the same answers as the plain model: the compiled decoding step
(``torch.compile(model.forward_static)``) and int8 weight-only quantization. Speed itself is
measured by scripts/benchmark.py, not here."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from llama3 import Transformer
from llama3.distributed import ColumnParallelLinear, RowParallelLinear
from llama3.generation import make_decode_step
from llama3.presets import PRESETS
from llama3.quantize import (
    Int8ColumnParallelLinear,
    Int8RowParallelLinear,
    quantize_int8,
    quantize_per_channel,
)

TINY = dict(PRESETS["test-gqa"], max_batch_size=2, max_seq_len=48)
PROMPT, STEPS = 8, 12
# CUDA cases join in on a machine with a GPU (scripts/gpu_check.sh); nothing is skipped on CPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
               **overrides) -> Transformer:
    # The shared helper; larger than the default init: logits spread out, clear greedy margins.
    return tiny_model("test-gqa", seed=seed, std=0.08, dtype=dtype, device=device, **{**TINY, **overrides})


def prompt(batch: int = 2, seed: int = 1, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, PROMPT), generator=g).to(device)


def greedy(model: Transformer, tokens: torch.Tensor, step) -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS greedy tokens after ``tokens`` with ``step(token, pos) -> logits``; also the logits."""
    token = model.forward(tokens, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)
    out, logits = [token], []
    for pos in range(tokens.shape[1], tokens.shape[1] + STEPS - 1):
        step_logits = step(token, pos)[:, -1]
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


# --- int8 weight-only quantization -------------------------------------------------------------------


def test_per_channel_int8_reconstructs_each_row_within_half_a_step():
    torch.manual_seed(0)
    # Rows of very different magnitudes: a per-tensor scale would fail the small rows.
    weight = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]
    weight[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and q.shape == weight.shape
    assert scale.shape == (48,) and scale.dtype == weight.dtype
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
        assert type(m) in (Int8ColumnParallelLinear, Int8RowParallelLinear)
        assert m.weight.dtype == torch.int8 and not isinstance(m.weight, torch.nn.Parameter)
        assert m.scale.shape == (m.weight.shape[0],) and m.scale.dtype == torch.bfloat16
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
