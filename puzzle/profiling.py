"""Cost of every sub-block variant on the target device, and of whole models by the same method.

docs/methods.md, "Profiling". For each distinct (attention or FFN) variant of the parent's shape:
decode time of one step at (batch, context) with a KV cache of `context` tokens (a window layer holds
min(context, window)), prefill time of a prompt, parameter bytes and KV bytes per token. A decode step of a
whole child is then predicted as the fixed part (embedding, final norm, LM head) plus the sum of its
sub-blocks, which is what the MIP adds up; `measure_model` times whole models by the same method so the
prediction can be checked.

Method: sub-blocks run as in the model (pre-norm, residual add) on random inputs; each variant is stacked
`stack` times in one timed call so that launch overhead is amortised as inside a real model. On CUDA a
step is captured in a CUDA graph and replayed (median of `repeats` samples, each the mean of `inner`
replays, timed with CUDA events); on CPU the same code runs eagerly and the numbers are labelled CPU.
The KV cache used for timing has a fixed length and is overwritten in place, so every step has the same
shapes (graph-capturable) and no time goes to growing a cache. Mixture-of-experts FFNs are timed on CUDA in
their grouped-GEMM form (`puzzle.grouped_moe`: the same computation with static shapes, reading only the routed
experts, as a fused-MoE server runs it), so they are captured too; each variant records its `method`.
`analytic=True` instead estimates each time from bytes moved / memory bandwidth and flops
/ peak rate for a given hardware spec; a decode step of an MoE FFN reads the experts that at least one token of
the batch chose (`expected_active_experts`, uniform routing) and computes k experts per token.

KV bytes (per token, in the memory targets, and read by the analytic decode step) are at `profile.kv_dtype`
(default: the deployment dtype `param_dtype`; fp8 halves them). Measured timings read the KV cache at the timing
dtype: there is no fp8 attention kernel to time here.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from puzzle.arch import (
    Architecture,
    AttentionConfig,
    BlockConfig,
    FFNConfig,
    ModelShape,
    MoEConfig,
    attention_kv_bytes_per_token,
    attention_params,
    ffn_params,
    kv_dtype_bytes,
)
from puzzle.checkpoint import decilm_config
from puzzle.config import to_mapping
from puzzle.errors import ConfigError, StageError
from puzzle.files import read_json, write_json_atomic
from puzzle.grouped_moe import grouped_experts
from puzzle.modeling.configuration_decilm import DeciLMConfig
from puzzle.modeling.modeling_decilm import (
    DeciLMDecoderLayer,
    DeciLMForCausalLM,
    DeciLMMambaLayer,
    DeciLMRMSNorm,
    DeciLMRotaryEmbedding,
    MaskProvider,
)
from puzzle.progress import track

# A timing whose samples spread ((p90 - p10) / median) more than this is flagged, not trusted. On an idle 2-core
# VM 15 decode samples of the demo parent spread 0.08-0.36 and their median moves a few percent between runs;
# on a loaded machine samples differ several-fold (a report once said 7.40x measured for 2.41x predicted).
NOISY = 0.5
MEASURE_ATTEMPTS = 3  # whole-model timings are repeated up to this often while they are noisy
# 2: parameter bytes at the deployment dtype (param_dtype), not the profiling dtype; 3: each variant's timing
# `method` (MoE variants are timed without CUDA graphs)
PROFILE_VERSION = 3


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """Peak rates for the analytic estimate (H100 SXM by default)."""

    name: str = "H100-SXM"
    memory_bandwidth: float = 3.0e12  # bytes/s actually reachable (about 90% of 3.35 TB/s)
    flops: float = 8.0e14  # dense bf16 FLOP/s reachable by large GEMMs


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    batch_size: int = 64  # sequences decoded together
    context_len: int = 4096  # tokens in each sequence's KV cache during decode
    prompt_len: int = 2048  # tokens of the prefill
    prefill_batch: int = 1  # sequences prefilled together
    generate_tokens: int = 256  # decode steps after the prefill (latency = prefill + this x decode step)
    # The dtype the child's weights are deployed in: memory targets count parameters at this, whatever dtype
    # the timing ran in (a CPU profile times fp32 layers of a child that will serve in bf16).
    param_dtype: str = "bf16"
    # KV-cache dtype (bf16, fp8, fp16, fp32) of the byte counts, the memory targets and the analytic KV reads;
    # unset: param_dtype, as a server stores KV in the model's dtype unless told to quantise it.
    kv_dtype: str | None = None
    repeats: int = 30  # timed samples; the median is reported
    inner: int = 10  # calls per sample (their mean is one sample)
    warmup: int = 5
    stack: int = 4  # copies of a variant in one timed call (amortises launch overhead as in a model)
    cuda_graphs: bool = True
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    analytic: bool = False
    hardware: Hardware = field(default_factory=Hardware)

    def __post_init__(self) -> None:
        for name in ("batch_size", "context_len", "prompt_len", "prefill_batch", "generate_tokens", "repeats",
                     "inner", "stack"):
            if getattr(self, name) < 1:
                raise ConfigError(f"profile.{name} must be positive, got {getattr(self, name)}")
        kv_dtype_bytes(self.param_dtype)
        if self.kv_dtype is None:
            object.__setattr__(self, "kv_dtype", self.param_dtype)
        kv_dtype_bytes(self.kv_dtype)


@dataclass(frozen=True, kw_only=True)
class VariantCost:
    kind: Literal["attention", "ffn"]
    name: str
    variant: dict[str, Any]
    decode_time_s: float
    prefill_time_s: float
    param_bytes: int
    kv_bytes_per_token: int  # at the profile's kv_dtype
    kv_window: int | None
    # how the times were taken: "cuda" for MoE variants in a "cuda_graphs" profile (not capturable), else the profile's
    method: Literal["cuda_graphs", "cuda", "cpu", "analytic"]
    state_bytes: int = 0  # a Mamba mixer's decode state per sequence (conv window at kv_dtype + fp32 scan state)


@dataclass(frozen=True, kw_only=True)
class Timing:
    decode_time_s: float  # one decode step of the whole batch
    prefill_time_s: float  # one prefill of prefill_batch x prompt_len
    # (90th - 10th percentile) / median of the decode samples: above NOISY the number is not to be trusted
    decode_spread: float = 0.0

    @property
    def noisy(self) -> bool:
        return self.decode_spread > NOISY

    def throughput(self, batch_size: int) -> float:
        return batch_size / self.decode_time_s


@dataclass(frozen=True, kw_only=True)
class Profile:
    device: str
    method: Literal["cuda_graphs", "cuda", "cpu", "analytic"]
    dtype: str
    config: dict[str, Any]
    fixed: VariantCost  # embedding + final norm + LM head
    variants: tuple[VariantCost, ...]
    parent_fingerprint: str = ""
    parent_measured: Timing | None = None  # the parent timed end to end by the same method
    created: str = ""
    torch_version: str = torch.__version__
    version: int = PROFILE_VERSION

    def cost(self, kind: str, variant: AttentionConfig | FFNConfig) -> VariantCost:
        key = variant.to_dict()
        for v in self.variants:
            if v.kind == kind and v.variant == key:
                return v
        raise StageError(f"profile has no {kind} variant {key}; rerun the profile stage (the library changed?)")

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> Profile:
        data = read_json(path, "profile (run the `profile` stage first)")
        if data.get("version") != PROFILE_VERSION:
            raise StageError(f"{path}: profile version {data.get('version')} is not {PROFILE_VERSION}; rerun the profile stage")
        data["fixed"] = VariantCost(**data["fixed"])
        data["variants"] = tuple(VariantCost(**v) for v in data["variants"])
        data["parent_measured"] = Timing(**data["parent_measured"]) if data.get("parent_measured") else None
        return cls(**data)


# ----------------------------------------------------------------------------------------------------------
# Timing


class TimingCache:
    """A KV cache of fixed length per layer, overwritten in place: constant shapes for CUDA graphs.

    `update` writes the new token's keys/values into the last slot and returns the whole buffer, so
    attention reads exactly `length` cached tokens every step, as a decode step at that context does.
    """

    def __init__(self, lengths: dict[int, int], past_len: int):
        self.lengths, self.past_len = lengths, past_len
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layers: dict[int, DeciLMMambaLayer] = {}  # Mamba layers' conv and scan states, updated in place

    def allocate_mamba(self, layer_idx: int, batch: int, mamba, device, dtype) -> None:
        state = DeciLMMambaLayer()
        state.conv = torch.randn(batch, mamba.conv_dim, mamba.conv_kernel - 1, device=device, dtype=dtype)
        state.ssm = torch.randn(batch, mamba.num_heads, mamba.head_dim, mamba.state_dim, device=device, dtype=torch.float32)
        self.layers[layer_idx] = state

    def allocate(self, layer_idx: int, batch: int, kv_heads: int, head_dim: int, device, dtype) -> None:
        shape = (batch, kv_heads, self.lengths[layer_idx], head_dim)
        self.buffers[layer_idx] = (torch.randn(shape, device=device, dtype=dtype),
                                   torch.randn(shape, device=device, dtype=dtype))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.buffers[layer_idx]
        q = key_states.shape[2]
        k[:, :, -q:].copy_(key_states)
        v[:, :, -q:].copy_(value_states)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past_len


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], cfg: ProfileConfig, device: torch.device) -> float:
    """Median seconds of one call of `fn` (CUDA graphs + events on GPU, perf_counter on CPU)."""
    return statistics.median(time_samples(fn, cfg, device))


def spread(samples: list[float]) -> float:
    """(90th - 10th percentile) / median: how far repeated timings disagree."""
    if len(samples) < 3:
        return 0.0
    deciles = statistics.quantiles(samples, n=10)
    return (deciles[-1] - deciles[0]) / statistics.median(samples)


def time_samples(fn: Callable[[], Any], cfg: ProfileConfig, device: torch.device) -> list[float]:
    """`cfg.repeats` samples of the seconds one call of `fn` takes, each the mean of `cfg.inner` calls."""
    with torch.no_grad():
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(cfg.warmup):
                    fn()
            torch.cuda.current_stream(device).wait_stream(stream)
            run = fn
            if cfg.cuda_graphs:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                run = graph.replay
            for _ in range(cfg.warmup):
                run()
            samples = []
            for _ in range(cfg.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(cfg.inner):
                    run()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1000 / cfg.inner)
            return samples
        for _ in range(cfg.warmup):
            fn()
        samples = []
        for _ in range(cfg.repeats):
            start = time.perf_counter()
            for _ in range(cfg.inner):
                fn()
            samples.append((time.perf_counter() - start) / cfg.inner)
        return samples


def _stacked_layers(parent: DeciLMConfig, block: BlockConfig, n: int, device, dtype):
    config = decilm_config(parent, [block] * n)
    layers = torch.nn.ModuleList([DeciLMDecoderLayer(config, i) for i in range(n)]).to(device=device, dtype=dtype)
    for p in layers.parameters():
        torch.nn.init.normal_(p, std=0.02)  # random, not zeros: multiplying zeros can run faster on GPUs
    return config, layers


def _cache_lengths(blocks: list[BlockConfig], context: int) -> dict[int, int]:
    out = {}
    for i, b in enumerate(blocks):
        if b.attention.has_softmax:
            w = b.attention.window_length
            out[i] = context if w is None else min(context, w)
    return out


def _allocate(cache: TimingCache, config: DeciLMConfig, blocks: list[BlockConfig], batch: int, device, dtype) -> None:
    for i in cache.lengths:
        kv = config.num_attention_heads // blocks[i].attention.n_heads_in_group
        cache.allocate(i, batch, kv, config.head_dim, device, dtype)
    for i, block in enumerate(blocks):
        if block.attention.mamba is not None:
            cache.allocate_mamba(i, batch, block.attention.mamba, device, dtype)


def timing_method(cfg: ProfileConfig, device: torch.device) -> str:
    """How layers are timed on `device`: "cuda_graphs", "cuda" (eager) or "cpu"."""
    if device.type != "cuda":
        return device.type
    return "cuda_graphs" if cfg.cuda_graphs else "cuda"


def _timing_form(module: torch.nn.Module, device: torch.device):
    """Experts as they are timed: on CUDA the grouped-GEMM form (capturable, what a fused-MoE server pays); on the
    CPU puzzle's own per-expert dispatch, the code the CPU runs anyway."""
    return grouped_experts(module) if device.type == "cuda" else contextlib.nullcontext(module)


