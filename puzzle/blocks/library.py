"""The `library` stage: enumerate every layer's candidates and collect the parent's calibration statistics.

Writes `library/manifest.json` (the candidates and work units, versioned) and
`library/calibration/L{i}.safetensors` (FFN channel scores, expert scores, least-squares linear maps) from one parent pass
over calibration tokens of the train split. Initial weights are derived from these and the parent's
weights when a unit starts, so they are never stored twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from puzzle.arch import Architecture, attention_params, ffn_params
from puzzle.blocks.experts import ExpertRanking
from puzzle.blocks.init import LayerStats, collect_layer_stats
from puzzle.blocks.space import Candidate, SearchSpace, build_candidates
from puzzle.checkpoint import fingerprint, load_architecture
from puzzle.errors import ConfigError, StageError
from puzzle.files import atomic_path, read_json, write_json_atomic
from puzzle.progress import track
from puzzle.run import RunPaths

MANIFEST_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    tokens: int = 1 << 20  # enough to rank FFN channels and fit the linear maps of a 70B model's layers
    batch_size: int = 8
    # How pruned-expert candidates pick their experts (blocks/experts.py): mean router probability, or mean
    # weighted output norm (one more pass through the routed experts during calibration).
    expert_ranking: ExpertRanking = "router_mass"

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.batch_size < 1:
            raise ConfigError("calibration.tokens and calibration.batch_size must be positive")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    parent_fingerprint: str
    num_layers: int
    space: dict[str, Any]
    candidates: tuple[Candidate, ...] = field(default_factory=tuple)
    version: int = MANIFEST_VERSION

    @property
    def units(self) -> list[Candidate]:
        """The candidates BLD trains (not the parent's own sub-blocks, not no-ops)."""
        return [c for c in self.candidates if c.trainable]

    def candidates_of(self, layer: int, kind: str) -> list[Candidate]:
        return [c for c in self.candidates if c.layer == layer and c.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "parent_fingerprint": self.parent_fingerprint, "num_layers": self.num_layers,
                "space": self.space, "candidates": [c.to_dict() for c in self.candidates]}

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> Manifest:
        data = read_json(path, "library manifest (run the `library` stage first)")
        if data.get("version") != MANIFEST_VERSION:
            raise StageError(f"{path}: manifest version {data.get('version')} is not {MANIFEST_VERSION}; rerun the library stage")
        return cls(parent_fingerprint=data["parent_fingerprint"], num_layers=data["num_layers"], space=data["space"],
                   candidates=tuple(Candidate.from_dict(c) for c in data["candidates"]))


def check_parent(paths: RunPaths, manifest: Manifest) -> None:
    """The library must belong to the run's parent (same config and weights)."""
    if fingerprint(paths.parent) != manifest.parent_fingerprint:
        raise StageError(f"{paths.manifest} was built for another parent than {paths.parent}; "
                         "delete the library folder (and later stages) or use a new run directory")


def stats_path(paths: RunPaths, layer: int) -> Path:
    return paths.calibration / f"L{layer}.safetensors"


def load_stats(paths: RunPaths, layer: int) -> LayerStats | None:
    path = stats_path(paths, layer)
    return load_file(path) if path.exists() else None


def needs_calibration(candidates: list[Candidate]) -> tuple[set[int], bool]:
    """Layers whose candidates need statistics, and whether any candidate is linear."""
    layers, linear = set(), False
    for c in candidates:
        if not c.trainable:
            continue
        variants = [c.variant.attention, c.variant.ffn] if c.kind == "block" else [c.variant]
        for v in variants:
            if getattr(v, "replace_with_linear", False):
                layers.add(c.layer)
                linear = True
            if any(getattr(v, field, None) is not None for field in ("intermediate_size", "moe", "mamba")):
                layers.add(c.layer)
    return layers, linear


def build_library(paths: RunPaths, space: SearchSpace, calibration: CalibrationConfig, model, data) -> Manifest:
    """Write the manifest and the calibration statistics; `model` is the loaded parent, `data` its TokenData."""
    arch: Architecture = load_architecture(paths.parent)
    candidates = build_candidates(arch, space)
    manifest = Manifest(parent_fingerprint=fingerprint(paths.parent), num_layers=arch.num_layers,
                        space=asdict(space), candidates=tuple(candidates))
    layers, linear = needs_calibration(candidates)
    paths.calibration.mkdir(parents=True, exist_ok=True)
    if layers:
        n_batches = data.num_batches("train", calibration.batch_size, n_tokens=calibration.tokens)
        batches = data.batches("train", calibration.batch_size, n_tokens=calibration.tokens, shuffle=True, seed=1)
        with track("calibration", n_batches) as bar:
            def counted():
                for batch in batches:
                    yield batch
                    bar.advance(1)

            stats = collect_layer_stats(model, counted(), sorted(layers), linear=linear,
                                        expert_ranking=calibration.expert_ranking)
        for layer, layer_stats in stats.items():
            with atomic_path(stats_path(paths, layer)) as tmp:
                save_file({k: v.contiguous().cpu() for k, v in layer_stats.items()}, tmp)
    manifest.save(paths.manifest)
    return manifest


def manifest_summary(manifest: Manifest) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in manifest.candidates:
        counts[c.kind] = counts.get(c.kind, 0) + 1
    return counts | {"units": len(manifest.units)}


def unit_params(candidate: Candidate, arch: Architecture) -> int:
    """Parameter count of a candidate (the cost used to balance workers)."""
    v = candidate.variant
    if candidate.kind == "attention":
        return attention_params(arch.shape, v)
    if candidate.kind == "ffn":
        return ffn_params(arch.shape, v)
    return attention_params(arch.shape, v.attention) + ffn_params(arch.shape, v.ffn)


def to_device_stats(stats: LayerStats | None, device: torch.device) -> LayerStats | None:
    return None if stats is None else {k: v.to(device) for k, v in stats.items()}
