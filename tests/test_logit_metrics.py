"""scripts/accuracy.py's logit metrics (scripts/bench/logit_metrics.py) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from scripts.bench.logit_metrics import compare, perplexity


def test_metrics_exact_values():
    reference = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    other = torch.tensor([[1.0, 2.0], [1.0, 3.0]])
    m = compare(other, reference)
    # position 0: max |diff| 1, std of [0, 2] = sqrt(2); position 1: 3 / std([1, 0]) = 3 * sqrt(2)
    assert m["median_diff_in_std"] == pytest.approx((1 / math.sqrt(2) + 3 * math.sqrt(2)) / 2)
    assert m["max_diff_in_std"] == pytest.approx(3 * math.sqrt(2))
    assert m["argmax_agreement"] == 0.5
    p0 = [1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)]
    q0 = [math.e / (math.e + math.e**2), math.e**2 / (math.e + math.e**2)]
    p1 = [math.e / (math.e + 1), 1 / (math.e + 1)]
    q1 = [math.e / (math.e + math.e**3), math.e**3 / (math.e + math.e**3)]
    kl = [sum(p * math.log(p / q) for p, q in zip(ps, qs, strict=True)) for ps, qs in ((p0, q0), (p1, q1))]
    assert m["kl_mean"] == pytest.approx(sum(kl) / 2)
    assert compare(reference, reference)["kl_mean"] == 0.0

    uniform = torch.zeros(4, 7)
    assert perplexity(uniform, [0, 1, 2, 3]) == pytest.approx(7.0)
    # position 0 predicts token 1 with probability e^2 / (1 + e^2); the last position predicts nothing
    assert perplexity(reference, [0, 1]) == pytest.approx((1 + math.e**2) / math.e**2)
