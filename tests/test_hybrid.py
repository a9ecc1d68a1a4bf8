"""Hybrid Mamba-Transformer parents (Nemotron-H): what works today and what is refused.

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


def test_stages_that_do_not_handle_hybrids_yet_refuse_them_naming_the_layers(nemotron_h):
    parent = nemotron_h / "parent"
    with pytest.raises(UnsupportedModelError, match=r"puzzle prune does not handle hybrid .*Mamba-2 mixers \(layers 0, 4\)"):
        prune(parent, nemotron_h / "pruned", PruneConfig(ffn_size=48))
    with pytest.raises(UnsupportedModelError, match=r"FFNs without a gate \(layers 3\)"):
        fuse_ffn(parent, None, FusionConfig(threshold=None))
    assert not (nemotron_h / "pruned").exists()
