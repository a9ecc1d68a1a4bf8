"""What `prune` is asked to do (`PruneConfig`) and what it did (`PruneResult`, saved in puzzle.json).

docs/methods.md, "Minitron pruning". Every default of the prune stage lives here. A target left
at None keeps that axis as it is; a target equal to the parent's size is the identity.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from puzzle.blocks.experts import EXPERT_RANKINGS
from puzzle.config import check_int, from_mapping, is_int
from puzzle.corpus import DataConfig
from puzzle.distill.gkd import GKDConfig
from puzzle.errors import ConfigError, InputError
from puzzle.metrics import Quality

PRUNE_VERSION = 1


def minitron_kd(tokens: int, **overrides: Any) -> GKDConfig:
    """The retraining Minitron found best: forward KL on the logits only, T = 1 (Sreenivas et al. 2024)."""
    return GKDConfig(**{"tokens": tokens, "cosine_weight": 0.0, **overrides})


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """Targets, calibration and retraining of one Minitron pruning run (YAML section `prune`)."""

    # Width targets (None: keep). ffn_size is one width for every gated FFN, or one entry per layer (None: keep).
    hidden_size: int | None = None
    ffn_size: int | tuple[int | None, ...] | None = None
    heads: int | None = None  # query heads of every attention layer (num_attention_heads is global)
    kv_heads: int | None = None  # KV heads of every attention layer; None: keep them where the heads allow
    # Mixture-of-experts layers: experts kept in every MoE layer (the best by `expert_ranking` on the calibration
    # tokens, router rows with them; never fewer than its experts per token) and the width of every kept expert
    # (its neurons ranked by their activations on the tokens routed to it).
    experts: int | None = None
    expert_ffn_size: int | None = None
    # Hybrid (Nemotron-H) Mamba-2 layers: heads kept in every Mamba layer (a multiple of its B/C groups, the same
    # number from each group), ranked by their output norm entering out_proj (Nemotron-Nano-2's Mamba pruning).
    mamba_heads: int | None = None
    mamba_head_dim: int | None = None  # channels kept in every Mamba head (its best, by their output norm)
    expert_ranking: Literal["contribution", "router_mass"] = "contribution"
    # Depth: drop this many layers, ranked by `metric` (cos: 1 - cos(input, output), ShortGPT's block
    # importance; loss: LM-loss increase when removed), the `contiguous` block of them or any.
    drop_layers: int = 0
    metric: Literal["cos", "loss"] = "cos"
    contiguous: bool = False
    # Calibration (train split) and the quality check against the parent (held-out split).
    data: DataConfig | None = None
    # On the demo, 2^14 tokens kept 98-99% of the channels / neurons 2^16 keeps, in the same head and layer order.
    calibration_tokens: int = 1 << 16
    eval_tokens: int = 1 << 15  # held-out tokens for KL / LM loss right after pruning; 0 skips the check
    batch_size: int = 8
    distill: GKDConfig | None = None  # KD right after pruning (minitron_kd(tokens) is Minitron's recipe)
    # auto: a plain LlamaForCausalLM folder when every layer is the same Llama layer, else DeciLM.
    output_format: Literal["auto", "decilm", "plain"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = False  # run code shipped with the checkpoint's tokenizer (user's opt-in)
    # The most the parent's (and then the child's) weights may take on the device (GiB) for calibration and the
    # quality check; layers beyond it stay in their safetensors files, read in per forward. None: half the free memory.
    parent_memory_gb: float | None = None

    def __post_init__(self) -> None:
        if self.parent_memory_gb is not None and not self.parent_memory_gb > 0:
            raise ConfigError(f"prune.parent_memory_gb must be a positive number of GiB, got {self.parent_memory_gb!r}")
        for name in ("hidden_size", "heads", "kv_heads", "experts", "expert_ffn_size", "mamba_heads", "mamba_head_dim"):
            check_int(f"prune.{name}", getattr(self, name), optional=True)
        sizes = self.ffn_size if isinstance(self.ffn_size, tuple) else (self.ffn_size,)
        if not all(s is None or (is_int(s) and s >= 1) for s in sizes):
            raise ConfigError(f"prune.ffn_size must be a positive integer or a list of them (null: keep), got {self.ffn_size!r}")
        if self.heads is not None and self.kv_heads is not None and self.heads % self.kv_heads:
            raise ConfigError(f"prune.kv_heads {self.kv_heads} does not divide prune.heads {self.heads}; "
                              "every KV head serves the same number of query heads")
        if self.expert_ranking not in EXPERT_RANKINGS:
            raise ConfigError(f"prune.expert_ranking must be one of {', '.join(EXPERT_RANKINGS)}, got {self.expert_ranking!r}")
        check_int("prune.drop_layers", self.drop_layers, minimum=0)
        if self.contiguous and not self.drop_layers:
            raise ConfigError("prune.contiguous chooses which layers drop_layers removes; set drop_layers too")
        if self.metric not in ("cos", "loss"):
            raise ConfigError(f"prune.metric must be cos or loss, got {self.metric!r}")
        for name in ("calibration_tokens", "batch_size"):
            check_int(f"prune.{name}", getattr(self, name))
        check_int("prune.eval_tokens", self.eval_tokens, minimum=0)
        if self.output_format not in ("auto", "decilm", "plain") or self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("prune.output_format must be auto, decilm or plain and prune.device auto, cpu or cuda")

    @property
    def prunes_width(self) -> bool:
        return any(v is not None for v in (self.hidden_size, self.ffn_size, self.heads, self.kv_heads, self.experts,
                                           self.expert_ffn_size))


@dataclass(frozen=True, kw_only=True)
class ShapeSummary:
    """The sizes a pruning run changes, per model (0 in a per-layer entry: no softmax attention / gated FFN /
    experts)."""

    layers: int
    hidden_size: int
    num_attention_heads: int
    kv_heads: tuple[int, ...]
    ffn_sizes: tuple[int, ...]
    params: int
    experts: tuple[int, ...] = ()  # experts of each MoE layer (0: a dense layer; empty: no MoE layer at all)
    expert_ffn_sizes: tuple[int, ...] = ()  # width of each MoE layer's experts (0: a dense layer)


def size_range(values: tuple[int, ...]) -> str:
    """Distinct non-zero per-layer sizes of a ShapeSummary as one number or lo..hi (-: none)."""
    kept = sorted({v for v in values if v})
    return "-" if not kept else str(kept[0]) if len(kept) == 1 else f"{kept[0]}..{kept[-1]}"


@dataclass(frozen=True, kw_only=True)
class PruneResult:
    """What `prune` did; saved in the child's puzzle.json under "prune"."""

    source: str
    out: str
    output_format: Literal["decilm", "plain"]
    before: ShapeSummary
    after: ShapeSummary
    kept_layers: tuple[int, ...]  # parent layer of each child layer (saved layers are renumbered 0..n-1)
    metric: str | None  # how layers were ranked (None: no depth pruning)
    layer_scores: tuple[float, ...] | None  # importance of each parent layer alone (free choice)
    window_scores: tuple[float, ...] | None  # importance of each block of drop_layers layers (contiguous)
    calibration_tokens: int  # 0: nothing needed calibration (identity)
    # Per child layer, the parent experts it keeps (renumbered 0..k-1 in this order); None: all, or no experts.
    kept_experts: tuple[tuple[int, ...] | None, ...] | None = None
    unrouted_experts: tuple[str, ...] = ()  # "L{i}.E{e}": got no calibration token, neurons kept by weight norm
    quality: Quality | None = None  # held-out, against the parent, right after pruning
    distill_tokens: int = 0
    quality_distilled: Quality | None = None  # the same after KD
    config: dict[str, Any] = field(default_factory=dict)
    version: int = PRUNE_VERSION

    @property
    def dropped_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.before.layers) if i not in self.kept_layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "prune result") -> PruneResult:
        if data.get("version") != PRUNE_VERSION:
            raise InputError(f"{where}: version {data.get('version')} is not {PRUNE_VERSION}; rerun puzzle prune")
        return from_mapping(cls, data, where)
