"""Cached generation is right with the installed transformers, whatever it calls the cache.

transformers renamed the generation cache (`past_key_values` -> `cache`, 5.20): a model that drops the new
name regenerates from an empty cache at every step and emits wrong tokens while its logits stay exact. These
tests load checkpoints as users do (`AutoModelForCausalLM`, `trust_remote_code=True`) and run the same way
under `make test-latest` and `make test-oldest` (the newest releases and the oldest supported transformers).
"""

import pytest
import torch
from factories import FAMILIES, hf_parent, randomize_
from transformers import AutoModelForCausalLM

from puzzle import checkpoint
from puzzle.arch import Architecture, AttentionConfig, BlockConfig, FFNConfig
from puzzle.modeling import modeling_decilm

NEW_TOKENS = 16


def _sharpen_(model):
    """Weights x5: at transformers' 0.02 init a tiny model's greedy output is nearly constant whatever the
    context, which would hide a lost cache; sharper weights make every token depend on the context."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return model


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of two prompts (7 and 4 tokens) and its padding mask."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 128, (2, 7), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def _greedy_by_full_forwards(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference: argmax of a full forward over the whole sequence at every step, no cache, no `generate`."""
    for _ in range(NEW_TOKENS):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def _generate(model, ids, mask, **kwargs) -> list:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                         **kwargs)
    return out.tolist()


def _heterogeneous_child(parent_dir, out):
    """A 4-layer child of the converted parent with every kind of variant: no-op attention, fewer KV heads, a
    window shorter than the generated text, linear attention and FFN, narrow and no-op FFNs."""
    shape = checkpoint.load_architecture(parent_dir).shape
    blocks = (
        BlockConfig(attention=AttentionConfig(no_op=True), ffn=FFNConfig(intermediate_size=40)),
        BlockConfig(attention=AttentionConfig(n_heads_in_group=shape.num_attention_heads), ffn=FFNConfig(replace_with_linear=True)),
        BlockConfig(attention=AttentionConfig(n_heads_in_group=2, window_length=5), ffn=FFNConfig(no_op=True)),
        BlockConfig(attention=AttentionConfig(replace_with_linear=True), ffn=FFNConfig(intermediate_size=64)),
    )
    config = checkpoint.decilm_config(checkpoint.normalized_config(parent_dir), Architecture(shape=shape, blocks=blocks))
    torch.manual_seed(5)
    checkpoint.save_model(_sharpen_(randomize_(checkpoint.build_model(config), 5)), out, source=parent_dir)
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_converted_parent_generates_as_transformers_own_model(family, tmp_path):
    parent = _sharpen_(hf_parent(family, seed=1))
    parent.save_pretrained(tmp_path / "hf")
    checkpoint.convert(tmp_path / "hf", tmp_path / "parent")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "parent", trust_remote_code=True, dtype=torch.float32)
    assert type(ours).__name__ == "DeciLMForCausalLM"
    ids, mask = _prompts()
    expected = _generate(parent, ids, mask)
    assert _generate(ours.eval(), ids, mask) == expected
    assert _generate(ours, ids, mask, use_cache=False) == expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_heterogeneous_child_generates_the_same_with_and_without_cache(family, tmp_path):
    hf_parent(family, tmp_path / "hf", seed=2)
    checkpoint.convert(tmp_path / "hf", tmp_path / "parent")
    child_dir = _heterogeneous_child(tmp_path / "parent", tmp_path / "child")
    child = AutoModelForCausalLM.from_pretrained(child_dir, trust_remote_code=True, dtype=torch.float32).eval()
    ids, mask = _prompts()
    reference = _greedy_by_full_forwards(child, ids, mask).tolist()
    assert _generate(child, ids, mask) == reference
    assert _generate(child, ids, mask, use_cache=False) == reference


def test_forward_takes_the_cache_under_either_name_and_returns_it_under_the_installed_name():
    parent = _sharpen_(hf_parent("llama", seed=3))
    config = checkpoint.decilm_config(checkpoint.decilm_config_from_parent(None, parent.config.to_dict()))
    model = checkpoint.build_model(config)
    model.load_state_dict(parent.state_dict())
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        for name in ("cache", "past_key_values"):
            out = model(ids[:, :5], use_cache=True)
            cache = getattr(out, modeling_decilm._CACHE_FIELD)
            assert isinstance(cache, modeling_decilm.DeciLMCache) and cache.get_seq_length() == 5
            step = model(ids[:, 5:], use_cache=True, **{name: cache}).logits[:, -1]
            torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="not both"):
            model(ids, cache=cache, past_key_values=modeling_decilm.DeciLMCache(config))

