"""Choosing the next token from the model's logits: greedy or nucleus (top-p) sampling.

Top-p follows Meta's reference rule exactly: sort the probabilities in descending order, keep every
token whose *preceding* cumulative mass is ``<= p`` (so the token that crosses ``p`` is kept, and
always at least one), renormalise the kept ones and draw one.

The reference sorts all 128K probabilities for every token, which costs more than a decoding step
of a small model on a CPU. The kept set is a head of the sorted order, so only the tokens near the
cut need sorting. Non-negative float32 values order as their bit patterns do, so the top 16 bits
(sign, exponent, 7 mantissa bits) put each probability in one of ~16K buckets whose order is the
order of the values, each bucket spanning under 1% of its values. One pass builds the mass of
every bucket (float64); the bucket where the cumulative mass from the top crosses ``p`` holds the
cut; only its tokens (a few hundred for a real model's 128K logits) are sorted, and the reference
rule is applied to them with the mass of all higher buckets before them. Everything above that
bucket is kept, everything below dropped. This is the CPU path; on a GPU (where sorting is cheap
and the bucket search would wait on the host) and for small vocabularies the reference's sort is
used as it is.

Exactness. Each decision is the reference's up to the rounding of the cumulative sums (the
reference rounds each partial sum to float32, ~6e-8 near 1). A row whose last kept or first dropped
token has a preceding mass within ``_MARGIN`` of ``p`` (2e-7), where that rounding
could decide either way, goes through the reference's full sort instead, so the kept set and its renormalised
probabilities are the reference's in every case. One thing the reference leaves unspecified: the
order of *equal* probabilities in its (unstable) sort, which decides which members of a tied group
straddling the cut are kept. Here ties are kept lowest token id first (what a stable sort gives);
how many are kept, and the probabilities, are the same either way.

The draw picks a bucket by its kept mass (inverse CDF in float64 with one ``torch.rand``), then a
token inside it with ``torch.multinomial``: exactly the renormalised nucleus distribution, drawn
from torch's random stream (``torch.manual_seed`` makes it reproducible). It is not the same
*token* as the reference's for the same seed (that one draws over the sorted order), only the same
distribution.

Off the CPU (CUDA) the draw never waits on the host. ``torch.multinomial`` reads its input back to
validate it, a device-to-host synchronisation per token that would defeat a decode loop that reads
back only every few steps. There the kept set comes from the reference's full sort (no
synchronisation) and the token from an exponential race: with Eᵢ independent Exp(1) draws,
``argmax pᵢ / Eᵢ`` over the kept tokens is token i with probability pᵢ / Σ kept p, because
Eᵢ / pᵢ is Exp(pᵢ) and the smallest of independent exponentials is the i-th with probability
rate / total rate. The noise is float64 (one value per token from torch's random stream), so its
resolution is far below the probabilities' own float32 rounding. This is exactly the
renormalised nucleus distribution (the same *distribution* as the reference's, a different token
for the same seed), with one random tensor and one argmax, all on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["race_top_p", "sample_next_token", "sample_top_p", "top_p_mask"]

# A cut this close to p (in probability mass) is settled by the reference's own sort. On the CPU
# the reference's cumulative sum is accumulated in float64 and rounded to float32 (half an ulp,
# 3e-8 near 1), the subtraction and p's own float32 rounding add as much again: 9e-8 in all, and
# ours (float64 throughout) is off by far less.
_MARGIN = 2e-7
# Below this vocabulary size a full sort is as cheap as anything else.
_SORT_BELOW = 4096


def _reference_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    """The reference's kept set, by a full (stable) sort: True where a token is kept."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, mass_before <= p)


def _sort_is_best(probs: torch.Tensor, p: float) -> bool:
    """The reference's full sort: off the CPU (a GPU sorts 128K values in microseconds, and the
    bucket search would synchronise with the host several times per row), for small
    vocabularies, and for p so close to 1 that only float32 dust at the very end is dropped."""
    return probs.device.type != "cpu" or probs.shape[-1] < _SORT_BELOW or p >= 1.0 - 1e-5


@dataclass
class _Nucleus:
    """One row's kept set: every bucket above ``cut`` whole, and ``cut_ids`` (probabilities
    ``cut_probs``) from bucket ``cut``."""

    key: torch.Tensor  # [vocab] bucket of each token
    bucket_mass: torch.Tensor  # [n_buckets] float64 mass of each bucket
    cut: int
    cut_ids: torch.Tensor
    cut_probs: torch.Tensor


