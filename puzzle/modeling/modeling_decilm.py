"""Heterogeneous Llama-family decoder (DeciLM / "nemotron-nas"): every layer has its own attention and FFN.

Follows transformers' `models/llama/modeling_llama.py`. Per layer, `config.block_configs[i]` picks
  attention: softmax GQA with any number of KV heads (`n_heads_in_group`), optionally a sliding window
             (`window_length`), a linear replacement (one hidden x hidden matrix) or no-op;
  ffn:       SwiGLU of any width (`intermediate_size`, or NVIDIA's older `ffn_mult`), a mixture of gated
             experts (`moe`: Mixtral / Qwen3-MoE / gpt-oss routing and activations, any number of experts per
             layer), a linear replacement, or no-op.
Global options cover the families puzzle converts: Llama-3 RoPE scaling (any transformers RoPE type), Qwen2
q/k/v bias, Qwen3 per-head q/k RMSNorm, Mistral/Qwen2 sliding windows, gpt-oss attention sinks, tied embeddings.
Hybrid Mamba-Transformer parents (Nemotron-H, transformers' `models/nemotron_h`) use the same layers: a Mamba-2
mixer sits in the attention slot (`attention.mamba`, NVIDIA's field; its decode state lives in `DeciLMMambaLayer`),
the relu2 MLP is an FFN with `gated: false`, attention has no positional embedding (`position_embedding_type:
none`), and the experts route by grouped sigmoid scores with a shared expert.

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


def mamba_settings(attention):
    """The Mamba-2 settings of a layer whose sequence mixer is Mamba (None otherwise)."""
    return None if getattr(attention, "no_op", False) else getattr(attention, "mamba", None)


def has_softmax_attention(attention):
    """True when the layer keeps real attention (and therefore a KV cache)."""
    return not (getattr(attention, "no_op", False) or getattr(attention, "replace_with_linear", False)
                or mamba_settings(attention) is not None)


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
        self.rope = getattr(config, "position_embedding_type", "rope") != "none"  # Nemotron-H: no positions at all

    def forward(self, hidden_states, position_embeddings, masks, past_key_values=None):
        bsz, q_len, _ = hidden_states.shape
        hidden_shape = (bsz, q_len, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)  # (B, T, H, D)
        k = self.k_proj(hidden_states).view(hidden_shape)  # (B, T, KV, D)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, KV, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.rope:
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


# ----------------------------------------------------------------------------------------------------------
# Mamba-2 (Nemotron-H's mixer; the chunked scan and the one-token update follow transformers' PyTorch reference
# in models/nemotron_h, so converted parents match it; no mamba_ssm / causal_conv1d kernels are needed)


class DeciLMGatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z) over groups of channels (one group per Mamba B/C group), in fp32."""

    def __init__(self, hidden_size, group_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size, self.variance_epsilon = group_size, eps

    def forward(self, hidden_states, gate):
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32) * F.silu(gate.to(torch.float32))
        x = x.view(*x.shape[:-1], -1, self.group_size)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.view(*x.shape[:-2], -1).to(input_dtype)


def _segment_sum(x):
    """(..., T) -> (..., T, T): out[..., i, j] = sum(x[..., j + 1 : i + 1]) for j <= i, -inf above the diagonal."""
    t = x.size(-1)
    x = x[..., None].expand(*x.size(), t)
    x = x.masked_fill(~torch.tril(torch.ones(t, t, device=x.device, dtype=torch.bool), diagonal=-1), 0)
    x = torch.cumsum(x, dim=-2)
    return x.masked_fill(~torch.tril(torch.ones(t, t, device=x.device, dtype=torch.bool), diagonal=0), -torch.inf)


