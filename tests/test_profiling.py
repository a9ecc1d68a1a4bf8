"""Profiling: what each variant costs in memory is the deployed child's, whatever device and dtype timed it."""

import pytest
from factories import decilm_model

from puzzle.arch import Architecture
from puzzle.errors import ConfigError
from puzzle.profiling import ProfileConfig, profile_variants

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
