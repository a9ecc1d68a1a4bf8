"""Hybrid Mamba-Transformer parents (Nemotron-H): conversion, the Mamba state, Mamba head selection, Minitron pruning,
FFN Fusion of gate-less MLPs, and how vLLM serves them.

Conversion exactness and cached generation against transformers' own NemotronH model run with every family in
tests/test_checkpoint.py and tests/modeling/test_generation_compat.py ("nemotron_h" in factories.FAMILIES); the
Mamba variant's cache, padding and parameter accounting run with every variant in tests/modeling and
tests/test_arch.py. Here: the pieces specific to hybrids."""

import pytest
import torch
from factories import hf_parent

from puzzle import checkpoint
from puzzle.fusion.config import FusionConfig
from puzzle.fusion.stage import fuse_ffn
from puzzle.prune.config import PruneConfig
from puzzle.prune.stage import prune


@pytest.fixture(scope="module")
def nemotron_h(tmp_path_factory):
    root = tmp_path_factory.mktemp("nemotron_h")
    hf_parent("nemotron_h", root / "hf", seed=3)
    checkpoint.convert(root / "hf", root / "parent")
    return root


def test_a_nemotron_h_layer_is_one_mixer_in_the_slot_of_its_kind(nemotron_h):
    arch = checkpoint.load_architecture(nemotron_h / "parent")
    heads = arch.shape.num_attention_heads
    labels = [(b.attention.label(heads), b.ffn.label()) for b in arch.blocks]
    assert labels == [("mamba8", "no_op"), ("no_op", "moe_k4_top2"), ("kv2", "no_op"), ("no_op", "ffn96"),
                      ("mamba8", "no_op"), ("kv2", "no_op"), ("no_op", "moe_k4_top2")]
    assert not arch.blocks[3].ffn.gated and arch.blocks[1].ffn.moe.shared_expert_intermediate_dim == 48
    # A Mamba layer's decode state does not grow with the context; attention's does.
    assert arch.kv_cache_bytes(1, 100) - arch.kv_cache_bytes(1, 50) == 50 * arch.kv_bytes_per_token()
    assert arch.kv_cache_bytes(1, 50) - 50 * arch.kv_bytes_per_token() == 2 * arch.blocks[0].attention.mamba.state_bytes()


def test_the_unconverted_folder_loads_under_nemotron_h_names(nemotron_h):
    ids = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.load_model(nemotron_h / "hf")(ids).logits,
                                   checkpoint.load_model(nemotron_h / "parent")(ids).logits, atol=1e-6, rtol=0)


def test_the_mamba_state_is_updated_in_place_during_decode(nemotron_h):
    """A server's state slots (and CUDA graphs) need fixed addresses: decode writes into the prefill's tensors."""
    model = checkpoint.load_model(nemotron_h / "parent")
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids[:, :8], use_cache=True)
        cache = out.past_key_values
        conv, ssm = cache.layers[0].conv, cache.layers[0].ssm
        step = model(ids[:, 8:], past_key_values=cache, use_cache=True).logits[:, -1]
        full = model(ids, use_cache=False).logits[:, -1]
    assert cache.layers[0].conv is conv and cache.layers[0].ssm is ssm
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


def test_fuse_ffn_fuses_gate_less_mlps_of_a_hybrid_exactly(tmp_path):
    """A hybrid child whose relu2 MLPs follow each other without a mixer between (as a search makes them): the
    run is fused into one gate-less FFN computing the sum of the three, and a Mamba layer ends the run."""
    from factories import decilm_dict

    from puzzle.modeling.configuration_decilm import DeciLMConfig

    blocks = [("mamba", "no_op"), ("no_op", "ungated"), ("no_op", "ungated"), ("no_op", "ungated"), ("mamba", "no_op"),
              ("no_op", "ungated")]
    config = DeciLMConfig(**decilm_dict(blocks, hidden_act="relu2", position_embedding_type="none"))
    torch.manual_seed(6)
    model = checkpoint.build_model(config)
    checkpoint.save_model(model, tmp_path / "child")
    report = fuse_ffn(tmp_path / "child", tmp_path / "fused", FusionConfig(threshold=None, keep_last=False))
    assert report.fused_groups == ((1, 2, 3),)
    fused = checkpoint.load_model(tmp_path / "fused")
    arch = checkpoint.load_architecture(tmp_path / "fused")
    assert arch.blocks[1].ffn.intermediate_size == 3 * 64 and not arch.blocks[1].ffn.gated
    assert all(arch.blocks[i].ffn.no_op for i in (2, 3)) and arch.vllm_serving() == "nemotron_h"
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = sum(model.model.layers[i].ffn_branch(h) for i in (1, 2, 3))
        torch.testing.assert_close(fused.model.layers[1].ffn_branch(h), expected, atol=1e-5, rtol=1e-5)