def mamba_chunk_scan(x, dt, A, B, C, D, chunk_size, initial_state=None):
    """The selective scan over a whole sequence in chunks (Mamba-2's SSD form), in fp32.

    x: (b, T, h, p), dt: (b, T, h) already softplus'd and clamped, A: (h,), B/C: (b, T, g, n), D: (h,),
    initial_state: (b, h, p, n) or None. Returns y (b, T, h, p) and the final state (b, h, p, n).
    """
    b, T, h, p = x.shape
    B = B.float().repeat_interleave(h // B.shape[2], dim=2)  # (b, T, h, n)
    C = C.float().repeat_interleave(h // C.shape[2], dim=2)
    x = x.float()
    pad = (chunk_size - T % chunk_size) % chunk_size
    skip = D[..., None] * F.pad(x, (0, 0, 0, 0, 0, pad))  # (b, T + pad, h, p)
    x = x * dt[..., None].float()
    A = A.to(x.dtype) * dt.float()  # (b, T, h)

    def chunks(t):  # (b, T, ...) -> (b, c, l, ...), zero-padded to whole chunks
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, -1, chunk_size, *t.shape[2:])

    x, A, B, C = chunks(x), chunks(A), chunks(B), chunks(C)
    A = A.permute(0, 3, 1, 2)  # (b, h, c, l)
    A_cumsum = torch.cumsum(A, dim=-1)
    L = torch.exp(_segment_sum(A))  # (b, h, c, l, s): decay from position s to l within a chunk
    y_diag = torch.einsum("bclsh,bcshp->bclhp", torch.einsum("bclhn,bcshn->bclsh", C, B) * L.permute(0, 2, 3, 4, 1), x)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)  # (b, h, c, l)
    states = torch.einsum("bclhn,bclhp->bchpn", B * decay_states.permute(0, 2, 3, 1)[..., None], x)
    previous = torch.zeros_like(states[:, :1]) if initial_state is None else initial_state[:, None].to(states)
    states = torch.cat([previous, states], dim=1)  # (b, c + 1, h, p, n)
    decay_chunk = torch.exp(_segment_sum(F.pad(A_cumsum[:, :, :, -1], (1, 0)))).transpose(1, 3)  # (b, c+1, c+1, h)
    new_states = torch.einsum("bzch,bzhpn->bchpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    y_off = torch.einsum("bclhn,bchpn->bclhp", C, states) * torch.exp(A_cumsum).permute(0, 2, 3, 1)[..., None]
    y = (y_diag + y_off).contiguous().reshape(b, -1, h, p) + skip
    return y[:, :T], final_state


class DeciLMMamba2Mixer(nn.Module):
    """Mamba-2: in_proj -> (z, xBC, dt); causal depthwise conv + act on xBC; selective scan of x with B, C, dt;
    gated RMSNorm with z; out_proj. Weight names are Nemotron-H's (in_proj, conv1d, dt_bias, A_log, D, norm,
    out_proj)."""

    def __init__(self, config, layer_idx, mamba):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = mamba.num_heads, mamba.head_dim
        self.state_dim, self.num_groups = mamba.state_dim, mamba.num_groups
        self.conv_kernel = getattr(mamba, "conv_kernel", 4)
        self.intermediate_size = self.num_heads * self.head_dim
        self.conv_dim = self.intermediate_size + 2 * self.num_groups * self.state_dim
        self.chunk_size = getattr(config, "mamba_chunk_size", 128)
        self.dt_min = getattr(config, "mamba_dt_min", 0.0)  # the chunked scan clamps dt below (Nemotron-H)
        self.act = ACT2FN[getattr(config, "mamba_hidden_act", "silu")]
        proj_bias = getattr(config, "mamba_proj_bias", False)
        self.in_proj = nn.Linear(config.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_kernel, groups=self.conv_dim,
                                padding=self.conv_kernel - 1, bias=getattr(config, "mamba_conv_bias", True))
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = DeciLMGatedRMSNorm(self.intermediate_size, self.intermediate_size // self.num_groups, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=proj_bias)

    def forward(self, hidden_states, state=None, padding_mask=None):
        """hidden_states (b, T, C); `state` this layer's DeciLMMambaLayer (updated in place) or None;
        padding_mask (b, T), 1 for real tokens (padding is zeroed so that it does not enter the state)."""
        b, T, _ = hidden_states.shape
        dtype = hidden_states.dtype
        if padding_mask is not None:
            hidden_states = (hidden_states * padding_mask[:, :, None]).to(dtype)
        z, xBC, dt = self.in_proj(hidden_states).split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        A = -torch.exp(self.A_log.float())

        # Causal conv over the last conv_kernel inputs: the cached ones (zeros at the start) and the new ones.
        xBC = xBC.transpose(1, 2)  # (b, conv_dim, T)
        previous = state.conv if state is not None and state.conv is not None else None
        if previous is None:
            previous = xBC.new_zeros(b, self.conv_dim, self.conv_kernel - 1)
        window = torch.cat([previous.to(xBC.dtype), xBC], dim=-1)  # (b, conv_dim, K - 1 + T)
        if state is not None:
            state.store("conv", window[..., -(self.conv_kernel - 1):].detach())
        weight = self.conv1d.weight
        xBC = F.conv1d(window.to(weight.dtype), weight, self.conv1d.bias, groups=self.conv_dim)  # (b, conv_dim, T)
        xBC = self.act(xBC).to(dtype).transpose(1, 2)  # (b, T, conv_dim)
        if padding_mask is not None:
            xBC = (xBC * padding_mask[:, :, None]).to(dtype)
        x, B, C = xBC.split([self.intermediate_size, self.num_groups * self.state_dim, self.num_groups * self.state_dim], dim=-1)

        if state is not None and state.ssm is not None and T == 1:
            y = self._step(x, dt, A, B, C, state)  # (b, 1, I)
        else:
            dt = F.softplus(dt + self.dt_bias.to(dt.dtype)).clamp(min=self.dt_min)
            y, final = mamba_chunk_scan(
                x.view(b, T, self.num_heads, self.head_dim), dt, A,
                B.view(b, T, self.num_groups, self.state_dim), C.view(b, T, self.num_groups, self.state_dim),
                self.D, self.chunk_size, None if state is None else state.ssm,
            )
            y = y.reshape(b, T, -1)
            if state is not None:
                state.store("ssm", final.to(torch.float32))
        return self.out_proj(self.norm(y, z).to(dtype))

    def _step(self, x, dt, A, B, C, state):
        """One token through the recurrence: state = state * exp(dt A) + dt B x; y = C state + D x (fp32 state).

        The state (b, h, p, n) is the big tensor (4 MiB per sequence at Nemotron-H-8B's shape): it is decayed and
        accumulated in place (one read and write each, no (b, h, p, n) temporaries), as a server's kernel keeps it."""
        b = x.shape[0]
        x = x.view(b, self.num_heads, self.head_dim)
        dt = F.softplus(dt.view(b, self.num_heads, 1) + self.dt_bias.view(-1, 1).to(dt.dtype))  # (b, h, 1)
        dA = torch.exp(dt[..., None].float() * A.view(-1, 1, 1).float())  # (b, h, 1, 1)
        per_group = self.num_heads // self.num_groups
        B = B.view(b, self.num_groups, 1, self.state_dim).repeat_interleave(per_group, dim=1)  # (b, h, 1, n)
        C = C.view(b, self.num_groups, self.state_dim, 1).repeat_interleave(per_group, dim=1)  # (b, h, n, 1)
        ssm = state.ssm
        ssm.mul_(dA).addcmul_(x[..., None], dt[..., None] * B)  # (b, h, p, n) += x (p) outer dt B (n)
        y = torch.matmul(ssm, C.float()).squeeze(-1).to(x.dtype)  # (b, h, p); the state read once, in fp32
        y = y + x * self.D.view(-1, 1)
        return y.reshape(b, 1, -1).to(x.dtype)


class DeciLMMambaAttention(nn.Module):
    """The attention slot of a Mamba layer (NVIDIA's DeciLM layout: `self_attn.mamba_mixer.*`)."""

    def __init__(self, config, layer_idx, mamba):
        super().__init__()
        self.layer_idx = layer_idx
        self.mamba_mixer = DeciLMMamba2Mixer(config, layer_idx, mamba)

    def forward(self, hidden_states, position_embeddings=None, masks=None, past_key_values=None):
        state = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        padding = None if masks is None or masks.padding_mask is None else masks.padding_mask[:, -hidden_states.shape[1]:]
        return self.mamba_mixer(hidden_states, state, padding)


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


class DeciLMPlainMLP(nn.Module):
    """FFN without a gate (Nemotron-H's relu2 MLP): down(act(up(x)))."""

    def __init__(self, config, intermediate_size, bias=None, act=None):
        super().__init__()
        bias = getattr(config, "mlp_bias", False) if bias is None else bias
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[act or config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)))


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


