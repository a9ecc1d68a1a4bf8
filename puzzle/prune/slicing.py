"""A PrunePlan applied to weights: every tensor sliced along the axes the plan shrinks, layers renumbered.

docs/methods.md, "Minitron pruning". The hidden axis runs through the whole model: the embedding and LM
head columns, every projection's input columns (q/k/v, gate/up) and output rows (o, down, and their biases),
both square matrices of a linear replacement, and every RMSNorm gain. Pruning it changes what an RMSNorm
divides by (the mean square over fewer channels); Minitron accepts that, which is one reason KD follows.
Heads slice q rows / o columns by whole heads and k / v rows by whole KV heads; q_norm / k_norm act on
head_dim, which pruning leaves alone; attention sinks (gpt-oss, one logit per query head) go with their heads.
Mixture-of-experts layers first keep their plan's experts (router rows and bias entries with them, renumbered:
puzzle/blocks/experts.py `slice_experts`), then every expert is sliced as a gated FFN: its own kept neurons,
and the hidden axis like any projection (the router reads the hidden state too); grouped routing's correction bias
goes with the router rows and a shared expert keeps its neurons. A Mamba-2 mixer keeps its plan's heads
(puzzle/blocks/mamba.py: their z / x / dt rows of in_proj, conv channels, dt_bias, A_log, D, norm gains and out_proj
columns; B and C whole) and the hidden axis as its in_proj columns and out_proj rows. Tied embeddings stay tied.
Dropped layers are removed (not made no-op): the child is smaller on disk, can be a plain Llama, and its
layer i is parent layer kept[i].
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from puzzle.arch import Architecture
from puzzle.blocks.experts import slice_experts
from puzzle.blocks.mamba import head_rows as mamba_rows
from puzzle.checkpoint import decilm_config
from puzzle.modeling.configuration_decilm import DeciLMConfig
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM, DeciLMRotaryEmbedding
from puzzle.prune.plan import LayerPlan, PrunePlan, pruned_architecture

# Per tensor (name inside a layer, or global name): the index set of each axis (None: not sliced).
_GLOBAL_AXES = {
    "model.embed_tokens.weight": (None, "hidden"),
    "lm_head.weight": (None, "hidden"),
    "model.norm.weight": ("hidden",),
}
_LAYER_AXES = {
    "input_layernorm.weight": ("hidden",),
    "post_attention_layernorm.weight": ("hidden",),
    "self_attn.q_proj.weight": ("q", "hidden"),
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.k_proj.bias": ("kv",),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.bias": ("kv",),
    "self_attn.o_proj.weight": ("hidden", "q"),
    "self_attn.o_proj.bias": ("hidden",),
    "self_attn.sinks": ("q_heads",),
    "self_attn.q_norm.weight": (None,),
    "self_attn.k_norm.weight": (None,),
    "self_attn.linear_attn.weight": ("hidden", "hidden"),
    "mlp.gate_proj.weight": ("ffn", "hidden"),
    "mlp.gate_proj.bias": ("ffn",),
    "mlp.up_proj.weight": ("ffn", "hidden"),
    "mlp.up_proj.bias": ("ffn",),
    "mlp.down_proj.weight": ("hidden", "ffn"),
    "mlp.down_proj.bias": ("hidden",),
    "mlp.linear_mlp.weight": ("hidden", "hidden"),
    "mlp.gate.weight": (None, "hidden"),  # the router; its rows (experts) are chosen by slice_experts first
    "mlp.gate.bias": (None,),
    "mlp.gate.e_score_correction_bias": (None,),
    "mlp.shared_expert.gate_proj.weight": (None, "hidden"),
    "mlp.shared_expert.up_proj.weight": (None, "hidden"),
    "mlp.shared_expert.down_proj.weight": ("hidden", None),
    "mlp.shared_expert.gate_proj.bias": (None,),
    "mlp.shared_expert.up_proj.bias": (None,),
    "mlp.shared_expert.down_proj.bias": ("hidden",),
    "self_attn.mamba_mixer.in_proj.weight": ("mamba_in_proj", "hidden"),
    "self_attn.mamba_mixer.in_proj.bias": ("mamba_in_proj",),
    "self_attn.mamba_mixer.conv1d.weight": ("mamba_conv", None, None),
    "self_attn.mamba_mixer.conv1d.bias": ("mamba_conv",),
    "self_attn.mamba_mixer.dt_bias": ("mamba_heads",),
    "self_attn.mamba_mixer.A_log": ("mamba_heads",),
    "self_attn.mamba_mixer.D": ("mamba_heads",),
    "self_attn.mamba_mixer.norm.weight": ("mamba_channels",),
    "self_attn.mamba_mixer.out_proj.weight": ("hidden", "mamba_channels"),
    "self_attn.mamba_mixer.out_proj.bias": ("hidden",),
}
# The tensors of expert e (mlp.experts.{e}.*): a gated FFN whose neurons are the index set "expert_ffn".
_EXPERT_AXES = {
    "gate_proj.weight": ("expert_ffn", "hidden"),
    "gate_proj.bias": ("expert_ffn",),
    "up_proj.weight": ("expert_ffn", "hidden"),
    "up_proj.bias": ("expert_ffn",),
    "down_proj.weight": ("hidden", "expert_ffn"),
    "down_proj.bias": ("hidden",),
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_NAME = re.compile(r"mlp\.experts\.(\d+)\.(.+)")


def head_rows(heads: tuple[int, ...] | None, head_dim: int) -> torch.Tensor | None:
    """Row indices of whole heads in a (heads * head_dim, ...) projection."""
    if heads is None:
        return None
    return (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()  # (h * D,)


def _indices(plan: PrunePlan, layer: LayerPlan | None, head_dim: int, arch: Architecture | None = None
             ) -> dict[str, torch.Tensor | None]:
    as_index = lambda kept: None if kept is None else torch.tensor(kept)  # noqa: E731
    index = {"hidden": as_index(plan.hidden)}
    if layer is not None:
        index |= {"q": head_rows(layer.q_heads, head_dim), "kv": head_rows(layer.kv_heads, head_dim),
                  "q_heads": as_index(layer.q_heads), "ffn": as_index(layer.ffn)}
        rows = {} if layer.mamba_heads is None else \
            mamba_rows(arch.blocks[layer.source].attention.mamba, layer.mamba_heads, layer.mamba_channels)
        index |= {f"mamba_{k}": rows.get(k) for k in ("in_proj", "conv", "heads", "channels")}
    return index


def _slice_layer(tensors: dict[str, torch.Tensor], layer: LayerPlan, index: dict[str, torch.Tensor | None]
                 ) -> dict[str, torch.Tensor]:
    """One layer's tensors (names relative to the layer) sliced by its plan."""
    if layer.experts is not None:
        tensors = {k: t for k, t in tensors.items() if not k.startswith("mlp.")} | slice_experts(tensors, layer.experts)
    out = {}
    for rest, tensor in tensors.items():
        expert = _EXPERT_NAME.fullmatch(rest)
        if expert is None:
            assert rest in _LAYER_AXES, f"no pruning rule for tensor {rest} (layer {layer.source})"
            out[rest] = slice_tensor(tensor, _LAYER_AXES[rest], index)
            continue
        e, name = int(expert.group(1)), expert.group(2)
        assert name in _EXPERT_AXES, f"no pruning rule for expert tensor {rest} (layer {layer.source})"
        neurons = None if layer.expert_ffn is None else torch.tensor(layer.expert_ffn[e])
        out[rest] = slice_tensor(tensor, _EXPERT_AXES[name], index | {"expert_ffn": neurons})
    return out


