"""Which hidden channels, FFN neurons, heads, experts and layers a pruned child keeps: targets + importance -> plan.

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation";
Sreenivas et al. 2024, "LLM Pruning and Distillation in Practice"), docs/methods.md, "Minitron pruning". Pure functions of
the architecture description and importance scores (importance.py), so tests call them directly;
slicing.py applies a plan to weights.

Heads follow GQA: a layer keeps whole KV groups (its most important ones, a group scored by the L2 norm of
its query heads' scores, as Model-Optimizer's Minitron does) and the same number of query heads in each
kept group, so `n_heads_in_group` stays one number per layer. Merging groups (more query heads per group
than the parent had) is Puzzle's KV mean-pooling, not pruning, and is refused.

Mixture-of-experts layers keep their `experts` best experts (ExpertStats' ranking, puzzle/blocks/experts.py; with
grouped routing the same number from every group) and every kept expert its `expert_ffn_size` most active neurons,
all experts of a layer one width (one MoEConfig). Mamba-2 layers keep `mamba_heads` heads, the same number from
every B/C group (puzzle/blocks/mamba.py), so every Mamba layer keeps one shape, as vLLM's Nemotron-H model reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from puzzle.arch import Architecture, AttentionConfig, FFNConfig
from puzzle.blocks.experts import best_experts
from puzzle.blocks.mamba import best_channels, best_heads
from puzzle.errors import ConfigError, InputError
from puzzle.prune.config import PruneConfig


@dataclass(frozen=True, kw_only=True)
class LayerPlan:
    source: int  # the parent layer this child layer comes from
    kv_heads: tuple[int, ...] | None = None  # kept KV heads (GQA groups), ascending; None: all
    q_heads: tuple[int, ...] | None = None  # kept query heads, group by group in kv_heads' order; None: all
    ffn: tuple[int, ...] | None = None  # kept FFN neurons, ascending; None: all
    experts: tuple[int, ...] | None = None  # kept parent experts, ascending (child expert j is experts[j]); None: all
    expert_ffn: tuple[tuple[int, ...], ...] | None = None  # per child expert, its kept neurons, ascending; None: all
    mamba_heads: tuple[int, ...] | None = None  # kept Mamba heads, ascending, as many from each group; None: all
    mamba_channels: tuple[tuple[int, ...], ...] | None = None  # per kept Mamba head, its kept channels; None: all


@dataclass(frozen=True, kw_only=True)
class PrunePlan:
    hidden: tuple[int, ...] | None  # kept hidden channels, ascending; None: all
    num_attention_heads: int  # of the child (global, like the parent's)
    layers: tuple[LayerPlan, ...]  # the child's layers, in order


# ----------------------------------------------------------------------------------------------------------
# Selection


def top_k(scores: torch.Tensor, k: int) -> tuple[int, ...]:
    """Indices of the k largest scores, ascending (ties: the lower index), so kept channels keep their order."""
    order = torch.sort(scores.detach().float().cpu(), descending=True, stable=True).indices
    return tuple(sorted(order[:k].tolist()))


def select_heads(scores: torch.Tensor, kv_in: int, kv_out: int, per_group: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(kept KV heads, kept query heads) of one layer from its per-query-head scores (H,).

    Query head h belongs to KV group h // (H / kv_in) (SDPA's enable_gqa and HF's repeat_kv). The kv_out
    groups with the largest L2 norm of their heads' scores are kept, and in each the per_group best heads.
    """
    group = scores.numel() // kv_in
    by_group = scores.float().view(kv_in, group)  # (KV, H / KV)
    kv = top_k(by_group.norm(dim=1), kv_out)
    q = tuple(g * group + j for g in kv for j in top_k(by_group[g], per_group))
    return kv, q


def drop_lowest(layer_scores: torch.Tensor, n: int) -> tuple[int, ...]:
    """Kept layers when the n least important layers go, each judged alone (ShortGPT)."""
    return top_k(layer_scores, layer_scores.numel() - n)


def drop_window(window_scores: torch.Tensor, n: int) -> tuple[int, ...]:
    """Kept layers when the block of n consecutive layers whose removal matters least goes.

    `window_scores[s]` is the importance of layers s .. s+n-1 together (L - n + 1 entries).
    """
    start = top_k(-window_scores, 1)[0]
    layers = window_scores.numel() + n - 1
    return tuple(i for i in range(layers) if not start <= i < start + n)


# ----------------------------------------------------------------------------------------------------------
# Targets (checked from the description alone, before any weight is read)


