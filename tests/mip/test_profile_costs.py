"""The MIP's memory and KV targets use the profile's costs: every kept expert's bytes, KV at profile.kv_dtype."""

import pytest
from factories import decilm_model

from puzzle.arch import Architecture
from puzzle.blocks.library import Manifest
from puzzle.errors import InfeasibleError
from puzzle.mip import Targets, solve
from puzzle.mip.metrics import parent_metrics
from puzzle.mip.stage import build_problem
from puzzle.profiling import ProfileConfig, profile_variants
from puzzle.scoring import Scores

BATCH, CONTEXT = 8, 64


def _parent_only_problem(kv_dtype: str):
    """A search space holding only the parent's variants (no candidates), costed by an analytic profile."""
    model = decilm_model([("gqa2", "moe"), ("kv1", "moe")])
    arch = Architecture.from_config(model.config.to_dict())
    variants = [(kind, v) for b in arch.blocks for kind, v in (("attention", b.attention), ("ffn", b.ffn))]
    cfg = ProfileConfig(batch_size=BATCH, context_len=CONTEXT, analytic=True, device="cpu", kv_dtype=kv_dtype)
    profile = profile_variants(model.config, variants, cfg)
    manifest = Manifest(parent_fingerprint="p", num_layers=arch.num_layers, space={})
    scores = Scores(parent_fingerprint="p", weights="bld", tokens=0, parent_lm_loss=0.0)
    return arch, build_problem(manifest, scores, profile, arch)


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_memory_counts_every_expert_and_the_kv_cache_at_the_profile_kv_dtype(kv_dtype):
    arch, problem = _parent_only_problem(kv_dtype)
    metrics = parent_metrics(problem, batch_size=BATCH, context_len=CONTEXT)
    assert metrics.param_bytes == arch.total_params() * 2  # bf16 weights, all four experts of each layer
    assert metrics.kv_bytes_per_token == arch.kv_bytes_per_token(kv_dtype)
    assert metrics.memory_bytes == metrics.param_bytes + arch.kv_cache_bytes(BATCH, CONTEXT, kv_dtype)


def test_a_memory_target_only_fp8_kv_meets_is_infeasible_with_bf16_kv():
    bf16 = parent_metrics(_parent_only_problem("bf16")[1], batch_size=BATCH, context_len=CONTEXT).memory_bytes
    fp8 = parent_metrics(_parent_only_problem("fp8")[1], batch_size=BATCH, context_len=CONTEXT).memory_bytes
    assert fp8 < bf16
    targets = Targets(batch_size=BATCH, context_len=CONTEXT, max_memory_bytes=(fp8 + bf16) // 2)
    assert solve(_parent_only_problem("fp8")[1], targets).score == 0.0
    with pytest.raises(InfeasibleError, match="memory <= .* is infeasible"):
        solve(_parent_only_problem("bf16")[1], targets)
