"""Heterogeneous Llama-family decoder (DeciLM / "nemotron-nas"): every layer has its own attention and FFN.

Follows transformers' `models/llama/modeling_llama.py`. Per layer, `config.block_configs[i]` picks
  attention: softmax GQA with any number of KV heads (`n_heads_in_group`), optionally a sliding window
             (`window_length`), a linear replacement (one hidden x hidden matrix) or no-op;
  ffn:       SwiGLU of any width (`intermediate_size`, or NVIDIA's older `ffn_mult`), a mixture of gated
             experts (`moe`: Mixtral / Qwen3-MoE / gpt-oss routing and activations, any number of experts per
             layer), a linear replacement, or no-op.
Global options cover the families puzzle converts: Llama-3 RoPE scaling (any transformers RoPE type), Qwen2
q/k/v bias, Qwen3 per-head q/k RMSNorm, Mistral/Qwen2 sliding windows, gpt-oss attention sinks, tied embeddings.

This file is copied into every puzzle checkpoint and loaded with `trust_remote_code=True` where puzzle is
not installed, so it imports only torch and public transformers APIs (transformers >= 5.17).

The generation cache has had two names: `past_key_values` (transformers <= 5.19) and `cache` (5.20 on,
where `generate` passes only `cache` and model outputs carry a `cache` field). The models take either name
and return the cache under the installed release's field name (`_with_cache`).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_decilm import DeciLMConfig

# The name of the cache field of model outputs in the installed transformers ("cache" from 5.20 on).
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _given_cache(cache, past_key_values):
    """The cache a caller passed, under either name (`generate` of transformers >= 5.20 passes `cache`)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def _with_cache(output_cls, cache, **fields):
    """A model output holding `cache` under the field name of the installed transformers release."""
    return output_cls(**{_CACHE_FIELD: cache}, **fields)


# ----------------------------------------------------------------------------------------------------------
# Reading block_configs (the same rules as vLLM's nemotron_nas.py)


def _find_multiple(n, k):
    return n if n % k == 0 else n + k - (n % k)


def ffn_intermediate_size(ffn, hidden_size):
    """FFN width of a block: `intermediate_size`, or NVIDIA's `ffn_mult` rounded up to a multiple of 256."""
    if getattr(ffn, "intermediate_size", None) is not None:
        return ffn.intermediate_size
    return _find_multiple(int(2 * ffn.ffn_mult * hidden_size / 3), 256)


def has_softmax_attention(attention):
    """True when the layer keeps real attention (and therefore a KV cache)."""
    return not (getattr(attention, "no_op", False) or getattr(attention, "replace_with_linear", False))


# ----------------------------------------------------------------------------------------------------------
# Math


class DeciLMRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        # One fused kernel (it accumulates in fp32): at decode the unfused pow / mean / rsqrt / scale chain cost as
        # much as a small FFN's matmuls. In bf16 the result can differ from Llama's unfused form in the last bit.
        if hidden_states.dtype == self.weight.dtype:
            return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)
        input_dtype = hidden_states.dtype  # mixed dtypes (fp32 weights under autocast): Llama's exact form
        normed = F.rms_norm(hidden_states.to(torch.float32), self.weight.shape, eps=self.variance_epsilon)
        return self.weight * normed.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class DeciLMRotaryEmbedding(nn.Module):
    """Rotary embedding shared by all layers; any RoPE type transformers knows (default, llama3, yarn, ...)."""

    def __init__(self, config):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, **kwargs):
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """q: (B, H, T, D), k: (B, KV, T, D), cos/sin: (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def attention_mask_for(padding_mask, past_len, q_len, kv_len, window, device):
    """Boolean mask (B|1, 1, q_len, kv_len), True = attend, or None when plain causal attention suffices.

    The kv_len keys are the most recent of the past_len + q_len tokens (a window cache drops older ones);
    `padding_mask` (B, past_len + q_len), 1 for real tokens, covers all of them.
    """
    total = past_len + q_len
    # One new token whose cached keys all lie inside its window (a window cache keeps exactly those): no mask.
    window_covers = window is None or window >= total or (q_len == 1 and kv_len <= window)
    if padding_mask is None and window_covers:
        if q_len == kv_len:
            return "causal"
        if q_len == 1:
            return None
    q_pos = torch.arange(past_len, total, device=device)[:, None]  # (q, 1)
    k_pos = torch.arange(total - kv_len, total, device=device)[None, :]  # (1, kv)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    allowed = allowed[None, None]  # (1, 1, q, kv)
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, total - kv_len : total].bool()
    # A query that may see no key at all (a left-padding position) would give NaN; let it see everything.
    return allowed | ~allowed.any(dim=-1, keepdim=True)


class MaskProvider:
    """Builds each layer's attention mask on demand, once per (kv_len, window), shared by the layers."""

    def __init__(self, padding_mask, past_len, q_len, device):
        self.padding_mask, self.past_len, self.q_len, self.device = padding_mask, past_len, q_len, device
        self._masks = {}

    def __call__(self, kv_len, window):
        key = (kv_len, window)
        if key not in self._masks:
            self._masks[key] = attention_mask_for(self.padding_mask, self.past_len, self.q_len, kv_len, window, self.device)
        return self._masks[key]