def _nucleus(row: torch.Tensor, p: float) -> _Nucleus | None:
    """The kept set of one row of probabilities, or None where only the full sort can tell."""
    key = row.view(torch.int32) >> 16  # non-negative floats: bucket order = value order
    mass = torch.bincount(key, weights=row.double())  # buckets up to the largest key (1.0: 0x3F80)
    n_buckets = mass.numel()
    mass_from = mass.flip(0).cumsum(0).flip(0)  # mass_from[b]: mass in buckets >= b
    cut = int((mass_from > p).sum()) - 1
    if cut < 0:  # the whole row sums to <= p (not a distribution): leave it to the reference
        return None
    above = float(mass_from[cut + 1]) if cut + 1 < n_buckets else 0.0
    ids = torch.nonzero(key == cut).squeeze(1)
    values, order = torch.sort(row[ids], descending=True, stable=True)
    ids = ids[order]
    cumulative = above + torch.cumsum(values.double(), 0)
    before = cumulative - values.double()
    n_keep = int((before <= p).sum())  # >= 1: the first has `above` <= p before it
    last_before = float(before[n_keep - 1])
    if last_before > 0 and p - last_before < _MARGIN:
        return None
    dropped_before = float(cumulative[n_keep - 1])
    if (n_keep < ids.numel() or cut > 0) and dropped_before - p < _MARGIN:
        return None
    return _Nucleus(key, mass, cut, ids[:n_keep], values[:n_keep])


def top_p_mask(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Which tokens top-p keeps: a bool mask shaped like ``probs`` [batch, vocab] (non-negative,
    rows summing to ~1). Meta's rule; see the module docstring for how and how exactly."""
    probs = probs.float()
    if _sort_is_best(probs, p):
        return _reference_mask(probs, p)
    mask = torch.empty_like(probs, dtype=torch.bool)
    for i, row in enumerate(probs):
        kept = _nucleus(row, p)
        if kept is None:
            mask[i] = _reference_mask(row[None], p)[0]
        else:
            mask[i] = kept.key > kept.cut
            mask[i, kept.cut_ids] = True
    return mask


def _draw(kept: _Nucleus, row: torch.Tensor) -> torch.Tensor:
    """One token from the renormalised nucleus: a bucket by kept mass, then a token within it."""
    weights = kept.bucket_mass[kept.cut:].clone()
    weights[0] = kept.cut_probs.double().sum()
    cdf = weights.cumsum(0)
    total = cdf[-1:]
    u = torch.minimum(torch.rand(1, dtype=torch.float64, device=row.device) * total,
                      torch.nextafter(total, torch.zeros_like(total)))
    bucket = kept.cut + int(torch.searchsorted(cdf, u, right=True))  # never a bucket of weight 0
    if bucket == kept.cut:
        ids, values = kept.cut_ids, kept.cut_probs
    else:
        ids = torch.nonzero(kept.key == bucket).squeeze(1)
        values = row[ids]
    return ids[torch.multinomial(values, num_samples=1)]


def race_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nucleus sampling with no host synchronisation: token ids [batch, 1] drawn from the
    renormalised top-p set of ``probs`` [batch, vocab] by the exponential race (module docstring).

    Every operation stays on ``probs``'s device and none reads a value back (no ``.item()``, no
    ``torch.multinomial``, no data-dependent shape), so a CUDA decode loop keeps running ahead of
    the host. ``generator`` (optional) is the random stream; default torch's global one.
    """
    probs = probs.float()
    kept = torch.where(_reference_mask(probs, p), probs.double(), 0.0)
    noise = torch.empty_like(kept).exponential_(generator=generator)
    # exponential_ may return exactly 0 (u rounded to 1): kept/0 would be inf and tie, dropped 0/0
    # NaN (which argmax prefers). The smallest positive double instead keeps the order of the
    # rest, and a dropped token (0 / anything) never beats a kept one (> 0 / anything finite).
    race = kept / noise.clamp_min(torch.finfo(torch.float64).tiny)
    return race.argmax(dim=-1, keepdim=True)


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al., 2019) from probabilities ``probs`` [batch, vocab].

    Keeps, per row, the most likely tokens until their cumulative probability reaches ``p`` (the
    token that crosses ``p`` is kept, so at least one token always is), renormalises, and draws
    one. Returns token ids [batch, 1]. Meta's reference rule: on the CPU without sorting the
    vocabulary, elsewhere without synchronising with the host (see the module docstring).
    """
    probs = probs.float()
    if probs.device.type != "cpu":
        return race_top_p(probs, p)  # no host synchronisation (module docstring)
    if _sort_is_best(probs, p):
        return torch.multinomial(torch.where(_reference_mask(probs, p), probs, 0.0), num_samples=1)
    out = torch.empty(probs.shape[0], 1, dtype=torch.long, device=probs.device)
    for i, row in enumerate(probs):
        kept = _nucleus(row, p)
        if kept is None:
            weights = torch.where(_reference_mask(row[None], p)[0], row, 0.0)
            out[i] = torch.multinomial(weights, num_samples=1)
        else:
            out[i] = _draw(kept, row)
    return out


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token ids [batch] from last-position logits [batch, vocab].

    ``temperature == 0`` is greedy decoding (argmax, no randomness); otherwise the logits are divided
    by ``temperature`` and a token is drawn by :func:`sample_top_p`.
    """
    if temperature > 0:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return sample_top_p(probs, top_p).reshape(-1)
    return torch.argmax(logits, dim=-1)
