"""The learning-rate schedule of BLD and GKD: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(total_steps: int, warmup_fraction: float, min_lr_fraction: float) -> Callable[[int], float]:
    """LR factor per optimizer step (for `torch.optim.lr_scheduler.LambdaLR`): linear warm-up over
    `warmup_fraction` of the steps, then cosine decay to `min_lr_fraction` at the last step."""
    warmup = int(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_fraction + (1 - min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
