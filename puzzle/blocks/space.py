"""Search space: the candidate sub-blocks of every layer, and the work units that train them.

Puzzle (Bercovich et al. 2024), section 3: per layer, attention with the parent's KV heads halved down to 1,
window attention, a linear replacement or no-op; FFN at fractions of the parent's width (rounded to a
multiple the device likes), linear or no-op; a mixture-of-experts FFN also keeps fractions of its experts
(Puzzle for MoE: expert pruning; optionally fewer experts per token). Hybrid parents (Nemotron-H) get, per layer, the
variants of its type: a Mamba mixer with fewer heads (the same number kept in every B/C group), linear or no-op;
attention, MLP and MoE layers as above (an MLP without a gate stays without one). Decoupled mode trains attention and FFN candidates separately
((m + n) units per layer); coupled mode trains every (attention, FFN) pair as a whole block (m x n).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from puzzle.arch import Architecture, AttentionConfig, BlockConfig, FFNConfig
from puzzle.errors import ConfigError

Kind = Literal["attention", "ffn", "block"]


@dataclass(frozen=True, kw_only=True)
class AttentionSpace:
    kv_heads: tuple[int, ...] | None = None  # None: the parent's KV heads halved repeatedly down to 1
    # Window attention (parent's KV heads). Each window must be shorter than data.seq_len, the length BLD and
    # scoring see (checked by the search config): 128 fits the default 256; raise both for long contexts.
    windows: tuple[int, ...] = (128,)
    linear: bool = True
    no_op: bool = True

    def __post_init__(self) -> None:
        if any(k < 1 for k in self.kv_heads or ()) or any(w < 1 for w in self.windows):
            raise ConfigError("space.attention: kv_heads and windows must be positive integers")


@dataclass(frozen=True, kw_only=True)
class FFNSpace:
    fractions: tuple[float, ...] = (1.0, 0.87, 0.75, 0.5, 0.25, 0.2, 0.1)  # Puzzle's FFN search space
    multiple: int = 256  # widths rounded to a multiple of this (GPU GEMM tiles like 256; the demo uses 64)
    linear: bool = True
    no_op: bool = True

    def __post_init__(self) -> None:
        if not all(0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"space.ffn.fractions must lie in (0, 1], got {list(self.fractions)}")
        if self.multiple < 1:
            raise ConfigError("space.ffn.multiple must be a positive integer")


@dataclass(frozen=True, kw_only=True)
class MoESpace:
    # Fractions of a mixture-of-experts layer's experts to keep (rounded, at least its experts per token).
    experts: tuple[float, ...] = (0.75, 0.5, 0.25)
    # Fewer experts per token than the parent's (e.g. [1] for a top-2 parent), with every expert count above: a
    # decode step then computes fewer experts per token and, at small batches, reads fewer. Off by default.
    experts_per_token: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not all(0 < f <= 1 for f in self.experts):
            raise ConfigError(f"space.moe.experts must lie in (0, 1], got {list(self.experts)}")
        if not all(isinstance(k, int) and k >= 1 for k in self.experts_per_token):
            raise ConfigError(f"space.moe.experts_per_token must be positive integers, got {list(self.experts_per_token)}")


@dataclass(frozen=True, kw_only=True)
class MambaSpace:
    # Fractions of a Mamba-2 layer's heads to keep (rounded down to whole heads per B/C group, at least one each);
    # the attention section's `linear` and `no_op` apply to Mamba layers too.
    heads: tuple[float, ...] = (0.75, 0.5, 0.25)

    def __post_init__(self) -> None:
        if not all(0 < f <= 1 for f in self.heads):
            raise ConfigError(f"space.mamba.heads must lie in (0, 1], got {list(self.heads)}")


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    attention: AttentionSpace = field(default_factory=AttentionSpace)
    ffn: FFNSpace = field(default_factory=FFNSpace)
    moe: MoESpace = field(default_factory=MoESpace)
    mamba: MambaSpace = field(default_factory=MambaSpace)
    layers: tuple[int, ...] | None = None  # only these layers get candidates; the others keep the parent's
    mode: Literal["decoupled", "coupled"] = "decoupled"

    def __post_init__(self) -> None:
        if self.mode not in ("decoupled", "coupled"):
            raise ConfigError(f"space.mode must be 'decoupled' or 'coupled', got {self.mode!r}")


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One variant of one sub-block (or, in coupled mode, of one whole block) of one layer."""

    layer: int
    kind: Kind
    name: str  # kv2, kv4_w128, linear, no_op, ffn1536, kv2+ffn1536 (coupled)
    variant: AttentionConfig | FFNConfig | BlockConfig
    is_parent: bool

    @property
    def unit_id(self) -> str:
        return f"{self.kind}/L{self.layer}/{self.name}"

    @property
    def trainable(self) -> bool:
        """The parent's own sub-block is exact and a no-op has no weights: neither is trained."""
        if self.is_parent:
            return False
        if isinstance(self.variant, BlockConfig):
            return not (self.variant.attention.no_op and self.variant.ffn.no_op)
        return not self.variant.no_op

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "name": self.name, "is_parent": self.is_parent,
                "variant": self.variant.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        kind, raw = data["kind"], data["variant"]
        if kind == "attention":
            variant = AttentionConfig(**raw)
        elif kind == "ffn":
            variant = FFNConfig(**raw)
        else:
            variant = BlockConfig(attention=AttentionConfig(**raw["attention"]), ffn=FFNConfig(**raw["ffn"]))
        return cls(layer=data["layer"], kind=kind, name=data["name"], variant=variant, is_parent=data["is_parent"])


