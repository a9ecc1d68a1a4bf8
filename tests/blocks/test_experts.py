"""Expert pruning: a pruned MoE layer is the parent's layer sliced by hand, and the rankings are what they say."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from factories import MOE_FAMILIES, hf_parent

from puzzle import checkpoint
from puzzle.arch import FFNConfig, MoEConfig
from puzzle.blocks.experts import best_experts, keep_experts
from puzzle.blocks.init import collect_layer_stats, init_candidate
from puzzle.blocks.space import Candidate

LAYER = 2  # an MoE layer in both families (Qwen3-MoE's layer 1 is dense)


def _parent(family, tmp_path):
    hf = hf_parent(family, tmp_path / "hf", seed=4)
    checkpoint.convert(tmp_path / "hf", tmp_path / "parent")
    return hf, checkpoint.load_model(tmp_path / "parent"), checkpoint.load_architecture(tmp_path / "parent")


def _moe_inputs(hf, ids):
    """The normalised inputs of transformers' own MoE block in layer LAYER (its forward pre-hook)."""
    seen = []
    handle = hf.model.layers[LAYER].mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        hf(ids)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])  # (N, C)


def _router(block):
    """transformers' router module of an MoE block (gpt-oss calls it `router`, the others `gate`)."""
    return block.router if hasattr(block, "router") else block.gate


def _router_logits(hf, x):
    router = _router(hf.model.layers[LAYER].mlp)
    return F.linear(x, router.weight, getattr(router, "bias", None))  # (N, E), gpt-oss's router has a bias


def _hand_sliced_reference(hf, keep):
    """transformers' own MoE block of layer LAYER with only the `keep` experts: router rows (and bias), fused expert
    tensors (and gpt-oss's expert biases) sliced by hand from the parent's."""
    parent_block = hf.model.layers[LAYER].mlp
    config = hf.config.__class__(**{**hf.config.to_dict(), "num_local_experts": len(keep), "num_experts": len(keep)})
    block = type(parent_block)(config).eval()
    with torch.no_grad():
        for name, tensor in [*_router(block).named_parameters(prefix="router"),
                             *block.experts.named_parameters(prefix="experts")]:
            source = dict([*_router(parent_block).named_parameters(prefix="router"),
                           *parent_block.experts.named_parameters(prefix="experts")])[name]
            tensor.copy_(source[keep])  # every router and expert tensor has the experts on its first axis
    return block


def _moe_output(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out  # GptOssMLP also returns its router scores


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_pruned_layer_equals_the_hand_sliced_reference(family, tmp_path):
    hf, model, arch = _parent(family, tmp_path)
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    stats = collect_layer_stats(model, [ids], [LAYER], linear=False)
    parent_moe = arch.blocks[LAYER].ffn.moe
    variant = FFNConfig(moe=replace(parent_moe, num_local_experts=3))  # as the search space builds it
    candidate = Candidate(layer=LAYER, kind="ffn", name=variant.label(), variant=variant, is_parent=False)
    pruned = init_candidate(candidate, model, arch, stats[LAYER])

    x = _moe_inputs(hf, ids)
    mass = F.softmax(_router_logits(hf, x), dim=-1).mean(0)  # (E,) router probability mass
    keep = mass.topk(3).indices.sort().values
    assert keep.tolist() != [0, 1, 2]  # the test would not see a wrong slice otherwise (seeded)
    reference = _hand_sliced_reference(hf, keep)
    # The sub-block applies post_attention_layernorm itself; feed both the same residual stream.
    h = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(1))
    norm = hf.model.layers[LAYER].post_attention_layernorm
    with torch.no_grad():
        torch.testing.assert_close(pruned(h), _moe_output(reference, norm(h)), atol=1e-6, rtol=0)


def test_contribution_ranking_is_the_mean_weighted_expert_output_norm(tmp_path):
    hf, model, _ = _parent("qwen3_moe", tmp_path)
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(2))
    score = collect_layer_stats(model, [ids], [LAYER], linear=False, expert_ranking="contribution")[LAYER]["expert_score"]
    x = _moe_inputs(hf, ids)
    block = hf.model.layers[LAYER].mlp
    probs = F.softmax(x @ block.gate.weight.T, dim=-1)  # (N, E)
    top, chosen = probs.topk(2, dim=-1)  # norm_topk_prob is false: the raw top-2 probabilities
    expected = torch.zeros(4)
    with torch.no_grad():
        for e in range(4):
            gate, up = F.linear(x, block.experts.gate_up_proj[e]).chunk(2, dim=-1)
            norms = F.linear(F.silu(gate) * up, block.experts.down_proj[e]).norm(dim=-1)  # (N,)
            expected[e] = (top * (chosen == e)).sum(-1).mul(norms).mean()
    torch.testing.assert_close(score, expected, atol=1e-6, rtol=1e-5)


def test_keeping_experts_refuses_what_it_cannot_do():
    parent = {"mlp.gate.weight": torch.randn(4, 8), **{f"mlp.experts.{e}.{n}.weight": torch.randn(6, 8)
              for e in range(4) for n in ("gate_proj", "up_proj")},
              **{f"mlp.experts.{e}.down_proj.weight": torch.randn(8, 6) for e in range(4)}}
    moe = dict(num_experts_per_tok=2, expert_intermediate_dim=6, norm_topk_prob=True)
    with pytest.raises(ValueError, match="needs calibration statistics"):
        keep_experts(parent, MoEConfig(num_local_experts=2, **moe), None)
    with pytest.raises(ValueError, match="cannot keep 5 experts"):
        keep_experts(parent, MoEConfig(num_local_experts=5, **moe), torch.rand(4))
    with pytest.raises(ValueError, match="keeps whole experts"):
        keep_experts(parent, MoEConfig(num_local_experts=2, **{**moe, "expert_intermediate_dim": 3}), torch.rand(4))
    with pytest.raises(ValueError, match="mixture-of-experts parent"):
        keep_experts({"mlp.down_proj.weight": torch.randn(8, 6)}, MoEConfig(num_local_experts=2, **moe), torch.rand(4))
    kept = keep_experts(parent, MoEConfig(num_local_experts=2, **moe), torch.tensor([0.1, 0.9, 0.0, 0.5]))
    assert torch.equal(kept["mlp.gate.weight"], parent["mlp.gate.weight"][[1, 3]])
    assert torch.equal(kept["mlp.experts.1.down_proj.weight"], parent["mlp.experts.3.down_proj.weight"])


def test_best_experts_keep_parent_order_and_break_ties_by_the_lower_index():
    assert best_experts(torch.tensor([0.5, 0.9, 0.5, 0.1]), 2) == (0, 1)
    assert best_experts(torch.tensor([0.0, 0.0, 0.3, 0.0]), 3) == (0, 1, 2)
