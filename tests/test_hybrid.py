"""Hybrid Mamba-Transformer parents (Nemotron-H): conversion, the Mamba state, Mamba head pruning, and the stages that refuse them.

Conversion exactness and cached generation against transformers' own NemotronH model run with every family in
tests/test_checkpoint.py and tests/modeling/test_generation_compat.py ("nemotron_h" in factories.FAMILIES); the
Mamba variant's cache, padding and parameter accounting run with every variant in tests/modeling and
tests/test_arch.py. Here: the pieces specific to hybrids."""

import pytest
import torch
from factories import hf_parent

from puzzle import checkpoint
from puzzle.errors import UnsupportedModelError
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


def test_prune_and_fuse_refuse_hybrid_layers_naming_them(nemotron_h):
    parent = nemotron_h / "parent"
    with pytest.raises(UnsupportedModelError, match=r"puzzle prune does not handle hybrid .*Mamba-2 mixers \(layers 0, 4\)"):
        prune(parent, nemotron_h / "pruned", PruneConfig(ffn_size=48))
    with pytest.raises(UnsupportedModelError, match=r"FFNs without a gate \(layers 3\)"):
        fuse_ffn(parent, None, FusionConfig(threshold=None))
    assert not (nemotron_h / "pruned").exists()


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
