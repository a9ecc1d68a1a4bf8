"""A lean decode step of one attention or FFN variant: what a serving engine runs, to check puzzle's profiler.

    python benchmarks/lean_decode.py                  # puzzle's profiler vs this, three operating points (GPU)
    python benchmarks/lean_decode.py --tiny           # CPU smoke run
    python benchmarks/quality_at_speed.py fidelity    # the same against a search run's profile.json

One fused QKV matmul, RoPE on q and k, the new token's K/V written into a preallocated cache, SDPA over the
cache, the output projection; for an FFN one fused gate/up matmul, SiLU * up, the down projection. Pre-norm
(RMSNorm) and the residual add as in the model; bf16; timed by `puzzle.profiling.time_call` (CUDA graphs,
CUDA events) with `stack` copies of distinct weights, as puzzle's profiler times its layers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from puzzle.arch import AttentionConfig, FFNConfig
from puzzle.profiling import ProfileConfig, time_call


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, 1, D); cos/sin: (1, 1, 1, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _Attention:
    def __init__(self, hidden: int, heads: int, head_dim: int, kv_heads: int, cache_len: int, batch: int, device, dtype):
        q, kv = heads * head_dim, kv_heads * head_dim
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.norm = torch.ones(hidden, device=device, dtype=dtype)
        self.w_qkv = torch.randn(hidden, q + 2 * kv, device=device, dtype=dtype) * 0.02
        self.w_o = torch.randn(q, hidden, device=device, dtype=dtype) * 0.02
        self.k = torch.randn(batch, kv_heads, cache_len, head_dim, device=device, dtype=dtype)
        self.v = torch.randn_like(self.k)
        angle = torch.rand(1, 1, 1, head_dim, device=device)
        self.cos, self.sin = angle.cos().to(dtype), angle.sin().to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = F.rms_norm(x, (x.shape[-1],), self.norm, 1e-5)
        qkv = h @ self.w_qkv  # (B, 1, (H + 2 KV) D)
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], -1)
        q = _rope(q.view(b, 1, self.heads, self.head_dim).transpose(1, 2), self.cos, self.sin)
        k = _rope(k.view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2), self.cos, self.sin)
        self.k[:, :, -1:].copy_(k)
        self.v[:, :, -1:].copy_(v.view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2))
        o = F.scaled_dot_product_attention(q, self.k, self.v, enable_gqa=self.kv_heads != self.heads)  # (B, H, 1, D)
        return x + o.transpose(1, 2).reshape(b, 1, -1) @ self.w_o


class _Linear:
    def __init__(self, hidden: int, device, dtype):
        self.norm = torch.ones(hidden, device=device, dtype=dtype)
        self.w = torch.randn(hidden, hidden, device=device, dtype=dtype) * 0.02

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.rms_norm(x, (x.shape[-1],), self.norm, 1e-5) @ self.w


class _FFN:
    def __init__(self, hidden: int, width: int, device, dtype):
        self.width = width
        self.norm = torch.ones(hidden, device=device, dtype=dtype)
        self.w_gate_up = torch.randn(hidden, 2 * width, device=device, dtype=dtype) * 0.02
        self.w_down = torch.randn(width, hidden, device=device, dtype=dtype) * 0.02

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (F.rms_norm(x, (x.shape[-1],), self.norm, 1e-5) @ self.w_gate_up).split(self.width, -1)
        return x + (F.silu(gate) * up) @ self.w_down


def lean_decode_time(kind: str, variant: AttentionConfig | FFNConfig, *, hidden: int, heads: int, head_dim: int,
                     cfg: ProfileConfig, device: torch.device, dtype: torch.dtype) -> float:
    """Seconds of one decode step of one sub-block of `variant` (a no-op costs 0)."""
    if variant.no_op:
        return 0.0
    blocks = []
    for _ in range(cfg.stack):
        if variant.replace_with_linear:
            blocks.append(_Linear(hidden, device, dtype))
        elif kind == "attention":
            window = variant.window_length
            cache = cfg.context_len if window is None else min(cfg.context_len, window)
            blocks.append(_Attention(hidden, heads, head_dim, variant.num_kv_heads(heads), cache, cfg.batch_size, device, dtype))
        else:
            blocks.append(_FFN(hidden, variant.intermediate_size, device, dtype))
    x = torch.randn(cfg.batch_size, 1, hidden, device=device, dtype=dtype)

    def step():
        h = x
        for block in blocks:
            h = block(h)
        return h

    return time_call(step, cfg, device) / cfg.stack


def compare(config, variants, cfg: ProfileConfig, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """puzzle's profiled decode time of every variant against the lean step, at `cfg`'s operating point."""
    from puzzle.profiling import profile_variants

    profile = profile_variants(config, variants, cfg)
    rows = []
    for v in profile.variants:
        variant = AttentionConfig(**v.variant) if v.kind == "attention" else FFNConfig(**v.variant)
        lean = lean_decode_time(v.kind, variant, hidden=config.hidden_size, heads=config.num_attention_heads,
                                head_dim=config.head_dim, cfg=cfg, device=device, dtype=dtype)
        rows.append({"kind": v.kind, "name": v.name, "puzzle_s": v.decode_time_s, "lean_s": lean,
                     "ratio": v.decode_time_s / lean if lean else None})
    return rows


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from benchmarks.common import llama_8b_config, write_results
    from puzzle.arch import Architecture
    from puzzle.blocks.space import SearchSpace, build_candidates
    from puzzle.modeling.configuration_decilm import DeciLMConfig

    parser = argparse.ArgumentParser(description="puzzle's profiler against a lean decode step")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    small = DeciLMConfig(vocab_size=4096, hidden_size=384, num_hidden_layers=1, num_attention_heads=6, head_dim=64,
                         block_configs=[{"attention": {"n_heads_in_group": 1}, "ffn": {"intermediate_size": 1024}}])
    points = [("quality_at_speed parent", small, 2048, 512), ("Llama-3.1-8B layer", llama_8b_config(1, args.tiny), 1, 2048),
              ("Llama-3.1-8B layer", llama_8b_config(1, args.tiny), 64, 4096)]
    if args.tiny:
        points = [(n, c, min(b, 4), min(ctx, 64)) for n, c, b, ctx in points]
    timing = dict(repeats=5, inner=2, warmup=1, stack=1) if args.tiny else dict(repeats=20, inner=10, warmup=5, stack=4)
    results, lines = [], []
    for name, config, batch, context in points:
        arch = Architecture.from_config(config.to_dict())
        candidates = build_candidates(arch, SearchSpace())
        variants = list(dict.fromkeys((c.kind, c.variant) for c in candidates))
        cfg = ProfileConfig(batch_size=batch, context_len=context, device=device.type, **timing)
        rows = compare(config, variants, cfg, device, dtype)
        results.append({"model": name, "batch_size": batch, "context_len": context, "variants": rows})
        lines += [f"## {name}, decode batch {batch}, context {context}", "",
                  "| sub-block | variant | puzzle (us) | lean (us) | puzzle / lean |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['kind']} | {r['name']} | {r['puzzle_s'] * 1e6:.1f} | {r['lean_s'] * 1e6:.1f} | {r['ratio']:.2f} |"
                  for r in rows if r["ratio"]]
        lines.append("")
    lines.append("puzzle = `puzzle.profiling` (the model's own decoder layers, the profile the MIP reads); lean = "
                 "this file's fused QKV / fused gate-up step. Same timing method (CUDA graphs, median of samples).")
    write_results("lean_decode" + ("_tiny" if args.tiny else ""), {"points": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
