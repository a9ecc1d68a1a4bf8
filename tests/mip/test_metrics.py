"""The plain-Python re-added costs that every MIP answer is checked against, on a hand-computed child."""

from __future__ import annotations

import pytest

from puzzle.errors import ConfigError
from puzzle.mip import LayerOptions, Option, Problem, evaluate, parent_metrics


def _problem() -> Problem:
    full = Option(name="full", score=0.0, decode_time_s=2.0, prefill_time_s=20.0, param_bytes=1000,
                  kv_bytes_per_token=10, has_attention=True)
    window = Option(name="window", score=0.25, decode_time_s=1.0, prefill_time_s=10.0, param_bytes=1000,
                    kv_bytes_per_token=10, kv_window=100, has_attention=True)
    noop = Option(name="noop", score=1.0, decode_time_s=0.0, prefill_time_s=0.0, param_bytes=0, has_attention=False)
    ffn = Option(name="ffn", score=0.0, decode_time_s=3.0, prefill_time_s=30.0, param_bytes=5000, has_attention=False)
    half = Option(name="half", score=0.5, decode_time_s=1.5, prefill_time_s=15.0, param_bytes=2500,
                  has_attention=False)
    layer = LayerOptions(attention=(full, window, noop), ffn=(ffn, half))
    return Problem(layers=(layer, layer), fixed_decode_time_s=1.0, fixed_prefill_time_s=5.0, fixed_param_bytes=700)


def test_evaluate_matches_hand_computation():
    metrics = evaluate(_problem(), (1, 2), (0, 1), batch_size=4, context_len=1000, generate_tokens=10)
    decode = 1.0 + (1.0 + 3.0) + (0.0 + 1.5)
    prefill = 5.0 + (10.0 + 30.0) + (0.0 + 15.0)
    assert metrics.score == 0.25 + 1.0 + 0.5
    assert metrics.decode_time_s == decode and metrics.prefill_time_s == prefill
    assert metrics.throughput == 4 / decode
    assert metrics.latency_s == prefill + 10 * decode
    params = 700 + 1000 + 5000 + 0 + 2500
    assert metrics.param_bytes == params
    assert metrics.memory_bytes == params + 4 * 10 * 100  # the window caches 100 of the 1000 tokens
    assert metrics.kv_bytes_per_token == 10  # full context: windows ignored
    assert metrics.attention_layers == 1


def test_parent_metrics_and_missing_operating_point():
    parent = parent_metrics(_problem())
    assert parent.score == 0 and parent.throughput == 1 / 11.0
    assert parent.latency_s is None and parent.memory_bytes is None


def test_evaluate_rejects_bad_choices():
    with pytest.raises(ConfigError, match="one per layer"):
        evaluate(_problem(), (0,), (0, 0))
    with pytest.raises(ConfigError, match=r"layer 1 ffn choice 2 is not an option index in \[0, 2\)"):
        evaluate(_problem(), (0, 0), (0, 2))
