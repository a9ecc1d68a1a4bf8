"""Initialisation from the parent: every rule beats a random init of the same shape on the BLD loss,
and the rules do what they claim on planted inputs."""

import pytest
import torch
from factories import decilm_model

from puzzle.arch import Architecture, AttentionConfig, FFNConfig
from puzzle.blocks.init import collect_layer_stats, init_attention, init_candidate, init_ffn, parent_layer_state
from puzzle.blocks.space import AttentionSpace, FFNSpace, SearchSpace, build_candidates
from puzzle.blocks.subblock import Rotary, SubBlock
from puzzle.distill.activations import run_layers
from puzzle.distill.bld import unit_io
from puzzle.distill.losses import normalized_mse


@pytest.fixture(scope="module")
def setup():
    model = decilm_model([("full", "full")] * 2, seed=11)
    ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(3))
    arch = Architecture.from_config(model.config.to_dict())
    stats = collect_layer_stats(model, [ids], range(2))
    _, io = run_layers(model, ids, capture={0, 1})
    return model, arch, stats, io


SPACE = SearchSpace(attention=AttentionSpace(windows=(8,)), ffn=FFNSpace(multiple=16))


@pytest.mark.parametrize("fold", ["least_squares", "fold"])
def test_every_initialisation_beats_random_init(setup, fold):
    model, arch, stats, io = setup
    rotary = Rotary(model.config)
    checked = 0
    for c in build_candidates(arch, SPACE):
        if not c.trainable or (fold == "fold" and not getattr(c.variant, "replace_with_linear", False)):
            continue
        x, target = unit_io(c, io[c.layer])
        init = init_candidate(c, model, arch, stats.get(c.layer), fold)
        random = SubBlock(model.config, c.kind, c.variant)
        for module in random.modules():
            model._init_weights(module)
        with torch.no_grad():
            ours = normalized_mse(init(x, rotary(x)), target).item()
            theirs = normalized_mse(random(x, rotary(x)), target).item()
        assert ours < theirs, (c.unit_id, ours, theirs)
        checked += 1
    assert checked >= (2 if fold == "fold" else 12)


def test_kv_mean_pooling_is_exact_when_the_grouped_heads_are_equal(setup):
    model, arch, _, io = setup
    state = parent_layer_state(model, 0)
    d = model.config.head_dim
    for name in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        w = state[name].reshape(4, d, -1)
        state[name] = torch.stack([w[0], w[0], w[2], w[2]]).reshape(4 * d, -1)  # heads 0,1 and 2,3 equal
    parent = SubBlock(model.config, "attention", AttentionConfig(n_heads_in_group=1))
    parent.layer.load_state_dict(init_attention(state, AttentionConfig(n_heads_in_group=1), AttentionConfig(n_heads_in_group=1), 4, d))
    pooled = SubBlock(model.config, "attention", AttentionConfig(n_heads_in_group=2))
    pooled.layer.load_state_dict(init_attention(state, AttentionConfig(n_heads_in_group=1), AttentionConfig(n_heads_in_group=2), 4, d))
    x = io[0].x
    rot = Rotary(model.config)(x)
    torch.testing.assert_close(pooled(x, rot), parent(x, rot))


def test_narrowed_ffn_keeps_the_most_contributing_channels(setup):
    model, _, stats, _ = setup
    state = parent_layer_state(model, 0)
    score = torch.zeros(96)
    planted = torch.tensor([5, 17, 60, 90])
    score[planted] = 10.0
    out = init_ffn(state, FFNConfig(intermediate_size=4), {"ffn_channel_score": score})
    torch.testing.assert_close(out["mlp.gate_proj.weight"], state["mlp.gate_proj.weight"][planted])
    torch.testing.assert_close(out["mlp.down_proj.weight"], state["mlp.down_proj.weight"][:, planted])
