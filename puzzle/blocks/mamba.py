"""Keeping some of a Mamba-2 mixer's heads: which ones, and the rows of its tensors that belong to them.

Heads are independent given B and C, which the heads of one group share: a mixer keeps the same number of heads
in every B/C group (so `num_groups` and the group size of its gated norm stay whole), and every tensor keeps the
kept heads' parts. Used to initialise narrower Mamba candidates (blocks/init.py) and by Minitron pruning
(prune/slicing.py), on scores of the heads' contribution to out_proj.
"""

from __future__ import annotations

import torch

from puzzle.arch import MambaConfig


def best_heads(score: torch.Tensor, mamba: MambaConfig, kept: int) -> tuple[int, ...]:
    """The `kept` heads (a multiple of num_groups) with the highest scores, the same number from each group, in
    their parent order."""
    groups = mamba.num_groups
    if kept % groups or not 0 < kept <= mamba.num_heads:
        raise ValueError(f"{kept} Mamba heads cannot be kept from {mamba.num_heads} in {groups} groups: keep a "
                         f"multiple of {groups}, at most {mamba.num_heads}")
    old, new = mamba.num_heads // groups, kept // groups
    score = score.detach().float().cpu()
    heads = [g * old + i for g in range(groups)
             for i in sorted(torch.sort(score[g * old:(g + 1) * old], descending=True, stable=True).indices[:new].tolist())]
    return tuple(heads)


def head_rows(mamba: MambaConfig, heads: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Index sets of the kept heads: "in_proj" rows (z | x | B, C | dt), "conv" channels (x | B, C), "channels"
    (the inner channels: norm gains, out_proj columns) and "heads" (dt_bias, A_log, D)."""
    head = torch.tensor(heads, dtype=torch.long)
    channels = (head[:, None] * mamba.head_dim + torch.arange(mamba.head_dim)).flatten()  # (h' * P,)
    inner, bc = mamba.intermediate_size, 2 * mamba.num_groups * mamba.state_dim
    return {"in_proj": torch.cat([channels, inner + channels, 2 * inner + torch.arange(bc), 2 * inner + bc + head]),
            "conv": torch.cat([channels, inner + torch.arange(bc)]), "channels": channels, "heads": head}
