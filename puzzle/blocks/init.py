"""Initialise each candidate sub-block from the parent's weights (Puzzle, section 3; docs/methods.md "Search space").

- fewer KV heads: mean-pool the K and V heads of each new group (queries, output and norms copied);
- window attention: the parent's weights unchanged;
- linear attention: least squares from the normalised input to the attention output on calibration tokens
  (default), or the fold W_O x W_V, each KV head's W_V repeated for the query heads that read it
  (the map attention computes when every token attends only to itself). On random and demo parents the
  fold is often worse than removing the attention (normalised MSE > 1); least squares never is on the
  calibration data, since zero is one of the maps it chooses from;
- narrowed FFN: keep the channels with the largest contribution, mean |activation| (the input of
  down_proj) x the norm of the channel's down_proj column, measured on calibration tokens;
- linear FFN: least squares from the FFN's normalised input to its output on calibration tokens;
- pruned experts: keep the best-ranked experts and their router rows (`blocks/experts.py`);
- a Mamba-2 mixer with fewer heads: in every B/C group keep the heads with the largest contribution, mean squared
  input of out_proj over the head's channels x their out_proj column norms, on calibration tokens; each kept head
  keeps its z, x and dt projections, conv channels, decay, skip and norm gains (B and C are shared: all kept);
- no-op: nothing.
The calibration statistics come from one parent pass (`collect_layer_stats`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from puzzle.arch import Architecture, AttentionConfig, BlockConfig, FFNConfig
from puzzle.blocks.experts import ExpertRanking, ExpertStats, keep_experts
from puzzle.blocks.mamba import best_heads, head_rows
from puzzle.blocks.space import Candidate
from puzzle.blocks.subblock import SubBlock
from puzzle.distill.activations import layer_weights, offloaded, run_layers
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM

# "ffn_channel_score" (I,), "expert_score" (E,), "ffn_linear" (C, C), "attn_linear" (C, C), "mamba_head_score" (H,)
LayerStats = dict[str, torch.Tensor]


@torch.no_grad()
def collect_layer_stats(model: DeciLMForCausalLM, batches: Iterable[torch.Tensor], layers: Iterable[int],
                        linear: bool = True, expert_ranking: ExpertRanking = "router_mass") -> dict[int, LayerStats]:
    """FFN channel activations, expert scores of MoE layers, and (if `linear`) least-squares linear maps of the
    given parent layers."""
    layers = list(layers)
    sums: dict[int, dict[str, torch.Tensor]] = {i: {} for i in layers}
    expert_stats: dict[int, ExpertStats] = {}
    hooks = []

    def add(i, key, value):
        sums[i][key] = sums[i].get(key, 0) + value

    for i in layers:
        attn = model.model.layers[i].self_attn
        if attn is not None and hasattr(attn, "mamba_mixer"):
            out_proj, heads = attn.mamba_mixer.out_proj, attn.mamba_mixer.num_heads

            def on_mamba(module, args, i=i, heads=heads):
                y = args[0].flatten(0, -2).double()  # (N, I), the gated-normed scan output
                column = module.weight.double().pow(2).sum(0)  # (I,) squared out_proj column norms
                add(i, "mamba_head", (y.pow(2).sum(0) * column).view(heads, -1).sum(-1))
                add(i, "mamba_tokens", torch.tensor(y.shape[0], dtype=torch.float64))

            hooks.append(out_proj.register_forward_pre_hook(on_mamba))
        if linear and attn is not None and (hasattr(attn, "o_proj") or hasattr(attn, "mamba_mixer")):
            def on_attn(module, args, output, i=i):
                x, y = args[0].flatten(0, -2).double(), output.flatten(0, -2).double()  # (N, C)
                add(i, "attn_xtx", x.T @ x)
                add(i, "attn_xty", x.T @ y)

            hooks.append(attn.register_forward_hook(on_attn))
        mlp = model.model.layers[i].mlp
        if mlp is None or not (hasattr(mlp, "down_proj") or hasattr(mlp, "experts")):
            continue
        if hasattr(mlp, "experts"):
            expert_stats[i] = ExpertStats(expert_ranking)
            hooks.append(mlp.register_forward_hook(expert_stats[i]))

        def on_down(module, args, i=i):
            act = args[0].flatten(0, -2).double()  # (N, I)
            add(i, "abs_act", act.abs().sum(0))
            add(i, "tokens", torch.tensor(act.shape[0], dtype=torch.float64))

        def on_mlp(module, args, output, i=i):
            if linear:
                x, y = args[0].flatten(0, -2).double(), output.flatten(0, -2).double()  # (N, C)
                add(i, "xtx", x.T @ x)
                add(i, "xty", x.T @ y)

        if hasattr(mlp, "down_proj"):
            hooks.append(mlp.down_proj.register_forward_pre_hook(on_down))
        hooks.append(mlp.register_forward_hook(on_mlp))
    try:
        last = max(layers, default=-1)
        for batch in batches:
            _forward_until(model, batch.to(model.device), last)
    finally:
        for h in hooks:
            h.remove()
    stats: dict[int, LayerStats] = {}
    for i in layers:
        s, out = sums[i], {}
        if "abs_act" in s:
            out["ffn_channel_score"] = (s["abs_act"] / s["tokens"]).float()
        if i in expert_stats:
            out["expert_score"] = expert_stats[i].score()
        if "xtx" in s:
            out["ffn_linear"] = least_squares(s["xtx"], s["xty"]).float()
        if "attn_xtx" in s:
            out["attn_linear"] = least_squares(s["attn_xtx"], s["attn_xty"]).float()
        if "mamba_head" in s:
            out["mamba_head_score"] = (s["mamba_head"] / s["mamba_tokens"]).float()
        if out:
            stats[i] = out
    return stats


def _forward_until(model: DeciLMForCausalLM, ids: torch.Tensor, last_layer: int) -> None:
    """Run the parent's layers 0..last_layer only (calibration needs nothing after them)."""
    run_layers(model, ids, stop=last_layer + 1)