def test_a_mamba_mixer_with_fewer_heads_keeps_the_best_heads_of_each_group_exactly():
    """Heads are independent given the shared B and C: the pruned mixer's scan output (before the gated norm) is the
    parent's on the kept heads, and its gate is the parent's gate on their channels."""
    from factories import decilm_model

    from puzzle.arch import AttentionConfig, MambaConfig
    from puzzle.blocks.init import init_attention
    from puzzle.blocks.subblock import SubBlock

    parent = decilm_model([("mamba", "no_op")], seed=4)
    mixer = parent.model.layers[0].self_attn.mamba_mixer
    old = AttentionConfig(mamba=MambaConfig(num_heads=8, head_dim=16, state_dim=8, num_groups=2))
    new = AttentionConfig(mamba=MambaConfig(num_heads=4, head_dim=16, state_dim=8, num_groups=2))
    score = torch.tensor([0.1, 5.0, 0.2, 3.0, 9.0, 0.3, 8.0, 0.0])  # best two of heads 0-3: 1, 3; of 4-7: 4, 6
    state = {k: v.detach() for k, v in parent.model.layers[0].state_dict().items()}
    weights = init_attention(state, old, new, 4, 16, {"mamba_head_score": score})
    child = SubBlock(parent.config, "attention", new)
    child.layer.load_state_dict(weights, strict=True)

    captured = {}

    def keep_norm_input(name):
        return lambda module, args: captured.__setitem__(name, args)

    hooks = [mixer.norm.register_forward_pre_hook(keep_norm_input("parent")),
             child.layer.self_attn.mamba_mixer.norm.register_forward_pre_hook(keep_norm_input("child"))]
    x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parent.model.layers[0].attention_branch(x)
        child(x)
    for h in hooks:
        h.remove()
    channels = (torch.tensor([1, 3, 4, 6])[:, None] * 16 + torch.arange(16)).flatten()
    (y_parent, z_parent), (y_child, z_child) = captured["parent"], captured["child"]
    torch.testing.assert_close(y_child, y_parent[..., channels], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_child, z_parent[..., channels])


def _hybrid_parent(root):
    """(converted tiny Nemotron-H with every layer type, its data config)."""
    from factories import tiny_parent_with_tokenizer

    from puzzle.corpus import DataConfig

    hf, corpus = tiny_parent_with_tokenizer(root / "inputs", layers=4, family="nemotron_h")
    parent = checkpoint.convert(hf, root / "parent")
    return parent, DataConfig(paths=(str(corpus),), seq_len=64)