def route_tokens(router_logits, top_k, norm_topk_prob, routing="softmax_topk", moe=None, correction_bias=None):
    """Routing weights (N, top_k) and expert indices (N, top_k) from router_logits (N, E).

    "softmax_topk" (Mixtral / Qwen3-MoE): softmax over the experts in fp32, the top-k, optionally renormalised.
    "topk_softmax" (gpt-oss): the top-k logits, then a softmax over those k in the logits' dtype.
    "sigmoid_group_topk" (Nemotron-H): sigmoid scores plus `correction_bias` pick `moe.topk_group` of the
    `moe.n_group` expert groups (a group's strength: its best two corrected scores) and the top-k experts inside
    them; the weights are the uncorrected scores, optionally renormalised, times `moe.routed_scaling_factor`.
    """
    if routing == "sigmoid_group_topk":
        scores = router_logits.float().sigmoid()  # (N, E)
        choice = scores + correction_bias.float()
        n, e = scores.shape
        groups, per_group = getattr(moe, "n_group", 1), e // getattr(moe, "n_group", 1)
        group_scores = choice.view(n, groups, per_group).topk(min(2, per_group), dim=-1)[0].sum(dim=-1)  # (N, G)
        best = torch.topk(group_scores, k=getattr(moe, "topk_group", 1), dim=-1, sorted=False)[1]
        allowed = torch.zeros_like(group_scores).scatter_(1, best, 1).bool()
        allowed = allowed[:, :, None].expand(n, groups, per_group).reshape(n, e)
        experts = torch.topk(choice.masked_fill(~allowed, float("-inf")), k=top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, experts)
        if norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * getattr(moe, "routed_scaling_factor", 1.0), experts
    if routing == "topk_softmax":
        top, experts = torch.topk(router_logits, top_k, dim=-1)  # (N, top_k)
        return F.softmax(top, dim=-1, dtype=top.dtype), experts
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float)  # (N, E)
    weights, experts = torch.topk(probs, top_k, dim=-1)  # (N, top_k)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