def variant_name(variant: AttentionConfig | FFNConfig | BlockConfig, num_heads: int) -> str:
    if isinstance(variant, AttentionConfig):
        return variant.label(num_heads)
    if isinstance(variant, FFNConfig):
        return variant.label()
    return f"{variant.attention.label(num_heads)}+{variant.ffn.label()}"


def attention_variants(parent: AttentionConfig, num_heads: int, space: AttentionSpace,
                       mamba: MambaSpace = MambaSpace()) -> list[AttentionConfig]:
    """The parent's attention (or Mamba mixer) first, then cheaper ones; duplicates removed."""
    variants = [parent]
    if parent.mamba is not None:
        m = parent.mamba
        for fraction in sorted(mamba.heads, reverse=True):
            per_group = max(1, int(m.num_heads // m.num_groups * fraction))
            if per_group * m.num_groups < m.num_heads:
                variants.append(AttentionConfig(mamba=replace(m, num_heads=per_group * m.num_groups)))
        if space.linear:
            variants.append(AttentionConfig(replace_with_linear=True))
    if parent.has_softmax:
        parent_kv = parent.num_kv_heads(num_heads)
        if space.kv_heads is None:
            kv_list, k = [], parent_kv
            while k >= 1:
                kv_list.append(k)
                k //= 2
        else:
            kv_list = [k for k in space.kv_heads if k <= parent_kv]
        for k in kv_list:
            if num_heads % k == 0 and parent_kv % k == 0:  # mean-pooling needs whole groups of KV heads
                variants.append(AttentionConfig(n_heads_in_group=num_heads // k, window_length=parent.window_length))
        for w in space.windows:
            if parent.window_length is None or w < parent.window_length:
                variants.append(AttentionConfig(n_heads_in_group=parent.n_heads_in_group, window_length=w))
        if space.linear:
            variants.append(AttentionConfig(replace_with_linear=True))
    if space.no_op:
        variants.append(AttentionConfig(no_op=True))
    return list(dict.fromkeys(variants))


def ffn_variants(parent: FFNConfig, space: FFNSpace, moe: MoESpace = MoESpace()) -> list[FFNConfig]:
    variants = [parent]
    if parent.moe is not None:
        experts, top_k, groups = parent.moe.num_local_experts, parent.moe.num_experts_per_tok, parent.moe.n_group
        counts = [experts] + [max(top_k, round(experts * fraction)) for fraction in moe.experts]
        # Grouped routing keeps whole groups' worth: the same number of experts in each group, enough in the
        # groups a token may use for its top-k.
        counts = [c // groups * groups for c in counts if c // groups * parent.moe.topk_group >= top_k]
        for kept in dict.fromkeys(counts):
            for per_token in (top_k, *sorted({k for k in moe.experts_per_token if k < top_k}, reverse=True)):
                if (kept, per_token) != (experts, top_k):
                    variants.append(FFNConfig(moe=replace(parent.moe, num_local_experts=kept, num_experts_per_tok=per_token)))
    if parent.is_dense:
        for fraction in space.fractions:
            width = max(space.multiple, round(parent.intermediate_size * fraction / space.multiple) * space.multiple)
            if fraction == 1.0 or width >= parent.intermediate_size:
                continue  # the parent's own width is the parent variant
            variants.append(replace(parent, intermediate_size=width))  # a gate-less MLP stays gate-less
    if (parent.is_dense or parent.moe is not None) and space.linear:
        variants.append(FFNConfig(replace_with_linear=True))
    if space.no_op:
        variants.append(FFNConfig(no_op=True))
    return list(dict.fromkeys(variants))


def build_candidates(arch: Architecture, space: SearchSpace) -> list[Candidate]:
    """Every candidate of every layer, the parent's own variant first in each (layer, kind)."""
    heads = arch.shape.num_attention_heads
    layers = range(arch.num_layers) if space.layers is None else space.layers
    out: list[Candidate] = []
    for i in layers:
        if not 0 <= i < arch.num_layers:
            raise ConfigError(f"space.layers: layer {i} does not exist (the parent has {arch.num_layers} layers)")
        parent = arch.blocks[i]
        attns = attention_variants(parent.attention, heads, space.attention, space.mamba)
        ffns = ffn_variants(parent.ffn, space.ffn, space.moe)
        if space.mode == "decoupled":
            out += [_candidate(i, "attention", a, a == parent.attention, heads) for a in attns]
            out += [_candidate(i, "ffn", f, f == parent.ffn, heads) for f in ffns]
        else:
            out += [_candidate(i, "block", BlockConfig(attention=a, ffn=f), a == parent.attention and f == parent.ffn, heads)
                    for a in attns for f in ffns]
    return out


def _candidate(layer: int, kind: Kind, variant, is_parent: bool, heads: int) -> Candidate:
    return Candidate(layer=layer, kind=kind, name=variant_name(variant, heads), variant=variant, is_parent=is_parent)


def space_to_dict(space: SearchSpace) -> dict[str, Any]:
    return asdict(space)