def time_layers(parent: DeciLMConfig, block: BlockConfig, cfg: ProfileConfig, device, dtype) -> Timing:
    """Decode and prefill time of one layer `block`, measured as `cfg.stack` stacked copies."""
    if block.attention.no_op and block.ffn.no_op:
        return Timing(decode_time_s=0.0, prefill_time_s=0.0)
    n = cfg.stack
    config, layers = _stacked_layers(parent, block, n, device, dtype)
    with _timing_form(layers, device):
        return _time_stacked_layers(config, layers, block, cfg, device, dtype)


def _time_stacked_layers(config: DeciLMConfig, layers, block: BlockConfig, cfg: ProfileConfig, device, dtype) -> Timing:
    n = len(layers)
    rotary = DeciLMRotaryEmbedding(config).to(device)
    c = config.hidden_size
    # decode: one new token per sequence at position context-1
    cache = TimingCache(_cache_lengths([block] * n, cfg.context_len), cfg.context_len - 1)
    _allocate(cache, config, [block] * n, cfg.batch_size, device, dtype)
    x = torch.randn(cfg.batch_size, 1, c, device=device, dtype=dtype)
    pos = torch.full((1, 1), cfg.context_len - 1, device=device)
    pe = rotary(x, pos)

    def decode():
        masks = MaskProvider(None, cfg.context_len - 1, 1, device)
        h = x
        for layer in layers:
            h = layer(h, pe, masks, cache)
        return h

    decode_time = time_call(decode, cfg, device) / n
    xp = torch.randn(cfg.prefill_batch, cfg.prompt_len, c, device=device, dtype=dtype)
    pep = rotary(xp, torch.arange(cfg.prompt_len, device=device)[None])

    def prefill():
        masks = MaskProvider(None, 0, cfg.prompt_len, device)
        h = xp
        for layer in layers:
            h = layer(h, pep, masks, None)
        return h

    prefill_time = time_call(prefill, _prefill_cfg(cfg), device) / n
    return Timing(decode_time_s=decode_time, prefill_time_s=prefill_time)


