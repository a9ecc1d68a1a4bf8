"""Blockwise local distillation of one Llama-3.1-8B-shaped layer, tokens/s per unit.

    python benchmarks/bld_8b_layer.py           # H100 / H200, bf16 parent, bf16 autocast units
    python benchmarks/bld_8b_layer.py --tiny    # CPU smoke run of the same code path

The parent is an 8B-shaped model cut to two layers (random weights, bf16); the units are every default
candidate of layer 1 (KV heads 4/2/1, windows 128/1024, linear, FFN 87..10 %, linear FFN). They are
trained by puzzle.distill.bld's own group trainer on random token batches (throughput does not depend on
the text), first all together (one shared parent pass, as a worker does), then each alone.
Writes benchmarks/results/bld_8b_layer.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.common import llama_8b_config, write_results  # noqa: E402
from puzzle.arch import Architecture  # noqa: E402
from puzzle.blocks.init import collect_layer_stats  # noqa: E402
from puzzle.blocks.library import stats_path, unit_params  # noqa: E402
from puzzle.blocks.space import AttentionSpace, FFNSpace, SearchSpace, build_candidates  # noqa: E402
from puzzle.distill.bld import BLDConfig, train_group  # noqa: E402
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM  # noqa: E402
from puzzle.run import RunPaths  # noqa: E402


@dataclass
class _DataConfig:
    seq_len: int


class RandomTokens:
    """Random token batches with TokenData's interface (only throughput is measured here)."""

    def __init__(self, vocab: int, seq_len: int, device: str):
        self.config, self.vocab, self.device = _DataConfig(seq_len), vocab, device
        self.cache_path = "random"

    def batches(self, split, batch_size, seq_len=None, n_tokens=None, shuffle=True, seed=0, start_step=0):
        seq_len = seq_len or self.config.seq_len
        gen = torch.Generator().manual_seed(seed * 1000 + (split == "held_out"))
        steps = -(-(n_tokens or batch_size * seq_len) // (batch_size * seq_len))
        for _ in range(start_step, steps):
            yield torch.randint(0, self.vocab, (batch_size, seq_len), generator=gen)


ALONE_QUICK = ("kv4", "kv1", "kv8_w1024", "linear", "ffn7168")  # a representative subset when time is short


def run(tiny: bool, quick: bool = False) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = llama_8b_config(num_layers=2, tiny=tiny)
    with torch.device(device):
        parent = DeciLMForCausalLM(config)
    parent = parent.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval().requires_grad_(False)
    arch = Architecture.from_config(config.to_dict())
    space = SearchSpace(attention=AttentionSpace(windows=(128, 1024)), ffn=FFNSpace(multiple=64 if tiny else 256))
    units = [c for c in build_candidates(arch, space) if c.layer == 1 and c.trainable]
    seq_len, batch = (128, 4) if tiny else (4096, 4)
    steps = 3 if tiny else (6 if quick else 12)
    cfg = BLDConfig(tokens_per_unit=steps * batch * seq_len, batch_size=batch, eval_tokens=seq_len, checkpoint_every=10**6,
                    max_group_params=10**12)
    data = RandomTokens(config.vocab_size, seq_len, device.type)
    results, rows = {"seq_len": seq_len, "batch_size": batch, "steps": steps, "units": {}}, []
    with tempfile.TemporaryDirectory() as tmp:
        paths = RunPaths(Path(tmp))
        paths.calibration.mkdir(parents=True)
        stats = collect_layer_stats(parent, list(data.batches("train", batch, n_tokens=2 * batch * seq_len)), [1])
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in stats[1].items()}, stats_path(paths, 1))

        def timed(group):
            train_group(group, parent, arch, paths, data, BLDConfig(**{**cfg.__dict__, "tokens_per_unit": batch * seq_len}),
                        device)  # warm-up (kernels, allocator)
            for u in group:
                (paths.library / "attn" / "L1" / f"{u.name}.safetensors").unlink(missing_ok=True)
                (paths.library / "ffn" / "L1" / f"{u.name}.safetensors").unlink(missing_ok=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = train_group(group, parent, arch, paths, data, cfg, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            for u in group:
                (paths.library / ("attn" if u.kind == "attention" else "ffn") / "L1" / f"{u.name}.safetensors").unlink()
            return seconds, peak, out

        seconds, peak, out = timed(units)
        tokens = steps * batch * seq_len
        results["together"] = {"units": len(units), "seconds": seconds, "tokens_per_s": tokens / seconds,
                               "unit_tokens_per_s": tokens * len(units) / seconds, "peak_gib": peak}
        for u in units:
            if quick and not tiny and u.name not in ALONE_QUICK:
                continue
            seconds, peak, out = timed([u])
            results["units"][u.unit_id] = {"params": unit_params(u, arch), "seconds": seconds, "tokens_per_s": tokens / seconds,
                                           "peak_gib": peak, "loss_init": out[0].loss_init, "loss_final": out[0].loss_final}
            rows.append(f"| {u.kind} | {u.name} | {unit_params(u, arch) / 1e6:.1f} | {tokens / seconds:,.0f} | "
                        f"{peak if peak is None else round(peak, 1)} |")
            print(rows[-1], flush=True)
    t = results["together"]
    md = [f"BLD of layer 1 of a Llama-3.1-8B-shaped parent (random weights), batch {batch} x {seq_len} tokens, {steps} timed steps "
          f"after one warm-up step; parent bf16, units fp32 master weights with bf16 autocast" if device.type == "cuda" else
          f"BLD smoke run on the CPU ({config.hidden_size} hidden)", "",
          f"All {t['units']} units of the layer trained together (one shared parent pass per batch): "
          f"{t['tokens_per_s']:,.0f} tokens/s for the group = {t['unit_tokens_per_s']:,.0f} unit-tokens/s; peak memory "
          f"{t['peak_gib'] if t['peak_gib'] is None else round(t['peak_gib'], 1)} GiB.", "",
          "Each unit alone (parent pass included):", "", "| sub-block | variant | params (M) | tokens/s | peak GiB |", "|---|---|---:|---:|---:|", *rows]
    name = "bld_8b_layer_tiny" if tiny else "bld_8b_layer"
    paths = write_results(name, results, "\n".join(md))
    print("\n".join(md))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU (smoke run)")
    parser.add_argument("--quick", action="store_true", help="6 timed steps; only a subset of units alone")
    args = parser.parse_args()
    run(args.tiny, args.quick)