_ROUTINGS = ("softmax_topk", "topk_softmax", "sigmoid_group_topk")
_EXPERT_ACTIVATIONS = ("swiglu", "clamped_swiglu", "relu2")


def _expert(config, moe):
    """One expert module of an MoE layer: a plain SwiGLU, gpt-oss's clamped one, or Nemotron-H's relu2 MLP."""
    activation = getattr(moe, "expert_activation", "swiglu")
    if activation not in _EXPERT_ACTIVATIONS:  # a checkpoint newer than this file: refuse, do not guess
        raise ValueError(f"config.json: ffn.moe.expert_activation {activation!r} is not known to this modeling file "
                         f"(known: {', '.join(_EXPERT_ACTIVATIONS)}); use the modeling_decilm.py of a newer puzzle")
    bias = getattr(moe, "expert_bias", False) or None  # None: the global mlp_bias, as Mixtral / Qwen3-MoE experts
    return _dense_expert(config, moe, moe.expert_intermediate_dim, bias)


def _dense_expert(config, moe, width, bias):
    activation = getattr(moe, "expert_activation", "swiglu")
    if activation == "clamped_swiglu":
        return DeciLMClampedMLP(config, width, bias, moe.swiglu_alpha, moe.swiglu_limit)
    if activation == "relu2":
        return DeciLMPlainMLP(config, width, bias, act="relu2")
    return DeciLMMLP(config, width, bias)


