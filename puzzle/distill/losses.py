"""Distillation losses and the quality metrics built on them (each checked against a naive reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalized_mse(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """||pred - target||^2 / ||target||^2 over the whole batch (Puzzle's BLD loss); 1.0 = predicting zero."""
    return (pred - target).pow(2).sum() / target.pow(2).sum().clamp_min(eps)


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, per position: (..., V) -> (...)."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a, b) along the last dimension, averaged over the other dimensions."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()
