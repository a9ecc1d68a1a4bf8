"""Experts as a server runs them, for timing: each projection of all experts is one grouped GEMM.

`DeciLMSparseMoE` sends each expert the tokens that chose it, one expert at a time (as transformers does, which
keeps CPU results bitwise equal to it). Those shapes depend on the routing, so its forward syncs with the host,
launches kernels per routed expert and cannot be captured in a CUDA graph: timing it would charge an MoE layer
for Python and launches that a fused-MoE server (vLLM's fused_moe, transformers' "grouped_mm" experts) never pays.
`GroupedMoE` computes the same layer with the experts' weights stacked: tokens sorted by expert, one grouped GEMM
per projection that reads only the experts some token chose, static shapes throughout, so the profiler times MoE
layers and whole MoE models in CUDA graphs like every other layer (docs/methods.md, "Mixture of experts").

The stacked tensors are the weights: each expert's Linear is re-pointed at a view of them, so swapping the
grouped form in (`grouped_experts`) costs one layer's experts of extra memory at a time, and the model
keeps working unchanged after the swap is undone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from puzzle.modeling.modeling_decilm import DeciLMSparseMoE, route_tokens

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (S, in) sorted by group, weight (G, out, in), offs (G,) cumulative rows: (S, out)."""
    grouped = getattr(F, "grouped_mm", None) or torch._grouped_mm  # public from torch 2.10
    return grouped(x, weight.transpose(-2, -1), offs=offs)


class GroupedMoE(nn.Module):
    """`DeciLMSparseMoE`'s computation (same router, routing rule, activation, weighting) with stacked experts."""

    def __init__(self, moe: DeciLMSparseMoE):
        super().__init__()
        self.gate, self.top_k, self.norm_topk_prob, self.routing = moe.gate, moe.top_k, moe.norm_topk_prob, moe.routing
        self.activate = moe.experts[0].activate  # the experts of one layer share their activation
        self.num_experts = len(moe.experts)
        self.weight: dict[str, torch.Tensor] = {}
        self.bias: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name in _PROJECTIONS:
                linears = [getattr(expert, name) for expert in moe.experts]
                self.weight[name] = torch.stack([linear.weight for linear in linears])  # (E, out, in)
                for e, linear in enumerate(linears):  # one copy of the weights: the experts view the stack
                    linear.weight = nn.Parameter(self.weight[name][e], requires_grad=linear.weight.requires_grad)
                if linears[0].bias is not None:
                    self.bias[name] = torch.stack([linear.bias for linear in linears])  # (E, out)
                    for e, linear in enumerate(linears):
                        linear.bias = nn.Parameter(self.bias[name][e], requires_grad=linear.bias.requires_grad)

    def _project(self, name: str, x: torch.Tensor, offs: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        out = _grouped_mm(x, self.weight[name], offs)
        if name in self.bias:
            out = out + self.bias[name][expert_of_row]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq_len, hidden = x.shape
        x = x.reshape(-1, hidden)  # (N, C)
        weights, chosen = route_tokens(self.gate(x), self.top_k, self.norm_topk_prob, self.routing)  # (N, top_k)
        expert_of_row, order = torch.sort(chosen.reshape(-1), stable=True)  # (N * top_k,) rows grouped by expert
        token = order // self.top_k
        # histc, not bincount: bincount sizes its output from the data (a host sync, not capturable)
        counts = torch.histc(expert_of_row.to(torch.float if x.device.type == "cpu" else torch.int),
                             bins=self.num_experts, min=0, max=self.num_experts - 1)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        rows = x[token]  # (N * top_k, C)
        h = self.activate(self._project("gate_proj", rows, offs, expert_of_row),
                          self._project("up_proj", rows, offs, expert_of_row))
        y = self._project("down_proj", h, offs, expert_of_row) * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype)).view(bsz, seq_len, hidden)


@contextmanager
def grouped_experts(module: nn.Module) -> Iterator[nn.Module]:
    """Every `DeciLMSparseMoE` inside `module` replaced by its `GroupedMoE` for the duration; put back after."""
    swapped: list[tuple[nn.Module, str, DeciLMSparseMoE]] = []
    try:
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, DeciLMSparseMoE):
                    setattr(parent, name, GroupedMoE(child))
                    swapped.append((parent, name, child))
        yield module
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
