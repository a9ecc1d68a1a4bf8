"""The global-distillation loss: KL(teacher || student) on next-token distributions + sum of (1 - cos).

Puzzle (Bercovich et al. 2024), section 5: GKD trains the whole child on
    L = kl_weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + cosine_weight * sum_l (1 - cos(h_t^l, h_s^l))
over aligned layers l (the paper found an added LM loss hurt, so there is none). Minitron (Sreenivas et al.
2024) distils on logits only: cosine_weight = 0. docs/methods.md, "Global distillation".

KL, LM loss and top-1 agreement are taken over the predicting positions (all but the last of each
window), as in `puzzle.scoring`, so a child's KL in gkd.json and in scores.json mean the same thing. The
logits are formed `chunk` positions at a time under activation checkpointing: a 128k vocabulary never
materialises (B, T, V) in fp32 for the whole batch, in the forward or in the backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from puzzle.distill.losses import cosine_distance, kl_per_token
from puzzle.metrics import QualitySums


def _kl_chunk(student_h: torch.Tensor, teacher_h: torch.Tensor, student_head: nn.Module, teacher_head: nn.Module,
              temperature: float) -> torch.Tensor:
    """Sum over positions of KL(teacher || student) for final-norm hidden states (N, C) -> scalar."""
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_h)  # (N, V): recomputed in the backward, never stored
    return kl_per_token(teacher_logits, student_head(student_h), temperature).sum()


def kl_sum(student_h: torch.Tensor, teacher_h: torch.Tensor, student_head: nn.Module, teacher_head: nn.Module,
           temperature: float, chunk: int) -> torch.Tensor:
    """sum_n KL(teacher_n || student_n) over (N, C) hidden states, `chunk` rows of logits at a time."""
    total = student_h.new_zeros((), dtype=torch.float32)
    for s in range(0, student_h.shape[0], chunk):
        args = (student_h[s:s + chunk], teacher_h[s:s + chunk], student_head, teacher_head, temperature)
        if torch.is_grad_enabled():
            total = total + checkpoint(_kl_chunk, *args, use_reentrant=False)
        else:
            total = total + _kl_chunk(*args)
    return total


class GKDLoss(nn.Module):
    """The GKD objective from both models' hidden states; holds no parameters."""

    def __init__(self, *, temperature: float, kl_weight: float, cosine_weight: float,
                 layer_pairs: Sequence[tuple[int, int]], logits_chunk: int) -> None:
        super().__init__()
        self.temperature, self.kl_weight, self.cosine_weight = temperature, kl_weight, cosine_weight
        self.layer_pairs = tuple(layer_pairs)  # (student layer, teacher layer)
        self.logits_chunk = logits_chunk

    @property
    def needs_layer_states(self) -> bool:
        return self.cosine_weight > 0 and bool(self.layer_pairs)

    def forward(self, student_states: Sequence[torch.Tensor] | None, teacher_states: Sequence[torch.Tensor] | None,
                student_final: torch.Tensor, teacher_final: torch.Tensor, student_head: nn.Module,
                teacher_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, mean KL, summed cosine distance); the last two detached, for logging.

        `*_states` are `output_hidden_states` (embeddings, then each layer's output), so layer i is entry i + 1;
        `*_final` are the final-norm hidden states (B, T, C) the LM heads read.
        """
        s = student_final[:, :-1].flatten(0, 1)  # (N, C) predicting positions
        t = teacher_final[:, :-1].flatten(0, 1)  # (N, C)
        kl = kl_sum(s, t, student_head, teacher_head, self.temperature, self.logits_chunk) / s.shape[0]
        # T^2 keeps the gradient scale independent of the temperature (Hinton et al. 2015, section 2).
        loss = self.kl_weight * self.temperature**2 * kl
        cosine = kl.new_zeros(())
        if self.needs_layer_states:
            for i, j in self.layer_pairs:
                cosine = cosine + cosine_distance(student_states[i + 1], teacher_states[j + 1])
            loss = loss + self.cosine_weight * cosine
        return loss, kl.detach(), cosine.detach()


@torch.no_grad()
def held_out_sums(student_final: torch.Tensor, teacher_final: torch.Tensor, input_ids: torch.Tensor,
                  student_head: nn.Module, teacher_head: nn.Module, chunk: int) -> torch.Tensor:
    """`puzzle.metrics.QualitySums` of the student against the teacher over predicting positions (T = 1), as
    the tensor the processes all-reduce."""
    s = student_final[:, :-1].flatten(0, 1)  # (N, C)
    t = teacher_final[:, :-1].flatten(0, 1)  # (N, C)
    labels = input_ids[:, 1:].flatten()  # (N,)
    sums = QualitySums(s.device)
    for a in range(0, s.shape[0], chunk):
        sums.add_logits(teacher_head(t[a:a + chunk]), student_head(s[a:a + chunk]), labels[a:a + chunk])
    return sums.sums
