"""How close a model's next-token predictions are to a reference model's: one accumulator for every stage.

Scoring (replace-one-block), the fusion check, GKD's held-out metrics and the report all add up the same sums
over predicting positions: KL(reference || model), the model's and the reference's next-token NLL, and top-1
agreement. They are kept as one float64 tensor on the device (no host sync per batch; processes add theirs
with one all-reduce) and turned into means by `QualitySums.quality()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FIELDS = ("kl", "nll", "top1", "reference_nll", "positions")  # the order of `QualitySums.sums`


@dataclass(frozen=True)
class Reference:
    """The reference's side of a run of positions, computed once and compared with any number of models."""

    log_p: torch.Tensor  # (N, V) reference log-probabilities, fp32
    top1: torch.Tensor  # (N,) reference argmax
    labels: torch.Tensor  # (N,) next tokens
    nll: torch.Tensor  # () the reference's summed next-token NLL

    @property
    def p(self) -> torch.Tensor:
        """The probabilities, recomputed at each use: a kept Reference then costs 4 bytes per entry, not 8."""
        return self.log_p.exp()

    @classmethod
    def from_logits(cls, logits: torch.Tensor, labels: torch.Tensor) -> Reference:
        log_p = F.log_softmax(logits.float(), dim=-1)
        nll = -log_p.gather(-1, labels[:, None]).sum()
        return cls(log_p=log_p, top1=logits.argmax(-1), labels=labels, nll=nll)


@dataclass(frozen=True, kw_only=True)
class Quality:
    """Means per predicting position of a model against its reference."""

    kl: float  # KL(reference || model), nats
    lm_loss: float  # the model's next-token cross-entropy, nats
    top1: float  # fraction of positions where the model's argmax is the reference's
    tokens: int  # predicting positions
    reference_lm_loss: float | None = None  # the reference's on the same positions


class QualitySums:
    """Running sums of FIELDS over positions; `add` a chunk of logits at a time."""

    def __init__(self, device: torch.device | str | None = None):
        self.sums = torch.zeros(len(FIELDS), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, reference: Reference, logits: torch.Tensor) -> None:
        """One chunk: the model's logits (N, V) at the positions of `reference`."""
        log_q = F.log_softmax(logits.float(), dim=-1)
        row = torch.stack([
            (reference.p * (reference.log_p - log_q)).sum(),
            -log_q.gather(-1, reference.labels[:, None]).sum(),
            (logits.argmax(-1) == reference.top1).sum(),
            reference.nll,
            torch.tensor(float(reference.labels.numel()), device=logits.device),
        ]).double()
        self.sums += row.to(self.sums.device)

    def add_logits(self, reference_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.add(Reference.from_logits(reference_logits, labels), logits)

    def quality(self) -> Quality:
        return quality_from(self.sums)


def quality_from(sums: torch.Tensor) -> Quality:
    """Means from a `QualitySums.sums` tensor (e.g. one all-reduced over processes)."""
    kl, nll, top1, reference_nll, n = sums.tolist()
    n = max(n, 1.0)
    return Quality(kl=kl / n, lm_loss=nll / n, top1=top1 / n, tokens=int(n), reference_lm_loss=reference_nll / n)
