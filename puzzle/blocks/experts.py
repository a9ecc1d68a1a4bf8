"""Expert pruning (Puzzle for MoE, gpt-oss-puzzle): keep k of a layer's E experts, the ones that matter most.

Experts are ranked on calibration tokens (`collect_layer_stats` calls `ExpertStats` on the parent's MoE layers):
- `router_mass`: each expert's mean router probability (softmax over all E experts), the share of routing it
  gets before the top-k cut;
- `contribution`: each expert's mean weighted output norm, routing weight x ||expert(x)|| over the tokens
  routed to it (0 elsewhere), the share of the layer's output it actually writes.
The kept experts keep their relative order and the router keeps their rows (and bias entries, gpt-oss), so the
pruned layer routes among them by the family's own rule (softmax over the kept experts, top-k, renormalised when
`norm_topk_prob`; gpt-oss: top-k of the kept experts' logits, softmax over those). Expert biases go with their
experts. Grouped sigmoid routing (Nemotron-H) keeps the same number of experts in every group (the best of each),
their correction-bias entries, and the shared expert; its router mass is the mean sigmoid score.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from puzzle.arch import MoEConfig
from puzzle.modeling.modeling_decilm import DeciLMSparseMoE, route_tokens

ExpertRanking = Literal["router_mass", "contribution"]
EXPERT_RANKINGS: tuple[str, ...] = ("router_mass", "contribution")
_EXPERT_TENSORS = ("gate_proj", "up_proj", "down_proj")


class ExpertStats:
    """Running sums of one MoE layer's expert ranking over calibration tokens (a forward hook on the layer)."""

    def __init__(self, ranking: ExpertRanking):
        if ranking not in EXPERT_RANKINGS:
            raise ValueError(f"expert ranking {ranking!r} is not known; use one of {', '.join(EXPERT_RANKINGS)}")
        self.ranking = ranking
        self.total: torch.Tensor | None = None  # (E,) float64
        self.tokens = 0

    @torch.no_grad()
    def __call__(self, module: DeciLMSparseMoE, args, output) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])  # (N, C), the layer's normalised input
        logits = module.gate(x)  # (N, E)
        sigmoid = module.routing == "sigmoid_group_topk"
        if self.ranking == "router_mass":
            score = (logits.float().sigmoid() if sigmoid else F.softmax(logits, dim=-1, dtype=torch.float)).sum(0)
        else:
            score = torch.zeros(logits.shape[-1], dtype=torch.float, device=x.device)
            weights, chosen = route_tokens(logits, module.top_k, module.norm_topk_prob, module.routing, module.moe,
                                           getattr(module.gate, "e_score_correction_bias", None))  # (N, top_k) each
            for expert in torch.unique(chosen).tolist():
                token, slot = torch.where(chosen == expert)
                norms = module.experts[expert](x[token]).float().norm(dim=-1)  # (n,)
                score[expert] = (weights[token, slot] * norms).sum()
        self.total = score.double() if self.total is None else self.total + score.double()
        self.tokens += x.shape[0]

    def score(self) -> torch.Tensor:
        """(E,) mean score per calibration token; higher = keep first."""
        if self.total is None:
            raise ValueError("no calibration tokens reached this MoE layer")
        return (self.total / self.tokens).float()


def best_experts(score: torch.Tensor, k: int) -> tuple[int, ...]:
    """The k best-scored experts, in their parent order (ties: the lower index)."""
    order = torch.sort(score.detach().float().cpu(), descending=True, stable=True).indices
    return tuple(sorted(order[:k].tolist()))


def slice_experts(parent: dict[str, torch.Tensor], keep: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The layer-relative router (rows, and bias entries) and expert tensors of the `keep` experts, renumbered
    0..k-1 in that order. Router rows are copies; expert tensors are the parent's (callers clone)."""
    index = torch.tensor(keep, dtype=torch.long, device=parent["mlp.gate.weight"].device)
    out = {"mlp.gate.weight": parent["mlp.gate.weight"][index]}
    for name in ("mlp.gate.bias", "mlp.gate.e_score_correction_bias"):  # one entry per expert: sliced as the rows
        if name in parent:
            out[name] = parent[name][index]
    out |= {name: t for name, t in parent.items() if name.startswith("mlp.shared_expert.")}  # always on: kept
    for new, old in enumerate(keep):
        for tensor in _EXPERT_TENSORS:
            for suffix in ("weight", "bias"):
                name = f"mlp.experts.{old}.{tensor}.{suffix}"
                if name in parent:
                    out[f"mlp.experts.{new}.{tensor}.{suffix}"] = parent[name]
    return out


def keep_experts(parent: dict[str, torch.Tensor], variant: MoEConfig,
                 score: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Layer-relative MoE weights of `variant` from the parent layer's: the router rows and experts of the
    `variant.num_local_experts` best-scored experts, renumbered 0..k-1 in their parent order."""
    if "mlp.gate.weight" not in parent:
        raise ValueError("an expert-pruned FFN needs a mixture-of-experts parent layer (mlp.gate.weight)")
    experts, k = parent["mlp.gate.weight"].shape[0], variant.num_local_experts
    parent_width = parent["mlp.experts.0.down_proj.weight"].shape[1]
    if variant.expert_intermediate_dim != parent_width:
        raise ValueError(f"expert width {variant.expert_intermediate_dim} differs from the parent's {parent_width}; "
                         "expert pruning keeps whole experts")
    if k > experts:
        raise ValueError(f"cannot keep {k} experts of a layer that has {experts}")
    groups = variant.n_group
    if k == experts:
        keep = tuple(range(experts))
    elif score is None:
        raise ValueError("expert pruning needs calibration statistics (expert_score)")
    elif groups > 1:  # the same number from every group, so the groups stay the router's unit
        size, kept = experts // groups, k // groups
        keep = tuple(g * size + e for g in range(groups) for e in best_experts(score[g * size:(g + 1) * size], kept))
    else:
        keep = best_experts(score, k)
    return {name: t.clone() for name, t in slice_experts(parent, keep).items()}
