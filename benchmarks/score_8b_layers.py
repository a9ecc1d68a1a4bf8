"""Replace-one-block scoring of Llama-3.1-8B-shaped layers' candidates: tokens/s, and scores against a baseline.

    python benchmarks/score_8b_layers.py                          # H100 / H200, bf16
    python benchmarks/score_8b_layers.py --baseline before.json   # before / after (same device, same stay)
    python benchmarks/score_8b_layers.py --tiny                   # CPU smoke run of the same code path

The parent is an 8B-shaped model cut to --layers layers (random weights, bf16 on GPU); every layer's default
candidates (KV heads 4/2/1, windows 128/1024, linear, no-op; FFN 87..10 %, linear, no-op) are scored by
puzzle.scoring.score_candidates on random tokens, with seeded random weights for the trained ones (speed does
not depend on them; the same seed gives the baseline the same blocks, so its scores must be the same).
Throughput = scored positions x candidates / seconds. Writes benchmarks/results/score_8b_layers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.bld_8b_layer import RandomTokens  # noqa: E402
from benchmarks.common import SHAPE_NAMES, llama_8b_config, write_results  # noqa: E402
from puzzle.arch import Architecture  # noqa: E402
from puzzle.blocks.space import AttentionSpace, FFNSpace, SearchSpace, build_candidates  # noqa: E402
from puzzle.blocks.subblock import SubBlock  # noqa: E402
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM  # noqa: E402
from puzzle.scoring import ScoreConfig, score_candidates  # noqa: E402


def run(tiny: bool, layers: int, tokens: int, baseline: Path | None, out: Path | None, shape: str = "8b") -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = llama_8b_config(num_layers=layers, tiny=tiny, shape=shape)
    torch.manual_seed(0)
    with torch.device(device):
        parent = DeciLMForCausalLM(config)
    parent = parent.to(dtype).eval().requires_grad_(False)
    arch = Architecture.from_config(config.to_dict())
    space = SearchSpace(attention=AttentionSpace(windows=(128, 1024)), ffn=FFNSpace(multiple=64 if tiny else 256))
    candidates = build_candidates(arch, space)
    seq_len, batch = (128, 4) if tiny else (4096, 8)
    data = RandomTokens(config.vocab_size, seq_len, device.type)
    cfg = ScoreConfig(tokens=tokens, batch_size=batch)

    def load(c):
        if not c.trainable:
            return None
        torch.manual_seed(zlib.crc32(c.unit_id.encode()))
        with torch.device(device):
            return SubBlock(parent.config, c.kind, c.variant).to(dtype)

    score_candidates(parent, [c for c in candidates if c.layer == layers - 1], load, data,
                     ScoreConfig(tokens=batch * seq_len, batch_size=batch), "bench")  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    scores = score_candidates(parent, candidates, load, data, cfg, "bench")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    scored = sum(not c.is_parent for c in candidates)
    results = {"shape": shape, "layers": layers, "seq_len": seq_len, "batch_size": batch, "positions": scores.tokens,
               "candidates": scored, "seconds": seconds, "candidate_tokens_per_s": scores.tokens * scored / seconds,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
               "scores": {f"{e.layer}/{e.kind}/{e.name}": [e.kl, e.lm_loss, e.top1] for e in scores.entries}}
    lines = [f"Replace-one-block scoring of all {scored} candidates of a {layers}-layer {SHAPE_NAMES[shape]}-shaped parent "
             f"(random weights, {str(dtype).removeprefix('torch.')}), {scores.tokens:,} positions ({batch} x {seq_len}): "
             f"{seconds:.1f} s = {results['candidate_tokens_per_s']:,.0f} candidate-tokens/s; peak "
             f"{results['peak_gib'] and round(results['peak_gib'], 1)} GiB."]
    if baseline is not None:
        b = json.loads(Path(baseline).read_text())
        diff = max(abs(x - y) for k, v in results["scores"].items() for x, y in zip(v, b["scores"][k]))
        same = all(results["scores"][k] == b["scores"][k] for k in b["scores"])
        results["baseline"] = {"seconds": b["seconds"], "candidate_tokens_per_s": b["candidate_tokens_per_s"],
                               "max_abs_score_difference": diff, "bitwise_equal": same}
        lines += ["", "| code | seconds | candidate-tokens/s | peak GiB |", "|---|---:|---:|---:|",
                  f"| before | {b['seconds']:.1f} | {b['candidate_tokens_per_s']:,.0f} | {b['peak_gib'] and round(b['peak_gib'], 1)} |",
                  f"| after | {seconds:.1f} | {results['candidate_tokens_per_s']:,.0f} | {results['peak_gib'] and round(results['peak_gib'], 1)} |",
                  "", f"Speed-up {b['seconds'] / seconds:.2f}x. Scores (KL, LM loss, top-1 of every candidate) "
                  + ("bitwise equal to the baseline's." if same else f"differ from the baseline's by at most {diff:.3g}.")]
    md = "\n".join(lines)
    name = "score_8b_layers" if shape == "8b" else f"score_{shape}_layers"
    paths = write_results(f"{name}_tiny" if tiny else name, results, md, out)
    print(md)
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU (smoke run)")
    parser.add_argument("--layers", type=int, default=8, help="layers of the 8B-shaped parent")
    parser.add_argument("--tokens", type=int, help="scored tokens (default: two batches)")
    parser.add_argument("--baseline", type=Path, help="JSON of an earlier run (e.g. the code before a change)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--shape", choices=("8b", "70b", "405b"), default="8b", help="Llama-3.x shape of the parent")
    args = parser.parse_args()
    seq, bs = (128, 4) if args.tiny else (4096, 8)
    run(args.tiny, args.layers, args.tokens or 2 * bs * seq, args.baseline, args.out, args.shape)
