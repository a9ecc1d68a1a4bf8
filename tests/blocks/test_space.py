"""The search space: Puzzle's default variants per layer, and the unit counts of both BLD modes."""

import pytest
from factories import decilm_dict

from puzzle.arch import Architecture
from puzzle.blocks.space import AttentionSpace, Candidate, FFNSpace, MoESpace, SearchSpace, build_candidates
from puzzle.errors import ConfigError


def _arch(blocks=(("full", "full"),) * 3, **kw):
    return Architecture.from_config(decilm_dict(list(blocks), **kw))


def test_default_attention_variants_halve_kv_heads_then_window_linear_no_op():
    arch = _arch()
    names = [c.name for c in build_candidates(arch, SearchSpace(attention=AttentionSpace(windows=(8,)))) if c.layer == 0 and c.kind == "attention"]
    assert names == ["kv4", "kv2", "kv1", "kv4_w8", "linear", "no_op"]


def test_ffn_widths_are_fractions_rounded_to_the_multiple_and_deduplicated():
    space = SearchSpace(ffn=FFNSpace(fractions=(1.0, 0.87, 0.75, 0.5, 0.25, 0.2, 0.1), multiple=8))
    names = [c.name for c in build_candidates(_arch(), space) if c.layer == 0 and c.kind == "ffn"]
    # parent 96: 0.87 -> 83.5 -> 80, 0.75 -> 72, 0.5 -> 48, 0.25 -> 24, 0.2 -> 19.2 -> 16, 0.1 -> 9.6 -> 8
    assert names == ["ffn96", "ffn80", "ffn72", "ffn48", "ffn24", "ffn16", "ffn8", "linear", "no_op"]


def test_moe_layers_keep_fractions_of_their_experts_never_fewer_than_experts_per_token():
    space = SearchSpace(moe=MoESpace(experts=(0.75, 0.5, 0.25, 0.1)))
    candidates = [c for c in build_candidates(_arch([("full", "moe")]), space) if c.kind == "ffn"]
    # 4 experts, 2 per token: 0.75 -> 3, 0.5 -> 2, 0.25 and 0.1 -> 2 (the top-k floor), deduplicated
    assert [c.name for c in candidates] == ["moe_k4_top2", "moe_k3_top2", "moe_k2_top2", "linear", "no_op"]
    assert [c.variant.moe.num_local_experts for c in candidates[:3]] == [4, 3, 2]
    assert Candidate.from_dict(candidates[1].to_dict()) == candidates[1]  # the manifest round trip


def test_fewer_experts_per_token_come_with_every_expert_count():
    space = SearchSpace(moe=MoESpace(experts=(0.5,), experts_per_token=(1, 2, 5)))
    names = [c.name for c in build_candidates(_arch([("full", "moe")]), space) if c.kind == "ffn"]
    # 4 experts, 2 per token: 2 and 5 are not fewer than 2, so only top-1 is added, at 4 and at 2 experts
    assert names == ["moe_k4_top2", "moe_k4_top1", "moe_k2_top2", "moe_k2_top1", "linear", "no_op"]
    with pytest.raises(ConfigError, match="experts_per_token"):
        MoESpace(experts_per_token=(0,))


def test_parent_variant_first_and_not_trained():
    for c in build_candidates(_arch(), SearchSpace()):
        assert c.trainable == (not c.is_parent and not c.variant.no_op)
    first = build_candidates(_arch(), SearchSpace())[0]
    assert first.is_parent and first.name == "kv4"


@pytest.mark.parametrize("layers", [1, 3, 5])
def test_decoupled_units_grow_as_m_plus_n_coupled_as_m_times_n(layers):
    arch = _arch([("full", "full")] * layers)
    space = SearchSpace(attention=AttentionSpace(windows=(8, 16)), ffn=FFNSpace(multiple=8))
    decoupled = build_candidates(arch, space)
    m = sum(1 for c in decoupled if c.kind == "attention" and c.layer == 0)
    n = sum(1 for c in decoupled if c.kind == "ffn" and c.layer == 0)
    coupled = build_candidates(arch, SearchSpace(attention=space.attention, ffn=space.ffn, mode="coupled"))
    assert len(decoupled) == (m + n) * layers and len(coupled) == m * n * layers
    assert (m, n) == (7, 9)


def test_heterogeneous_parent_layers_get_candidates_relative_to_their_own_block():
    arch = _arch([("gqa2", "narrow"), ("no_op", "no_op")])
    cands = build_candidates(arch, SearchSpace(attention=AttentionSpace(windows=()), ffn=FFNSpace(multiple=8)))
    assert [c.name for c in cands if c.layer == 0 and c.kind == "attention"] == ["kv2", "kv1", "linear", "no_op"]
    assert [c.name for c in cands if c.layer == 1] == ["no_op", "no_op"]


def test_invalid_space_and_layers_are_errors():
    with pytest.raises(ConfigError, match="fractions"):
        FFNSpace(fractions=(1.5,))
    with pytest.raises(ConfigError, match="layer 7 does not exist"):
        build_candidates(_arch(), SearchSpace(layers=(7,)))
