"""Profile one gpt-oss-20b-shaped MoE layer with 32, 24, 16 and 8 experts kept, at decode batch 1 and 64.

    python benchmarks/moe_layer_profile.py           # H100 / H200, bf16 (a few minutes)
    python benchmarks/moe_layer_profile.py --tiny    # CPU smoke run of the same code path

gpt-oss-20b's shape (hidden 2880, 64 query / 8 KV heads of 64, 32 experts of width 2880, 4 per token, attention
sinks, alternating 128-token window / full attention, vocab 201088), random bf16 weights (timings do not depend on
the values; a random router spreads tokens over the experts as a uniform router would). For each point every
variant is timed by puzzle's profiler (experts in their grouped-GEMM form, CUDA graphs: `puzzle.grouped_moe`) and
also in puzzle's per-expert form without graphs (what transformers' eager loop pays), next to the analytic
estimate (bytes of the experts the batch routes to / bandwidth). Then a 24-layer parent and a child with half
the experts kept in every layer are timed end to end and compared with the sums the MIP would use.
Writes benchmarks/results/moe_layer_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from transformers import GptOssConfig

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.common import write_results  # noqa: E402
from puzzle.arch import Architecture, AttentionConfig, BlockConfig, FFNConfig  # noqa: E402
from puzzle.checkpoint import decilm_config, decilm_config_from_parent  # noqa: E402
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM  # noqa: E402
from puzzle.profiling import (  # noqa: E402
    Hardware,
    ProfileConfig,
    _stacked_layers,
    _time_stacked_layers,
    analytic_timing,
    expected_active_experts,
    measure_model,
    predicted_timing,
    profile_variants,
)

H200 = Hardware(name="H200", memory_bandwidth=4.3e12, flops=8.0e14)  # ~90% of 4.8 TB/s; dense bf16 reachable


def gpt_oss_config(tiny: bool, layers: int) -> dict:
    """gpt-oss-20b's config.json (tiny: the same structure, small), converted to puzzle's description."""
    if tiny:
        shape = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=256,
                     num_local_experts=16, vocab_size=1024)
    else:
        shape = dict(hidden_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64, intermediate_size=2880,
                     num_local_experts=32, vocab_size=201088)
    hf = GptOssConfig(**shape, num_hidden_layers=layers, num_experts_per_tok=4, sliding_window=128,
                      layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                      max_position_embeddings=131072)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        config = json.loads((Path(tmp) / "config.json").read_text())
        return decilm_config_from_parent(Path(tmp), config)


def per_expert_eager(parent, block: BlockConfig, cfg: ProfileConfig, device, dtype) -> float:
    """Decode seconds of `block` in puzzle's per-expert form, no CUDA graphs (transformers' eager loop)."""
    cfg = replace(cfg, cuda_graphs=False)
    config, layers = _stacked_layers(parent, block, cfg.stack, device, dtype)
    return _time_stacked_layers(config, layers, block, cfg, device, dtype).decode_time_s


def random_model(config, device, dtype) -> DeciLMForCausalLM:
    with torch.device(device):
        model = DeciLMForCausalLM(config)
    return model.to(dtype).eval()


def run(tiny: bool, quick: bool) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layers = 4 if tiny else 24
    parent_dict = gpt_oss_config(tiny, layers)
    parent = decilm_config(parent_dict)
    arch = Architecture.from_config(parent_dict)
    moe = arch.blocks[1].ffn.moe
    experts = moe.num_local_experts
    kept = [experts, experts * 3 // 4, experts // 2, experts // 4]
    ffns = [FFNConfig(moe=replace(moe, num_local_experts=k)) for k in kept]
    full, window = arch.blocks[1].attention, arch.blocks[0].attention
    variants = [("attention", full), ("attention", window), ("attention", AttentionConfig(no_op=True))] + \
        [("ffn", f) for f in ffns]
    repeats = 5 if tiny or quick else 20
    points = {f"batch{b}": ProfileConfig(batch_size=b, context_len=256 if tiny else 4096, prompt_len=128 if tiny else 2048,
                                        repeats=repeats, inner=5 if quick else 10, hardware=H200) for b in (1, 64)}
    results, md = {"shape": {k: parent_dict[k] for k in ("hidden_size", "num_attention_heads", "head_dim", "vocab_size")}
                   | {"experts": experts, "per_token": moe.num_experts_per_tok, "expert_width": moe.expert_intermediate_dim,
                      "layers": layers}, "points": {}}, []
    child_arch = Architecture(shape=arch.shape, blocks=tuple(
        replace(b, ffn=FFNConfig(moe=replace(moe, num_local_experts=experts // 2))) for b in arch.blocks))
    for point, cfg in points.items():
        print(f"== {point}: profiling {len(variants)} variants", flush=True)
        profile = profile_variants(parent, variants, cfg)
        rows = []
        for kind, variant in variants:
            if variant.no_op:
                continue
            cost = profile.cost(kind, variant)
            block = BlockConfig(attention=variant, ffn=FFNConfig(no_op=True)) if kind == "attention" else \
                BlockConfig(attention=AttentionConfig(no_op=True), ffn=variant)
            row = {"kind": kind, "name": cost.name, "decode_s": cost.decode_time_s, "prefill_s": cost.prefill_time_s,
                   "method": cost.method, "param_bytes": cost.param_bytes,
                   "analytic_decode_s": analytic_timing(arch.shape, kind, variant, cfg, 2).decode_time_s}
            if kind == "ffn":
                row["active_experts"] = expected_active_experts(variant.moe.num_local_experts, moe.num_experts_per_tok,
                                                                cfg.batch_size)
                row["per_expert_eager_decode_s"] = per_expert_eager(parent, block, cfg, torch.device(device), dtype)
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
        result = {"profile_config": {k: getattr(cfg, k) for k in ("batch_size", "context_len", "prompt_len", "stack")},
                  "method": profile.method, "device": profile.device, "variants": rows,
                  "fixed_decode_s": profile.fixed.decode_time_s}
        for name, a in (("parent", arch), ("child_half", child_arch)):
            print(f"   timing the {name} end to end", flush=True)
            model = random_model(decilm_config(parent_dict, a), device, dtype)
            measured = measure_model(model, cfg)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
            predicted = predicted_timing(profile, list(a.blocks))
            result[name] = {"measured_decode_s": measured.decode_time_s, "predicted_decode_s": predicted.decode_time_s,
                            "measured_prefill_s": measured.prefill_time_s, "predicted_prefill_s": predicted.prefill_time_s,
                            "params": a.total_params()}
        p, c = result["parent"], result["child_half"]
        result["speedup"] = {"predicted": p["predicted_decode_s"] / c["predicted_decode_s"],
                             "measured": p["measured_decode_s"] / c["measured_decode_s"]}
        results["points"][point] = result
        md += [f"## {point}: decode batch {cfg.batch_size}, context {cfg.context_len}; prefill 1 x {cfg.prompt_len} "
               f"({profile.method}, {profile.dtype}, {cfg.stack} stacked copies)", "",
               "| sub-block | variant | experts the batch reads (expected) | decode (us) | per-expert eager (us) | "
               "analytic (us) | prefill (ms) | params (M) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            active = f"{r['active_experts']:.1f}" if "active_experts" in r else ""
            eager = f"{r['per_expert_eager_decode_s'] * 1e6:.1f}" if "per_expert_eager_decode_s" in r else ""
            md.append(f"| {r['kind']} | {r['name']} | {active} | {r['decode_s'] * 1e6:.1f} | {eager} | "
                      f"{r['analytic_decode_s'] * 1e6:.1f} | {r['prefill_s'] * 1e3:.3f} | {r['param_bytes'] / 2 / 1e6:.1f} |")
        md += ["", f"Whole models ({layers} layers): parent decode step predicted {p['predicted_decode_s'] * 1e3:.3f} ms, "
                   f"measured {p['measured_decode_s'] * 1e3:.3f} ms; child with {experts // 2} experts per layer predicted "
                   f"{c['predicted_decode_s'] * 1e3:.3f} ms, measured {c['measured_decode_s'] * 1e3:.3f} ms; speed-up "
                   f"predicted {result['speedup']['predicted']:.3f}x, measured {result['speedup']['measured']:.3f}x.", ""]
    name = "moe_layer_profile_tiny" if tiny else "moe_layer_profile"
    paths = write_results(name, results, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU (smoke run)")
    parser.add_argument("--quick", action="store_true", help="fewer timing samples")
    args = parser.parse_args()
    run(args.tiny, args.quick)
