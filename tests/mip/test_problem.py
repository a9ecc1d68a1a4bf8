"""Validation of the MIP inputs: bad options, layers and targets fail with a one-line ConfigError."""

from __future__ import annotations

import pytest

from puzzle.errors import ConfigError
from puzzle.mip import DiversityTarget, LayerOptions, Option, Problem, Targets


def _option(**overrides) -> Option:
    values = dict(name="parent", score=0.0, decode_time_s=1e-3, prefill_time_s=1e-2, param_bytes=100,
                  has_attention=False)
    return Option(**{**values, **overrides})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(score=-0.1), "score must be a finite number >= 0"),
        (dict(decode_time_s=float("nan")), "decode_time_s"),
        (dict(param_bytes=1.5), "param_bytes must be an integer"),
        (dict(kv_bytes_per_token=True), "kv_bytes_per_token"),
        (dict(kv_window=0), "kv_window must be an integer >= 1"),
        (dict(name=""), "name must be a non-empty string"),
        (dict(has_attention="yes"), "has_attention must be true or false"),
    ],
)
def test_option_rejects_bad_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _option(**overrides)


def test_option_kv_tokens_respects_the_window():
    assert _option(kv_window=128).kv_tokens(4096) == 128
    assert _option(kv_window=8192).kv_tokens(4096) == 4096
    assert _option().kv_tokens(4096) == 4096


def test_layer_options_rejects_bad_lists():
    with pytest.raises(ConfigError, match="non-empty tuple"):
        LayerOptions(attention=[_option()], ffn=(_option(),))
    with pytest.raises(ConfigError, match="non-empty tuple"):
        LayerOptions(attention=(), ffn=(_option(),))
    with pytest.raises(ConfigError, match=r"names must be unique, \['a'\] repeat"):
        LayerOptions(attention=(_option(name="a"), _option(name="a")), ffn=(_option(),))
    with pytest.raises(ConfigError, match="ffn option 'x' has attention or KV bytes"):
        LayerOptions(attention=(_option(),), ffn=(_option(name="x", kv_bytes_per_token=2),))


def test_problem_rejects_bad_layers_and_fixed_costs():
    layer = LayerOptions(attention=(_option(),), ffn=(_option(),))
    with pytest.raises(ConfigError, match="non-empty tuple of LayerOptions"):
        Problem(layers=())
    with pytest.raises(ConfigError, match="layer 1 must be a LayerOptions"):
        Problem(layers=(layer, "x"))
    with pytest.raises(ConfigError, match="fixed_param_bytes"):
        Problem(layers=(layer,), fixed_param_bytes=-1)
    problem = Problem(layers=(layer, layer))
    assert problem.num_layers == 2 and problem.parent_choice() == ((0, 0), (0, 0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(), "set at least one of min_throughput"),
        (dict(batch_size=8), "set at least one of"),
        (dict(max_memory_bytes=10**9), "max_memory_bytes needs context_len"),
        (dict(max_latency_s=1.0), "max_latency_s needs generate_tokens"),
        (dict(min_attention_layers=5, max_attention_layers=3), "min_attention_layers 5 > max_attention_layers 3"),
        (dict(min_throughput=0.0), "min_throughput must be a finite number > 0"),
        (dict(batch_size=0, min_throughput=1.0), "batch_size must be an integer >= 1"),
        (dict(max_kv_bytes_per_token=-1), "max_kv_bytes_per_token must be an integer >= 0"),
        (dict(diversity=0.5), "diversity must be a DiversityTarget"),
    ],
)
def test_targets_reject_bad_combinations(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Targets(**kwargs)


def test_diversity_fraction_in_unit_interval():
    with pytest.raises(ConfigError, match=r"max_shared_fraction must be in \[0, 1\]"):
        DiversityTarget(max_shared_fraction=1.5)


def test_targets_dict_round_trip_and_unknown_key():
    targets = Targets(batch_size=4, context_len=1024, min_throughput=10.0,
                      diversity=DiversityTarget(max_shared_fraction=0.8))
    assert Targets.from_dict(targets.to_dict()) == targets
    with pytest.raises(ConfigError, match="unknown key 'min_thruput'"):
        Targets.from_dict({"min_thruput": 3.0})
    assert targets.constraint_names() == ("min_throughput", "diversity")


def test_errors_are_one_line():
    with pytest.raises(ConfigError) as info:
        Targets(max_memory_bytes=1)
    assert "\n" not in str(info.value)
