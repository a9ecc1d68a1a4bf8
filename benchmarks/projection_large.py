"""GPU-hours of Llama-3.3-70B- and Llama-3.1-405B-shaped searches per stage, projected from H200 measurements.

    python benchmarks/projection_large.py

Reads bld_70b_layer.json (all default units of one 70B-shaped layer trained as one group, steady state and
one-time cost, and the parent's forward), score_70b_layers.json / score_405b_layers.json (replace-one-block
scoring of 4 and 2 layers) and multigpu.json (GKD rate), and applies them to the default search of the whole
parent (puzzle's own `build_candidates`, `BLDConfig`, `ScoreConfig`, `GKDConfig`), for a parent that does not fit
one GPU, assuming BLD streams the parent one layer at a time with each layer's input kept at its boundary, so the
parent's forward is paid once per BLD batch and layer (not once per group up to its depth, as for an 8B parent
held whole; puzzle's BLD does not keep such boundary inputs yet).
405B's BLD is scaled from the 70B measurement by the units' FLOPs (same MFU: its GEMMs are larger; its attention
units measured alone ran at 40-67% MFU, see the note in the markdown). Writes benchmarks/results/projection_large.{json,md}.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.bld_8b_layer import unit_flops_per_token  # noqa: E402
from benchmarks.common import LLAMA_SHAPES, RESULTS, SHAPE_NAMES, llama_8b_config, write_results  # noqa: E402
from benchmarks.projection_8b import CUDA_CONTEXT_GIB, GPUS, H200_GIB, gkd, scoring  # noqa: E402
from puzzle.arch import Architecture  # noqa: E402
from puzzle.blocks.library import unit_params  # noqa: E402
from puzzle.blocks.space import SearchSpace, build_candidates  # noqa: E402
from puzzle.distill.bld import GROUP_MEMORY_FRACTION, TRAINED_PARAM_BYTES, BLDConfig  # noqa: E402


def arch_of(shape: str) -> Architecture:
    return Architecture.from_config(llama_8b_config(num_layers=LLAMA_SHAPES[shape][-1], shape=shape).to_dict())


def layer_units(arch: Architecture, layer: int = 1) -> list:
    return [c for c in build_candidates(arch, SearchSpace(layers=(layer,))) if c.trainable]


def bld(arch: Architecture, measured: dict, ref: Architecture) -> dict:
    """Per layer: steps x (its units' own step time + the parent layer's forward for each group) + one-time costs;
    plus the parent's forward once per batch and layer for the streamed layer inputs. The units' own time comes
    from the measured 70B group, scaled by the units' FLOPs for another shape."""
    cfg = BLDConfig()
    tokens_per_step = measured["batch_size"] * measured["seq_len"]
    steps = cfg.tokens_per_unit // tokens_per_step
    group = measured["together"]
    flops, flops_ref = (sum(unit_flops_per_token(u, a) for u in layer_units(a)) for a in (arch, ref))
    scale = flops / flops_ref
    layer_forward_s = measured["parent_step_s"] / 2 * arch.layer_params(1) / ref.layer_params(1)  # one layer, one step
    own_s = (group["step_s"] - measured["parent_step_s"]) * scale  # all units of a layer, one step
    unit_params_layer = sum(unit_params(u, arch) for u in layer_units(arch))
    free = (H200_GIB - CUDA_CONTEXT_GIB) * 2**30 - 2 * 2 * arch.layer_params(1)  # two bf16 layers resident
    groups = math.ceil(unit_params_layer / (GROUP_MEMORY_FRACTION * free / TRAINED_PARAM_BYTES))
    per_layer_s = steps * (own_s + groups * layer_forward_s) + group["fixed_s"] * scale
    stream_s = steps * layer_forward_s * arch.num_layers  # boundary inputs: every layer over every batch, once
    total = arch.num_layers * per_layer_s + stream_s
    boundary_gb = steps * tokens_per_step * arch.shape.hidden_size * 2 / 1e9  # one layer boundary, bf16
    return {"units_per_layer": len(layer_units(arch)), "unit_params_per_layer_b": unit_params_layer / 1e9,
            "groups_per_layer": groups, "flops_scale_from_70b": scale, "steps_per_unit": steps,
            "tokens_per_unit": cfg.tokens_per_unit, "per_layer_hours": per_layer_s / 3600, "stream_hours": stream_s / 3600,
            "gpu_hours": total / 3600, "wall_hours_8_gpus": total / GPUS / 3600, "boundary_activations_gb": boundary_gb,
            "worker_layer_gb": 2 * arch.layer_params(1) / 1e9}


