"""The fused weights: norm gains folded into gate / up, matrices concatenated, layers replaced in place."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from puzzle.arch import Architecture
from puzzle.checkpoint import decilm_config
from puzzle.fusion.runs import fused_architecture
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM, DeciLMMLP

# ----------------------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class FFNWeights:
    """One gated FFN with its RMSNorm gain: f(h) = down(act(gate(g * n(h))) * up(g * n(h)))."""

    norm: torch.Tensor  # (C,) RMSNorm gain g
    gate: torch.Tensor  # (I, C)
    up: torch.Tensor  # (I, C)
    down: torch.Tensor  # (C, I)
    gate_bias: torch.Tensor | None = None  # (I,)
    up_bias: torch.Tensor | None = None  # (I,)
    down_bias: torch.Tensor | None = None  # (C,)

    @property
    def width(self) -> int:
        return self.gate.shape[0]


def fuse_ffn_weights(ffns: Sequence[FFNWeights]) -> FFNWeights:
    """One FFN of width sum_j I_j computing sum_j f_j on a shared unit-gain norm (exact up to rounding).

    W g (.) n = (W diag(g)) n, so each gain scales the columns of its own gate / up rows; the fold is done
    in fp32 and stored in the weights' dtype.
    """
    assert len({f.down_bias is None for f in ffns}) == 1, "mlp_bias is global: all FFNs have biases or none do"
    dtype = ffns[0].gate.dtype
    gate = torch.cat([f.gate.float() * f.norm.float()[None, :] for f in ffns]).to(dtype)  # (sum I, C)
    up = torch.cat([f.up.float() * f.norm.float()[None, :] for f in ffns]).to(dtype)  # (sum I, C)
    down = torch.cat([f.down for f in ffns], dim=1)  # (C, sum I)
    biased = ffns[0].down_bias is not None
    return FFNWeights(
        norm=torch.ones_like(ffns[0].norm),
        gate=gate,
        up=up,
        down=down,
        gate_bias=torch.cat([f.gate_bias for f in ffns]) if biased else None,
        up_bias=torch.cat([f.up_bias for f in ffns]) if biased else None,
        down_bias=torch.stack([f.down_bias.float() for f in ffns]).sum(0).to(dtype) if biased else None,
    )


def layer_ffn_weights(layer: torch.nn.Module) -> FFNWeights:
    mlp = layer.mlp
    return FFNWeights(
        norm=layer.post_attention_layernorm.weight.detach(),
        gate=mlp.gate_proj.weight.detach(), up=mlp.up_proj.weight.detach(), down=mlp.down_proj.weight.detach(),
        gate_bias=_detach(mlp.gate_proj.bias), up_bias=_detach(mlp.up_proj.bias), down_bias=_detach(mlp.down_proj.bias),
    )


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


@torch.no_grad()
def fuse_layers_(model: DeciLMForCausalLM, groups: Iterable[Sequence[int]]) -> DeciLMForCausalLM:
    """Fuse each group's FFNs into its first layer, in place; the group's other layers become no-op.

    Trust but verify: each fused layer is checked against the sum of the original FFNs on a random input.
    """
    groups = [tuple(g) for g in groups if len(g) > 1]
    layers = model.model.layers
    config = decilm_config(model.config.to_dict(), fused_architecture(Architecture.from_config(model.config.to_dict()), groups))
    param = next(model.parameters())
    probe = torch.randn(1, 3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    probe = probe.to(param.device, param.dtype)  # (1, 3, C)
    tolerance = 1e-5 if param.dtype == torch.float32 else 3e-2
    for group in groups:
        eps = {layers[i].post_attention_layernorm.variance_epsilon for i in group}
        assert len(eps) == 1, f"layers {group} have different RMSNorm eps {eps}"  # rms_norm_eps is global
        expected = sum(layers[i].ffn_branch(probe).float() for i in group)  # the parallel formulation
        fused = fuse_ffn_weights([layer_ffn_weights(layers[i]) for i in group])
        with torch.device("meta"):
            mlp = DeciLMMLP(config, fused.width)
        state = {"gate_proj.weight": fused.gate, "up_proj.weight": fused.up, "down_proj.weight": fused.down}
        if fused.down_bias is not None:
            state |= {"gate_proj.bias": fused.gate_bias, "up_proj.bias": fused.up_bias, "down_proj.bias": fused.down_bias}
        mlp.load_state_dict(state, assign=True)
        host = layers[group[0]]
        host.mlp = mlp
        host.post_attention_layernorm.weight.copy_(fused.norm)
        for i in group[1:]:
            layers[i].mlp = layers[i].post_attention_layernorm = None
        got = host.ffn_branch(probe).float()
        error = ((got - expected).norm() / expected.norm().clamp_min(1e-12)).item()
        assert error < tolerance, f"fused FFN of layers {group} differs from the parallel sum (relative error {error:.2e})"
    model.config = model.model.config = config
    return model


