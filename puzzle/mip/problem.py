"""What the MIP chooses from and what it must meet: per-layer options and the search targets.

Puzzle (Bercovich et al. 2024), section "MIP": one attention and one FFN variant per layer, each with a
quality cost (replace-one-block KL), a measured runtime and a memory cost; targets bound throughput, latency,
memory, KV bytes per token and the number of attention layers, plus a diversity bound against earlier
solutions (sum(x * x_prev) <= alpha * L). Units are seconds, bytes and tokens everywhere.

Convention: option 0 of every sub-block is the parent's own variant (score 0), so `Problem.parent_choice()`
is the parent and relative targets ("2x the parent's throughput") are resolved against it by the caller,
with `puzzle.mip.metrics.parent_metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from puzzle.config import is_int
from puzzle.errors import ConfigError


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _check_number(owner: str, field: str, value: object, *, positive: bool = False) -> None:
    low_ok = value > 0 if positive else value >= 0  # type: ignore[operator]
    if not _is_number(value) or not low_ok:
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{owner}: {field} must be a finite number {bound}, got {value!r}")


def _check_int(owner: str, field: str, value: object, *, minimum: int = 0) -> None:
    if not is_int(value) or value < minimum:  # type: ignore[operator]
        raise ConfigError(f"{owner}: {field} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Option:
    """One variant of one sub-block (attention or FFN) in one layer, with its costs at the target."""

    name: str
    score: float  # quality cost, e.g. replace-one-block KL; 0 for the parent variant
    decode_time_s: float  # one decode step at the target batch size and context
    prefill_time_s: float  # prefill of the target prompt
    param_bytes: int
    has_attention: bool  # softmax attention present (counted by the attention-layer targets)
    kv_bytes_per_token: int = 0  # per sequence per token at the KV dtype; 0 for no-op/linear attention, FFNs
    kv_window: int | None = None  # window attention caches at most this many tokens
    state_bytes: int = 0  # per sequence whatever the context: a Mamba mixer's conv and scan state

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"Option: name must be a non-empty string, got {self.name!r}")
        owner = f"option {self.name!r}"
        for field in ("score", "decode_time_s", "prefill_time_s"):
            _check_number(owner, field, getattr(self, field))
        _check_int(owner, "param_bytes", self.param_bytes)
        _check_int(owner, "kv_bytes_per_token", self.kv_bytes_per_token)
        _check_int(owner, "state_bytes", self.state_bytes)
        if self.kv_window is not None:
            _check_int(owner, "kv_window", self.kv_window, minimum=1)
        if not isinstance(self.has_attention, bool):
            raise ConfigError(f"{owner}: has_attention must be true or false, got {self.has_attention!r}")

    def kv_tokens(self, context_len: int) -> int:
        """Tokens this option caches per sequence when `context_len` tokens are held."""
        return context_len if self.kv_window is None else min(context_len, self.kv_window)


def _check_options(kind: str, options: object) -> None:
    owner = f"LayerOptions.{kind}"
    if not isinstance(options, tuple) or not options:
        raise ConfigError(f"{owner}: options must be a non-empty tuple of Option, got {type(options).__name__}")
    if not all(isinstance(option, Option) for option in options):
        raise ConfigError(f"{owner}: every option must be an Option")
    names = [option.name for option in options]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{owner}: option names must be unique, {duplicates} repeat; rename the variants")


@dataclass(frozen=True, kw_only=True)
class LayerOptions:
    """The attention and FFN variants of one layer; index 0 of each is the parent's variant."""

    attention: tuple[Option, ...]
    ffn: tuple[Option, ...]

    def __post_init__(self) -> None:
        _check_options("attention", self.attention)
        _check_options("ffn", self.ffn)
        for option in self.ffn:
            if option.has_attention or option.kv_bytes_per_token:
                raise ConfigError(
                    f"ffn option {option.name!r} has attention or KV bytes; "
                    "list it under attention or set has_attention=False, kv_bytes_per_token=0"
                )