def attention_with_sinks(q, k, v, mask, sinks, scaling):
    """gpt-oss attention (transformers' GptOss eager_attention_forward): each head's softmax has one more logit,
    the head's learned sink, whose probability is dropped, so a head may give its keys less than full weight.

    q: (B, H, T, D), k/v: (B, KV, S, D), mask: "causal", None or bool (B|1, 1, T, S) with True = attend,
    sinks: (H,). Returns (B, H, T, D).
    """
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    logits = torch.matmul(q, k.transpose(2, 3)) * scaling  # (B, H, T, S)
    if isinstance(mask, str):  # "causal": the T queries are the last T of the S keys
        mask = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    if mask is not None:
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1).to(logits.dtype)  # (B, H, T, 1)
    combined = torch.cat([logits, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values  # as transformers: no overflow in bf16
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]  # the sink's share is dropped
    return torch.matmul(probs.to(v.dtype), v)


# Attention implementations this file computes itself (SDPA, or the eager sink form); any other registered one
# (`config._attn_implementation`, e.g. vLLM's "vllm" in its Transformers backend) is called through transformers'
# attention interface and then owns masking, the KV cache and the sliding window.
_OWN_ATTENTION = (None, "sdpa", "eager")


class DeciLMAttention(nn.Module):
    """Softmax attention with this layer's number of KV heads, optional sliding window and optional sinks."""

    is_causal = True

    def __init__(self, config, layer_idx, attention):
        super().__init__()
        self.config = config  # read for `_attn_implementation` (and by vLLM's Transformers backend)
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_attention_heads // attention.n_heads_in_group
        self.num_key_value_groups = attention.n_heads_in_group  # read by transformers' attention functions
        self.window = getattr(attention, "window_length", None)
        if self.window is not None and getattr(config, "_attn_implementation", None) == "vllm":
            # vLLM's attention function ignores `sliding_window=`: the layer would silently attend to everything.
            raise NotImplementedError(f"layer {layer_idx}: vLLM's Transformers backend does not apply DeciLM's "
                                      f"per-layer sliding window (window_length={self.window})")
        self.scaling = self.head_dim**-0.5
        qkv_bias = getattr(config, "qkv_bias", config.attention_bias)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_bias)
        if getattr(config, "qk_norm", False):  # Qwen3: RMSNorm over each head's dimension, before RoPE
            self.q_norm = DeciLMRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = DeciLMRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # gpt-oss: one learned sink logit per query head (0 until loaded: the sink then weighs as one key of logit 0).
        self.sinks = nn.Parameter(torch.zeros(self.num_heads)) if getattr(config, "attention_sinks", False) else None

    def forward(self, hidden_states, position_embeddings, masks, past_key_values=None):
        bsz, q_len, _ = hidden_states.shape
        hidden_shape = (bsz, q_len, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)  # (B, T, H, D)
        k = self.k_proj(hidden_states).view(hidden_shape)  # (B, T, KV, D)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, KV, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        mask = masks(k.shape[2], self.window)
        implementation = getattr(self.config, "_attn_implementation", None)
        if implementation not in _OWN_ATTENTION:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, None)
            out, _ = attention_interface(
                self, q, k, v,
                None if mask is None or isinstance(mask, str) else mask,
                dropout=0.0,
                scaling=self.scaling,
                sliding_window=self.window,
                s_aux=self.sinks,
            )  # (B, T, H, D), or (B * T, H * D) from vLLM
            return self.o_proj(out.reshape(bsz, q_len, -1))
        if self.sinks is not None:  # SDPA has no sink logit; the eager form is transformers' own
            out = attention_with_sinks(q, k, v, mask, self.sinks, self.scaling)  # (B, H, T, D)
            return self.o_proj(out.transpose(1, 2).reshape(bsz, q_len, -1))
        is_causal = isinstance(mask, str)  # "causal": no mask tensor needed, SDPA's own causal path
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=None if is_causal else mask,
            is_causal=is_causal,
            scale=self.scaling,
            enable_gqa=self.num_key_value_heads != self.num_heads,
        )  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(bsz, q_len, -1)
        return self.o_proj(out)


