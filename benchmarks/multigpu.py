"""BLD and GKD scaling over the GPUs of one host, through torchrun.

    python benchmarks/multigpu.py            # every power of two up to the GPUs present: 1, 2, 4, 8
    python benchmarks/multigpu.py --tiny     # CPU smoke run of the same launches (gloo, 1 and 2 processes)

BLD: a Llama-3.1-8B-shaped parent cut to `--layers` layers (random weights, bf16) and every default
candidate of those layers as units. The calibration statistics are collected once (the library stage);
then `torchrun --nproc-per-node k` starts k workers that each take their share of the units
(`puzzle.distill.bld.worker_share`, the split `puzzle bld` uses) and train them with `train_units` on random tokens.
Units/s is units over the slowest worker's training time (after a one-step warm-up of its first group);
the torchrun wall time, process start and parent build included, is reported beside it.

GKD: the ~1B student and teacher of benchmarks/gkd_throughput.py, distilled by `run_gkd` under torchrun
with DDP and with FSDP2 (`--fsdp`); each process keeps its batch, so k processes train k times the tokens
per step. tokens/s is run_gkd's figure over training steps (a short warm-up run first, same process).

Scaling efficiency = throughput with k / (k x throughput with 1), measured in the same run.
Writes benchmarks/results/multigpu.{json,md} (multigpu_tiny.* with --tiny).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, llama_8b_config, write_results  # noqa: E402


def bld_setup(tiny: bool, layers: int):
    """(parent, arch, units, config) — identical in every process: fixed seed, same device kind."""
    from puzzle.arch import Architecture
    from puzzle.blocks.space import SearchSpace, build_candidates
    from puzzle.modeling.modeling_decilm import DeciLMForCausalLM

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() and not tiny else torch.device("cpu")
    config = llama_8b_config(num_layers=layers, tiny=tiny)
    torch.manual_seed(0)
    with torch.device(device):
        parent = DeciLMForCausalLM(config)
    parent = parent.to(torch.float32 if tiny else torch.bfloat16).eval().requires_grad_(False)
    arch = Architecture.from_config(config.to_dict())
    units = [c for c in build_candidates(arch, SearchSpace()) if c.trainable]
    return parent, arch, units, device


def bld_config(tiny: bool, steps: int):
    from puzzle.distill.bld import BLDConfig

    batch, seq_len = (2, 64) if tiny else (4, 4096)
    return BLDConfig(tokens_per_unit=steps * batch * seq_len, batch_size=batch, eval_tokens=seq_len), seq_len


def bld_prepare(work: Path, tiny: bool, layers: int) -> int:
    """The library stage's calibration statistics, once for every later launch; returns the unit count."""
    from safetensors.torch import save_file

    from benchmarks.bld_8b_layer import RandomTokens
    from puzzle.blocks.init import collect_layer_stats
    from puzzle.blocks.library import stats_path
    from puzzle.run import RunPaths

    parent, arch, units, device = bld_setup(tiny, layers)
    cfg, seq_len = bld_config(tiny, 1)
    data = RandomTokens(parent.config.vocab_size, seq_len, device.type)
    paths = RunPaths(work / "stats")
    paths.calibration.mkdir(parents=True)
    stats = collect_layer_stats(parent, list(data.batches("train", cfg.batch_size, n_tokens=2 * cfg.batch_size * seq_len)),
                                list(range(layers)))
    for layer, tensors in stats.items():
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, stats_path(paths, layer))
    return len(units)


