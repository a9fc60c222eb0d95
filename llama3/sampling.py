"""Choosing the next token from the model's logits: greedy or nucleus (top-p) sampling.

The sampling procedure is the one of Meta's reference (sort, keep the smallest head of the sorted
distribution whose mass reaches ``top_p``, renormalise, draw with ``torch.multinomial``), so that
with the same seed, the same logits and the same device the same tokens come out.
"""

from __future__ import annotations

import torch

__all__ = ["sample_next_token", "sample_top_p"]


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al., 2019) from probabilities ``probs`` [batch, vocab].

    Keeps, per row, the most likely tokens until their cumulative probability reaches ``p`` (the
    token that crosses ``p`` is kept, so at least one token always is), renormalises, and draws
    one. Returns token ids [batch, 1].
    """
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before > p, 0.0)
    # multinomial accepts unnormalised weights, but normalising first keeps the draws identical to
    # the reference implementation's bit for bit.
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(sorted_probs, num_samples=1)
    return torch.gather(order, -1, choice)


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token ids [batch] from last-position logits [batch, vocab].

    ``temperature == 0`` is greedy decoding (argmax, no randomness); otherwise the logits are divided
    by ``temperature`` and a token is drawn by :func:`sample_top_p`.
    """
    if temperature > 0:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return sample_top_p(probs, top_p).reshape(-1)
    return torch.argmax(logits, dim=-1)