def test_pruning_a_hybrid_at_its_own_sizes_is_the_identity(tmp_path):
    parent, data = _hybrid_parent(tmp_path)
    arch = checkpoint.load_architecture(parent)
    cfg = PruneConfig(mamba_heads=8, ffn_size=(None, None, 128, None), hidden_size=64, experts=4, data=data,
                      eval_tokens=0)
    prune(parent, tmp_path / "same", cfg)
    assert checkpoint.load_architecture(tmp_path / "same") == arch
    ids = torch.randint(0, arch.shape.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(checkpoint.load_model(tmp_path / "same")(ids).logits, checkpoint.load_model(parent)(ids).logits)


def test_a_pruned_hybrid_equals_its_hand_sliced_parent(tmp_path):
    """Mamba heads (2 of 4 per group), MLP neurons, hidden channels and experts (one per group) kept by a plan of
    known scores: the slicing equals indexing the parent's tensors by hand."""
    from puzzle.prune.importance import Importance
    from puzzle.prune.plan import make_plan
    from puzzle.prune.slicing import apply_plan

    parent_dir, _ = _hybrid_parent(tmp_path)
    parent = checkpoint.load_model(parent_dir)
    arch = checkpoint.load_architecture(parent_dir)
    gen = torch.Generator().manual_seed(1)
    importance = Importance(hidden=torch.rand(64, generator=gen), mamba_heads={0: torch.rand(8, generator=gen)},
                            ffn={2: torch.rand(128, generator=gen)}, experts={3: torch.tensor([0.2, 0.9, 0.8, 0.1])},
                            expert_ffn={})
    cfg = PruneConfig(mamba_heads=4, ffn_size=(None, None, 32, None), hidden_size=48, experts=2)
    plan = make_plan(arch, cfg, importance)
    child = apply_plan(parent, plan)
    assert plan.layers[3].experts == (1, 2)  # the best of experts {0, 1} and of {2, 3}: grouped routing keeps both groups
    heads = importance.mamba_heads[0]
    kept = sorted(heads[:4].topk(2).indices.tolist()) + sorted((heads[4:].topk(2).indices + 4).tolist())
    assert plan.layers[0].mamba_heads == tuple(kept)
    hidden = torch.tensor(sorted(importance.hidden.topk(48).indices.tolist()))
    p, c = parent.state_dict(), child.state_dict()
    channels = (torch.tensor(kept)[:, None] * 16 + torch.arange(16)).flatten()
    inner, bc = 128, 2 * 2 * 16  # 8 heads x 16 channels; B and C of 2 groups x state 16
    in_rows = torch.cat([channels, inner + channels, 2 * inner + torch.arange(bc), 2 * inner + bc + torch.tensor(kept)])
    mixer = "model.layers.0.self_attn.mamba_mixer."
    assert torch.equal(c[mixer + "in_proj.weight"], p[mixer + "in_proj.weight"][in_rows][:, hidden])
    assert torch.equal(c[mixer + "conv1d.weight"], p[mixer + "conv1d.weight"][torch.cat([channels, inner + torch.arange(bc)])])
    assert torch.equal(c[mixer + "out_proj.weight"], p[mixer + "out_proj.weight"][hidden][:, channels])
    for name in ("A_log", "D", "dt_bias"):
        assert torch.equal(c[mixer + name], p[mixer + name][torch.tensor(kept)])
    neurons = torch.tensor(sorted(importance.ffn[2].topk(32).indices.tolist()))
    assert torch.equal(c["model.layers.2.mlp.up_proj.weight"], p["model.layers.2.mlp.up_proj.weight"][neurons][:, hidden])
    assert torch.equal(c["model.layers.3.mlp.gate.e_score_correction_bias"],
                       p["model.layers.3.mlp.gate.e_score_correction_bias"][torch.tensor([1, 2])])
    assert torch.equal(c["model.layers.3.mlp.shared_expert.down_proj.weight"],
                       p["model.layers.3.mlp.shared_expert.down_proj.weight"][hidden])
    assert torch.equal(c["model.layers.3.mlp.experts.1.up_proj.weight"], p["model.layers.3.mlp.experts.2.up_proj.weight"][:, hidden])


def test_puzzle_prune_of_a_hybrid_loads_without_puzzle_and_in_vllms_layout(tmp_path):
    from transformers import AutoModelForCausalLM

    parent, data = _hybrid_parent(tmp_path)
    cfg = PruneConfig(mamba_heads=4, mamba_head_dim=8, ffn_size=64, hidden_size=48, experts=2, drop_layers=1, data=data,
                      calibration_tokens=2048, eval_tokens=1024, batch_size=4)
    result = prune(parent, tmp_path / "pruned", cfg)
    arch = checkpoint.load_architecture(tmp_path / "pruned")
    heads = arch.shape.num_attention_heads
    layers = [("mamba4", "no_op"), ("kv4", "no_op"), ("no_op", "ffn64"), ("no_op", "moe_k2_top2")]
    assert len(result.kept_layers) == 3 and [(b.attention.label(heads), b.ffn.label()) for b in arch.blocks] == \
        [layers[i] for i in result.kept_layers]  # depth: one layer of the four dropped, by block importance
    assert all(b.attention.mamba.head_dim == 8 for b in arch.blocks if b.attention.mamba)
    assert result.quality is not None and result.quality.kl > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(0, arch.shape.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=8, do_sample=False).tolist() == \
            model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False).tolist()
    assert (tmp_path / "pruned-nemotron-h" / "config.json").exists()  # vLLM's Nemotron-H layout beside it


