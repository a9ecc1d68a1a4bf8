"""The grouped-GEMM form the profiler times computes exactly what puzzle's MoE layer computes."""

import pytest
import torch
from factories import decilm_model, randomize_

from puzzle.grouped_moe import GroupedMoE, grouped_experts
from puzzle.modeling.modeling_decilm import DeciLMSparseMoE


@pytest.mark.parametrize("ffn", ["moe", "gpt_oss_moe"])
def test_grouped_experts_equal_the_per_expert_layer(ffn):
    model = randomize_(decilm_model([("full", ffn), ("gqa2", ffn)], seed=3), seed=3)
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    with torch.no_grad():
        expected = model(ids).logits
        with grouped_experts(model):
            assert all(isinstance(layer.mlp, GroupedMoE) for layer in model.model.layers)
            grouped = model(ids).logits
        again = model(ids).logits
    assert all(isinstance(layer.mlp, DeciLMSparseMoE) for layer in model.model.layers)  # put back after
    torch.testing.assert_close(grouped, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)  # the experts still work on their own weights


def test_experts_share_the_stacked_weights():
    """The grouped form does not copy the experts: each expert's weight is a view of the stack (memory)."""
    layer = decilm_model([("full", "moe")], seed=1).model.layers[0].mlp
    grouped = GroupedMoE(layer)
    stack = grouped.weight["down_proj"]
    assert all(e.down_proj.weight.data_ptr() == stack[i].data_ptr() for i, e in enumerate(layer.experts))


def test_a_token_routed_to_no_expert_of_a_group_is_not_an_error():
    """Experts no token chose get empty groups (decode at batch 1 uses top_k of E)."""
    layer = decilm_model([("full", "moe")], seed=2).model.layers[0].mlp
    x = torch.randn(1, 1, layer.gate.in_features)
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(GroupedMoE(layer)(x), expected, rtol=0, atol=1e-5)
