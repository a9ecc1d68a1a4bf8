"""One MIP answer: the chosen variant per layer and its re-added costs, saved as versioned JSON.

The `solve` stage writes one of these per target to `solutions/*.json`; `realize` reads the indices and
names, `report` the predicted metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from puzzle.errors import ConfigError
from puzzle.mip.metrics import Metrics
from puzzle.mip.problem import Targets

SOLUTION_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class Solution:
    """The child chosen for one target: option indices and names per layer, plus its metrics."""

    attention: tuple[int, ...]  # option index per layer
    ffn: tuple[int, ...]
    attention_names: tuple[str, ...]
    ffn_names: tuple[str, ...]
    score: float
    decode_time_s: float
    prefill_time_s: float
    throughput: float  # tokens/s at targets.batch_size
    latency_s: float | None  # None when targets.generate_tokens is None
    memory_bytes: int | None  # None when targets.context_len is None
    param_bytes: int
    kv_bytes_per_token: int
    attention_layers: int
    targets: Targets
    solver: str  # back-end that found it, e.g. "pulp-cbc"
    solve_time_s: float  # wall time of the optimising solve (not of infeasibility diagnosis)

    def __post_init__(self) -> None:
        n = len(self.attention)
        lengths = {len(self.ffn), len(self.attention_names), len(self.ffn_names)}
        if n == 0 or lengths != {n}:
            raise ConfigError("Solution: attention, ffn and their names must be non-empty and of one length per layer")
        if not isinstance(self.targets, Targets):
            raise ConfigError("Solution: targets must be a Targets")

    @property
    def num_layers(self) -> int:
        return len(self.attention)

    @property
    def metrics(self) -> Metrics:
        return Metrics(**{f.name: getattr(self, f.name) for f in fields(Metrics)})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict with `"version": 1`."""
        out: dict[str, Any] = {"version": SOLUTION_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["targets"] = self.targets.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Solution:
        """Inverse of `to_dict`; rejects other versions, unknown and missing keys with their names."""
        if not isinstance(data, dict):
            raise ConfigError(f"solution JSON must be an object, got {type(data).__name__}")
        version = data.get("version")
        if version != SOLUTION_VERSION:
            raise ConfigError(
                f"solution version {version!r} is not supported; this puzzle reads version 1, re-run solve"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"version"})
        if unknown:
            raise ConfigError(f"solution: unknown key {unknown[0]!r}; re-run solve with this puzzle version")
        missing = sorted(known - set(data))
        if missing:
            raise ConfigError(f"solution: missing key {missing[0]!r}; re-run solve with this puzzle version")
        values = {name: data[name] for name in known}
        for name in ("attention", "ffn", "attention_names", "ffn_names"):
            values[name] = tuple(values[name])
        values["targets"] = Targets.from_dict(values["targets"])
        return cls(**values)
