"""Losses against naive references."""

import math

import torch

from puzzle.distill.losses import cosine_distance, kl_per_token, normalized_mse


def test_normalized_mse_matches_naive_and_is_one_for_zero():
    a, b = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    naive = sum(((a - b) ** 2).flatten().tolist()) / sum((b**2).flatten().tolist())
    assert math.isclose(normalized_mse(a, b).item(), naive, rel_tol=1e-5)
    assert normalized_mse(torch.zeros_like(b), b).item() == 1.0


def test_kl_per_token_matches_naive():
    t, s = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    p, q = t.softmax(-1), s.softmax(-1)
    naive = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(kl_per_token(t, s), naive)
    assert kl_per_token(t, t).abs().max() < 1e-6
    torch.testing.assert_close(kl_per_token(t, s, temperature=2.0), kl_per_token(t / 2, s / 2))


def test_cosine_distance():
    a = torch.randn(4, 8)
    assert cosine_distance(a, a).item() < 1e-6
    assert abs(cosine_distance(a, -a).item() - 2) < 1e-6
