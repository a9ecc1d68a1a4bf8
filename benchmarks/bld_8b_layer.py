"""Blockwise local distillation of one Llama-3.1-8B-shaped layer: steady-state tokens/s, MFU, one-time costs.

    python benchmarks/bld_8b_layer.py                          # H100 / H200: bf16 parent, bf16 autocast units
    python benchmarks/bld_8b_layer.py --baseline before.json   # adds a before / after table (same device, same stay)
    python benchmarks/bld_8b_layer.py --tiny                   # CPU smoke run of the same code path

The parent is an 8B-shaped model cut to two layers (random weights, bf16); the units are every default
candidate of layer 1 (KV heads 4/2/1, windows 128/1024, linear, FFN 87..10 %, linear FFN). They are trained by
puzzle.distill.bld's own group trainer on random token batches (throughput does not depend on the text), first
all together (one shared parent pass per batch, as a worker does), then each alone.

Each is trained twice, for S0 and S0 + S steps (S >= 100): the difference is the steady state (S steps), the
rest of the short run is the one-time cost (initialisation, the two held-out evaluations, the unit file write).
MFU counts 6 x trainable parameters per token for gradient-trained units, 4 x hidden^2 for the least-squares
ones (their x^T x and x^T y sums), and 2 x the parent's layer parameters for its forward (attention-score
FLOPs are not counted anywhere), over the device's dense bf16 peak.
Writes benchmarks/results/bld_8b_layer.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.common import SHAPE_NAMES, llama_8b_config, write_results  # noqa: E402
from puzzle.arch import Architecture  # noqa: E402
from puzzle.blocks.init import collect_layer_stats  # noqa: E402
from puzzle.blocks.library import stats_path, unit_params  # noqa: E402
from puzzle.blocks.space import AttentionSpace, FFNSpace, SearchSpace, build_candidates  # noqa: E402
from puzzle.distill.bld import BLDConfig, train_group  # noqa: E402
from puzzle.distill.parent_cache import RecomputedActivations  # noqa: E402
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM  # noqa: E402
from puzzle.run import RunPaths  # noqa: E402

BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12}  # dense, SXM


def bf16_peak() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


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


def unit_flops_per_token(u, arch: Architecture) -> float:
    if u.variant.replace_with_linear:  # least squares: x^T x and x^T y, C x C each
        return 4 * arch.shape.hidden_size ** 2
    return 6 * unit_params(u, arch)


def run(tiny: bool, steps: int, short: int, baseline: Path | None, out: Path | None, shape: str = "8b",
        alone_only: bool = False, group_only: bool = False) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = llama_8b_config(num_layers=2, tiny=tiny, shape=shape)
    with torch.device(device):
        parent = DeciLMForCausalLM(config)
    parent = parent.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval().requires_grad_(False)
    arch = Architecture.from_config(config.to_dict())
    space = SearchSpace(attention=AttentionSpace(windows=(128, 1024)), ffn=FFNSpace(multiple=64 if tiny else 256))
    units = [c for c in build_candidates(arch, space) if c.layer == 1 and c.trainable]
    seq_len, batch = (128, 4) if tiny else (4096, 4)
    tokens_per_step = batch * seq_len
    default_steps = BLDConfig().tokens_per_unit // tokens_per_step  # the default budget at this batch shape
    parent_flops = 2 * sum(arch.layer_params(i) for i in range(2))  # per token, layers 0..1
    peak = bf16_peak()
    data = RandomTokens(config.vocab_size, seq_len, device.type)

    def cfg(n: int) -> BLDConfig:
        return BLDConfig(tokens_per_unit=n * tokens_per_step, batch_size=batch, checkpoint_every=10**6, max_group_params=10**12)

    with tempfile.TemporaryDirectory() as tmp:
        paths = RunPaths(Path(tmp))
        paths.calibration.mkdir(parents=True)
        stats = collect_layer_stats(parent, list(data.batches("train", batch, n_tokens=2 * tokens_per_step)), [1])
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in stats[1].items()}, stats_path(paths, 1))

        def train(group, n: int) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_group(group, parent, arch, paths, data, cfg(n), device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            for u in group:
                (paths.library / ("attn" if u.kind == "attention" else "ffn") / "L1" / f"{u.name}.safetensors").unlink()
            return seconds

        def measure(group) -> dict:
            train(group, 1)  # warm-up: kernels, allocator
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t_short, t_long = train(group, short), train(group, short + steps)
            step_s = (t_long - t_short) / steps
            fixed_s = max(0.0, t_short - short * step_s)
            flops = tokens_per_step * (sum(unit_flops_per_token(u, arch) for u in group) + parent_flops)
            at_default = fixed_s + default_steps * step_s
            return {"units": [u.unit_id for u in group], "params": sum(unit_params(u, arch) for u in group),
                    "step_s": step_s, "tokens_per_s": tokens_per_step / step_s,
                    "unit_tokens_per_s": tokens_per_step * len(group) / step_s, "fixed_s": fixed_s,
                    "fixed_fraction_at_default": fixed_s / at_default, "tflops": flops / step_s / 1e12,
                    "mfu": flops / step_s / peak if peak else None,
                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}

        def parent_step_s() -> float:  # the parent's forward that feeds the units, alone
            source = RecomputedActivations(parent)
            batches = [b.to(device) for b in data.batches("train", batch, n_tokens=(short + steps) * tokens_per_step)]
            timings = []
            for n in (short, short + steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.no_grad():
                    for k in range(n):
                        source.layer_io("train", k, batches[k], [1])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings.append(time.perf_counter() - start)
            return (timings[1] - timings[0]) / steps

        parent_s = parent_step_s()
        together = None if alone_only else measure(units)
        if together:
            print(f"group: {together['tokens_per_s']:,.0f} tokens/s, fixed {together['fixed_s']:.2f} s", flush=True)
        alone = {}
        for u in ([] if group_only else units):
            alone[u.unit_id] = measure([u])
            print(f"{u.unit_id}: {alone[u.unit_id]['tokens_per_s']:,.0f} tokens/s, MFU {alone[u.unit_id]['mfu']}", flush=True)

    # The group against its parts: the parent's forward once plus each unit's own work (its time alone less the
    # parent's forward it paid there), over the group's measured time. 1.0: training them together costs
    # exactly their parts; below: grouping costs extra (memory traffic, allocator), above: it saves.
    parts_s = parent_s + sum(a["step_s"] - parent_s for a in alone.values()) if alone else None
    results = {"shape": shape, "seq_len": seq_len, "batch_size": batch, "steps": steps, "short_steps": short,
               "default_steps": default_steps, "bf16_peak": peak, "parent_step_s": parent_s, "together": together,
               "units": alone, "group_parts_s": parts_s,
               "group_vs_parts": parts_s / together["step_s"] if together and parts_s else None}
    md = markdown(results, device, baseline)
    name = "bld_8b_layer" if shape == "8b" else f"bld_{shape}_layer"
    paths_out = write_results(f"{name}_tiny" if tiny else name, results, md, out)
    print(md)
    print(f"wrote {paths_out[0]} and {paths_out[1]}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(r: dict, device: torch.device, baseline: Path | None) -> str:
    t = r["together"]
    shape = SHAPE_NAMES[r.get("shape", "8b")]
    head = (f"BLD of layer 1 of a {shape}-shaped parent (random weights), batch {r['batch_size']} x {r['seq_len']} "
            f"tokens; steady state over {r['steps']} steps (runs of {r['short_steps']} and {r['short_steps'] + r['steps']} "
            "steps, the difference), one-time cost = the rest of the short run; parent bf16, units fp32 master weights "
            "with bf16 autocast" if device.type == "cuda" else "BLD smoke run on the CPU (tiny shapes)")
    lines = [head, ""]
    if t is not None:
        lines += [
             f"All {len(t['units'])} units together (one shared parent pass per batch): {t['tokens_per_s']:,.0f} tokens/s = "
             f"{t['unit_tokens_per_s']:,.0f} unit-tokens/s, {t['tflops']:.0f} TFLOP/s, MFU {_pct(t['mfu'])}; one-time cost "
             f"{t['fixed_s']:.2f} s = {_pct(t['fixed_fraction_at_default'])} of the group's time at the default budget "
             f"({r['default_steps']} steps); peak {t['peak_gib'] and round(t['peak_gib'], 1)} GiB.", ""]
    if t is not None and r["group_parts_s"]:
        lines += [
             f"The group against its parts: a step takes {1e3 * t['step_s']:.1f} ms; the parent's forward alone "
             f"{1e3 * r['parent_step_s']:.1f} ms plus each unit's own time (alone, less that forward) add up to "
             f"{1e3 * r['group_parts_s']:.1f} ms: the group runs at {_pct(r['group_vs_parts'])} of the speed of its parts.", ""]
    lines += ["Each unit alone (its parent pass included in time and FLOPs):", "",
             "| unit | params (M) | tokens/s | TFLOP/s | MFU | one-time s | one-time at default budget | peak GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for unit, a in r["units"].items():
        lines.append(f"| {unit} | {a['params'] / 1e6:.1f} | {a['tokens_per_s']:,.0f} | {a['tflops']:.0f} | {_pct(a['mfu'])} | "
                     f"{a['fixed_s']:.2f} | {_pct(a['fixed_fraction_at_default'])} | {a['peak_gib'] and round(a['peak_gib'], 1)} |")
    if baseline is not None:
        b = json.loads(Path(baseline).read_text())
        lines += ["", f"Before / after (before: {b.get('label', baseline.name)}, measured in the same stay with this "
                  "benchmark):", "", "| unit | tokens/s before | after | MFU before | after | one-time s before | after |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        pairs = [("group (all units)", b["together"], t)] + [(k, b["units"][k], a) for k, a in r["units"].items() if k in b["units"]]
        for name, x, y in pairs:
            lines.append(f"| {name} | {x['tokens_per_s']:,.0f} | {y['tokens_per_s']:,.0f} | {_pct(x['mfu'])} | {_pct(y['mfu'])} | "
                         f"{x['fixed_s']:.2f} | {y['fixed_s']:.2f} |")
    return "\n".join(lines)


def run_span(span: int, steps: int, short: int, out: Path | None, group_params: int | None = None) -> None:
    """Units of layers 1..span trained as the default budget groups them (bld.max_group_params unset: half the
    free GPU memory), with the parent's forward to layer `span` once per step: what a worker of an 8B search
    that owns `span` layers does."""
    from puzzle.distill.bld import group_budget, plan_groups

    device = torch.device("cuda")
    config = llama_8b_config(num_layers=span + 1)
    with torch.device(device):
        parent = DeciLMForCausalLM(config)
    parent = parent.to(torch.bfloat16).eval().requires_grad_(False)
    arch = Architecture.from_config(config.to_dict())
    units = [c for c in build_candidates(arch, SearchSpace()) if c.layer >= 1 and c.trainable]
    seq_len, batch = 4096, 4
    data = RandomTokens(config.vocab_size, seq_len, device.type)
    budget = group_budget(BLDConfig(max_group_params=group_params), device)
    groups = plan_groups(units, arch, budget)
    with tempfile.TemporaryDirectory() as tmp:
        paths = RunPaths(Path(tmp))
        paths.calibration.mkdir(parents=True)
        layers = list(range(1, span + 1))
        stats = collect_layer_stats(parent, list(data.batches("train", batch, n_tokens=2 * batch * seq_len)), layers)
        from safetensors.torch import save_file

        for i in layers:
            save_file({k: v.contiguous().cpu() for k, v in stats[i].items()}, stats_path(paths, i))

        def train(n: int) -> float:
            torch.cuda.synchronize()
            start = time.perf_counter()
            for g in groups:
                train_group(g, parent, arch, paths, data, BLDConfig(tokens_per_unit=n * batch * seq_len, batch_size=batch,
                                                                     checkpoint_every=10**6, max_group_params=budget), device)
                for u in g:
                    (paths.library / ("attn" if u.kind == "attention" else "ffn") / f"L{u.layer}" / f"{u.name}.safetensors").unlink()
            torch.cuda.synchronize()
            return time.perf_counter() - start

        train(1)
        torch.cuda.reset_peak_memory_stats()
        t_short, t_long = train(short), train(short + steps)
    step_s = (t_long - t_short) / steps
    results = {"span": span, "units": len(units), "groups": len(groups), "budget_params": budget,
               "unit_params": sum(unit_params(u, arch) for u in units), "step_s": step_s,
               "fixed_s": max(0.0, t_short - short * step_s), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
               "seq_len": seq_len, "batch_size": batch, "steps": steps}
    how = "bld.max_group_params" if group_params else "the default: half the free memory"
    md = (f"Units of layers 1..{span} of an 8B-shaped parent ({len(units)} units, {results['unit_params'] / 1e9:.2f}B "
          f"parameters) in {len(groups)} group(s) of at most {budget / 1e9:.2f}B parameters ({how}): {1e3 * step_s:.0f} ms per step of {batch} x {seq_len} tokens, one-time {results['fixed_s']:.1f} s, "
          f"peak {results['peak_gib']:.1f} GiB.")
    write_results(f"bld_8b_span{span}" + (f"_groups{group_params // 10**6}M" if group_params else ""), results, md, out)
    print(md)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU (smoke run)")
    parser.add_argument("--steps", type=int, default=100, help="steady-state steps (the long run's extra steps)")
    parser.add_argument("--short", type=int, default=10, help="steps of the short run")
    parser.add_argument("--baseline", type=Path, help="JSON of an earlier run (e.g. the code before a change)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--span", type=int, help="train layers 1..SPAN's units as a worker owning them does (GPU)")
    parser.add_argument("--max-group-params", type=int, help="with --span: groups of at most this many parameters")
    parser.add_argument("--shape", choices=("8b", "70b", "405b"), default="8b", help="Llama-3.x shape of the layer")
    parser.add_argument("--alone-only", action="store_true", help="skip the all-units group (too large for one GPU at 405b)")
    parser.add_argument("--group-only", action="store_true", help="only the all-units group, no unit alone")
    args = parser.parse_args()
    if args.span:
        run_span(args.span, args.steps, args.short, args.out, args.max_group_params)
    else:
        run(args.tiny, args.steps, args.short, args.baseline, args.out, args.shape, args.alone_only, args.group_only)
