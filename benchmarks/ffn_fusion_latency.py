"""Decode latency of k sequential FFNs vs one fused FFN of width k * I (FFN Fusion).

    python benchmarks/ffn_fusion_latency.py                 # GPU: Llama-3.1-8B shapes, bf16, CUDA graphs
    python benchmarks/ffn_fusion_latency.py --cpu-tiny      # CPU smoke check: demo shapes, fp32, no graphs

Sequential: k blocks, each `x = x + down(silu(gate(n)) * up(n))` with `n = rmsnorm_j(x)` (its own norm and
residual add), gate and up as one merged GEMM as vLLM runs them. Fused: one such block of width k * I
(one norm, one residual add), which is what `puzzle fuse-ffn` writes. Both run one decode step: x is
(batch, hidden). On GPU each variant is captured once in a CUDA graph; for every input set the two are
replayed alternately (warm-up first), each replay timed with CUDA events, and the median over all replays
is reported with the spread of the per-set medians. The weights (0.35 GB per FFN in bf16) are far larger
than the L2 cache, so every replay streams them from HBM as a real decode step does.

Writes benchmarks/results/ffn_fusion_latency_<device>.json and .md (device, date, torch version).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Settings:
    hidden: int = 4096  # Llama-3.1-8B
    intermediate: int = 14336
    ks: tuple[int, ...] = (2, 3, 4)
    batches: tuple[int, ...] = (1, 64)
    dtype: str = "bfloat16"
    input_sets: int = 5
    warmup: int = 25  # replays of each variant before timing, per input set
    replays: int = 200  # timed replays of each variant, per input set
    cuda_graphs: bool = True
    eps: float = 1e-5


CPU_TINY = Settings(hidden=256, intermediate=768, dtype="float32", input_sets=3, warmup=5, replays=50, cuda_graphs=False)


@dataclass(frozen=True)
class Row:
    k: int
    batch: int
    sequential_us: float  # median over all timed replays
    fused_us: float
    speedup: float  # sequential / fused
    saved_per_ffn_us: float  # (sequential - fused) / (k - 1): what each FFN folded away cost
    sequential_set_medians_us: tuple[float, ...]
    fused_set_medians_us: tuple[float, ...]
    max_abs_error: float  # fused vs the parallel reference computed block by block (sanity)


def ffn_block(x: torch.Tensor, norm: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, eps: float) -> torch.Tensor:
    """x + down(silu(gate(n)) * up(n)), n = rmsnorm(x) * norm; gate_up is (2I, C), down (C, I)."""
    n = F.rms_norm(x, (x.shape[-1],), norm, eps)  # (B, C)
    gate, up = F.linear(n, gate_up).chunk(2, dim=-1)  # (B, I) each
    return x + F.linear(F.silu(gate) * up, down)  # (B, C)


def make_weights(k: int, s: Settings, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """k FFNs (norm gain, merged gate_up, down) and their fusion, gains folded into the gate/up columns."""
    g = torch.Generator(device=device).manual_seed(seed)
    c, i = s.hidden, s.intermediate
    ffns = [
        (1 + 0.1 * torch.randn(c, generator=g, device=device, dtype=dtype),
         torch.randn(2 * i, c, generator=g, device=device, dtype=dtype) * c**-0.5,
         torch.randn(c, i, generator=g, device=device, dtype=dtype) * i**-0.5)
        for _ in range(k)
    ]
    gates = [(gu[:i].float() * n.float()).to(dtype) for n, gu, _ in ffns]
    ups = [(gu[i:].float() * n.float()).to(dtype) for n, gu, _ in ffns]
    fused = (torch.ones(c, device=device, dtype=dtype), torch.cat(gates + ups), torch.cat([d for _, _, d in ffns], dim=1))
    return ffns, fused


def timed_runner(fn, static_x: torch.Tensor, s: Settings):
    """A zero-argument callable running `fn(static_x)` (a CUDA graph replay on GPU) and a timer for it."""
    if static_x.is_cuda and s.cuda_graphs:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the graph (allocator, cuBLAS workspaces)
            for _ in range(3):
                fn(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(static_x)
        run = graph.replay
    else:
        def run():
            fn(static_x)

    if static_x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed() -> float:
            start.record()
            run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3  # µs

    else:
        def timed() -> float:
            t = time.perf_counter()
            run()
            return (time.perf_counter() - t) * 1e6

    return run, timed


@torch.no_grad()
def measure(k: int, batch: int, s: Settings, device: torch.device) -> Row:
    dtype = getattr(torch, s.dtype)
    ffns, fused = make_weights(k, s, device, dtype)
    x = torch.zeros(batch, s.hidden, device=device, dtype=dtype)  # static input the graphs read

    def sequential(h):
        for norm, gate_up, down in ffns:
            h = ffn_block(h, norm, gate_up, down, s.eps)
        return h

    runners = {"sequential": timed_runner(sequential, x, s), "fused": timed_runner(lambda h: ffn_block(h, *fused, s.eps), x, s)}
    times = {name: [] for name in runners}
    set_medians = {name: [] for name in runners}
    g = torch.Generator(device=device).manual_seed(1000 + batch)
    for _ in range(s.input_sets):
        x.copy_(torch.randn(batch, s.hidden, generator=g, device=device, dtype=dtype))
        for name, (run, _) in runners.items():
            for _ in range(s.warmup):
                run()
        this_set = {name: [] for name in runners}
        for r in range(s.replays):  # alternate, so drifting clocks or load hit both alike
            for name in (("sequential", "fused") if r % 2 == 0 else ("fused", "sequential")):
                this_set[name].append(runners[name][1]())
        for name, values in this_set.items():
            times[name] += values
            set_medians[name].append(statistics.median(values))
    parallel = x + sum(ffn_block(x, *w, s.eps) - x for w in ffns)  # x + sum_j f_j(x), block by block
    error = (ffn_block(x, *fused, s.eps).float() - parallel.float()).abs().max().item()
    seq, fus = statistics.median(times["sequential"]), statistics.median(times["fused"])
    return Row(k=k, batch=batch, sequential_us=round(seq, 2), fused_us=round(fus, 2), speedup=round(seq / fus, 4),
               saved_per_ffn_us=round((seq - fus) / (k - 1), 2),
               sequential_set_medians_us=tuple(round(v, 2) for v in set_medians["sequential"]),
               fused_set_medians_us=tuple(round(v, 2) for v in set_medians["fused"]), max_abs_error=error)


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    return {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def markdown(record: dict) -> str:
    s = record["settings"]
    lines = [
        "# FFN Fusion: decode latency of k sequential FFNs vs one fused FFN",
        "",
        f"{record['device']} · torch {record['torch']} · {record['date']} · {s['dtype']} · hidden {s['hidden']}, "
        f"intermediate {s['intermediate']} per FFN · CUDA graphs: {'yes' if s['cuda_graphs'] else 'no'}",
        "",
        f"Median over {s['input_sets']} input sets x {s['replays']} timed replays per variant ({s['warmup']} warm-up "
        "replays per set), sequential and fused alternating. Sequential = k blocks each with its own RMSNorm and "
        "residual add; fused = one block of width k x intermediate. Command: `" + record["command"] + "`.",
        "",
        "| k | batch | sequential (µs) | fused (µs) | speed-up | saved per folded FFN (µs) | per-set medians seq / fused (µs) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in record["rows"]:
        spread = f"{min(r['sequential_set_medians_us'])}-{max(r['sequential_set_medians_us'])} / " \
                 f"{min(r['fused_set_medians_us'])}-{max(r['fused_set_medians_us'])}"
        lines.append(f"| {r['k']} | {r['batch']} | {r['sequential_us']:.1f} | {r['fused_us']:.1f} | {r['speedup']:.3f}x | "
                     f"{r['saved_per_ffn_us']:.1f} | {spread} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-tiny", action="store_true", help="quick CPU smoke check with demo-sized FFNs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and markdown results")
    args = parser.parse_args()
    if args.cpu_tiny:
        s, device = CPU_TINY, torch.device("cpu")
        torch.set_num_threads(1)  # idle OpenMP threads spin; on a shared CPU they swamp kernels this small
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here; use --cpu-tiny for the CPU smoke check")
        s, device = Settings(), torch.device("cuda")
    rows = []
    for batch in s.batches:
        for k in s.ks:
            rows.append(measure(k, batch, s, device))
            r = rows[-1]
            print(f"k={k} batch={batch}: sequential {r.sequential_us:.1f} µs, fused {r.fused_us:.1f} µs, "
                  f"{r.speedup:.3f}x, saved {r.saved_per_ffn_us:.1f} µs per folded FFN", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next k allocates its own weights
    info = device_info(device)
    record = {
        **info, "torch": torch.__version__, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/ffn_fusion_latency.py" + (" --cpu-tiny" if args.cpu_tiny else ""),
        "settings": asdict(s), "rows": [asdict(r) for r in rows],
    }
    name = "cpu-tiny" if args.cpu_tiny else re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-").lower()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ffn_fusion_latency_{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / f"ffn_fusion_latency_{name}.md").write_text(markdown(record))
    print(f"wrote {args.out / f'ffn_fusion_latency_{name}'}.{{json,md}}")


if __name__ == "__main__":
    main()