@dataclass(frozen=True, kw_only=True)
class Problem:
    """The search space of one MIP: options per layer plus the costs every child pays."""

    layers: tuple[LayerOptions, ...]
    fixed_decode_time_s: float = 0.0  # embeddings, final norm, LM head
    fixed_prefill_time_s: float = 0.0
    fixed_param_bytes: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ConfigError("Problem: layers must be a non-empty tuple of LayerOptions")
        for index, layer in enumerate(self.layers):
            if not isinstance(layer, LayerOptions):
                raise ConfigError(f"Problem: layer {index} must be a LayerOptions, got {type(layer).__name__}")
        _check_number("Problem", "fixed_decode_time_s", self.fixed_decode_time_s)
        _check_number("Problem", "fixed_prefill_time_s", self.fixed_prefill_time_s)
        _check_int("Problem", "fixed_param_bytes", self.fixed_param_bytes)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def parent_choice(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(attention, ffn) indices of the parent: option 0 in every layer."""
        zeros = (0,) * self.num_layers
        return zeros, zeros


@dataclass(frozen=True, kw_only=True)
class DiversityTarget:
    """Bound on how much a new solution may share with each previous one (Puzzle's sum(x*x_prev) <= aL).

    Shared = number of sub-blocks (attention and FFN counted separately, 2L in all) whose choice equals the
    previous solution's; it must stay <= max_shared_fraction * 2L for every previous solution.
    """

    max_shared_fraction: float

    def __post_init__(self) -> None:
        value = self.max_shared_fraction
        if not _is_number(value) or not 0 <= value <= 1:
            raise ConfigError(f"DiversityTarget: max_shared_fraction must be in [0, 1], got {value!r}")


_CONSTRAINT_FIELDS = (
    "min_throughput",
    "max_latency_s",
    "max_memory_bytes",
    "max_kv_bytes_per_token",
    "min_attention_layers",
    "max_attention_layers",
    "diversity",
)


@dataclass(frozen=True, kw_only=True)
class Targets:
    """Absolute search targets at one operating point; relative targets are resolved by the caller.

    throughput = batch_size / decode step time (tokens/s); latency = prefill time + generate_tokens x decode
    step time; memory = params + batch_size x sum of KV bytes/token x min(context_len, window); KV bytes per
    token = sum over layers at full context (windows ignored), per sequence.
    """

    batch_size: int = 1  # must match the batch the decode times were measured at
    context_len: int | None = None  # tokens held in the KV cache per sequence; needed by max_memory_bytes
    generate_tokens: int | None = None  # decode steps counted in latency; needed by max_latency_s
    min_throughput: float | None = None
    max_latency_s: float | None = None
    max_memory_bytes: int | None = None
    max_kv_bytes_per_token: int | None = None
    min_attention_layers: int | None = None
    max_attention_layers: int | None = None
    diversity: DiversityTarget | None = None

    def __post_init__(self) -> None:
        _check_int("Targets", "batch_size", self.batch_size, minimum=1)
        if self.context_len is not None:
            _check_int("Targets", "context_len", self.context_len, minimum=1)
        if self.generate_tokens is not None:
            _check_int("Targets", "generate_tokens", self.generate_tokens)
        for field in ("min_throughput", "max_latency_s"):
            if getattr(self, field) is not None:
                _check_number("Targets", field, getattr(self, field), positive=True)
        for field in ("max_memory_bytes", "max_kv_bytes_per_token", "min_attention_layers", "max_attention_layers"):
            if getattr(self, field) is not None:
                _check_int("Targets", field, getattr(self, field))
        if self.diversity is not None and not isinstance(self.diversity, DiversityTarget):
            raise ConfigError("Targets: diversity must be a DiversityTarget or None")
        if not self.constraint_names():
            raise ConfigError(f"Targets: set at least one of {', '.join(_CONSTRAINT_FIELDS)}")
        if self.max_memory_bytes is not None and self.context_len is None:
            raise ConfigError("Targets: max_memory_bytes needs context_len (tokens cached per sequence); set it")
        if self.max_latency_s is not None and self.generate_tokens is None:
            raise ConfigError("Targets: max_latency_s needs generate_tokens (decode steps per request); set it")
        low, high = self.min_attention_layers, self.max_attention_layers
        if low is not None and high is not None and low > high:
            raise ConfigError(f"Targets: min_attention_layers {low} > max_attention_layers {high}; swap or fix them")

    def constraint_names(self) -> tuple[str, ...]:
        """The constraint fields that are set, in a fixed order."""
        return tuple(name for name in _CONSTRAINT_FIELDS if getattr(self, name) is not None)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.diversity is not None:
            out["diversity"] = {"max_shared_fraction": self.diversity.max_shared_fraction}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Targets:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"targets: unknown key {unknown[0]!r}; known keys are {', '.join(sorted(known))}")
        data = dict(data)
        if data.get("diversity") is not None:
            diversity = data["diversity"]
            if not isinstance(diversity, dict) or set(diversity) != {"max_shared_fraction"}:
                raise ConfigError("targets: diversity must be {'max_shared_fraction': number}")
            data["diversity"] = DiversityTarget(**diversity)
        return cls(**data)
