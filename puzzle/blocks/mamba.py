"""Keeping some of a Mamba-2 mixer's heads (and of each head's channels): which ones, and the rows of its tensors
that belong to them.

Heads are independent given B and C, which the heads of one group share: a mixer keeps the same number of heads
in every B/C group (so `num_groups` and the group size of its gated norm stay whole), and every tensor keeps the
kept heads' parts. A head's channels are independent too (each has its own row of the scan state, under the
head's dt and decay and its group's B and C), so a head may keep some of them: the same number in every head
(`head_dim` is one number per layer). Used to initialise narrower Mamba candidates (blocks/init.py) and by Minitron pruning
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


def best_channels(score: torch.Tensor, mamba: MambaConfig, heads: tuple[int, ...], kept: int) -> tuple[tuple[int, ...], ...]:
    """Per kept head, its `kept` best-scored channels (offsets within the head, ascending); `score` (I,) per inner
    channel."""
    if not 0 < kept <= mamba.head_dim:
        raise ValueError(f"{kept} channels cannot be kept of Mamba heads of {mamba.head_dim}")
    score = score.detach().float().cpu().view(mamba.num_heads, mamba.head_dim)
    return tuple(tuple(sorted(torch.sort(score[h], descending=True, stable=True).indices[:kept].tolist())) for h in heads)


def head_rows(mamba: MambaConfig, heads: tuple[int, ...], channels: tuple[tuple[int, ...], ...] | None = None
              ) -> dict[str, torch.Tensor]:
    """Index sets of the kept heads (and, with `channels`, of each kept head's kept channels): "in_proj" rows
    (z | x | B, C | dt), "conv" channels (x | B, C), "channels" (the inner channels: norm gains, out_proj columns)
    and "heads" (dt_bias, A_log, D)."""
    head = torch.tensor(heads, dtype=torch.long)
    offsets = torch.arange(mamba.head_dim)[None, :].expand(len(heads), -1) if channels is None else torch.tensor(channels)
    channels = (head[:, None] * mamba.head_dim + offsets).flatten()  # (h' * P',)
    inner, bc = mamba.intermediate_size, 2 * mamba.num_groups * mamba.state_dim
    return {"in_proj": torch.cat([channels, inner + channels, 2 * inner + torch.arange(bc), 2 * inner + bc + head]),
            "conv": torch.cat([channels, inner + torch.arange(bc)]), "channels": channels, "heads": head}