class DeciLMSigmoidRouter(nn.Module):
    """Nemotron-H's router: fp32 logits and a per-expert correction bias that only affects which experts win."""

    def __init__(self, config, num_experts):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))

    def forward(self, x):
        return F.linear(x.float(), self.weight.float())


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
        self.moe = moe
        if self.routing == "sigmoid_group_topk":
            self.gate = DeciLMSigmoidRouter(config, moe.num_local_experts)
        else:
            self.gate = nn.Linear(config.hidden_size, moe.num_local_experts, bias=getattr(moe, "router_bias", False))
        self.experts = nn.ModuleList([_expert(config, moe) for _ in range(moe.num_local_experts)])
        shared = getattr(moe, "shared_expert_intermediate_dim", 0)
        self.shared_expert = _dense_expert(config, moe, shared, getattr(moe, "expert_bias", False) or None) if shared else None

    def forward(self, x):
        bsz, seq_len, hidden = x.shape
        x = x.reshape(-1, hidden)  # (N, C)
        weights, chosen = route_tokens(self.gate(x), self.top_k, self.norm_topk_prob, self.routing, self.moe,
                                       getattr(self.gate, "e_score_correction_bias", None))  # (N, top_k) each
        # Nemotron-H sums its experts in fp32 (the routing weights' dtype); the others in the activations' dtype.
        out = torch.zeros_like(x, dtype=weights.dtype if self.routing == "sigmoid_group_topk" else x.dtype)
        # Only the experts some token chose run, in ascending order as in transformers (same sums, same bits).
        for expert in torch.unique(chosen).tolist():
            token, slot = torch.where(chosen == expert)
            y = self.experts[expert](x[token]) * weights[token, slot, None]  # (n, C), fp32 weights as Mixtral
            out.index_add_(0, token, y.to(out.dtype))
        out = out.to(x.dtype)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
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
            elif mamba_settings(attention) is not None:
                self.self_attn = DeciLMMambaAttention(config, layer_idx, attention.mamba)
            else:
                self.self_attn = DeciLMAttention(config, layer_idx, attention)
        self.mlp = self.post_attention_layernorm = None
        if not getattr(ffn, "no_op", False):
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            if getattr(ffn, "replace_with_linear", False):
                self.mlp = DeciLMLinearMLP(config)
            elif getattr(ffn, "moe", None) is not None:
                self.mlp = DeciLMSparseMoE(config, ffn.moe)
            elif getattr(ffn, "gated", True) is False:
                self.mlp = DeciLMPlainMLP(config, ffn_intermediate_size(ffn, config.hidden_size))
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


class DeciLMMambaLayer(DynamicLayer):
    """A Mamba layer's decode state: the last conv_kernel - 1 conv inputs (b, conv_dim, K - 1) and the scan state
    (b, heads, head_dim, state_dim) in fp32. It holds no keys or values; its size does not grow with the text."""

    def __init__(self):
        super().__init__()
        self.conv = self.ssm = None

    def get_seq_length(self, *args, **kwargs):
        return 0

    def store(self, name, value):
        """Keep `value` as the conv or scan state: written into the existing tensor when the shapes match (a
        server's state slots; static addresses for CUDA graphs), else kept as given."""
        current = getattr(self, name)
        if current is not None and current.shape == value.shape and current.dtype == value.dtype:
            current.copy_(value)
        else:
            setattr(self, name, value)

    def reset(self):
        self.conv = self.ssm = None

    def _select(self, fn):
        self.conv = None if self.conv is None else fn(self.conv)
        self.ssm = None if self.ssm is None else fn(self.ssm)

    def reorder_cache(self, beam_idx):
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats):
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._select(lambda t: t[indices, ...])

    def crop(self, max_length):
        # A recurrent state cannot forget tokens (assisted decoding rewinds the cache): refuse rather than be wrong.
        raise NotImplementedError("a Mamba layer's state cannot be cropped to fewer tokens")


class DeciLMCache(DynamicCache):
    """KV cache for heterogeneous layers.

    Layers with softmax attention get a cache layer (a window layer keeps only its window); Mamba layers keep
    their conv and scan state (`DeciLMMambaLayer`); no-op and linear layers hold nothing. The sequence length is read from the first attention layer, so a model whose layer 0
    has no attention still reports the right length to `generate`; a model with no attention at all counts
    tokens itself.
    """

    def __init__(self, config):
        layers = []
        for block in config.block_configs:
            window = getattr(block.attention, "window_length", None)
            if mamba_settings(block.attention) is not None:
                layers.append(DeciLMMambaLayer())
            else:
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
        rope = getattr(self.config, "position_embedding_type", "rope") != "none"
        position_embeddings = self.rotary_emb(hidden_states, position_ids) if rope else None
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