class DeciLMLinearAttention(nn.Module):
    """Attention replaced by one linear map (Puzzle's `replace_with_linear`); no KV cache."""

    def __init__(self, config):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings=None, masks=None, past_key_values=None):
        return self.linear_attn(hidden_states)


class DeciLMMLP(nn.Module):
    """Gated FFN (SwiGLU for Llama): down(act(gate(x)) * up(x))."""

    def __init__(self, config, intermediate_size, bias=None):
        super().__init__()
        bias = getattr(config, "mlp_bias", False) if bias is None else bias
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def activate(self, gate, up):
        """The gated activation between the projections (also applied to stacked experts' outputs)."""
        return self.act_fn(gate) * up

    def forward(self, x):
        return self.down_proj(self.activate(self.gate_proj(x), self.up_proj(x)))


def clamped_swiglu(gate, up, alpha, limit):
    """gpt-oss's expert activation (transformers' GptOssExperts._apply_gate): the gate clamped above and the up
    projection on both sides at `limit`, then (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up + 1) * glu


class DeciLMClampedMLP(DeciLMMLP):
    """A gpt-oss expert: gate / up / down projections with biases and the clamped SwiGLU. gpt-oss stores gate and
    up interleaved in one tensor; puzzle splits them on conversion, so the names are the Llama names."""

    def __init__(self, config, intermediate_size, bias, alpha, limit):
        super().__init__(config, intermediate_size, bias)
        self.alpha, self.limit = alpha, limit

    def activate(self, gate, up):
        return clamped_swiglu(gate, up, self.alpha, self.limit)


def route_tokens(router_logits, top_k, norm_topk_prob, routing="softmax_topk"):
    """Routing weights (N, top_k) and expert indices (N, top_k) from router_logits (N, E).

    "softmax_topk" (Mixtral / Qwen3-MoE): softmax over the experts in fp32, the top-k, optionally renormalised.
    "topk_softmax" (gpt-oss): the top-k logits, then a softmax over those k in the logits' dtype.
    """
    if routing == "topk_softmax":
        top, experts = torch.topk(router_logits, top_k, dim=-1)  # (N, top_k)
        return F.softmax(top, dim=-1, dtype=top.dtype), experts
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float)  # (N, E)
    weights, experts = torch.topk(probs, top_k, dim=-1)  # (N, top_k)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


_ROUTINGS = ("softmax_topk", "topk_softmax")
_EXPERT_ACTIVATIONS = ("swiglu", "clamped_swiglu")


def _expert(config, moe):
    """One expert module of an MoE layer: a plain SwiGLU, or gpt-oss's clamped one."""
    activation = getattr(moe, "expert_activation", "swiglu")
    if activation not in _EXPERT_ACTIVATIONS:  # a checkpoint newer than this file: refuse, do not guess
        raise ValueError(f"config.json: ffn.moe.expert_activation {activation!r} is not known to this modeling file "
                         f"(known: {', '.join(_EXPERT_ACTIVATIONS)}); use the modeling_decilm.py of a newer puzzle")
    bias = getattr(moe, "expert_bias", False) or None  # None: the global mlp_bias, as Mixtral / Qwen3-MoE experts
    if activation == "clamped_swiglu":
        return DeciLMClampedMLP(config, moe.expert_intermediate_dim, bias, moe.swiglu_alpha, moe.swiglu_limit)
    return DeciLMMLP(config, moe.expert_intermediate_dim, bias)