def slice_tensor(t: torch.Tensor, axes: tuple[str | None, ...], index: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """`t` with each axis restricted to its index set (a copy, never a view of the parent's storage)."""
    assert len(axes) == t.dim(), f"{len(axes)} axes for a tensor of shape {tuple(t.shape)}"
    for dim, kind in enumerate(axes):
        if kind is not None and index[kind] is not None:
            t = t.index_select(dim, index[kind].to(t.device))
    return t.clone()


def slice_state_dict(state: dict[str, torch.Tensor], plan: PrunePlan, arch: Architecture) -> dict[str, torch.Tensor]:
    """The child's state dict: kept layers renumbered 0..n-1, every tensor sliced by the plan."""
    return dict(sliced_tensors(state, plan, arch))


def sliced_tensors(weights: Mapping[str, torch.Tensor], plan: PrunePlan, arch: Architecture) -> Iterator[tuple[str, torch.Tensor]]:
    """The child's tensors one at a time, from the parent's (`weights`: a state dict, or `LazyWeights` that reads
    each when reached): the global tensors, then each kept layer's (renumbered), sliced as it is read. Holds one
    parent layer at a time (a mixture-of-experts layer's experts are chosen together)."""
    new_index = {layer.source: i for i, layer in enumerate(plan.layers)}
    head_dim = arch.shape.head_dim
    global_index = _indices(plan, None, head_dim)
    by_layer: dict[int, list[tuple[str, str]]] = {}  # parent layer -> (checkpoint name, name inside the layer)
    for name in weights:
        match = _LAYER_NAME.fullmatch(name)
        if match is None:
            assert name in _GLOBAL_AXES, f"no pruning rule for tensor {name}"
            yield name, slice_tensor(weights[name], _GLOBAL_AXES[name], global_index)
        elif int(match.group(1)) in new_index:  # else a dropped layer
            by_layer.setdefault(int(match.group(1)), []).append((name, match.group(2)))
    for layer in plan.layers:
        tensors = {rest: weights[name] for name, rest in by_layer.get(layer.source, [])}
        for rest, tensor in _slice_layer(tensors, layer, _indices(plan, layer, head_dim, arch)).items():
            yield f"model.layers.{new_index[layer.source]}.{rest}", tensor


def pruned_config(config: dict[str, Any], arch: Architecture) -> dict[str, Any]:
    """The parent's config.json dict with the child's global sizes and block_configs."""
    config = dict(config)
    config.update(hidden_size=arch.shape.hidden_size, num_attention_heads=arch.shape.num_attention_heads,
                  head_dim=arch.shape.head_dim,  # explicit: hidden_size / heads no longer gives it
                  num_hidden_layers=arch.num_layers, block_configs=arch.block_configs())
    return config


def child_config(config: dict[str, Any], plan: PrunePlan) -> tuple[DeciLMConfig, Architecture]:
    """The pruned child's config and architecture, from the parent's config dict."""
    arch = pruned_architecture(Architecture.from_config(config), plan)
    return decilm_config(pruned_config(config, arch), arch), arch


@torch.no_grad()
def apply_plan(model: DeciLMForCausalLM, plan: PrunePlan) -> DeciLMForCausalLM:
    """A new model (same device and dtype, eval mode) holding the plan's slice of `model`'s weights (the parent
    held whole; the prune stage writes the same tensors streamed, `sliced_tensors`).

    Trust but verify: the child's parameter count must equal what the architecture description accounts.
    """
    child_cfg, arch = child_config(model.config.to_dict(), plan)
    state = slice_state_dict(model.state_dict(), plan, Architecture.from_config(model.config.to_dict()))
    with torch.device("meta"):
        child = DeciLMForCausalLM(child_cfg)
    child.load_state_dict(state, strict=True, assign=True)
    # inv_freq is a non-persistent buffer: not in the state dict, so build it for real.
    child.model.rotary_emb = DeciLMRotaryEmbedding(child_cfg).to(model.device)
    if child_cfg.tie_word_embeddings:
        child.lm_head.weight = child.model.embed_tokens.weight
    check_params(sum(p.numel() for p in child.parameters()), arch)
    return child.eval()


def check_params(counted: int, arch: Architecture) -> None:
    assert counted == arch.total_params(), f"pruned model has {counted} parameters, its description {arch.total_params()}"