def bld_worker(work: Path, tiny: bool, layers: int, steps: int, tag: str) -> None:
    """One torchrun process: its share of the units, trained as `puzzle bld --worker` would."""
    import shutil

    from benchmarks.bld_8b_layer import RandomTokens
    from puzzle.blocks.library import unit_params
    from puzzle.distill.bld import group_budget, plan_groups, train_group, train_units, unit_path, worker_share
    from puzzle.jobs import shard_from_env
    from puzzle.run import RunPaths

    shard = shard_from_env()
    parent, arch, units, device = bld_setup(tiny, layers)
    cfg, seq_len = bld_config(tiny, steps)
    data = RandomTokens(parent.config.vocab_size, seq_len, device.type)
    paths = RunPaths(work / tag)
    if shard.rank == 0:
        shutil.copytree(work / "stats", paths.root, dirs_exist_ok=True)
    _barrier(work / tag, shard)
    mine = worker_share(units, arch, shard)
    warm = RunPaths(work / f"{tag}-warmup-{shard.rank}")
    shutil.copytree(work / "stats", warm.root, dirs_exist_ok=True)
    train_group(plan_groups(mine, arch, group_budget(cfg, device))[0], parent, arch, warm, data,
                type(cfg)(**{**cfg.__dict__, "tokens_per_unit": cfg.batch_size * seq_len}), device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    train_units(mine, parent, arch, paths, data, cfg, device, f"{shard.rank}/{shard.world_size}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    assert all(unit_path(paths, u).exists() for u in mine)
    record = {"rank": shard.rank, "units": len(mine), "unit_params": sum(unit_params(u, arch) for u in mine),
              "seconds": seconds, "tokens_per_unit": cfg.tokens_per_unit,
              "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    (work / tag / f"rank{shard.rank}.json").write_text(json.dumps(record))


def _barrier(folder: Path, shard) -> None:
    """Rank 0 has copied the statistics when its marker exists (no process group needed for BLD)."""
    marker = folder / ".ready"
    if shard.rank == 0:
        marker.touch()
    while not marker.exists():
        time.sleep(0.1)


def gkd_prepare(work: Path, tiny: bool) -> dict:
    from benchmarks.gkd_throughput import LLAMA_32_1B, TINY, build_pair

    teacher, student, teacher_arch, arch = build_pair(TINY if tiny else LLAMA_32_1B, work / "gkd", "cpu" if tiny else "cuda")
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"teacher_params": teacher_arch.total_params(), "student_params": arch.total_params()}


def gkd_worker(work: Path, tiny: bool, steps: int, fsdp: bool, tag: str) -> None:
    from benchmarks.gkd_throughput import TEXT
    from puzzle.demo import demo_data_config
    from puzzle.distill.gkd import GKDConfig, run_gkd

    batch, seq_len, accum = (2, 64, 1) if tiny else (4, 2048, 2)
    common = dict(batch_size=batch, grad_accum=accum, seq_len=seq_len, lr=1e-5, eval_tokens=seq_len, checkpoint_every=10**9,
                  fsdp=fsdp, device="cpu" if tiny else "auto")
    teacher, student, data_cfg = work / "gkd" / "teacher", work / "gkd" / "student", demo_data_config(TEXT)
    per_step = batch * accum * seq_len * int(os.environ.get("WORLD_SIZE", 1))
    run_gkd(student, teacher, data_cfg, work / f"{tag}-warmup", GKDConfig(tokens=2 * per_step, **common), overwrite=True)
    if torch.cuda.is_available() and not tiny:
        torch.cuda.reset_peak_memory_stats()
    result = run_gkd(student, teacher, data_cfg, work / tag, GKDConfig(tokens=steps * per_step, **common), overwrite=True)
    if int(os.environ.get("RANK", 0)) == 0:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() and not tiny else None
        (work / f"{tag}.json").write_text(json.dumps({
            "tokens_per_s": result.tokens_per_s, "steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
            "world_size": result.world_size, "precision": result.precision, "batch_per_process": batch, "grad_accum": accum,
            "seq_len": seq_len, "peak_gib_rank0": peak}))


def torchrun(k: int, args: list[str], log: Path) -> float:
    """Run this file under `torchrun --nproc-per-node k`; returns the wall time. Raises with the log's tail on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={k}", __file__, *args]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if "--tiny" in args else "4")}
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if code:
        raise RuntimeError(f"{' '.join(args[:2])} with {k} processes failed (exit {code}):\n" + log.read_text()[-3000:])
    return seconds


def efficiency(rows: list[dict], key: str) -> None:
    base = next(r[key] for r in rows if r["k"] == 1)
    for r in rows:
        r["speedup"] = r[key] / base
        r["efficiency"] = r["speedup"] / r["k"]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def markdown(record: dict) -> str:
    lines = []
    if "bld" in record:
        lines += _bld_markdown(record["bld"], record["gpus"])
    if "gkd" in record:
        lines += _gkd_markdown(record["gkd"], record["gpus"])
    if record.get("not_run"):
        lines += ["", f"Not run: {record['not_run']}"]
    return "\n".join(lines)


def _bld_markdown(b: dict, gpus: int) -> list[str]:
    precision = "bf16 parent, fp32 units with bf16 autocast" if gpus else "fp32 on the CPU (gloo smoke run, tiny shapes)"
    lines = [f"BLD: Llama-3.1-8B-shaped parent cut to {b['layers']} layers (random weights, {precision}), all {b['units']} default units of those layers, {b['tokens_per_unit']:,} tokens per unit; "
             f"split over workers by `puzzle bld`'s own contiguous split. Units/s over the slowest worker's "
             f"training time; wall = the whole torchrun launch (start, parent build, warm-up).", "",
             "| workers | units/s | speedup | efficiency | slowest worker (s) | units per worker | torchrun wall (s) | peak GiB |",
             "|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in b["rows"]:
        lines.append(f"| {r['k']} | {r['units_per_s']:.3f} | {r['speedup']:.2f}x | {r['efficiency']:.2f} | {r['seconds']:.1f} | "
                     f"{r['units_per_worker']} | {r['wall_s']:.1f} | {r['peak_gib']} |")
    return lines


def _gkd_markdown(g: dict, gpus: int) -> list[str]:
    precision = "bf16 autocast" if gpus else "fp32 on the CPU"
    lines = ["", f"GKD: {_count(g['student_params'])} student from a {_count(g['teacher_params'])} teacher "
             f"(benchmarks/gkd_throughput.py's pair), KL + hidden-state cosine, {precision}, per-process batch kept "
              f"(weak scaling); tokens/s over the measured steps.", "",
              "| mode | processes | tokens/s | speedup | efficiency | batch/process x seq (x accum) | steps | peak GiB (rank 0) |",
              "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in g["rows"]:
        lines.append(f"| {r['mode']} | {r['k']} | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | {r['efficiency']:.2f} | "
                     f"{r['batch_per_process']} x {r['seq_len']} (x {r['grad_accum']}) | {r['steps']} | "
                     f"{None if r['peak_gib_rank0'] is None else round(r['peak_gib_rank0'], 1)} |")
    return lines


def bld_part(record: dict, work: Path, ks: list[int], common: list[str], args) -> None:
    units = bld_prepare(work, args.tiny, args.layers)
    record["bld"] = {"layers": args.layers, "units": units, "rows": []}
    for k in ks:
        tag = f"bld-k{k}"
        wall = torchrun(k, ["--role", "bld", "--work", str(work), "--tag", tag, *common], work / f"{tag}.log")
        ranks = [json.loads((work / tag / f"rank{r}.json").read_text()) for r in range(k)]
        assert sum(r["units"] for r in ranks) == units, "every unit must be trained exactly once"
        slowest = max(r["seconds"] for r in ranks)
        record["bld"]["tokens_per_unit"] = ranks[0]["tokens_per_unit"]
        record["bld"]["rows"].append({"k": k, "seconds": slowest, "units_per_s": units / slowest, "wall_s": wall,
                                      "units_per_worker": [r["units"] for r in ranks], "worker_seconds": [r["seconds"] for r in ranks],
                                      "peak_gib": None if ranks[0]["peak_gib"] is None else round(max(r["peak_gib"] for r in ranks), 1)})
        print(f"bld k={k}: {units / slowest:.3f} units/s (slowest worker {slowest:.1f} s, wall {wall:.1f} s)", flush=True)
    efficiency(record["bld"]["rows"], "units_per_s")


def gkd_part(record: dict, work: Path, ks: list[int], common: list[str], args, save) -> None:
    record["gkd"] = {**gkd_prepare(work, args.tiny), "rows": []}
    for mode in ("DDP", "FSDP2"):
        rows = []
        for k in ks:
            tag = f"gkd-{mode.lower()}-k{k}"
            flags = ["--fsdp"] if mode == "FSDP2" else []
            wall = torchrun(k, ["--role", "gkd", "--work", str(work), "--tag", tag, *flags, *common], work / f"{tag}.log")
            rows.append({"mode": mode, "k": k, "wall_s": wall, **json.loads((work / f"{tag}.json").read_text())})
            print(f"gkd {mode} k={k}: {rows[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
        efficiency(rows, "tokens_per_s")
        record["gkd"]["rows"] += rows
        save()  # DDP's rows are kept if FSDP does not finish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU, gloo, 1 and 2 processes")
    parser.add_argument("--layers", type=int, default=4, help="parent layers whose units BLD trains")
    parser.add_argument("--bld-steps", type=int, default=None, help="optimizer steps per unit (default 8; tiny 2)")
    parser.add_argument("--gkd-steps", type=int, default=None, help="measured GKD steps (default 20; tiny 3)")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="process counts (default: powers of two up to the GPUs)")
    parser.add_argument("--parts", nargs="+", choices=("bld", "gkd"), default=["bld", "gkd"],
                        help="what to measure; a part left out keeps its rows from an earlier results file")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON and markdown results")
    parser.add_argument("--role", choices=("bld", "gkd"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.bld_steps = args.bld_steps or (2 if args.tiny else 8)
    args.gkd_steps = args.gkd_steps or (3 if args.tiny else 20)
    if args.role == "bld":
        return bld_worker(args.work, args.tiny, args.layers, args.bld_steps, args.tag)
    if args.role == "gkd":
        return gkd_worker(args.work, args.tiny, args.gkd_steps, args.fsdp, args.tag)

    gpus = torch.cuda.device_count()
    if not args.tiny and gpus == 0:
        sys.exit("no GPU: use --tiny for a CPU smoke run")
    ks = args.ks or ([1, 2] if args.tiny else [k for k in (1, 2, 4, 8) if k <= gpus])
    common = ["--layers", str(args.layers), "--bld-steps", str(args.bld_steps), "--gkd-steps", str(args.gkd_steps)]
    common += ["--tiny"] if args.tiny else []
    name = "multigpu_tiny" if args.tiny else "multigpu"
    earlier = args.results / f"{name}.json"
    record = json.loads(earlier.read_text()) if earlier.exists() and set(args.parts) != {"bld", "gkd"} else {}
    record.pop("environment", None)
    record |= {"command": " ".join(["python", "benchmarks/multigpu.py", *sys.argv[1:]]), "gpus": gpus,
              "not_run": "" if args.tiny or gpus >= 8 else f"{[k for k in (4, 8) if k > gpus]} processes: only {gpus} GPU(s) on this host"}
    with tempfile.TemporaryDirectory(prefix="multigpu-") as tmp:
        work = Path(tmp)

        def save():
            return write_results(name, record, markdown(record), args.results)

        if "bld" in args.parts:
            bld_part(record, work, ks, common, args)
            save()  # kept if the GKD part does not finish
        if "gkd" in args.parts:
            gkd_part(record, work, ks, common, args, save)
    paths = save()
    print(paths[1].read_text())


if __name__ == "__main__":
    main()