def run() -> None:
    bld_measured = json.loads((RESULTS / "bld_70b_layer.json").read_text())
    ref = arch_of("70b")
    results, rows = {"shapes": {}}, []
    for shape in ("70b", "405b"):
        arch = arch_of(shape)
        score_measured = json.loads((RESULTS / f"score_{shape}_layers.json").read_text())
        b = bld(arch, bld_measured, ref)
        # scoring's per-layer forward at this shape: the 70B parent forward scaled by layer parameters
        per_layer = dict(bld_measured, parent_step_s=bld_measured["parent_step_s"] * arch.layer_params(1) / ref.layer_params(1))
        s = scoring(arch, score_measured, per_layer)
        g = gkd(arch, child_fraction=0.75)
        total = b["gpu_hours"] + s["gpu_hours"] + g["gpu_hours"]
        results["shapes"][shape] = {"params_b": arch.total_params() / 1e9, "layers": arch.num_layers, "bld": b,
                                    "score": s, "gkd": g, "total_gpu_hours": total,
                                    "node_days_8_gpus": total / GPUS / 24}
        rows.append((shape, arch, b, s, g, total))
    md = ["Default searches of a whole parent on H200s (BLD: every default unit of every layer, "
          f"{rows[0][2]['tokens_per_unit'] / 2**20:.0f}M tokens each; scoring: every candidate on the default tokens; "
          "GKD: one child with 75% of the parent's layer parameters on the default tokens).", "",
          "| parent | params | BLD GPU-h | scoring GPU-h | GKD GPU-h (one child) | total GPU-h | node-days on 8 GPUs |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for shape, arch, b, s, g, total in rows:
        md.append(f"| {SHAPE_NAMES[shape]} | {arch.total_params() / 1e9:.0f}B | {b['gpu_hours']:.0f} | {s['gpu_hours']:.1f} | "
                  f"{g['gpu_hours']:.0f} | {total:.0f} | {total / GPUS / 24:.2f} |")
    md += ["", "Per stage:"]
    for shape, arch, b, s, g, total in rows:
        md += [f"- {SHAPE_NAMES[shape]}: BLD {b['units_per_layer']} units per layer ({b['unit_params_per_layer_b']:.1f}B "
               f"parameters, {b['groups_per_layer']} group(s) per layer in half an H200's free memory), "
               f"{b['per_layer_hours']:.2f} GPU-h per layer + {b['stream_hours']:.1f} GPU-h for the streamed parent "
               f"forward; a worker holds {b['worker_layer_gb']:.1f} GB of parent weights (one layer and the next) and "
               f"{b['boundary_activations_gb']:.0f} GB of layer-boundary inputs per layer on local disk. Scoring "
               f"{s['candidates']} candidates on {s['positions']:,} positions. GKD of a {g['child_params_b']:.0f}B child "
               f"from the {g['teacher_params_b']:.0f}B teacher at {g['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU."]
    m = bld_measured["together"]
    md += ["", "Measured inputs (H200, torch " + bld_measured["environment"]["torch"] + "):",
           f"- `bld_8b_layer.py --shape 70b --group-only`: the 13 default units of one 70B-shaped layer as one group, "
           f"{m['params'] / 1e9:.2f}B parameters: {1e3 * m['step_s']:.0f} ms per step of 4 x 4096 tokens "
           f"({m['tokens_per_s']:,.0f} tokens/s, MFU {100 * m['mfu']:.1f}% counting unit and parent FLOPs, not attention "
           f"scores), one-time {m['fixed_s']:.1f} s, peak {m['peak_gib']:.1f} GiB; the parent's forward through 2 layers "
           f"{1e3 * bld_measured['parent_step_s']:.0f} ms per step ({bld_measured['environment']['date']}).",
           "- 405B: no full layer was trained (a unit-by-unit run did not fit the session's GPU time); its units alone, "
           "attention variants only, ran at 40-67% MFU (kv4 55.3%, kv2 51.4%, kv1 56.7%, window 128 40.2%, window 1024 "
           "46.3%, linear 67.2%; 2026-12-02), consistent with the 70B group's MFU, which this projection assumes.",
           "- Scoring: `score_8b_layers.py --shape 70b --layers 4` and `--shape 405b --layers 2` (per-candidate cost fitted, "
           "per-layer cost from the BLD parent forward scaled by layer parameters).",
           "- GKD: the FSDP2 FLOP rate of multigpu.json, as in projection_8b.md (the least certain row).",
           "- The measured group had 13 units (windows 128 and 1024); the default space has 12 (window 128 only), so the "
           "BLD rows are slightly conservative.",
           "", "Assumes BLD streams the parent: each layer's inputs computed once per layer and batch and kept at the layer "
           "boundary. puzzle does not do that yet: a parent over `parent_memory_gb` runs with its other layers read from "
           "its files per forward (same results), and BLD recomputes the parent up to each group's deepest layer every "
           "step: at 80 layers about 40 layers' forward per step, so the boundary cache is what makes these numbers "
           "reachable."]
    paths = write_results("projection_large", results, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    run()