class DeciLMSparseMoE(nn.Module):
    """Mixture of gated experts (transformers' MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock / GptOssMLP).

    The router (`gate`) scores this layer's experts; each token goes through its `num_experts_per_tok` best
    experts, whose outputs are summed with the routing weights. Experts are plain `DeciLMMLP`s, one module each,
    so a layer keeps any subset of a parent's experts (expert pruning) under ordinary per-expert weight names.
    """

    def __init__(self, config, moe):
        super().__init__()
        self.top_k = moe.num_experts_per_tok
        self.norm_topk_prob = moe.norm_topk_prob
        self.routing = getattr(moe, "routing", "softmax_topk")
        if self.routing not in _ROUTINGS:
            raise ValueError(f"config.json: ffn.moe.routing {self.routing!r} is not known to this modeling file "
                             f"(known: {', '.join(_ROUTINGS)}); use the modeling_decilm.py of a newer puzzle")
        self.gate = nn.Linear(config.hidden_size, moe.num_local_experts, bias=getattr(moe, "router_bias", False))
        self.experts = nn.ModuleList([_expert(config, moe) for _ in range(moe.num_local_experts)])

    def forward(self, x):
        bsz, seq_len, hidden = x.shape
        x = x.reshape(-1, hidden)  # (N, C)
        weights, chosen = route_tokens(self.gate(x), self.top_k, self.norm_topk_prob, self.routing)  # (N, top_k) each
        out = torch.zeros_like(x)
        # Only the experts some token chose run, in ascending order as in transformers (same sums, same bits).
        for expert in torch.unique(chosen).tolist():
            token, slot = torch.where(chosen == expert)
            y = self.experts[expert](x[token]) * weights[token, slot, None]  # (n, C), fp32 weights as Mixtral
            out.index_add_(0, token, y.to(out.dtype))
        return out.view(bsz, seq_len, hidden)


class DeciLMLinearMLP(nn.Module):
    """FFN replaced by one linear map (Puzzle's `replace_with_linear`)."""

    def __init__(self, config):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


class DeciLMDecoderLayer(nn.Module):
    """Pre-norm residual block; a no-op sub-block has no module and no norm."""

    def __init__(self, config, layer_idx):
        super().__init__()
        block = config.block_configs[layer_idx]
        attention, ffn = block.attention, block.ffn
        self.self_attn = self.input_layernorm = None
        if not getattr(attention, "no_op", False):
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            if getattr(attention, "replace_with_linear", False):
                self.self_attn = DeciLMLinearAttention(config)
            else:
                self.self_attn = DeciLMAttention(config, layer_idx, attention)
        self.mlp = self.post_attention_layernorm = None
        if not getattr(ffn, "no_op", False):
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            if getattr(ffn, "replace_with_linear", False):
                self.mlp = DeciLMLinearMLP(config)
            elif getattr(ffn, "moe", None) is not None:
                self.mlp = DeciLMSparseMoE(config, ffn.moe)
            else:
                self.mlp = DeciLMMLP(config, ffn_intermediate_size(ffn, config.hidden_size))

    def attention_branch(self, hidden_states, position_embeddings=None, masks=None, past_key_values=None):
        """What the attention sub-block adds to the residual stream (None for a no-op)."""
        if self.self_attn is None:
            return None
        return self.self_attn(self.input_layernorm(hidden_states), position_embeddings, masks, past_key_values)

    def ffn_branch(self, hidden_states):
        """What the FFN sub-block adds to the residual stream (None for a no-op)."""
        if self.mlp is None:
            return None
        return self.mlp(self.post_attention_layernorm(hidden_states))

    def forward(self, hidden_states, position_embeddings=None, masks=None, past_key_values=None):
        if self.self_attn is not None:
            residual = hidden_states
            hidden_states = residual + self.attention_branch(hidden_states, position_embeddings, masks, past_key_values)
        if self.mlp is not None:
            residual = hidden_states
            hidden_states = residual + self.ffn_branch(hidden_states)
        return hidden_states


