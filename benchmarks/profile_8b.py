"""Profile Llama-3.1-8B-shaped variants, solve for 2x throughput, check the prediction.

    python benchmarks/profile_8b.py           # H100 / H200, bf16, CUDA graphs (a few minutes)
    python benchmarks/profile_8b.py --tiny    # CPU smoke run of the same code path

For two operating points (batch 64 / context 4096 and batch 1 / context 2048) every attention and FFN
variant of puzzle's default search space is profiled with puzzle.profiling (random weights: timings do not
depend on the values). The MIP then picks a child for 2x the parent's decode throughput; since quality is
not what this measures, the replace-one-block scores are a fixed synthetic function (parameters removed,
weighted towards the first and last layers). The child and the parent are built with random weights and
timed end to end by the same method, and predicted vs measured speed-up are compared.
Writes benchmarks/results/profile_8b.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.common import llama_8b_config, write_results  # noqa: E402
from puzzle.arch import Architecture  # noqa: E402
from puzzle.blocks.library import Manifest  # noqa: E402
from puzzle.blocks.space import AttentionSpace, FFNSpace, SearchSpace, build_candidates  # noqa: E402
from puzzle.checkpoint import decilm_config  # noqa: E402
from puzzle.mip.stage import SolveConfig, TargetSpec, build_problem, solve_targets  # noqa: E402
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM  # noqa: E402
from puzzle.profiling import ProfileConfig, analytic_timing, measure_model, predicted_timing, profile_variants  # noqa: E402
from puzzle.scoring import CandidateScore, Scores  # noqa: E402


def synthetic_score(c, arch: Architecture) -> float:
    """A fixed stand-in for replace-one-block KL: what a variant removes, weighted by layer position."""
    n, i = arch.num_layers, c.layer
    weight = 1 + 3 * math.exp(-i / 2) + 2 * math.exp(-(n - 1 - i) / 2)
    v, parent = c.variant, arch.blocks[c.layer]
    if c.kind == "attention":
        if v.no_op:
            return weight
        if v.replace_with_linear:
            return 0.8 * weight
        kept = v.num_kv_heads(arch.shape.num_attention_heads) / parent.attention.num_kv_heads(arch.shape.num_attention_heads)
        window = 0.0 if v.window_length is None else 0.3 * math.sqrt(1024 / v.window_length)
        return weight * (0.3 * (1 - kept) + window)
    if v.no_op:
        return 0.9 * weight
    if v.replace_with_linear:
        return 0.7 * weight
    return weight * 0.6 * (1 - v.intermediate_size / parent.ffn.intermediate_size) ** 1.5


def random_model(config, device, dtype) -> DeciLMForCausalLM:
    with torch.device(device):
        model = DeciLMForCausalLM(config)
    return model.to(dtype).eval()


def run(tiny: bool, quick: bool = False) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    parent_config = llama_8b_config(num_layers=4 if tiny else 32, tiny=tiny)
    arch = Architecture.from_config(parent_config.to_dict())
    space = SearchSpace(attention=AttentionSpace(windows=(128, 1024)), ffn=FFNSpace(multiple=64 if tiny else 256))
    candidates = build_candidates(arch, space)
    manifest = Manifest(parent_fingerprint="synthetic", num_layers=arch.num_layers, space={}, candidates=tuple(candidates))
    scores = Scores(parent_fingerprint="synthetic", weights="bld", tokens=0, parent_lm_loss=0.0, entries=tuple(
        CandidateScore(layer=c.layer, kind=c.kind, name=c.name, kl=0.0 if c.is_parent else synthetic_score(c, arch),
                       lm_loss=0.0, top1=1.0) for c in candidates))
    variants = [(c.kind, c.variant) for c in candidates if c.layer == 0]
    points = {
        "batch64_ctx4096": ProfileConfig(batch_size=8 if tiny else 64, context_len=256 if tiny else 4096,
                                         prompt_len=128 if tiny else 2048, repeats=5 if tiny or quick else 30,
                                         inner=5 if quick else 10),
        "batch1_ctx2048": ProfileConfig(batch_size=1, context_len=128 if tiny else 2048, prompt_len=128 if tiny else 2048,
                                        repeats=5 if tiny or quick else 30, inner=5 if quick else 10),
    }
    results, md = {"points": {}}, []
    for point, pcfg in points.items():
        print(f"== {point}: profiling {len(variants)} variants", flush=True)
        profile = profile_variants(parent_config, variants, pcfg)
        dtype_bytes = torch.finfo(dtype).bits // 8
        rows = []
        for cost in profile.variants:
            variant = next(v for k, v in variants if k == cost.kind and v.to_dict() == cost.variant)
            est = analytic_timing(arch.shape, cost.kind, variant, pcfg, dtype_bytes)
            rows.append({**asdict(cost), "analytic_decode_time_s": est.decode_time_s})
        problem = build_problem(manifest, scores, profile, arch)
        plans, failures = solve_targets(problem, profile, manifest, arch,
                                        SolveConfig(targets=(TargetSpec(name="2x", throughput="2x"),)))
        point_result = {"profile_config": asdict(pcfg), "method": profile.method, "device": profile.device,
                        "fixed": asdict(profile.fixed), "variants": rows, "infeasible": failures}
        parent_pred = predicted_timing(profile, list(arch.blocks))
        print("   timing the parent end to end", flush=True)
        model = random_model(parent_config, device, dtype)
        parent_meas = measure_model(model, pcfg)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        point_result["parent"] = {"predicted_decode_s": parent_pred.decode_time_s, "measured_decode_s": parent_meas.decode_time_s,
                                  "predicted_prefill_s": parent_pred.prefill_time_s, "measured_prefill_s": parent_meas.prefill_time_s}
        if plans:
            plan = plans[0]
            child_arch = Architecture(shape=arch.shape, blocks=plan.blocks)
            print("   timing the 2x child end to end", flush=True)
            child = random_model(decilm_config(parent_config.to_dict(), child_arch), device, dtype)
            child_meas = measure_model(child, pcfg)
            del child
            if device == "cuda":
                torch.cuda.empty_cache()
            child_pred = predicted_timing(profile, list(plan.blocks))
            predicted = parent_pred.decode_time_s / child_pred.decode_time_s
            measured = parent_meas.decode_time_s / child_meas.decode_time_s
            heads = arch.shape.num_attention_heads
            point_result["child"] = {
                "predicted_decode_s": child_pred.decode_time_s, "measured_decode_s": child_meas.decode_time_s,
                "predicted_speedup": predicted, "measured_speedup": measured, "error": predicted / measured - 1,
                "params": child_arch.total_params(), "kv_bytes_per_token": child_arch.kv_bytes_per_token(),
                "layers": [f"{b.attention.label(heads)} | {b.ffn.label()}" for b in plan.blocks],
            }
        results["points"][point] = point_result
        md += [f"## {point}: batch {pcfg.batch_size}, context {pcfg.context_len}, prefill 1 x {pcfg.prompt_len} ({profile.method}, {profile.dtype})", "",
               "| sub-block | variant | decode step (us) | analytic (us) | prefill (ms) | params (M) | KV B/token |",
               "|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            md.append(f"| {r['kind']} | {r['name']} | {r['decode_time_s'] * 1e6:.1f} | {r['analytic_decode_time_s'] * 1e6:.1f} | "
                      f"{r['prefill_time_s'] * 1e3:.3f} | {r['param_bytes'] / dtype_bytes / 1e6:.1f} | {r['kv_bytes_per_token']} |")
        md.append(f"| fixed | embeddings + LM head | {profile.fixed.decode_time_s * 1e6:.1f} | | {profile.fixed.prefill_time_s * 1e3:.3f} | | |")
        p = point_result["parent"]
        md += ["", f"Parent decode step: predicted {p['predicted_decode_s'] * 1e3:.3f} ms, measured {p['measured_decode_s'] * 1e3:.3f} ms "
                   f"({p['predicted_decode_s'] / p['measured_decode_s'] - 1:+.1%})."]
        if "child" in point_result:
            c = point_result["child"]
            md += [f"2x child: predicted speed-up {c['predicted_speedup']:.3f}x, measured {c['measured_speedup']:.3f}x, "
                   f"error {c['error']:+.1%} (decode {c['predicted_decode_s'] * 1e3:.3f} ms predicted, {c['measured_decode_s'] * 1e3:.3f} ms measured).",
                   "", "Layers of the 2x child: " + ", ".join(f"{i}: {l}" for i, l in enumerate(c["layers"]))]
        else:
            md += [f"2x target infeasible: {failures}"]
        md.append("")
    name = "profile_8b_tiny" if tiny else "profile_8b"
    paths = write_results(name, results, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU (smoke run)")
    parser.add_argument("--quick", action="store_true", help="fewer timing samples (5 x 5 calls, median)")
    args = parser.parse_args()
    run(args.tiny, args.quick)
