"""A child's costs re-added in plain Python from its chosen options ("trust but verify").

This is the reference the MIP answers are checked against, so it reads like the definitions in
`puzzle.mip.problem.Targets` and shares no code with the linear model the solvers see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from puzzle.errors import ConfigError
from puzzle.mip.problem import Problem


@dataclass(frozen=True, kw_only=True)
class Metrics:
    """Costs of one child at one operating point (seconds, tokens/s, bytes)."""

    score: float  # summed quality cost
    decode_time_s: float  # one decode step of the whole model
    prefill_time_s: float
    throughput: float  # batch_size / decode_time_s, tokens/s
    latency_s: float | None  # prefill + generate_tokens x decode; None without generate_tokens
    memory_bytes: int | None  # params + KV cache at (batch_size, context_len); None without context_len
    param_bytes: int
    kv_bytes_per_token: int  # per sequence, full context (windows ignored)
    attention_layers: int  # layers that keep softmax attention


def check_choice(problem: Problem, attention: Sequence[int], ffn: Sequence[int]) -> None:
    """Raise ConfigError unless there is one valid attention and one valid FFN index per layer."""
    for kind, choice in (("attention", attention), ("ffn", ffn)):
        if len(choice) != problem.num_layers:
            raise ConfigError(
                f"{kind} choice has {len(choice)} entries for {problem.num_layers} layers; give one per layer"
            )
        for layer, index in enumerate(choice):
            count = len(getattr(problem.layers[layer], kind))
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
                raise ConfigError(f"layer {layer} {kind} choice {index!r} is not an option index in [0, {count})")


def evaluate(
    problem: Problem,
    attention: Sequence[int],
    ffn: Sequence[int],
    *,
    batch_size: int = 1,
    context_len: int | None = None,
    generate_tokens: int | None = None,
) -> Metrics:
    """Re-add the costs of the child that takes option `attention[i]` and `ffn[i]` in layer i."""
    check_choice(problem, attention, ffn)
    chosen = [
        option
        for layer, a, f in zip(problem.layers, attention, ffn, strict=True)
        for option in (layer.attention[a], layer.ffn[f])
    ]
    decode = math.fsum([problem.fixed_decode_time_s] + [option.decode_time_s for option in chosen])
    prefill = math.fsum([problem.fixed_prefill_time_s] + [option.prefill_time_s for option in chosen])
    params = problem.fixed_param_bytes + sum(option.param_bytes for option in chosen)
    memory = None
    if context_len is not None:
        kv_cache = sum(option.kv_bytes_per_token * option.kv_tokens(context_len) + option.state_bytes for option in chosen)
        memory = params + batch_size * kv_cache
    return Metrics(
        score=math.fsum(option.score for option in chosen),
        decode_time_s=decode,
        prefill_time_s=prefill,
        throughput=batch_size / decode if decode > 0 else math.inf,
        latency_s=None if generate_tokens is None else prefill + generate_tokens * decode,
        memory_bytes=memory,
        param_bytes=params,
        kv_bytes_per_token=sum(option.kv_bytes_per_token for option in chosen),
        attention_layers=sum(option.has_attention for option in chosen[::2]),  # chosen = (attn, ffn) per layer
    )


def parent_metrics(
    problem: Problem, *, batch_size: int = 1, context_len: int | None = None, generate_tokens: int | None = None
) -> Metrics:
    """Costs of the parent (option 0 everywhere): the reference for relative targets such as "2x"."""
    attention, ffn = problem.parent_choice()
    return evaluate(
        problem, attention, ffn, batch_size=batch_size, context_len=context_len, generate_tokens=generate_tokens
    )


def shared_blocks(attention: Sequence[int], ffn: Sequence[int], previous_attention: Sequence[int],
                  previous_ffn: Sequence[int]) -> int:
    """Sub-blocks (attention and FFN counted separately) whose choice equals the previous solution's."""
    same_attention = sum(a == b for a, b in zip(attention, previous_attention, strict=True))
    return same_attention + sum(a == b for a, b in zip(ffn, previous_ffn, strict=True))