# ----------------------------------------------------------------------------------------------------------
# KV cache


class DeciLMCache(DynamicCache):
    """KV cache for heterogeneous layers.

    Layers with softmax attention get a cache layer (a window layer keeps only its window); no-op and linear
    layers hold nothing. The sequence length is read from the first attention layer, so a model whose layer 0
    has no attention still reports the right length to `generate`; a model with no attention at all counts
    tokens itself.
    """

    def __init__(self, config):
        layers = []
        for block in config.block_configs:
            window = getattr(block.attention, "window_length", None)
            layers.append(DynamicSlidingWindowLayer(sliding_window=window) if window else DynamicLayer())
        Cache.__init__(self, layers=layers)
        self.attention_layers = [
            i for i, block in enumerate(config.block_configs) if has_softmax_attention(block.attention)
        ]
        self.tokens_seen = 0  # only read when there is no attention layer

    def get_seq_length(self, layer_idx=0):
        if not self.attention_layers:
            return self.tokens_seen
        if layer_idx not in self.attention_layers:
            layer_idx = self.attention_layers[0]
        return self.layers[layer_idx].get_seq_length()

    def crop(self, max_length):
        super().crop(max_length)
        self.tokens_seen = self.tokens_seen + max_length if max_length < 0 else min(self.tokens_seen, max_length)


def _past_length(cache, config):
    if cache is None:
        return 0
    if isinstance(cache, DeciLMCache):
        return cache.get_seq_length()
    first = next((i for i, b in enumerate(config.block_configs) if has_softmax_attention(b.attention)), 0)
    return cache.get_seq_length(first)


# ----------------------------------------------------------------------------------------------------------
# Models


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeciLMDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True  # attention dispatches through ALL_ATTENTION_FUNCTIONS (DeciLMAttention)

    @classmethod
    def _supports_default_dynamic_cache(cls):
        # `generate` must not build a plain DynamicCache: the model creates its own DeciLMCache.
        return False


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DeciLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeciLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        past_key_values=None,
        **kwargs,
    ):
        """`hidden_states` (when asked) are the embeddings and each layer's output, all before the final norm.

        The KV cache comes as `cache` or, from older callers, `past_key_values`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        past_key_values = _given_cache(cache, past_key_values)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and past_key_values is None:
            past_key_values = DeciLMCache(self.config)
        if not use_cache:
            past_key_values = None

        bsz, q_len, _ = inputs_embeds.shape
        past_len = _past_length(past_key_values, self.config)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + q_len, device=inputs_embeds.device)[None]
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("DeciLM expects a 2D padding attention_mask (batch, past + new tokens)")
        padding_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        masks = MaskProvider(padding_mask, past_len, q_len, inputs_embeds.device)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, position_embeddings, masks, past_key_values
                )
            else:
                hidden_states = layer(hidden_states, position_embeddings, masks, past_key_values)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        if isinstance(past_key_values, DeciLMCache):
            past_key_values.tokens_seen += q_len
        hidden_states = self.norm(hidden_states)
        return _with_cache(
            BaseModelOutputWithPast,
            past_key_values,
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        logits_to_keep=0,
        return_dict=None,
        past_key_values=None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_given_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return _with_cache(
            CausalLMOutputWithPast,
            getattr(outputs, _CACHE_FIELD),
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
        )


__all__ = ["DeciLMForCausalLM", "DeciLMModel", "DeciLMPreTrainedModel", "DeciLMCache"]
