"""The run directory of `puzzle search`: where every stage reads and writes (docs/run-directory.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

UNIT_DIRS = {"attention": "attn", "ffn": "ffn", "block": "block"}


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def parent(self) -> Path:
        return self.root / "parent"

    @property
    def library(self) -> Path:
        return self.root / "library"

    @property
    def manifest(self) -> Path:
        return self.library / "manifest.json"

    @property
    def calibration(self) -> Path:
        return self.library / "calibration"

    @property
    def progress(self) -> Path:
        """In-flight BLD groups' checkpoints (removed when their units are written)."""
        return self.library / ".progress"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def scores(self) -> Path:
        return self.root / "scores.json"

    @property
    def scores_init(self) -> Path:
        """Replace-one-block scores of the candidates before BLD (what BLD bought)."""
        return self.root / "scores_init.json"

    @property
    def profile(self) -> Path:
        return self.root / "profile.json"

    @property
    def solutions(self) -> Path:
        return self.root / "solutions"

    @property
    def children(self) -> Path:
        return self.root / "children"

    def unit(self, kind: str, layer: int, name: str) -> Path:
        """library/{attn,ffn,block}/L{i}/{variant}.safetensors: one trained candidate."""
        return self.library / UNIT_DIRS[kind] / f"L{layer}" / f"{name}.safetensors"