def _prefill_cfg(cfg: ProfileConfig) -> ProfileConfig:
    """Prefill calls are long: fewer inner calls per sample."""
    return replace(cfg, inner=max(1, cfg.inner // 5), repeats=max(5, cfg.repeats // 2))


def time_fixed(parent: DeciLMConfig, cfg: ProfileConfig, device, dtype) -> Timing:
    """Embedding lookup, final norm and LM head (last position only in prefill, as generate does)."""
    emb = torch.nn.Embedding(parent.vocab_size, parent.hidden_size).to(device=device, dtype=dtype)
    head = torch.nn.Linear(parent.hidden_size, parent.vocab_size, bias=False).to(device=device, dtype=dtype)

    norm = DeciLMRMSNorm(parent.hidden_size, parent.rms_norm_eps).to(device=device, dtype=dtype)
    ids = torch.randint(0, parent.vocab_size, (cfg.batch_size, 1), device=device)
    ids_p = torch.randint(0, parent.vocab_size, (cfg.prefill_batch, cfg.prompt_len), device=device)
    decode = time_call(lambda: head(norm(emb(ids))), cfg, device)
    prefill = time_call(lambda: (emb(ids_p), head(norm(emb(ids_p[:, -1:]))))[1], _prefill_cfg(cfg), device)
    return Timing(decode_time_s=decode, prefill_time_s=prefill)


def measure_model(model: DeciLMForCausalLM, cfg: ProfileConfig) -> Timing:
    """A whole model's decode step and prefill, timed by the same method as the variants."""
    device = model.device
    blocks = list(Architecture.from_config(model.config.to_dict()).blocks)
    with _timing_form(model, device):
        return _measure_model(model, blocks, cfg)


def _measure_model(model: DeciLMForCausalLM, blocks: list[BlockConfig], cfg: ProfileConfig) -> Timing:
    device, dtype, config = model.device, model.dtype, model.config
    cache = TimingCache(_cache_lengths(blocks, cfg.context_len), cfg.context_len - 1)
    _allocate(cache, config, blocks, cfg.batch_size, device, dtype)
    ids = torch.randint(0, config.vocab_size, (cfg.batch_size, 1), device=device)
    pos = torch.full((cfg.batch_size, 1), cfg.context_len - 1, device=device)
    best = None
    for _ in range(MEASURE_ATTEMPTS):  # a loaded machine: try again, keep the steadiest attempt
        samples = time_samples(lambda: model(ids, position_ids=pos, past_key_values=cache, use_cache=True).logits, cfg, device)
        if best is None or spread(samples) < spread(best):
            best = samples
        if spread(best) <= NOISY:
            break
    decode, decode_spread = statistics.median(best), spread(best)
    ids_p = torch.randint(0, config.vocab_size, (cfg.prefill_batch, cfg.prompt_len), device=device)
    prefill = time_call(lambda: model(ids_p, use_cache=False, logits_to_keep=1).logits, _prefill_cfg(cfg), device)
    return Timing(decode_time_s=decode, prefill_time_s=prefill, decode_spread=decode_spread)


# ----------------------------------------------------------------------------------------------------------
# Analytic estimate


def expected_active_experts(experts: int, per_token: int, tokens: int) -> float:
    """Expected number of distinct experts that `tokens` tokens choose, `per_token` each, under uniform routing.

    A token picks `per_token` distinct experts of `experts`, so it misses a given one with probability
    1 - k/E, and all `tokens` (routed independently) miss it with (1 - k/E)^tokens: E (1 - (1 - k/E)^B).
    One token reads k experts; a large batch reads nearly all E. Uniform, not the router's measured frequencies:
    a profile entry is per variant, shared by every layer it appears in, and pruning changes the kept experts' shares.
    """
    return experts * (1.0 - (1.0 - per_token / experts) ** tokens)


def moe_param_split(shape: ModelShape, moe: MoEConfig) -> tuple[int, int]:
    """(parameters every token uses: the norm and the router; parameters of one expert) of an MoE FFN.

    Taken from `ffn_params` itself (what one more expert adds, less its router row) so the two never disagree.
    """
    total = ffn_params(shape, FFNConfig(moe=moe))
    router_row = shape.hidden_size + (1 if moe.router_bias else 0)
    one_more = ffn_params(shape, FFNConfig(moe=replace(moe, num_local_experts=moe.num_local_experts + 1)))
    expert = one_more - total - router_row
    return total - moe.num_local_experts * expert, expert


def _weights_read_and_computed(shape: ModelShape, kind: str, variant, tokens: int) -> tuple[float, float]:
    """(parameters read from memory, parameters each token multiplies by) for one call over `tokens` tokens.

    A dense sub-block reads and uses all its parameters. An MoE FFN reads the experts some token chose
    (expected, uniform routing) and each token computes through its k experts; all E stay in memory (param_bytes).
    """
    if kind == "ffn" and variant.moe is not None:
        moe = variant.moe
        shared, expert = moe_param_split(shape, moe)
        active = expected_active_experts(moe.num_local_experts, moe.num_experts_per_tok, tokens)
        return shared + active * expert, shared + moe.num_experts_per_tok * expert
    params = attention_params(shape, variant) if kind == "attention" else ffn_params(shape, variant)
    return params, params


def analytic_timing(shape: ModelShape, kind: str, variant, cfg: ProfileConfig, dtype_bytes: int) -> Timing:
    """max(bytes / bandwidth, flops / peak) for one sub-block: weights read once per call (for experts: those the
    batch routes to), activations at `dtype_bytes`, the KV cache read per sequence at `cfg.kv_dtype`."""
    hw = cfg.hardware
    if variant.no_op:
        return Timing(decode_time_s=0.0, prefill_time_s=0.0)

    def estimate(tokens: int, kv_tokens: int, batch: int) -> float:
        read, used = _weights_read_and_computed(shape, kind, variant, tokens)
        flops = 2 * used * tokens
        moved = read * dtype_bytes + 2 * tokens * shape.hidden_size * dtype_bytes
        if kind == "attention" and variant.has_softmax:
            moved += batch * kv_tokens * attention_kv_bytes_per_token(shape, variant, cfg.kv_dtype)
            flops += 4 * tokens * kv_tokens * shape.num_attention_heads * shape.head_dim
        mamba = getattr(variant, "mamba", None) if kind == "attention" else None
        if mamba is not None:  # each sequence's state is read and written once per call; the scan's FLOPs per token
            moved += 2 * batch * mamba.state_bytes(kv_dtype_bytes(cfg.kv_dtype))
            flops += 6 * tokens * mamba.intermediate_size * mamba.state_dim
        return max(moved / hw.memory_bandwidth, flops / hw.flops)

    window = getattr(variant, "window_length", None)
    ctx = cfg.context_len if window is None else min(cfg.context_len, window)
    decode = estimate(cfg.batch_size, ctx, cfg.batch_size)
    prompt_ctx = cfg.prompt_len if window is None else min(cfg.prompt_len, window)
    prefill = estimate(cfg.prefill_batch * cfg.prompt_len, prompt_ctx // 2 + 1, cfg.prefill_batch)
    return Timing(decode_time_s=decode, prefill_time_s=prefill)


# ----------------------------------------------------------------------------------------------------------
# The profile of a set of variants


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def resolve_device_dtype(cfg: ProfileConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"profile.device {cfg.device!r}: CUDA is not available; use cpu or --analytic")
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    return device, dtype


def profile_variants(parent: DeciLMConfig, variants: list[tuple[str, AttentionConfig | FFNConfig]],
                     cfg: ProfileConfig, names: dict | None = None) -> Profile:
    """Cost of each distinct (kind, variant) of the parent's shape on the configured device."""
    shape = Architecture.from_config(parent.to_dict()).shape
    device, dtype = resolve_device_dtype(cfg)
    dtype_bytes = torch.finfo(dtype).bits // 8  # what the timed layers move
    param_bytes = kv_dtype_bytes(cfg.param_dtype)  # what the deployed weights occupy
    unique = list(dict.fromkeys((k, v) for k, v in variants))
    costs = []
    no_attn, no_ffn = AttentionConfig(no_op=True), FFNConfig(no_op=True)
    with track(f"profile ({'analytic' if cfg.analytic else device.type})", len(unique) + 1) as bar:
        if cfg.analytic:
            head = shape.vocab_size * shape.hidden_size * dtype_bytes
            fixed_timing = Timing(decode_time_s=head / cfg.hardware.memory_bandwidth,
                                  prefill_time_s=head / cfg.hardware.memory_bandwidth)
        else:
            fixed_timing = time_fixed(parent, cfg, device, dtype)
        bar.advance(1)
        for kind, variant in unique:
            block = BlockConfig(attention=variant, ffn=no_ffn) if kind == "attention" else BlockConfig(attention=no_attn, ffn=variant)
            timing = analytic_timing(shape, kind, variant, cfg, dtype_bytes) if cfg.analytic else \
                time_layers(parent, block, cfg, device, dtype)
            params = attention_params(shape, variant) if kind == "attention" else ffn_params(shape, variant)
            kv = attention_kv_bytes_per_token(shape, variant, cfg.kv_dtype) if kind == "attention" else 0
            mamba = getattr(variant, "mamba", None)
            state = mamba.state_bytes(kv_dtype_bytes(cfg.kv_dtype)) if mamba is not None else 0
            name = (names or {}).get((kind, variant)) or (variant.label(shape.num_attention_heads) if kind == "attention" else variant.label())
            method = "analytic" if cfg.analytic else timing_method(cfg, device)
            costs.append(VariantCost(kind=kind, name=name, variant=variant.to_dict(), decode_time_s=timing.decode_time_s,
                                     prefill_time_s=timing.prefill_time_s, param_bytes=params * param_bytes,
                                     kv_bytes_per_token=kv, kv_window=getattr(variant, "window_length", None),
                                     method=method, state_bytes=state))
            bar.advance(1)
    embed_params = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2) + shape.hidden_size
    method = "analytic" if cfg.analytic else timing_method(cfg, device)
    fixed = VariantCost(kind="ffn", name="embeddings+head", variant={}, decode_time_s=fixed_timing.decode_time_s,
                        prefill_time_s=fixed_timing.prefill_time_s, param_bytes=embed_params * param_bytes,
                        kv_bytes_per_token=0, kv_window=None, method=method)
    return Profile(device=cfg.hardware.name if cfg.analytic else _device_name(device), method=method,
                   dtype=str(dtype).removeprefix("torch."), config=_config_dict(cfg), fixed=fixed,
                   variants=tuple(costs), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def _config_dict(cfg: ProfileConfig) -> dict[str, Any]:
    return to_mapping(cfg)


def eager_variants(profile: Profile) -> list[str]:
    """Names of the variants timed without CUDA graphs in a CUDA-graphs profile (experts, in profiles written
    before their grouped-GEMM timing form)."""
    return [v.name for v in profile.variants if profile.method == "cuda_graphs" and v.method == "cuda"]


def predicted_timing(profile: Profile, blocks: list[BlockConfig]) -> Timing:
    """Sum of the profiled parts of a model made of `blocks` (the MIP's cost model)."""
    decode, prefill = profile.fixed.decode_time_s, profile.fixed.prefill_time_s
    for b in blocks:
        for kind, v in (("attention", b.attention), ("ffn", b.ffn)):
            if v.no_op:
                continue
            cost = profile.cost(kind, v)
            decode += cost.decode_time_s
            prefill += cost.prefill_time_s
    return Timing(decode_time_s=decode, prefill_time_s=prefill)
