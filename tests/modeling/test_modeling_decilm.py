"""The heterogeneous DeciLM model: every attention x FFN variant runs, caches correctly and generates."""

import pytest
import torch
from factories import VARIANT_COMBINATIONS, decilm_dict, decilm_model, globals_for

from puzzle.checkpoint import build_model, decilm_config
from puzzle.modeling.modeling_decilm import DeciLMCache


def _incremental_logits(model, ids, prefill):
    """Logits of positions prefill-1 .. T-1 computed with the KV cache, one token at a time after a prefill."""
    out = model(ids[:, :prefill], use_cache=True)
    cache, logits = out.past_key_values, [out.logits[:, -1]]
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("attention,ffn", VARIANT_COMBINATIONS)
def test_cached_decoding_equals_full_forward_for_every_variant(attention, ffn):
    # The variant sits in layer 0 (so a cache-less first layer is exercised) and layer 2, around a GQA layer.
    model = decilm_model([(attention, ffn), ("gqa2", "full"), (attention, ffn)], **globals_for(ffn))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        step = _incremental_logits(model, ids, prefill=5)
    torch.testing.assert_close(step, full[:, 4:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention,ffn", VARIANT_COMBINATIONS)
def test_generate_with_cache_equals_recomputation(attention, ffn):
    model = decilm_model([(attention, ffn), ("gqa2", "full"), (attention, ffn)], seed=3, **globals_for(ffn))
    prompt = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt))
    recomputed = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False,
                                attention_mask=torch.ones_like(prompt))
    assert cached.tolist() == recomputed.tolist()
    assert cached.shape == (2, 14)


def test_model_without_any_attention_generates_and_counts_tokens():
    model = decilm_model([("no_op", "full"), ("linear", "narrow")])
    prompt = torch.randint(0, 128, (1, 5))
    out = model(prompt, use_cache=True)
    assert isinstance(out.past_key_values, DeciLMCache) and out.past_key_values.get_seq_length() == 5
    cached = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert cached.tolist() == model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False).tolist()


def test_left_padding_gives_the_same_logits_as_unpadded():
    model = decilm_model([("window", "full"), ("gqa2", "narrow"), ("no_op", "full")])
    gen = torch.Generator().manual_seed(4)
    long_seq, short_seq = torch.randint(1, 128, (1, 9), generator=gen), torch.randint(1, 128, (1, 6), generator=gen)
    batch = torch.cat([long_seq, torch.cat([torch.zeros(1, 3, dtype=torch.long), short_seq], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, position_ids=position_ids).logits
        alone = model(short_seq).logits
    torch.testing.assert_close(padded[1, 3:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[0], model(long_seq).logits[0], atol=1e-5, rtol=1e-5)


def test_batched_generate_with_left_padding_matches_single_sequences():
    model = decilm_model([("gqa2", "full"), ("window", "narrow")], seed=5)
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randint(1, 128, (1, 7), generator=gen), torch.randint(1, 128, (1, 4), generator=gen)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out[0, 7:].tolist() == model.generate(a, max_new_tokens=6, do_sample=False)[0, 7:].tolist()
    assert out[1, 7:].tolist() == model.generate(b, max_new_tokens=6, do_sample=False)[0, 4:].tolist()


def test_window_cache_keeps_only_the_window():
    model = decilm_model([("window", "full"), ("gqa2", "full")])
    cache = model(torch.randint(0, 128, (1, 10)), use_cache=True).past_key_values
    assert cache.layers[0].keys.shape[2] == 3  # window 4: the last 3 tokens plus the next one
    assert cache.layers[1].keys.shape[2] == 10
    assert cache.get_seq_length() == 10


def test_hidden_states_are_embeddings_and_each_layer_output_before_the_final_norm():
    model = decilm_model([("gqa2", "full"), ("no_op", "narrow"), ("linear", "no_op")])
    out = model(torch.randint(0, 128, (2, 5)), output_hidden_states=True)
    assert len(out.hidden_states) == 4
    normed = model.model.norm(out.hidden_states[-1])
    torch.testing.assert_close(model.lm_head(normed), out.logits)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = decilm_model([("gqa2", "full"), ("window", "narrow"), ("linear", "linear")]).train()
    ids = torch.randint(0, 128, (2, 8))

    def grads():
        model.zero_grad()
        model(ids, labels=ids, use_cache=False).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


def test_ffn_mult_width_follows_vllms_rule():
    from factories import decilm_dict

    from puzzle.checkpoint import build_model, decilm_config

    config = decilm_dict([("gqa2", "full")])
    config["block_configs"][0]["ffn"] = {"ffn_mult": 2.625, "no_op": False, "replace_with_linear": False}
    model = build_model(decilm_config(config))
    # int(2 * 2.625 * 64 / 3) = 112, rounded up to a multiple of 256.
    assert model.model.layers[0].mlp.gate_proj.out_features == 256


@pytest.mark.parametrize("field", ["routing", "expert_activation"])
def test_unknown_moe_rule_is_refused_not_guessed(field):
    config = decilm_config(decilm_dict([("full", "moe")]))
    setattr(config.block_configs[0].ffn.moe, field, "sparsemixer")  # as a newer puzzle might write
    with pytest.raises(ValueError, match=f"ffn.moe.{field} 'sparsemixer' is not known"):
        build_model(config)
