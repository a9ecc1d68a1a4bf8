"""FFN Fusion's settings (FusionConfig) and what a fusion run reports (RunPlan, FusionQuality, FusionReport)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from puzzle.config import check_int, from_mapping
from puzzle.corpus import DataConfig
from puzzle.errors import ConfigError, InputError

FUSION_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class FusionConfig:
    """What to fuse and how to check it; every default of the fuse stage lives here."""

    # Fuse f_j into its group while its dependency on the group's input is at most this (cosine distance,
    # 0 = f_j ignores its predecessors). None: no calibration, fuse every run up to max_run. The paper
    # gives no number; the demo's attention-free runs measure 0.003-0.02, so 0.05 fuses those.
    threshold: float | None = 0.05
    max_run: int | None = None  # most FFNs in one fused layer; None: no limit
    keep_last: bool = True  # the FFN Fusion paper: leaving each run's last FFN unfused helps quality
    data: DataConfig | None = None  # train split: calibration; held-out split: the quality check
    calibration_tokens: int = 1 << 15
    eval_tokens: int = 1 << 15  # held-out tokens for KL / LM loss after fusion; 0 skips the check
    batch_size: int = 8
    distill_tokens: int = 0  # > 0: short KD from the unfused model afterwards (puzzle.distill.gkd)
    device: str = "auto"  # auto: cuda:LOCAL_RANK when available, else cpu
    trust_remote_code: bool = False  # run code shipped with the checkpoint's tokenizer (user's opt-in)
    # The most the input model's weights may take on the device (GiB) for calibration and the quality check; layers
    # beyond it stay in its safetensors files and are read in per forward. None: half the device's free memory.
    parent_memory_gb: float | None = None

    def __post_init__(self) -> None:
        if self.parent_memory_gb is not None and not self.parent_memory_gb > 0:
            raise ConfigError(f"fuse.parent_memory_gb must be a positive number of GiB, got {self.parent_memory_gb!r}")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and self.threshold >= 0):
            raise ConfigError(f"fuse.threshold must be a non-negative number or null, got {self.threshold!r}")
        check_int("fuse.max_run", self.max_run, minimum=2, optional=True)
        for name in ("calibration_tokens", "eval_tokens", "distill_tokens", "batch_size"):
            check_int(f"fuse.{name}", getattr(self, name), minimum=1 if name == "batch_size" else 0)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"fuse.device must be auto, cpu or cuda, got {self.device!r}")


# ----------------------------------------------------------------------------------------------------------
# Reports (saved in the child's puzzle.json under "fusion")


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """One run and what happens to it."""

    layers: tuple[int, ...]  # the run's FFN layers, in order
    dependency: tuple[float | None, ...]  # per layer: cosine distance, run input vs true input (None: first / unmeasured)
    groups: tuple[tuple[int, ...], ...]  # a partition of `layers`; a group of >= 2 is fused into its first layer
    notes: tuple[str, ...]  # per layer: why a group starts there ("" when it simply joins)

    @property
    def fused(self) -> tuple[tuple[int, ...], ...]:
        return tuple(g for g in self.groups if len(g) > 1)


@dataclass(frozen=True, kw_only=True)
class FusionQuality:
    """The fused model against the unfused one on held-out tokens."""

    tokens: int
    kl: float  # mean KL(unfused || fused) per token, nats
    top1: float  # fraction of positions where both models' argmax agree
    lm_loss_before: float  # nats/token
    lm_loss_after: float


@dataclass(frozen=True, kw_only=True)
class FusionReport:
    source: str
    out: str | None  # None: dry run, nothing written
    runs: tuple[RunPlan, ...]
    calibration_tokens: int  # 0: no calibration (threshold None)
    ffn_depth_before: int  # FFN sub-blocks executed one after another per token
    ffn_depth_after: int
    params_before: int
    params_after: int
    predicted_speedup: float  # DecodeCostModel: batch-1 decode step time before / after
    vllm_native: bool
    quality: FusionQuality | None = None  # right after fusion
    distill_tokens: int = 0  # trained by the short KD (0: none)
    quality_distilled: FusionQuality | None = None  # after the KD
    config: dict[str, Any] = field(default_factory=dict)
    version: int = FUSION_VERSION

    @property
    def fused_groups(self) -> tuple[tuple[int, ...], ...]:
        return tuple(g for run in self.runs for g in run.fused)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "fusion report") -> FusionReport:
        if data.get("version") != FUSION_VERSION:
            raise InputError(f"{where}: version {data.get('version')} is not {FUSION_VERSION}; rerun fuse-ffn")
        return from_mapping(cls, data, where)


