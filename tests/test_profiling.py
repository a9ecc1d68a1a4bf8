"""Profiling: what each variant costs in memory is the deployed child's, whatever device and dtype timed it; experts
cost decode what the batch routes to; KV bytes follow profile.kv_dtype."""

import itertools
from dataclasses import replace

import pytest
import torch
from factories import GPT_OSS_MOE, decilm_model

from puzzle.arch import Architecture, FFNConfig, ModelShape, MoEConfig, ffn_params
from puzzle.errors import ConfigError
from puzzle.profiling import (
    Hardware,
    Profile,
    ProfileConfig,
    analytic_timing,
    eager_variants,
    expected_active_experts,
    moe_param_split,
    profile_variants,
    timing_method,
)

TINY = dict(batch_size=2, context_len=16, prompt_len=8, repeats=1, inner=1, warmup=0, stack=1, device="cpu")


def _variants(arch: Architecture):
    return [(kind, v) for b in arch.blocks for kind, v in (("attention", b.attention), ("ffn", b.ffn)) if not v.no_op]


@pytest.mark.parametrize("param_dtype,bytes_per_param", [("bf16", 2), ("fp8", 1), ("fp32", 4)])
def test_parameter_bytes_are_counted_at_the_deployment_dtype_not_the_profiling_dtype(param_dtype, bytes_per_param):
    model = decilm_model([("gqa2", "full"), ("linear", "narrow"), ("no_op", "linear")])
    arch = Architecture.from_config(model.config.to_dict())
    profile = profile_variants(model.config, _variants(arch), ProfileConfig(**TINY, param_dtype=param_dtype))
    assert profile.dtype == "float32"  # timed in fp32 on the CPU ...
    total = profile.fixed.param_bytes + sum(
        profile.cost(kind, v).param_bytes for b in arch.blocks for kind, v in (("attention", b.attention), ("ffn", b.ffn))
        if not v.no_op)
    assert total == arch.total_params() * bytes_per_param  # ... but the weights count as deployed


def test_an_unknown_deployment_dtype_is_refused():
    with pytest.raises(ConfigError, match="'int3' is not known"):
        ProfileConfig(param_dtype="int3")


# ---- mixture of experts: decode reads the experts the batch routes to, memory holds all of them ------------------


def test_expected_active_experts_equals_enumerating_every_routing():
    experts, per_token, tokens = 4, 2, 3
    choices = list(itertools.combinations(range(experts), per_token))
    distinct = [len(set().union(*routing)) for routing in itertools.product(choices, repeat=tokens)]
    assert expected_active_experts(experts, per_token, tokens) == pytest.approx(sum(distinct) / len(distinct), rel=1e-12)


def test_one_token_reads_k_experts_and_a_large_batch_reads_nearly_all():
    assert expected_active_experts(32, 4, 1) == pytest.approx(4, rel=1e-12)
    assert expected_active_experts(32, 4, 64) == pytest.approx(32 * (1 - (28 / 32) ** 64), rel=1e-12)
    assert 31.9 < expected_active_experts(32, 4, 64) < 32
    assert expected_active_experts(8, 8, 1) == pytest.approx(8, rel=1e-12)  # every token uses every expert


def _moe_shape_and_ffn(experts: int = 8, per_token: int = 2, width: int = 32) -> tuple[ModelShape, FFNConfig]:
    shape = ModelShape(hidden_size=64, num_attention_heads=4, head_dim=16, vocab_size=128)
    moe = MoEConfig(num_local_experts=experts, num_experts_per_tok=per_token, expert_intermediate_dim=width,
                    norm_topk_prob=True)
    return shape, FFNConfig(moe=moe)


def test_moe_param_split_is_the_norm_and_router_plus_one_gated_expert_each():
    shape, ffn = _moe_shape_and_ffn()
    shared, expert = moe_param_split(shape, ffn.moe)
    assert expert == 3 * 64 * 32  # gate, up, down; Mixtral experts have no biases
    assert shared == 64 + 8 * 64  # input norm + router rows
    assert shared + 8 * expert == ffn_params(shape, ffn)


def test_moe_param_split_of_biased_gpt_oss_experts():
    shape, ffn = _moe_shape_and_ffn()
    moe = MoEConfig.from_dict(GPT_OSS_MOE)  # router and expert biases
    shared, expert = moe_param_split(shape, moe)
    width = moe.expert_intermediate_dim
    assert expert == 3 * 64 * width + 2 * width + 64
    assert shared == 64 + moe.num_local_experts * (64 + 1)
    assert shared + moe.num_local_experts * expert == ffn_params(shape, FFNConfig(moe=moe))


# Bandwidth-bound hardware (compute practically free) isolates the bytes the estimate moves.
BYTES_ONLY = Hardware(name="bytes", memory_bandwidth=1.0, flops=1e30)