def test_pruned_mamba_heads_and_channels_compute_the_parents_scan_on_what_they_keep(tmp_path):
    """Channels of a Mamba head are independent (each its own state row under the head's dt and the group's B, C):
    with 2 of 4 heads per group and 8 of 16 channels per head kept, the child's scan output before the gated norm is
    the parent's on the kept channels, exactly."""
    from puzzle.prune.importance import Importance
    from puzzle.prune.plan import make_plan
    from puzzle.prune.slicing import apply_plan

    parent_dir, _ = _hybrid_parent(tmp_path)
    parent, arch = checkpoint.load_model(parent_dir), checkpoint.load_architecture(parent_dir)
    gen = torch.Generator().manual_seed(3)
    importance = Importance(mamba_heads={0: torch.rand(8, generator=gen)}, mamba_channels={0: torch.rand(128, generator=gen)})
    plan = make_plan(arch, PruneConfig(mamba_heads=4, mamba_head_dim=8), importance)
    child = apply_plan(parent, plan)
    assert child.config.block_configs[0].attention.mamba.head_dim == 8
    channels = torch.cat([h * 16 + torch.tensor(c) for h, c in zip(plan.layers[0].mamba_heads, plan.layers[0].mamba_channels)])
    for h, kept in zip(plan.layers[0].mamba_heads, plan.layers[0].mamba_channels):  # each head its own best channels
        assert list(kept) == sorted(importance.mamba_channels[0][h * 16:(h + 1) * 16].topk(8).indices.tolist())
    captured = {}
    hooks = [m.model.layers[0].self_attn.mamba_mixer.norm.register_forward_pre_hook(
        lambda module, args, name=name: captured.__setitem__(name, args[0])) for name, m in (("parent", parent), ("child", child))]
    ids = torch.randint(0, arch.shape.vocab_size, (2, 21), generator=torch.Generator().manual_seed(4))  # > one chunk
    with torch.no_grad():
        parent(ids), child(ids)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(captured["child"], captured["parent"][..., channels], atol=1e-6, rtol=1e-5)


def test_inspect_says_how_vllm_serves_a_hybrid(nemotron_h, capsys):
    """A hybrid whose Mamba layers share one shape is served by vLLM's Nemotron-H model; one whose Mamba layers
    differ (as a search child may) is not, and inspect says why."""
    import dataclasses

    from puzzle.arch import Architecture, MambaConfig
    from puzzle.cli import app as cli

    assert cli.run(["inspect", str(nemotron_h / "parent")]) == 0
    assert "NemotronHPuzzleForCausalLM" in capsys.readouterr().out
    config = checkpoint.normalized_config(nemotron_h / "parent")
    arch = Architecture.from_config(config)
    blocks = list(arch.blocks)
    blocks[4] = dataclasses.replace(blocks[4], attention=dataclasses.replace(
        blocks[4].attention, mamba=MambaConfig(num_heads=4, head_dim=16, state_dim=16, num_groups=2)))
    child = checkpoint.build_model(checkpoint.decilm_config(config, Architecture(shape=arch.shape, blocks=tuple(blocks))))
    checkpoint.save_model(child, nemotron_h / "uneven")
    assert cli.run(["inspect", str(nemotron_h / "uneven")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "vLLM cannot serve it" in out and "Mamba layers of different shapes (mamba4, mamba8)" in out