def ffn_targets(arch: Architecture, ffn_size: int | tuple[int | None, ...] | None) -> tuple[int | None, ...]:
    """Per layer: the new FFN width, or None to keep the layer's FFN as it is."""
    widths = [b.ffn.intermediate_size if b.ffn.is_dense else None for b in arch.blocks]
    if ffn_size is None:
        return (None,) * arch.num_layers
    if isinstance(ffn_size, int):
        if not any(widths):
            moe = any(b.ffn.moe is not None for b in arch.blocks)
            raise InputError("ffn_size is set but no layer has a gated FFN to prune; "
                             + ("use --expert-ffn-size for the experts' width" if moe else "drop --ffn-size"))
        sizes = [ffn_size if w is not None else None for w in widths]
    else:
        if len(ffn_size) != arch.num_layers:
            raise InputError(f"ffn_size lists {len(ffn_size)} widths but the model has {arch.num_layers} layers; "
                             "give one per layer (- / null keeps a layer)")
        sizes = list(ffn_size)
    for i, (size, width) in enumerate(zip(sizes, widths)):
        if size is None:
            continue
        if width is None:
            raise InputError(f"ffn_size for layer {i} is {size}, but that layer's FFN is {arch.blocks[i].ffn.kind}; "
                             "give - / null for it")
        if size > width:
            raise InputError(f"ffn_size {size} exceeds layer {i}'s FFN width {width}; pruning only removes neurons "
                             "(give a per-layer list to treat layers differently)")
    return tuple(None if s is None or s == w else s for s, w in zip(sizes, widths))