def least_squares(xtx: torch.Tensor, xty: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """W (C_out, C_in) minimising sum ||y - W x||^2, from the sums x x^T and x y^T, with a tiny ridge."""
    n = xtx.shape[0]
    damping = ridge * xtx.diagonal().mean().clamp(min=1e-12)
    solution = torch.linalg.solve(xtx + damping * torch.eye(n, dtype=xtx.dtype, device=xtx.device), xty)  # (C_in, C_out)
    return solution.T


def _pool_heads(weight: torch.Tensor, old_heads: int, new_heads: int) -> torch.Tensor:
    """(old*d, ...) -> (new*d, ...): mean over each group of old_heads // new_heads consecutive heads."""
    group = old_heads // new_heads
    shaped = weight.reshape(new_heads, group, weight.shape[0] // old_heads, *weight.shape[1:])
    return shaped.mean(dim=1).reshape(new_heads * weight.shape[0] // old_heads, *weight.shape[1:])


def init_attention(parent: dict[str, torch.Tensor], parent_variant: AttentionConfig, variant: AttentionConfig,
                   num_heads: int, head_dim: int, stats: LayerStats | None = None,
                   linear_init: str = "least_squares") -> dict[str, torch.Tensor]:
    """Layer-relative weights of an attention variant from the parent layer's weights (same names)."""
    if variant.no_op:
        return {}
    out = {"input_layernorm.weight": parent["input_layernorm.weight"].clone()}
    if variant.replace_with_linear and (linear_init == "least_squares" or parent_variant.mamba is not None):
        if stats is None or "attn_linear" not in stats:
            raise ValueError("least-squares linear attention needs calibration statistics (attn_linear)")
        out["self_attn.linear_attn.weight"] = stats["attn_linear"].to(out["input_layernorm.weight"].dtype).clone()
        return out
    if variant.mamba is not None:
        return out | init_mamba(parent, parent_variant.mamba, variant.mamba, stats)
    if variant.replace_with_linear:
        kv = parent_variant.num_kv_heads(num_heads)
        w_v = parent["self_attn.v_proj.weight"].reshape(kv, head_dim, -1)  # (KV, D, C)
        w_v = w_v.repeat_interleave(num_heads // kv, dim=0).reshape(num_heads * head_dim, -1)  # (H*D, C)
        out["self_attn.linear_attn.weight"] = parent["self_attn.o_proj.weight"] @ w_v  # (C, C)
        return out
    old_kv, new_kv = parent_variant.num_kv_heads(num_heads), variant.num_kv_heads(num_heads)
    for name, tensor in parent.items():
        if not name.startswith("self_attn."):
            continue
        if name.startswith(("self_attn.k_proj.", "self_attn.v_proj.")) and new_kv != old_kv:
            out[name] = _pool_heads(tensor, old_kv, new_kv)
        else:
            out[name] = tensor.clone()
    return out


def init_mamba(parent: dict[str, torch.Tensor], parent_mamba, mamba, stats: LayerStats | None) -> dict[str, torch.Tensor]:
    """Layer-relative weights of a Mamba-2 mixer keeping `mamba.num_heads` of the parent's heads, the same number in
    every B/C group (the best-scored ones, in their parent order: blocks/mamba.py)."""
    prefix = "self_attn.mamba_mixer."
    mixer = {k[len(prefix):]: v for k, v in parent.items() if k.startswith(prefix)}
    if mamba == parent_mamba:
        return {prefix + k: v.clone() for k, v in mixer.items()}
    if stats is None or "mamba_head_score" not in stats:
        raise ValueError("a Mamba mixer with fewer heads needs calibration statistics (mamba_head_score)")
    rows = head_rows(parent_mamba, best_heads(stats["mamba_head_score"], parent_mamba, mamba.num_heads))
    which = {"in_proj.weight": "in_proj", "in_proj.bias": "in_proj", "conv1d.weight": "conv", "conv1d.bias": "conv",
             "dt_bias": "heads", "A_log": "heads", "D": "heads", "norm.weight": "channels"}
    out = {}
    for name, tensor in mixer.items():
        if name in which:
            out[prefix + name] = tensor[rows[which[name]].to(tensor.device)].clone()
        elif name == "out_proj.weight":
            out[prefix + name] = tensor[:, rows["channels"].to(tensor.device)].clone()
        else:  # out_proj.bias
            out[prefix + name] = tensor.clone()
    return out


def init_ffn(parent: dict[str, torch.Tensor], variant: FFNConfig, stats: LayerStats | None) -> dict[str, torch.Tensor]:
    """Layer-relative weights of an FFN variant from the parent layer's weights and calibration stats."""
    if variant.no_op:
        return {}
    out = {"post_attention_layernorm.weight": parent["post_attention_layernorm.weight"].clone()}
    if variant.replace_with_linear:
        if stats is None or "ffn_linear" not in stats:
            raise ValueError("linear FFN initialisation needs calibration statistics (ffn_linear)")
        out["mlp.linear_mlp.weight"] = stats["ffn_linear"].to(out["post_attention_layernorm.weight"].dtype).clone()
        return out
    if variant.moe is not None:
        return out | keep_experts(parent, variant.moe, None if stats is None else stats.get("expert_score"))
    down = parent["mlp.down_proj.weight"]  # (C, I)
    width = variant.intermediate_size
    if width == down.shape[1]:
        keep = torch.arange(width)
    else:
        if stats is None:
            raise ValueError("narrowed FFN initialisation needs calibration statistics (ffn_channel_score)")
        contribution = stats["ffn_channel_score"].to(down.device) * down.float().norm(dim=0)  # (I,)
        keep = contribution.topk(width).indices.sort().values
    for name in ("gate_proj", "up_proj") if variant.gated else ("up_proj",):
        out[f"mlp.{name}.weight"] = parent[f"mlp.{name}.weight"][keep].clone()
        if f"mlp.{name}.bias" in parent:
            out[f"mlp.{name}.bias"] = parent[f"mlp.{name}.bias"][keep].clone()
    out["mlp.down_proj.weight"] = down[:, keep].clone()
    if "mlp.down_proj.bias" in parent:
        out["mlp.down_proj.bias"] = parent["mlp.down_proj.bias"].clone()
    return out


def parent_layer_state(model: DeciLMForCausalLM, layer: int) -> dict[str, torch.Tensor]:
    """Layer-relative tensors of one parent layer (detached, on the model's device; read in from the checkpoint
    for a layer the model left there, `layer_weights`)."""
    with layer_weights(model.model.layers[layer]) as module:
        copy = offloaded(module)  # its weights are dropped again on the way out
        return {k: v.detach().clone() if copy else v.detach() for k, v in module.state_dict().items()}



def init_candidate(candidate: Candidate, parent_model: DeciLMForCausalLM, parent_arch: Architecture,
                   stats: LayerStats | None, linear_attention_init: str = "least_squares") -> SubBlock:
    """A SubBlock for `candidate` holding its initial weights (float32, on the parent's device)."""
    config = parent_model.config
    parent_attn = parent_arch.blocks[candidate.layer].attention
    layer_state = parent_layer_state(parent_model, candidate.layer)
    variant = candidate.variant
    if isinstance(variant, BlockConfig):
        attn, ffn = variant.attention, variant.ffn
    else:
        attn = variant if candidate.kind == "attention" else None
        ffn = variant if candidate.kind == "ffn" else None
    state: dict[str, torch.Tensor] = {}
    if attn is not None:
        state |= init_attention(layer_state, parent_attn, attn, config.num_attention_heads, config.head_dim,
                                stats, linear_attention_init)
    if ffn is not None:
        state |= init_ffn(layer_state, ffn, stats)
    block = SubBlock(config, candidate.kind, variant).to(device=parent_model.device, dtype=torch.float32)
    block.layer.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return block
