"""The fused weights: norm gains folded into gate / up, matrices concatenated, layers replaced in place."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from puzzle.arch import Architecture
from puzzle.checkpoint import decilm_config
from puzzle.fusion.runs import fused_architecture
from puzzle.modeling.configuration_decilm import DeciLMConfig
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM, DeciLMMLP, DeciLMPlainMLP, DeciLMRMSNorm

# ----------------------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class FFNWeights:
    """One FFN with its RMSNorm gain: f(h) = down(act(gate(g * n(h))) * up(g * n(h))), or without a gate
    (Nemotron-H's relu2 MLP, `gate` None) down(act(up(g * n(h))))."""

    norm: torch.Tensor  # (C,) RMSNorm gain g
    gate: torch.Tensor | None  # (I, C); None: no gate
    up: torch.Tensor  # (I, C)
    down: torch.Tensor  # (C, I)
    gate_bias: torch.Tensor | None = None  # (I,)
    up_bias: torch.Tensor | None = None  # (I,)
    down_bias: torch.Tensor | None = None  # (C,)

    @property
    def width(self) -> int:
        return self.up.shape[0]


def fuse_ffn_weights(ffns: Sequence[FFNWeights]) -> FFNWeights:
    """One FFN of width sum_j I_j computing sum_j f_j on a shared unit-gain norm (exact up to rounding).

    W g (.) n = (W diag(g)) n, so each gain scales the columns of its own gate / up rows; the fold is done
    in fp32 and stored in the weights' dtype.
    """
    assert len({f.down_bias is None for f in ffns}) == 1, "mlp_bias is global: all FFNs have biases or none do"
    assert len({f.gate is None for f in ffns}) == 1, "FFNs with and without a gate cannot be fused into one"
    dtype = ffns[0].up.dtype
    gated = ffns[0].gate is not None
    gate = torch.cat([f.gate.float() * f.norm.float()[None, :] for f in ffns]).to(dtype) if gated else None  # (sum I, C)
    up = torch.cat([f.up.float() * f.norm.float()[None, :] for f in ffns]).to(dtype)  # (sum I, C)
    down = torch.cat([f.down for f in ffns], dim=1)  # (C, sum I)
    biased = ffns[0].down_bias is not None
    return FFNWeights(
        norm=torch.ones_like(ffns[0].norm),
        gate=gate,
        up=up,
        down=down,
        gate_bias=torch.cat([f.gate_bias for f in ffns]) if biased and gated else None,
        up_bias=torch.cat([f.up_bias for f in ffns]) if biased else None,
        down_bias=torch.stack([f.down_bias.float() for f in ffns]).sum(0).to(dtype) if biased else None,
    )


def layer_ffn_weights(layer: torch.nn.Module) -> FFNWeights:
    mlp = layer.mlp
    gate = getattr(mlp, "gate_proj", None)
    return FFNWeights(
        norm=layer.post_attention_layernorm.weight.detach(),
        gate=_detach(None if gate is None else gate.weight), up=mlp.up_proj.weight.detach(), down=mlp.down_proj.weight.detach(),
        gate_bias=_detach(None if gate is None else gate.bias), up_bias=_detach(mlp.up_proj.bias),
        down_bias=_detach(mlp.down_proj.bias),
    )


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def ffn_module(config: DeciLMConfig, ffn: FFNWeights) -> DeciLMMLP:
    """A DeciLMMLP (DeciLMPlainMLP without a gate) holding `ffn`'s matrices (not its norm), without copying them."""
    with torch.device("meta"):
        mlp = DeciLMMLP(config, ffn.width) if ffn.gate is not None else DeciLMPlainMLP(config, ffn.width)
    state = {"up_proj.weight": ffn.up, "down_proj.weight": ffn.down}
    if ffn.gate is not None:
        state["gate_proj.weight"] = ffn.gate
    if ffn.down_bias is not None:
        state |= {"up_proj.bias": ffn.up_bias, "down_proj.bias": ffn.down_bias}
        if ffn.gate is not None:
            state["gate_proj.bias"] = ffn.gate_bias
    mlp.load_state_dict(state, assign=True)
    return mlp


def _ffn_branch(config: DeciLMConfig, ffn: FFNWeights, h: torch.Tensor) -> torch.Tensor:
    """f(h) of one FFN sub-block, as DeciLMDecoderLayer.ffn_branch computes it."""
    with torch.device("meta"):
        norm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    norm.load_state_dict({"weight": ffn.norm}, assign=True)
    return ffn_module(config, ffn)(norm(h))


@torch.no_grad()
def fuse_group(config: DeciLMConfig, ffns: Sequence[FFNWeights], group: Sequence[int]) -> FFNWeights:
    """`fuse_ffn_weights(ffns)` (the FFNs of layers `group`), checked against the sum of the original FFNs on a
    random input: trust but verify."""
    probe = torch.randn(1, 3, config.hidden_size, generator=torch.Generator().manual_seed(0))
    probe = probe.to(ffns[0].up.device, ffns[0].up.dtype)  # (1, 3, C)
    tolerance = 1e-5 if ffns[0].up.dtype == torch.float32 else 3e-2
    expected = sum(_ffn_branch(config, f, probe).float() for f in ffns)  # the parallel formulation
    fused = fuse_ffn_weights(ffns)
    got = _ffn_branch(config, fused, probe).float()
    error = ((got - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    assert error < tolerance, f"fused FFN of layers {tuple(group)} differs from the parallel sum (relative error {error:.2e})"
    return fused


@torch.no_grad()
def fuse_layers_(model: DeciLMForCausalLM, groups: Iterable[Sequence[int]]) -> DeciLMForCausalLM:
    """Fuse each group's FFNs into its first layer, in place; the group's other layers become no-op (the model
    held whole; `fused_tensors` writes the same weights tensor by tensor)."""
    groups = [tuple(g) for g in groups if len(g) > 1]
    layers = model.model.layers
    config = decilm_config(model.config.to_dict(), fused_architecture(Architecture.from_config(model.config.to_dict()), groups))
    for group in groups:
        eps = {layers[i].post_attention_layernorm.variance_epsilon for i in group}
        assert len(eps) == 1, f"layers {group} have different RMSNorm eps {eps}"  # rms_norm_eps is global
        fused = fuse_group(config, [layer_ffn_weights(layers[i]) for i in group], group)
        host = layers[group[0]]
        host.mlp = ffn_module(config, fused)
        host.post_attention_layernorm.weight.copy_(fused.norm)
        for i in group[1:]:
            layers[i].mlp = layers[i].post_attention_layernorm = None
    model.config = model.model.config = config
    return model


_FFN_KEYS = ("mlp.", "post_attention_layernorm.")
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


def fused_tensors(weights: Mapping[str, torch.Tensor], config: DeciLMConfig, groups: Iterable[Sequence[int]]
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """The fused checkpoint's tensors, one at a time, from the unfused one's (`weights`: a state dict, or
    `LazyWeights` that reads each when reached): every tensor outside the groups' FFNs passes through unchanged,
    each group's fused FFN (the weights `fuse_layers_` puts in its first layer) comes in place of the first layer's
    FFN, and the group's other layers lose theirs. Holds one group's FFNs at a time."""
    groups = [tuple(g) for g in groups if len(g) > 1]
    host = {g[0]: g for g in groups}
    fused_away = {i for g in groups for i in g}
    for name in weights:
        match = _LAYER_NAME.fullmatch(name)
        if match is None or int(match.group(1)) not in fused_away or not match.group(2).startswith(_FFN_KEYS):
            yield name, weights[name]
        elif int(match.group(1)) in host and match.group(2) == "post_attention_layernorm.weight":
            group = host[int(match.group(1))]
            fused = fuse_group(config, [_ffn_weights(weights, i) for i in group], group)
            prefix = f"model.layers.{group[0]}."
            yield prefix + "post_attention_layernorm.weight", fused.norm
            for key, tensor in ffn_module(config, fused).state_dict().items():
                yield prefix + "mlp." + key, tensor


def _ffn_weights(weights: Mapping[str, torch.Tensor], i: int) -> FFNWeights:
    p = f"model.layers.{i}."
    bias = lambda proj: weights[p + f"mlp.{proj}.bias"] if p + f"mlp.{proj}.bias" in weights else None  # noqa: E731
    gate = weights[p + "mlp.gate_proj.weight"] if p + "mlp.gate_proj.weight" in weights else None  # relu2 MLP: none
    return FFNWeights(norm=weights[p + "post_attention_layernorm.weight"], gate=gate,
                      up=weights[p + "mlp.up_proj.weight"], down=weights[p + "mlp.down_proj.weight"],
                      gate_bias=bias("gate_proj"), up_bias=bias("up_proj"), down_bias=bias("down_proj"))