def head_targets(arch: Architecture, heads: int | None, kv_heads: int | None) -> tuple[int, tuple[tuple[int, int] | None, ...]]:
    """(child's num_attention_heads, per layer (KV heads, query heads per KV head) or None to keep it).

    Without kv_heads a layer keeps its KV heads and prunes query heads inside the groups; where that
    cannot give `heads` (a group of one query head, as in MHA), it keeps its group size and drops groups.
    """
    h_in = arch.shape.num_attention_heads
    h_out = h_in if heads is None else heads
    if h_out > h_in:
        raise InputError(f"heads {h_out} exceeds the parent's {h_in} attention heads; pruning only removes heads")
    if kv_heads is not None and h_out % kv_heads:
        raise InputError(f"kv_heads {kv_heads} does not divide heads {h_out}; every KV head serves the same number "
                         "of query heads")
    plans = []
    for i, block in enumerate(arch.blocks):
        if not block.attention.has_softmax:
            plans.append(None)
            continue
        kv_in = block.attention.num_kv_heads(h_in)
        group = h_in // kv_in
        if kv_heads is not None:
            kv = kv_heads
        elif h_out % kv_in == 0 and h_out // kv_in <= group:
            kv = kv_in
        elif h_out % group == 0:
            kv = h_out // group
        else:
            raise InputError(f"layer {i}: {h_out} heads cannot be made from {kv_in} KV groups of {group}; "
                             "give --kv-heads as well")
        if kv > kv_in or h_out // kv > group:
            raise InputError(
                f"layer {i} has {kv_in} KV heads with {group} query heads each; {h_out} heads on {kv} KV heads would "
                f"need {'more KV heads' if kv > kv_in else 'larger groups'} than it has (pruning only removes heads); "
                "choose kv_heads <= the layer's and heads / kv_heads <= its group size"
            )
        plans.append(None if (kv, h_out // kv) == (kv_in, group) else (kv, h_out // kv))
    return h_out, tuple(plans)


def expert_targets(arch: Architecture, experts: int | None,
                   expert_ffn_size: int | None) -> tuple[tuple[int | None, int | None] | None, ...]:
    """Per layer: (experts kept or None, expert width or None), None for the whole entry where nothing changes."""
    moes = [b.ffn.moe for b in arch.blocks]
    if (experts is not None or expert_ffn_size is not None) and not any(moes):
        flag = "--experts" if experts is not None else "--expert-ffn-size"
        raise InputError(f"{flag} is set but no layer has experts (a mixture-of-experts FFN); drop {flag}")
    targets = []
    for i, moe in enumerate(moes):
        if moe is None:
            targets.append(None)
            continue
        if experts is not None and experts > moe.num_local_experts:
            raise InputError(f"experts {experts} exceeds layer {i}'s {moe.num_local_experts} experts; pruning only "
                             "removes experts")
        if experts is not None and experts < moe.num_experts_per_tok:
            raise ConfigError(f"experts {experts} is fewer than layer {i}'s {moe.num_experts_per_tok} experts per token; "
                              f"keep at least that many (--experts {moe.num_experts_per_tok})")
        if expert_ffn_size is not None and expert_ffn_size > moe.expert_intermediate_dim:
            raise InputError(f"expert_ffn_size {expert_ffn_size} exceeds layer {i}'s expert width "
                             f"{moe.expert_intermediate_dim}; pruning only removes neurons")
        k = None if experts in (None, moe.num_local_experts) else experts
        width = None if expert_ffn_size in (None, moe.expert_intermediate_dim) else expert_ffn_size
        targets.append(None if k is None and width is None else (k, width))
    return tuple(targets)


def mamba_targets(arch: Architecture, heads: int | None,
                  head_dim: int | None = None) -> tuple[tuple[int | None, int | None] | None, ...]:
    """Per layer: (Mamba heads to keep or None, channels per head to keep or None), None where nothing changes."""
    mambas = [b.attention.mamba for b in arch.blocks]
    for flag, value in (("--mamba-heads", heads), ("--mamba-head-dim", head_dim)):
        if value is not None and not any(mambas):
            raise InputError(f"{flag} is set but no layer is a Mamba layer; drop {flag}")
    targets = []
    for i, mamba in enumerate(mambas):
        if mamba is None:
            targets.append(None)
            continue
        if heads is not None and (heads > mamba.num_heads or heads % mamba.num_groups):
            raise InputError(f"mamba_heads {heads}: layer {i} has {mamba.num_heads} Mamba heads in {mamba.num_groups} "
                             f"groups; keep a multiple of {mamba.num_groups}, at most {mamba.num_heads} (pruning keeps "
                             "the same number of heads in every group)")
        if head_dim is not None and head_dim > mamba.head_dim:
            raise InputError(f"mamba_head_dim {head_dim} exceeds layer {i}'s {mamba.head_dim} channels per Mamba head; "
                             "pruning only removes channels")
        h = None if heads in (None, mamba.num_heads) else heads
        d = None if head_dim in (None, mamba.head_dim) else head_dim
        targets.append(None if h is None and d is None else (h, d))
    return tuple(targets)


def best_experts_grouped(score: torch.Tensor, k: int, groups: int) -> tuple[int, ...]:
    """`best_experts`, the same number from each of `groups` consecutive groups (grouped routing)."""
    if groups == 1:
        return best_experts(score, k)
    size = score.numel() // groups
    return tuple(g * size + e for g in range(groups) for e in best_experts(score[g * size:(g + 1) * size], k // groups))


def check_targets(arch: Architecture, cfg: PruneConfig) -> None:
    """Every target of `cfg` is reachable from `arch` by pruning; raises InputError naming the fix."""
    if cfg.hidden_size is not None and cfg.hidden_size > arch.shape.hidden_size:
        raise InputError(f"hidden_size {cfg.hidden_size} exceeds the parent's {arch.shape.hidden_size}; "
                         "pruning only removes channels")
    ffn_targets(arch, cfg.ffn_size)
    head_targets(arch, cfg.heads, cfg.kv_heads)
    expert_targets(arch, cfg.experts, cfg.expert_ffn_size)
    mamba_targets(arch, cfg.mamba_heads, cfg.mamba_head_dim)
    if cfg.drop_layers >= arch.num_layers:
        raise InputError(f"cannot drop {cfg.drop_layers} of the model's {arch.num_layers} layers; keep at least one")


def needs_calibration(arch: Architecture, cfg: PruneConfig) -> bool:
    """False when every target equals the parent's size (the identity needs no data)."""
    hidden = cfg.hidden_size is not None and cfg.hidden_size < arch.shape.hidden_size
    heads = any(head_targets(arch, cfg.heads, cfg.kv_heads)[1])
    ffn = any(s is not None for s in ffn_targets(arch, cfg.ffn_size))
    experts = any(expert_targets(arch, cfg.experts, cfg.expert_ffn_size))
    mamba = any(t is not None for t in mamba_targets(arch, cfg.mamba_heads, cfg.mamba_head_dim))
    return hidden or heads or ffn or experts or mamba or cfg.drop_layers > 0


# ----------------------------------------------------------------------------------------------------------
# Plan and the architecture it gives


def make_plan(arch: Architecture, cfg: PruneConfig, importance) -> PrunePlan:
    """The plan for `cfg`'s targets from `importance` (an importance.Importance with what the targets need)."""
    hidden = None
    if cfg.hidden_size is not None and cfg.hidden_size < arch.shape.hidden_size:
        hidden = top_k(importance.hidden, cfg.hidden_size)
    kept = tuple(range(arch.num_layers))
    if cfg.drop_layers:
        kept = drop_window(importance.windows, cfg.drop_layers) if cfg.contiguous else \
            drop_lowest(importance.layers, cfg.drop_layers)
    h_out, heads = head_targets(arch, cfg.heads, cfg.kv_heads)
    sizes = ffn_targets(arch, cfg.ffn_size)
    moe = expert_targets(arch, cfg.experts, cfg.expert_ffn_size)
    mamba = mamba_targets(arch, cfg.mamba_heads, cfg.mamba_head_dim)
    layers = []
    for i in kept:
        plan = LayerPlan(source=i)
        if mamba[i] is not None:
            shape, (heads_kept, channels_kept) = arch.blocks[i].attention.mamba, mamba[i]
            mamba_heads = tuple(range(shape.num_heads)) if heads_kept is None else \
                best_heads(importance.mamba_heads[i], shape, heads_kept)
            channels = None if channels_kept is None else \
                best_channels(importance.mamba_channels[i], shape, mamba_heads, channels_kept)
            plan = replace(plan, mamba_heads=mamba_heads, mamba_channels=channels)
        if heads[i] is not None:
            kv_in = arch.blocks[i].attention.num_kv_heads(arch.shape.num_attention_heads)
            kv, q = select_heads(importance.heads[i], kv_in, *heads[i])
            plan = replace(plan, kv_heads=kv, q_heads=q)
        if sizes[i] is not None:
            plan = replace(plan, ffn=top_k(importance.ffn[i], sizes[i]))
        if moe[i] is not None:
            k, width = moe[i]
            groups = arch.blocks[i].ffn.moe.n_group
            if k is not None and k % groups:
                raise InputError(f"experts {k}: layer {i} routes among {groups} expert groups; keep a multiple of {groups}")
            experts = None if k is None else best_experts_grouped(importance.experts[i], k, groups)
            if width is not None:
                kept = range(arch.blocks[i].ffn.moe.num_local_experts) if experts is None else experts
                plan = replace(plan, expert_ffn=tuple(top_k(importance.expert_ffn[i][e], width) for e in kept))
            plan = replace(plan, experts=experts)
        layers.append(plan)
    return PrunePlan(hidden=hidden, num_attention_heads=h_out, layers=tuple(layers))


def pruned_architecture(arch: Architecture, plan: PrunePlan) -> Architecture:
    """The child's description: the plan's layers, widths and heads (head_dim and everything else kept)."""
    shape = arch.shape
    shape = replace(shape, hidden_size=shape.hidden_size if plan.hidden is None else len(plan.hidden),
                    num_attention_heads=plan.num_attention_heads)
    blocks = []
    for layer in plan.layers:
        block = arch.blocks[layer.source]
        attention, ffn = block.attention, block.ffn
        if attention.has_softmax:
            kv = attention.num_kv_heads(arch.shape.num_attention_heads) if layer.kv_heads is None else len(layer.kv_heads)
            if plan.num_attention_heads % kv:
                raise AssertionError(f"layer {layer.source}: {plan.num_attention_heads} heads on {kv} KV heads")
            attention = AttentionConfig(n_heads_in_group=plan.num_attention_heads // kv, window_length=attention.window_length)
        if layer.mamba_heads is not None:
            head_dim = attention.mamba.head_dim if layer.mamba_channels is None else len(layer.mamba_channels[0])
            attention = AttentionConfig(mamba=replace(attention.mamba, num_heads=len(layer.mamba_heads), head_dim=head_dim))
        if layer.ffn is not None:
            ffn = replace(ffn, intermediate_size=len(layer.ffn))  # a gate-less MLP stays gate-less
        if layer.experts is not None or layer.expert_ffn is not None:
            moe = ffn.moe
            ffn = FFNConfig(moe=replace(
                moe, num_local_experts=moe.num_local_experts if layer.experts is None else len(layer.experts),
                expert_intermediate_dim=moe.expert_intermediate_dim if layer.expert_ffn is None else len(layer.expert_ffn[0])))
        blocks.append(replace(block, attention=attention, ffn=ffn))
    return Architecture(shape=shape, blocks=tuple(blocks))
