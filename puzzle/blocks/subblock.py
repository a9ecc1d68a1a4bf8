"""One attention or FFN sub-block as a standalone module, built from the modeling classes themselves.

A sub-block is a one-layer `DeciLMDecoderLayer` whose other half is no-op, so its parameters carry exactly
the names they have inside a checkpoint's layer (`input_layernorm.weight`, `self_attn.k_proj.weight`,
`post_attention_layernorm.weight`, `mlp.up_proj.weight`, ...) and no model code is copied for BLD, scoring
or profiling. `forward` returns the residual branch only (norm + attention, or norm + FFN): the quantity
blockwise local distillation matches (Puzzle, section 3).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from puzzle.arch import AttentionConfig, BlockConfig, FFNConfig
from puzzle.checkpoint import decilm_config
from puzzle.modeling.configuration_decilm import DeciLMConfig
from puzzle.modeling.modeling_decilm import DeciLMDecoderLayer, DeciLMRotaryEmbedding, MaskProvider

Kind = Literal["attention", "ffn", "block"]
_NO_OP_ATTENTION = AttentionConfig(no_op=True)
_NO_OP_FFN = FFNConfig(no_op=True)


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


class SubBlock(nn.Module):
    """The residual branch of one attention or FFN variant: x -> branch(x), without the residual add."""

    def __init__(self, parent: DeciLMConfig, kind: Kind, variant: AttentionConfig | FFNConfig | BlockConfig):
        super().__init__()
        self.kind = kind
        self.variant = variant
        if kind == "attention":
            block = BlockConfig(attention=variant, ffn=_NO_OP_FFN)
        elif kind == "ffn":
            block = BlockConfig(attention=_NO_OP_ATTENTION, ffn=variant)
        else:  # coupled mode: a whole layer
            block = variant
        self.config = decilm_config(parent, [block])
        self.layer = DeciLMDecoderLayer(self.config, 0)

    @property
    def is_empty(self) -> bool:
        """A no-op variant: no parameters, the branch is zero."""
        if isinstance(self.variant, BlockConfig):
            return self.variant.attention.no_op and self.variant.ffn.no_op
        return self.variant.no_op

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None) -> torch.Tensor:
        """hidden_states: (B, T, C), full sequences from position 0 (no KV cache)."""
        if self.is_empty:
            return torch.zeros_like(hidden_states)
        masks = MaskProvider(None, 0, hidden_states.shape[1], hidden_states.device)
        attn = self.layer.attention_branch(hidden_states, position_embeddings, masks)
        if self.kind == "attention":
            return attn
        ffn_input = hidden_states if attn is None else hidden_states + attn
        ffn = self.layer.ffn_branch(ffn_input)
        if attn is None:
            return ffn
        return attn if ffn is None else attn + ffn

    def checkpoint_state(self, layer: int) -> dict[str, torch.Tensor]:
        """Weights under the names they take in layer `layer` of a checkpoint."""
        return {layer_prefix(layer) + k: v for k, v in self.layer.state_dict().items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], layer: int, strict: bool = True) -> None:
        """Load this sub-block's weights from checkpoint-named tensors of layer `layer` (other keys ignored)."""
        prefix = layer_prefix(layer)
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        wanted = set(self.layer.state_dict())
        self.layer.load_state_dict({k: v for k, v in own.items() if k in wanted}, strict=strict)


class Rotary(nn.Module):
    """cos/sin for positions 0..T-1 of the parent's RoPE, shared by all attention sub-blocks."""

    def __init__(self, parent: DeciLMConfig):
        super().__init__()
        self.rotary = DeciLMRotaryEmbedding(parent)

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor):
        positions = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
        return self.rotary(hidden_states, positions)
