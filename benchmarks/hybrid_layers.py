"""Decode and prefill time of Nemotron-H-8B-shaped Mamba, attention and MLP layers and their cheaper variants.

    python benchmarks/hybrid_layers.py           # H100 / H200, bf16 (a few minutes)
    python benchmarks/hybrid_layers.py --tiny    # CPU smoke run of the same code path

Nemotron-H-8B's layer shapes (hidden 4096; Mamba-2: 128 heads of 64 channels, state 128, 8 groups, conv 4, chunks
of 128; attention: 32 query / 8 KV heads of 128, no RoPE; MLP: relu2, width 21504), random bf16 weights, timed by
puzzle's profiler (`puzzle.profiling.time_layers`: stacked copies, CUDA graphs, decode at `--context` cached tokens
with the Mamba state read and written in place, prefill of `--prompt` tokens) at decode batch 1 and 64. The Mamba
mixer is puzzle's PyTorch implementation (modeling_decilm.py: the chunked SSD scan and the one-token update, no
mamba_ssm / causal_conv1d kernels), so its prefill is slower than a server's fused Triton scan; decode is a
handful of small GEMMs and elementwise ops either way. Also reports each variant's parameters and its decode state
per sequence (KV bytes at the context for attention, conv + scan state for Mamba).
Writes benchmarks/results/hybrid_layers.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.common import write_results  # noqa: E402
from puzzle.arch import (  # noqa: E402
    Architecture,
    AttentionConfig,
    BlockConfig,
    FFNConfig,
    MambaConfig,
    attention_params,
    ffn_params,
)
from puzzle.checkpoint import decilm_config  # noqa: E402
from puzzle.profiling import ProfileConfig, resolve_device_dtype, time_layers  # noqa: E402

NO_OP_ATTENTION, NO_OP_FFN = AttentionConfig(no_op=True), FFNConfig(no_op=True)


def nemotron_h_8b(tiny: bool) -> tuple[dict, MambaConfig, int, int]:
    """(DeciLM config dict of one Mamba layer, the Mamba settings, query heads, MLP width)."""
    if tiny:
        hidden, heads, head_dim, mamba, width = 256, 4, 64, MambaConfig(num_heads=8, head_dim=32, state_dim=16, num_groups=2), 512
    else:
        hidden, heads, head_dim, width = 4096, 32, 128, 21504
        mamba = MambaConfig(num_heads=128, head_dim=64, state_dim=128, num_groups=8, conv_kernel=4)
    config = {"vocab_size": 1024, "hidden_size": hidden, "num_attention_heads": heads, "head_dim": head_dim,
              "num_hidden_layers": 1, "hidden_act": "relu2", "rms_norm_eps": 1e-5, "position_embedding_type": "none",
              "mamba_chunk_size": 32 if tiny else 128, "mamba_dt_min": 0.001, "max_position_embeddings": 1 << 17,
              "block_configs": [{"attention": {"mamba": mamba.__dict__}, "ffn": {"no_op": True}}]}
    return config, mamba, heads, width


def variants(mamba: MambaConfig, heads: int, width: int) -> list[tuple[str, str, BlockConfig]]:
    """(kind, name, block): the parent's three layer types first, then their cheaper versions."""
    out = []
    for kept in (1.0, 0.75, 0.5, 0.25):
        m = replace(mamba, num_heads=int(mamba.num_heads * kept))
        out.append(("mamba", m.label(), BlockConfig(attention=AttentionConfig(mamba=m), ffn=NO_OP_FFN)))
    for kv in (8, 4, 2, 1):
        if kv <= heads and heads % kv == 0:
            a = AttentionConfig(n_heads_in_group=heads // kv)
            out.append(("attention", a.label(heads), BlockConfig(attention=a, ffn=NO_OP_FFN)))
    for kept in (1.0, 0.75, 0.5, 0.25):
        f = FFNConfig(intermediate_size=int(width * kept), gated=False)
        out.append(("mlp", f.label(), BlockConfig(attention=NO_OP_ATTENTION, ffn=f)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (a CPU smoke run)")
    parser.add_argument("--batches", default="1,64", help="decode batch sizes")
    parser.add_argument("--context", type=int, default=None, help="cached tokens at decode (default 4096; tiny 64)")
    parser.add_argument("--prompt", type=int, default=None, help="prefill tokens (default 2048; tiny 64)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    config_dict, mamba, heads, width = nemotron_h_8b(args.tiny)
    context = args.context or (64 if args.tiny else 4096)
    prompt = args.prompt or (64 if args.tiny else 2048)
    quick = dict(repeats=5, inner=2, warmup=1, stack=2) if args.tiny else {}
    rows = []
    for batch in map(int, args.batches.split(",")):
        cfg = ProfileConfig(batch_size=batch, context_len=context, prompt_len=prompt, **quick)
        device, dtype = resolve_device_dtype(cfg)
        for kind, name, block in variants(mamba, heads, width):
            arch = Architecture.from_config({**config_dict, "block_configs": [block.to_dict()]})
            parent = decilm_config(config_dict, arch)
            timing = time_layers(parent, block, cfg, device, dtype)
            shape = arch.shape
            params = attention_params(shape, block.attention) + ffn_params(shape, block.ffn)
            state = arch.kv_cache_bytes(1, context, cfg.kv_dtype)
            rows.append({"batch": batch, "kind": kind, "variant": name, "params": params, "state_bytes_per_seq": state,
                         "decode_ms": timing.decode_time_s * 1e3, "prefill_ms": timing.prefill_time_s * 1e3})
            print(f"batch {batch:3d} {kind:9s} {name:12s} decode {timing.decode_time_s * 1e3:8.3f} ms  "
                  f"prefill {timing.prefill_time_s * 1e3:8.2f} ms", flush=True)
    device, dtype = resolve_device_dtype(ProfileConfig())
    lines = [f"Nemotron-H-8B-shaped layers ({'tiny shapes, ' if args.tiny else ''}{str(dtype).removeprefix('torch.')}, "
             f"random weights): decode of one token at {context} cached tokens, prefill of {prompt} tokens (batch 1); "
             "puzzle's profiler (stacked copies, CUDA graphs on GPU). Mamba: puzzle's PyTorch scan, no fused kernels.",
             "", "| batch | layer | variant | params (M) | state / seq (MiB) | decode ms | prefill ms | decode vs parent |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        parent = next(r for r in rows if r["batch"] == row["batch"] and r["kind"] == row["kind"])
        ratio = row["decode_ms"] / parent["decode_ms"] if parent["decode_ms"] else float("nan")
        lines.append(f"| {row['batch']} | {row['kind']} | {row['variant']} | {row['params'] / 1e6:.1f} | "
                     f"{row['state_bytes_per_seq'] / 2**20:.2f} | {row['decode_ms']:.3f} | {row['prefill_ms']:.2f} | {ratio:.2f} |")
    data = {"context": context, "prompt": prompt, "tiny": args.tiny, "rows": rows}
    _, md = write_results("hybrid_layers" + ("_tiny" if args.tiny else ""), data, "\n".join(lines), args.out)
    print(md.read_text())


if __name__ == "__main__":
    main()