@pytest.mark.parametrize("batch", [1, 4, 512])
def test_analytic_moe_decode_reads_the_experts_the_batch_routes_to(batch):
    shape, ffn = _moe_shape_and_ffn()
    cfg = ProfileConfig(batch_size=batch, analytic=True, hardware=BYTES_ONLY)
    shared, expert = moe_param_split(shape, ffn.moe)
    activations = 2 * batch * shape.hidden_size * 2
    seconds = analytic_timing(shape, "ffn", ffn, cfg, dtype_bytes=2).decode_time_s
    assert seconds == pytest.approx((shared + expected_active_experts(8, 2, batch) * expert) * 2 + activations, rel=1e-12)
    if batch == 1:
        assert seconds == pytest.approx((shared + 2 * expert) * 2 + activations, rel=1e-12)  # k experts, not E


def test_analytic_moe_flops_count_k_experts_per_token():
    shape, ffn = _moe_shape_and_ffn()
    flops_only = Hardware(name="flops", memory_bandwidth=1e30, flops=1.0)
    cfg = ProfileConfig(batch_size=16, analytic=True, hardware=flops_only)
    shared, expert = moe_param_split(shape, ffn.moe)
    assert analytic_timing(shape, "ffn", ffn, cfg, 2).decode_time_s == pytest.approx(2 * 16 * (shared + 2 * expert))


def test_moe_parameter_bytes_hold_every_kept_expert_and_pruning_lowers_decode_at_large_batch():
    model = decilm_model([("gqa2", "moe")])
    arch = Architecture.from_config(model.config.to_dict())
    moe = arch.blocks[0].ffn
    pruned = FFNConfig(moe=replace(moe.moe, num_local_experts=2))
    cfg = ProfileConfig(**(TINY | dict(batch_size=256)), analytic=True, hardware=BYTES_ONLY)
    profile = profile_variants(model.config, [("ffn", moe), ("ffn", pruned)], cfg)
    assert profile.cost("ffn", moe).param_bytes == ffn_params(arch.shape, moe) * 2
    assert profile.cost("ffn", pruned).param_bytes < profile.cost("ffn", moe).param_bytes
    assert profile.cost("ffn", pruned).decode_time_s < profile.cost("ffn", moe).decode_time_s
    assert {v.method for v in profile.variants} == {"analytic"}


def test_moe_variants_are_timed_on_cpu_and_in_cuda_graphs_on_cuda(tmp_path):
    model = decilm_model([("gqa2", "moe")])
    arch = Architecture.from_config(model.config.to_dict())
    profile = profile_variants(model.config, _variants(arch), ProfileConfig(**TINY))
    assert all(v.decode_time_s > 0 and v.method == "cpu" for v in profile.variants)
    profile.save(tmp_path / "profile.json")
    assert Profile.load(tmp_path / "profile.json") == profile
    # experts are captured in their grouped-GEMM form (puzzle.grouped_moe) like every other layer
    assert timing_method(ProfileConfig(), torch.device("cuda")) == "cuda_graphs"
    assert timing_method(ProfileConfig(cuda_graphs=False), torch.device("cuda")) == "cuda"


def test_eager_variants_lists_moe_variants_of_an_older_cuda_graphs_profile():
    model = decilm_model([("gqa2", "moe")])
    arch = Architecture.from_config(model.config.to_dict())
    profile = profile_variants(model.config, _variants(arch), ProfileConfig(**TINY))
    graphs = replace(profile, method="cuda_graphs", variants=tuple(
        replace(v, method="cuda" if v.kind == "ffn" else "cuda_graphs") for v in profile.variants))
    assert eager_variants(graphs) == ["moe_k4_top2"]
    assert eager_variants(profile) == []  # a CPU profile has no graphs to leave out


# ---- KV-cache dtype ------------------------------------------------------------------------------------------


def test_kv_dtype_defaults_to_the_deployment_dtype():
    assert ProfileConfig().kv_dtype == "bf16"
    assert ProfileConfig(param_dtype="fp32").kv_dtype == "fp32"
    assert ProfileConfig(param_dtype="fp32", kv_dtype="fp8").kv_dtype == "fp8"


def test_an_unknown_kv_dtype_is_refused():
    with pytest.raises(ConfigError, match="kv_dtype 'int4' is not known"):
        ProfileConfig(kv_dtype="int4")


def test_fp8_kv_halves_kv_bytes_and_the_analytic_kv_reads():
    model = decilm_model([("gqa2", "full")])
    arch = Architecture.from_config(model.config.to_dict())
    attention = arch.blocks[0].attention
    profiles = {kv: profile_variants(model.config, [("attention", attention)],
                                     ProfileConfig(**TINY, analytic=True, hardware=BYTES_ONLY, kv_dtype=kv))
                for kv in ("bf16", "fp8")}
    bf16, fp8 = (profiles[kv].cost("attention", attention) for kv in ("bf16", "fp8"))
    assert bf16.kv_bytes_per_token == 2 * fp8.kv_bytes_per_token == arch.kv_bytes_per_token("bf16")
    # decode reads batch x context cached tokens; fp8 saves half of those bytes and nothing else
    kv_read = TINY["batch_size"] * TINY["context_len"] * bf16.kv_bytes_per_token
    assert bf16.decode_time_s - fp8.decode_time_s == pytest.approx(kv_read / 2, rel=1e-12)
    assert profiles["fp8"].config["kv_dtype"] == "fp8"
