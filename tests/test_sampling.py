"""Sync-free nucleus sampling (the GPU path of llama3.sampling): it draws from exactly Meta's top-p
distribution, and nothing in it waits on the host (no ``torch.multinomial``, no ``.item()``, no
data-dependent shapes), checked op by op with a dispatch mode. CPU only: the "device" tensors are
meta tensors, which take the same branch a CUDA tensor does and record every op without running it.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama3.sampling import race_top_p, sample_next_token, sample_top_p

# Ops that make the host wait for the device on CUDA: reading a value back (item, bool of a
# tensor, equal), checking input on the host (multinomial), or an output shape that depends on the
# data (nonzero and the boolean indexing / masked_select built on it, unique).
SYNCING = {"aten::multinomial", "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select",
           "aten::is_nonzero", "aten::equal", "aten::item", "aten::_unique2", "aten::unique_consecutive",
           "aten::bincount"}


class HostSync(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Records every aten op run inside it; raises at the first one that would synchronise."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops.append(name)
        if name in SYNCING:
            raise HostSync(f"{name} synchronises with the host")
        return func(*args, **(kwargs or {}))


def _meta_sample_top_p():
    """``sample_top_p`` of Meta's reference (the llama-models wheel), compiled on its own."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llama-models (Meta's reference, the test oracle)")
    source = Path(spec.submodule_search_locations[0], "llama3", "generation.py")
    node = next(n for n in ast.parse(source.read_text()).body
                if isinstance(n, ast.FunctionDef) and n.name == "sample_top_p")
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(source), "exec"), namespace)
    return namespace["sample_top_p"]


def meta_distribution(probs: torch.Tensor, p: float) -> torch.Tensor:
    """The distribution [batch, vocab] Meta's ``sample_top_p`` draws from: its multinomial is
    replaced by a stub that captures the weights and hands back every sorted position."""
    captured = {}

    def stub(weights, num_samples):
        captured["weights"] = weights.clone()
        return torch.arange(weights.shape[-1]).expand(weights.shape[0], -1)

    original, torch.multinomial = torch.multinomial, stub
    try:
        order = _meta_sample_top_p()(probs.clone(), p)
    finally:
        torch.multinomial = original
    weights = torch.zeros_like(probs).scatter_(-1, order, captured["weights"])
    return weights / weights.sum(-1, keepdim=True)


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square test of ``counts`` against ``expected`` (same total): its p-value, from
    the regularised upper incomplete gamma function (chi2 sf = Q(df/2, x/2))."""
    statistic = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor(float(expected.numel() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, statistic / 2))


@pytest.mark.parametrize("p", [0.3, 0.75, 0.9, 1.0])
def test_race_draws_exactly_metas_top_p_distribution(p):
    """40,000 draws per row from two rows of 12 tokens (flat and peaked), one batched call with a
    fixed seed: no dropped token ever comes up, and the counts of the kept ones pass a chi-square
    test against Meta's renormalised nucleus at the 0.1% level."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 12, generator=g, dtype=torch.float64) * torch.tensor([[0.5], [2.5]],
                                                                                  dtype=torch.float64)
    probs = torch.softmax(logits, -1).float()
    want = meta_distribution(probs, p)
    n = 40_000
    torch.manual_seed(int(p * 100))
    for row in range(2):
        drawn = race_top_p(probs[row:row + 1].expand(n, -1), p).flatten()
        counts = torch.bincount(drawn, minlength=12).double()
        kept = want[row] > 0
        assert counts[~kept].sum() == 0, (p, row, counts)
        if kept.sum() > 1:
            assert chi_square_p_value(counts[kept], want[row][kept].double() * n) > 1e-3, (p, row, counts)
        else:
            assert counts[kept].item() == n


def test_race_is_seeded_and_keeps_only_the_nucleus_at_vocabulary_size():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(3, 128256, generator=g) * torch.tensor([[1.0], [4.0], [8.0]]), -1)
    torch.manual_seed(11)
    first = torch.cat([race_top_p(probs, 0.9) for _ in range(20)], dim=1)
    torch.manual_seed(11)
    again = torch.cat([race_top_p(probs, 0.9) for _ in range(20)], dim=1)
    assert torch.equal(first, again)
    kept = meta_distribution(probs, 0.9) > 0
    assert kept.gather(1, first).all()
    # top_p near 0 keeps only the most likely token: the race must return it every time.
    assert torch.equal(race_top_p(probs, 0.0), probs.argmax(-1, keepdim=True))


def test_sampling_off_the_cpu_never_synchronises_with_the_host():
    """What a CUDA tensor gets (here a meta tensor, same branch): sample_next_token and
    sample_top_p run no op that reads back from the device; the detector itself catches the CPU
    path's reads."""
    logits = torch.randn(2, 128256)
    for device_logits in (logits.to("meta"),):
        with NoHostSync() as mode:
            out = sample_next_token(device_logits, 0.6, 0.9)
        assert out.shape == (2,)
        assert out.dtype == torch.long
        assert "aten::exponential_" in mode.ops  # it did draw
        with NoHostSync():
            assert sample_top_p(torch.softmax(device_logits, -1), 0.95).shape == (2, 1)
    with NoHostSync():  # the race itself on real (CPU) values
        race_top_p(torch.softmax(logits, -1), 0.9)
    with pytest.raises(HostSync), NoHostSync():  # the CPU path's bucket search reads values back
        sample_top_p(torch.softmax(logits, -1), 0.9)
