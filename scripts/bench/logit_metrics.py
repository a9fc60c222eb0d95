"""How far one model's teacher-forced logits are from another's, and how well each predicts the text.

All in float64, on logits [positions, vocab] of the same tokens:

* distance: at each position the largest |difference| over the vocabulary, in units of the
  reference logits' standard deviation at that position; the median and the maximum over positions;
* argmax agreement: the fraction of positions whose most likely next token is the reference's;
* KL divergence KL(reference || other) of the next-token distributions, in nats, mean over positions;
* perplexity of the text: exp of the mean negative log-likelihood of each next token.
"""

from __future__ import annotations

import torch


def compare(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Distance (median / max over positions), argmax agreement and mean KL of ``logits`` from
    ``reference`` (both [positions, vocab])."""
    if logits.shape != reference.shape or logits.dim() != 2:
        raise ValueError(f"logits {list(logits.shape)} and reference {list(reference.shape)} must both be "
                         "[positions, vocab]")
    x, ref = logits.double(), reference.double()
    distance = (x - ref).abs().amax(dim=-1) / ref.std(dim=-1)
    log_p, log_q = torch.log_softmax(ref, dim=-1), torch.log_softmax(x, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    # quantile, not median(): torch's median of an even count is the lower middle value
    return {"median_diff_in_std": float(distance.quantile(0.5)), "max_diff_in_std": float(distance.max()),
            "argmax_agreement": float((x.argmax(dim=-1) == ref.argmax(dim=-1)).double().mean()),
            "kl_mean": float(kl.mean())}


def perplexity(logits: torch.Tensor, tokens: list[int]) -> float:
    """Perplexity of ``tokens[1:]`` under ``logits`` [len(tokens), vocab] (position i predicts i+1)."""
    if logits.dim() != 2 or logits.shape[0] != len(tokens) or len(tokens) < 2:
        raise ValueError(f"logits {list(logits.shape)} must be [len(tokens), vocab] for {len(tokens)} "
                         "tokens (at least 2)")
    log_q = torch.log_softmax(logits[:-1].double(), dim=-1)
    nll = -log_q.gather(1, torch.tensor(tokens[1:]).unsqueeze(1))
    return float(nll.mean().exp())
