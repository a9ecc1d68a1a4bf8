"""Do puzzle children keep more quality than depth and width pruning at the same measured speed?

    python benchmarks/quality_at_speed.py                 # every step not done yet (one H200, bf16, CUDA graphs)
    python benchmarks/quality_at_speed.py parent search   # only these steps (each resumes from WORK)
    python benchmarks/quality_at_speed.py --tiny          # the same code on a tiny parent, on the CPU (smoke run)

Steps, each under ten minutes on an H200 and recorded in WORK/steps/{step}.json (WORK defaults to
benchmarks/work/quality_at_speed[-tiny], git-ignored; a finished step is skipped):

1. parent: a Llama-shaped parent (12 layers, ~23M parameters) trained on the GPU on Python sources of the
   installed packages (a fixed sample, held-out split by file), with puzzle's demo-parent builder.
2. search: the operating point (the smallest decode batch at which an FFN of half width costs <= 0.75 of
   the full one, measured), the measured speed of every depth (layers dropped) at that point, then
   `puzzle search` (library, BLD, score, profile, solve, realize) for the speeds the depth-pruned models
   reach nearest to 1.5x, 2x and 3x, re-solved until each child's measured speed is within 3%; plus K
   diverse MIP solutions per target, to measure how well summed scores rank assembled children.
3. baselines: at each of those measured speeds, ShortGPT (drop the layers of lowest Block Influence),
   Minitron depth (drop the contiguous block whose removal costs the least LM loss) and Minitron width
   (hidden size, heads and FFN scaled by one factor, found by bisection on measured speed).
4. distill: the same logit-KL GKD budget for every child.
5. measure: decode throughput (CUDA graphs, bf16), parameters, KV bytes/token, held-out LM loss, KL to the
   parent and top-1 agreement (on held-out tokens after those scoring used), lm-eval on the shipped tasks;
   writes benchmarks/results/quality_at_speed[_tiny].{json,md,png}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks.common import RESULTS, environment, write_results  # noqa: E402
from puzzle.arch import Architecture, AttentionConfig, BlockConfig, FFNConfig  # noqa: E402
from puzzle.checkpoint import build_model, decilm_config, load_architecture, load_model, normalized_config  # noqa: E402
from puzzle.demo import DemoConfig, build_demo_parent, demo_data_config  # noqa: E402
from puzzle.profiling import ProfileConfig, measure_model, time_layers  # noqa: E402

STEPS = ("parent", "search", "fidelity", "baselines", "distill", "measure")
ROOT = Path(__file__).parents[1]


@dataclass(frozen=True, kw_only=True)
class Scale:
    """Every size and budget of one run of the benchmark."""

    name: str
    corpus_files: int  # .py files sampled from the installed packages (or the stdlib, tiny)
    corpus_source: str  # "site-packages" or "stdlib"
    parent: DemoConfig
    speedups: tuple[float, ...] = (1.5, 2.0, 3.0)
    tolerance: float = 0.03  # measured speeds of the compared models agree within this
    batch_candidates: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096, 8192)  # decode batches tried (operating point)
    context_len: int = 512  # tokens in each sequence's KV cache at decode
    profile: dict[str, Any] = field(default_factory=dict)  # ProfileConfig fields besides batch and context
    search: dict[str, Any] = field(default_factory=dict)  # puzzle search config sections (data comes from the parent)
    diverse: int = 4  # MIP solutions per target for the ranking study
    max_shared_fraction: float = 0.85  # each diverse solution shares at most this fraction of sub-blocks
    gkd: dict[str, Any] = field(default_factory=dict)  # GKDConfig fields, the same for every child
    report_tokens: int = 1 << 17  # held-out tokens for the quality columns
    tasks: tuple[str, ...] = ("puzzle_stdlib_word_order", "puzzle_stdlib_next_line", "puzzle_stdlib_ppl")
    task_limit: int | None = None


GPU = Scale(
    name="gpu", corpus_files=12000, corpus_source="site-packages",
    parent=DemoConfig(
        vocab_size=4096, num_hidden_layers=12, hidden_size=384, num_attention_heads=6, head_dim=64,
        num_key_value_heads=6, intermediate_size=1024, max_position_embeddings=2048, block_init_std=0.0041,
        seq_len=512, batch_size=64, train_tokens=80 * 2**20, learning_rate=2e-3, warmup_fraction=0.02,
        eval_tokens=2**18, eval_batch_size=64, held_out_fraction=0.02, device="cuda", max_shard_size="15MB",
        save_dtype="bfloat16", exclude=("tests", "test", "__pycache__"),
    ),
    profile=dict(prompt_len=512, prefill_batch=8, generate_tokens=128, repeats=30, inner=10, warmup=5, stack=4),
    search=dict(
        space={"attention": {"windows": [128]}, "ffn": {"fractions": [1.0, 0.75, 0.5, 0.25], "multiple": 64}},
        calibration={"tokens": 2**18, "batch_size": 32},
        bld={"tokens_per_unit": 2**22, "batch_size": 16, "eval_tokens": 2**16, "checkpoint_every": 256},
        score={"tokens": 2**16, "batch_size": 32},
    ),
    gkd=dict(tokens=2**23, batch_size=32, lr=3e-4, cosine_weight=0.0, eval_tokens=2**16, checkpoint_every=10**6),
)
TINY = Scale(
    name="tiny", corpus_files=48, corpus_source="stdlib",
    parent=DemoConfig(
        vocab_size=512, num_hidden_layers=6, hidden_size=64, num_attention_heads=4, head_dim=16,
        num_key_value_heads=4, intermediate_size=192, max_position_embeddings=256, seq_len=64, batch_size=8,
        train_tokens=2**16, eval_tokens=2**11, held_out_fraction=0.15, exclude=("test", "tests", "__pycache__"),
        threads=2,
    ),
    speedups=(1.5, 2.0), tolerance=0.5, batch_candidates=(4, 16), context_len=48,
    profile=dict(prompt_len=32, prefill_batch=2, generate_tokens=8, repeats=5, inner=2, warmup=1, stack=1),
    search=dict(
        space={"attention": {"windows": [16]}, "ffn": {"fractions": [1.0, 0.5], "multiple": 32}},
        calibration={"tokens": 2**12, "batch_size": 4},
        bld={"tokens_per_unit": 2**11, "batch_size": 4, "eval_tokens": 2**10, "checkpoint_every": 64},
        score={"tokens": 2**10, "batch_size": 4},
    ),
    diverse=2, gkd=dict(tokens=2**11, batch_size=4, cosine_weight=0.0, eval_tokens=2**10),
    report_tokens=2**11, tasks=("puzzle_stdlib_word_order",), task_limit=20,
)


# ----------------------------------------------------------------------------------------------------------
# Bookkeeping


class Work:
    """WORK/: the benchmark's files; a step's record in WORK/steps/{step}.json means it is done."""

    def __init__(self, root: Path, scale: Scale):
        self.root, self.scale = Path(root), scale
        self.root.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def record(self, step: str) -> dict[str, Any] | None:
        path = self.root / "steps" / f"{step}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def done(self, step: str, data: dict[str, Any]) -> None:
        path = self.root / "steps" / f"{step}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)

    @property
    def parent(self) -> Path:
        return self.root / "parent"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def profile_cfg(self, batch_size: int | None = None) -> ProfileConfig:
        batch = batch_size or self.record("search")["operating_point"]["batch_size"]
        return ProfileConfig(batch_size=batch, context_len=self.scale.context_len, device=self.device.type,
                             **self.scale.profile)

    def data_config(self) -> dict[str, Any]:
        data = demo_data_config(replace(self.scale.parent, stdlib_dir=str(self.root / "corpus")))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(data).items()}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Step 1: corpus and parent


def build_corpus(out: Path, scale: Scale) -> dict[str, Any]:
    """A fixed sample of UTF-8 .py files (<= 256 KB) of the installed packages, copied into `out`."""
    root = Path(sysconfig.get_paths()["purelib" if scale.corpus_source == "site-packages" else "stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("tests", "test", "__pycache__") and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    # A pseudo-random sample that does not depend on the walk order.
    files.sort(key=lambda p: hashlib.blake2b(str(p.relative_to(root)).encode(), digest_size=8).digest())
    kept, size = 0, 0
    out.mkdir(parents=True, exist_ok=True)
    for path in files:
        if kept == scale.corpus_files:
            break
        try:
            if path.stat().st_size > 256 * 1024:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) < 200:
            continue
        dest = out / path.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        kept, size = kept + 1, size + len(text)
    return {"source": str(root), "files": kept, "characters": size}


def step_parent(work: Work) -> dict[str, Any]:
    corpus = build_corpus(work.root / "corpus", work.scale)
    log(f"corpus: {corpus['files']} files, {corpus['characters'] / 1e6:.1f}M characters from {corpus['source']}")
    cfg = replace(work.scale.parent, stdlib_dir=str(work.root / "corpus"),
                  device=work.scale.parent.device if torch.cuda.is_available() else "cpu")
    parent = build_demo_parent(cfg, out=work.parent)
    metrics = asdict(parent.metrics)
    log(f"parent: {metrics['parameters'] / 1e6:.1f}M parameters, held-out loss {metrics['held_out_loss']:.3f} "
        f"(unigram {metrics['unigram_loss']:.3f}), {metrics['tokens_per_s']:,.0f} tokens/s")
    return {"corpus": corpus, "metrics": metrics, "config": cfg.to_dict()}


# ----------------------------------------------------------------------------------------------------------
# Speed


def random_model(config, work: Work):
    """Weights do not change the time of a forward: a random model of `config` on the device."""
    with torch.device(work.device):
        model = build_model(config, work.dtype)
    return model.to(work.device)


def measured_speed(model, work: Work, batch_size: int | None = None) -> float:
    """Decode throughput (sequences x steps per second) at the operating point."""
    cfg = work.profile_cfg(batch_size)
    return cfg.batch_size / measure_model(model, cfg).decode_time_s


def folder_speed(path: Path, work: Work) -> float:
    model = load_model(path, dtype=work.dtype, device=work.device)
    speed = measured_speed(model, work)
    del model
    return speed


def operating_point(work: Work) -> dict[str, Any]:
    """The smallest decode batch at which an FFN of half width costs <= 0.75 of the full one (measured)."""
    parent = decilm_config(normalized_config(work.parent))
    full = load_architecture(work.parent).blocks[0]
    half = BlockConfig(attention=AttentionConfig(no_op=True), ffn=FFNConfig(intermediate_size=full.ffn.intermediate_size // 2))
    only_ffn = replace(half, ffn=full.ffn)
    rows = []
    for batch in work.scale.batch_candidates:
        cfg = work.profile_cfg(batch)
        t_full = time_layers(parent, only_ffn, cfg, work.device, work.dtype).decode_time_s
        t_half = time_layers(parent, half, cfg, work.device, work.dtype).decode_time_s
        attention = time_layers(parent, replace(full, ffn=FFNConfig(no_op=True)), cfg, work.device, work.dtype).decode_time_s
        rows.append({"batch_size": batch, "ffn_full_s": t_full, "ffn_half_s": t_half, "ratio": t_half / t_full,
                     "attention_s": attention})
        log(f"operating point: batch {batch}: FFN half/full {t_half / t_full:.3f}, attention {attention * 1e6:.1f} us")
        if t_half / t_full <= 0.75:
            break
    chosen = next((r for r in rows if r["ratio"] <= 0.75), rows[-1])
    return {**chosen, "context_len": work.scale.context_len, "tried": rows}


def depth_speeds(work: Work) -> dict[int, float]:
    """Measured speed-up of the parent with n layers removed (random weights), for every n."""
    config = normalized_config(work.parent)
    arch = load_architecture(work.parent)
    base = measured_speed(random_model(decilm_config(config), work), work)
    out = {}
    for n in range(1, arch.num_layers - 1):
        child = Architecture(shape=arch.shape, blocks=arch.blocks[:arch.num_layers - n])
        out[n] = measured_speed(random_model(decilm_config(config, child), work), work) / base
    log("depth speed-ups: " + ", ".join(f"-{n}: {s:.2f}x" for n, s in out.items()))
    return out


# ----------------------------------------------------------------------------------------------------------
# Step 2: the puzzle search, matched to the depth-pruned speeds


def search_config(work: Work, targets: dict[str, float], point: dict[str, Any]) -> dict[str, Any]:
    s = work.scale
    profile = {**s.profile, "batch_size": point["batch_size"], "context_len": s.context_len}
    solve = {"targets": [{"name": name, "throughput": f"{t:.6f}x"} for name, t in targets.items()],
             "sweep": sorted({round(x, 2) for x in (1.25, *s.speedups)}), "solver": "pulp"}
    report = {"eval_tokens": s.report_tokens, "batch_size": 16}
    return {"data": work.data_config(), **s.search, "profile": profile, "solve": solve, "report": report}


def step_search(work: Work) -> dict[str, Any]:
    from puzzle.mip.stage import ChildPlan
    from puzzle.pipeline import run_search, run_stage

    point = operating_point(work)
    work.done("search", {"operating_point": point, "partial": True})  # profile_cfg reads the batch from here
    depths = depth_speeds(work)
    matched = {}  # target name -> (layers dropped, measured depth speed-up)
    for s in work.scale.speedups:
        n = min(depths, key=lambda k: abs(depths[k] - s))
        matched[f"{s:g}x"] = {"drop_layers": n, "speedup": depths[n]}
    config_path = work.root / "search.json"
    targets = {name: m["speedup"] for name, m in matched.items()}
    config_path.write_text(json.dumps(search_config(work, targets, point)))
    started = time.perf_counter()
    run_search(work.run, parent=work.parent, config=config_path)  # every stage; each is skipped once done
    stage_times = stage_seconds(work.run)
    log("search: " + ", ".join(f"{k} {v:.0f} s" for k, v in stage_times.items()))
    parent_speed = folder_speed(work.run / "parent", work)
    children = {}
    for attempt in range(4):  # re-solve a child whose measured speed is off by more than the tolerance
        off = {}
        for name, m in matched.items():
            plan = ChildPlan.load(work.run / "solutions" / f"{name}.json")
            speed = folder_speed(work.run / "children" / name, work) / parent_speed
            children[name] = {"measured_speedup": speed, "predicted_speedup": plan.predicted_speedup,
                              "target_speedup": m["speedup"], "attempts": attempt + 1, "requested": targets[name]}
            if abs(speed / m["speedup"] - 1) > work.scale.tolerance:
                off[name] = speed
        if not off or attempt == 3:
            break
        for name, speed in off.items():
            targets[name] *= matched[name]["speedup"] / speed
        config_path.write_text(json.dumps(search_config(work, targets, point)))
        log(f"search: re-solving {', '.join(off)} (measured off by more than {work.scale.tolerance:.0%})")
        run_stage(work.run, "solve", overrides={"solve": search_config(work, targets, point)["solve"]})
        run_stage(work.run, "realize")
    for name, c in children.items():
        log(f"puzzle {name}: predicted {c['predicted_speedup']:.3f}x, measured {c['measured_speedup']:.3f}x "
            f"(depth {c['target_speedup']:.3f}x)")
    ranking = rank_study(work, targets, parent_speed)
    return {"operating_point": point, "depth_speedups": depths, "matched": matched, "children": children,
            "ranking": ranking, "stage_seconds": stage_times, "search_seconds": time.perf_counter() - started}


def stage_seconds(run: Path) -> dict[str, float]:
    """Seconds between consecutive stage records of a search that ran in one go (from their mtimes)."""
    from puzzle.pipeline import STAGES

    times = {s: (run / "stages" / f"{s}.json").stat().st_mtime for s in STAGES if (run / "stages" / f"{s}.json").exists()}
    start = (run / "config.yaml").stat().st_mtime
    out, last = {}, min([start, *times.values()])
    for stage, t in sorted(times.items(), key=lambda kv: kv[1]):
        out[stage], last = t - last, t
    return out


def rank_study(work: Work, targets: dict[str, float], parent_speed: float) -> dict[str, Any]:
    """K diverse MIP solutions per target, realized and measured: how well do summed scores rank them?"""
    from puzzle.mip.stage import SolveConfig, TargetSpec, build_problem, solve_targets
    from puzzle.pipeline import open_run
    from puzzle.profiling import Profile
    from puzzle.realize import realize
    from puzzle.scoring import Scores, model_quality

    search = open_run(work.run)
    manifest, arch = search.manifest(), load_architecture(search.paths.parent)
    profile = Profile.load(search.paths.profile)
    problem = build_problem(manifest, Scores.load(search.paths.scores), profile, arch)
    rows = []
    for name, t in targets.items():
        specs = tuple(TargetSpec(name=f"rank-{name}-{k}", throughput=f"{t:.6f}x",
                                 max_shared_fraction=work.scale.max_shared_fraction if k else None)
                      for k in range(work.scale.diverse))
        plans, failures = solve_targets(problem, profile, manifest, arch, SolveConfig(targets=specs, sweep=()))
        for failure in failures:
            log(f"rank study: {failure}")
        parent = search.parent_model()
        # The tokens scoring used: the report's held-out tokens are kept for the final comparison.
        batches = list(search.data().batches("held_out", 8, n_tokens=search.cfg.score.tokens, shuffle=False))
        for plan in plans:
            path = realize(plan, arch, manifest, search.paths, parent.dtype)
            child = load_model(path, dtype=parent.dtype, device=parent.device)
            q = model_quality(parent, child, batches)
            del child
            rows.append({"name": plan.name, "target": name, "summed_score": plan.solution.score, "kl": q.kl,
                         "top1": q.top1, "predicted_speedup": plan.predicted_speedup,
                         "measured_speedup": folder_speed(path, work) / parent_speed})
            shutil.rmtree(path)
    by_target = {}
    for name in targets:
        mine = [r for r in rows if r["target"] == name]
        if mine:
            best = min(mine, key=lambda r: r["kl"])
            by_target[name] = {"mip_optimum_kl": mine[0]["kl"], "best_measured_kl": best["kl"], "best": best["name"],
                               "spearman": spearman([r["summed_score"] for r in mine], [r["kl"] for r in mine])}
    return {"rows": rows, "by_target": by_target,
            "spearman": spearman([r["summed_score"] for r in rows], [r["kl"] for r in rows]),
            "note": "KL of each assembled child (before GKD) on the held-out tokens scoring used"}


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 points."""
    if len(a) < 3:
        return None

    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else None


# ----------------------------------------------------------------------------------------------------------
# Step 3: the profiler against a lean decode step


def step_fidelity(work: Work) -> dict[str, Any]:
    """Every profiled variant's decode time against `benchmarks/lean_decode.py` at the same operating point."""
    from benchmarks.lean_decode import lean_decode_time
    from puzzle.profiling import Profile

    profile = Profile.load(work.run / "profile.json")
    shape = load_architecture(work.run / "parent").shape
    cfg = replace(work.profile_cfg(), stack=profile.config["stack"])  # the profile's own operating point
    rows = []
    for v in profile.variants:
        variant = AttentionConfig(**v.variant) if v.kind == "attention" else FFNConfig(**v.variant)
        lean = lean_decode_time(v.kind, variant, hidden=shape.hidden_size, heads=shape.num_attention_heads,
                                head_dim=shape.head_dim, cfg=cfg, device=work.device, dtype=work.dtype)
        rows.append({"kind": v.kind, "name": v.name, "puzzle_s": v.decode_time_s, "lean_s": lean,
                     "ratio": v.decode_time_s / lean if lean else None})
        log(f"fidelity {v.kind} {v.name}: puzzle {v.decode_time_s * 1e6:.1f} us, lean {lean * 1e6:.1f} us")
    return {"variants": rows, "over_15_percent": [r["name"] for r in rows if r["ratio"] and r["ratio"] > 1.15]}


# ----------------------------------------------------------------------------------------------------------
# Step 4: baselines at the same measured speeds


def width_config(arch: Architecture, heads: int, r: float) -> dict[str, int]:
    """Minitron width: `heads` attention heads (MHA kept), hidden size and FFN width scaled by r (multiples of 64)."""
    shape = arch.shape
    hidden = min(shape.hidden_size, max(64, round(shape.hidden_size * r / 64) * 64))
    ffn = max(64, round(arch.blocks[0].ffn.intermediate_size * r / 64) * 64)
    return {"hidden_size": hidden, "heads": heads, "kv_heads": heads, "ffn_size": ffn}


def width_arch(arch: Architecture, w: dict[str, int]) -> Architecture:
    shape = replace(arch.shape, hidden_size=w["hidden_size"], num_attention_heads=w["heads"])
    blocks = tuple(BlockConfig(attention=replace(b.attention, n_heads_in_group=1), ffn=FFNConfig(intermediate_size=w["ffn_size"]))
                   for b in arch.blocks)
    return Architecture(shape=shape, blocks=blocks)


def width_for_speed(work: Work, target: float) -> tuple[dict[str, int], float]:
    """The widest Minitron width configuration whose measured speed-up is within tolerance of `target`.

    Decode speed is mostly the KV cache (heads) and partly the matrices (hidden, FFN), so for each head count
    whose range of speeds (widest to narrowest matrices) contains the target, the matrix width is found by
    bisection on measured speed; the configuration with the most parameters wins (else the closest one)."""
    config = normalized_config(work.parent)
    arch = load_architecture(work.parent)
    base = measured_speed(random_model(decilm_config(config), work), work)
    cache: dict[tuple, float] = {}

    def speed(heads: int, r: float) -> tuple[dict[str, int], float]:
        w = width_config(arch, heads, r)
        key = tuple(sorted(w.items()))
        if key not in cache:
            c = {**config, "hidden_size": w["hidden_size"], "num_attention_heads": w["heads"]}
            cache[key] = measured_speed(random_model(decilm_config(c, width_arch(arch, w)), work), work) / base
        return w, cache[key]

    tol = work.scale.tolerance
    found = []
    for heads in range(arch.shape.num_attention_heads, 0, -1):
        slowest, fastest = speed(heads, 1.0), speed(heads, 0.1)
        found += [slowest, fastest]
        if not slowest[1] * (1 - tol) <= target <= fastest[1] * (1 + tol):
            continue
        lo, hi = 0.1, 1.0  # speed falls as r grows
        for _ in range(10):
            mid = (lo + hi) / 2
            w, s = speed(heads, mid)
            found.append((w, s))
            if abs(s / target - 1) <= tol / 2:
                break
            lo, hi = (mid, hi) if s > target else (lo, mid)
    within = [f for f in found if abs(f[1] / target - 1) <= tol]
    if within:
        return max(within, key=lambda f: width_arch(arch, f[0]).total_params())
    return min(found, key=lambda f: abs(f[1] / target - 1))


def step_baselines(work: Work) -> dict[str, Any]:
    from puzzle.corpus import DataConfig
    from puzzle.prune import PruneConfig, prune

    search = work.record("search")
    data = DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in work.data_config().items()})
    parent_speed = folder_speed(work.parent, work)
    out = {}
    for name, m in search["matched"].items():
        target = search["children"][name]["measured_speedup"]
        w, predicted = width_for_speed(work, target)
        specs = {
            "shortgpt": PruneConfig(drop_layers=m["drop_layers"], metric="cos", data=data),
            "minitron-depth": PruneConfig(drop_layers=m["drop_layers"], metric="loss", contiguous=True, data=data),
            "minitron-width": PruneConfig(hidden_size=w["hidden_size"], heads=w["heads"], kv_heads=w["kv_heads"],
                                          ffn_size=w["ffn_size"], data=data),
        }
        for method, cfg in specs.items():
            path = work.root / "baselines" / f"{method}-{name}"
            if not path.exists():
                prune(work.parent, path, replace(cfg, calibration_tokens=2**16, eval_tokens=0, output_format="decilm"))
            speed = folder_speed(path, work) / parent_speed
            out[f"{method}-{name}"] = {"method": method, "target": name, "path": str(path), "measured_speedup": speed,
                                        "puzzle_speedup": target, "matched": abs(speed / target - 1) <= work.scale.tolerance,
                                        **({"width": w} if method == "minitron-width" else {"drop_layers": m["drop_layers"]})}
            log(f"{method} {name}: measured {speed:.3f}x vs puzzle {target:.3f}x")
    return {"models": out}


# ----------------------------------------------------------------------------------------------------------
# Step 5: the same GKD for every child


def models_to_compare(work: Work) -> dict[str, dict[str, Any]]:
    search, baselines = work.record("search"), work.record("baselines")
    out = {f"puzzle-{name}": {"method": "puzzle", "target": name, "path": str(work.run / "children" / name)}
           for name in search["matched"]}
    out.update({k: {"method": v["method"], "target": v["target"], "path": v["path"]} for k, v in baselines["models"].items()})
    return out


def step_distill(work: Work) -> dict[str, Any]:
    from puzzle.corpus import DataConfig
    from puzzle.distill.gkd import GKDConfig, run_gkd

    data = DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in work.data_config().items()})
    cfg = GKDConfig(**work.scale.gkd)
    out = {}
    for name, m in models_to_compare(work).items():
        dest = work.root / "kd" / name
        if (dest / "gkd.json").exists():
            out[name] = json.loads((dest / "gkd.json").read_text())
            continue
        t0 = time.perf_counter()
        result = run_gkd(Path(m["path"]), work.parent, data, dest, cfg, overwrite=True, info={"benchmark": "quality_at_speed"})
        out[name] = {"tokens": result.tokens, "tokens_per_s": result.tokens_per_s, "kl_before": result.before.kl,
                     "kl_after": result.after.kl, "seconds": time.perf_counter() - t0}
        log(f"gkd {name}: KL {result.before.kl:.4f} -> {result.after.kl:.4f} ({result.tokens_per_s:,.0f} tokens/s)")
    return {"gkd": asdict(cfg), "models": out}


# ----------------------------------------------------------------------------------------------------------
# Step 6: measure everything, write the results


def step_measure(work: Work) -> dict[str, Any]:
    from puzzle.corpus import DataConfig
    from puzzle.data import load_token_data, load_tokenizer
    from puzzle.scoring import model_quality

    data_cfg = DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in work.data_config().items()})
    data = load_token_data(data_cfg, load_tokenizer(work.parent))
    score_tokens = work.scale.search["score"]["tokens"]
    batches = list(data.batches("held_out", 16, n_tokens=work.scale.report_tokens, shuffle=False, skip_tokens=score_tokens))
    parent = load_model(work.parent, dtype=work.dtype, device=work.device)
    parent_speed = measured_speed(parent, work)
    search = work.record("search")
    rows = {"parent": {"method": "parent", "target": "-", "path": str(work.parent)}}
    rows.update({name: {**m, "path": str(work.root / "kd" / name), "before_kd": m["path"]}
                 for name, m in models_to_compare(work).items()})
    out = {}
    for name, m in rows.items():
        path = Path(m["path"])
        model = load_model(path, dtype=work.dtype, device=work.device)
        arch = load_architecture(path)
        q = model_quality(parent, model, batches)
        speed = measured_speed(model, work) / parent_speed
        before = None
        if "before_kd" in m:
            raw = load_model(Path(m["before_kd"]), dtype=work.dtype, device=work.device)
            before = asdict(model_quality(parent, raw, batches))
            del raw
        del model
        out[name] = {"method": m["method"], "target": m["target"], "params": arch.total_params(),
                     "kv_bytes_per_token": arch.kv_bytes_per_token("bf16"), "measured_speedup": speed,
                     "kl": q.kl, "lm_loss": q.lm_loss, "top1": q.top1, "before_kd": before}
        if m["method"] == "puzzle":
            out[name]["predicted_speedup"] = search["children"][m["target"]]["predicted_speedup"]
        log(f"{name}: {speed:.3f}x, KL {q.kl:.4f}, LM loss {q.lm_loss:.4f}, top-1 {q.top1:.3f}")
    tasks = lm_eval_scores(work, {name: Path(m["path"]) for name, m in rows.items()})
    for name, scores in tasks.items():
        out[name]["tasks"] = scores
    return {"models": out, "report_positions": sum(b.shape[0] * (b.shape[1] - 1) for b in batches),
            "scoring_positions_excluded": score_tokens}


def lm_eval_scores(work: Work, models: dict[str, Path]) -> dict[str, dict[str, float]]:
    try:
        import lm_eval  # noqa: F401
    except ModuleNotFoundError:
        log("lm-eval is not installed here: no task scores (carry its wheels, see the module docstring)")
        return {}
    from puzzle.evaluation import EvalConfig, evaluate_many

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    results = evaluate_many(models, list(work.scale.tasks), EvalConfig(batch_size=32, limit=work.scale.task_limit,
                                                                       device=work.device.type, write=False))
    out = {}
    for name, result in results.items():
        out[name] = {}
        for task, r in result.tasks.items():
            metric = r.main_metric
            out[name][f"{task}:{metric}"] = r.metrics[metric]
    return out


def write_benchmark_results(work: Work, argv: list[str]) -> None:
    """benchmarks/results/quality_at_speed[_tiny].{json,md,png} from the step records."""
    records = {step: work.record(step) for step in STEPS}
    measure = records["measure"]
    models = measure["models"]
    parent = models["parent"]
    name = "quality_at_speed" + ("" if work.scale.name == "gpu" else f"_{work.scale.name}")
    point = records["search"]["operating_point"]
    steps = ", ".join(f"{step} {records[step]['seconds']:.0f} s" for step in STEPS if records.get(step))
    lines = [
        f"Command: `python benchmarks/quality_at_speed.py` (steps may run in separate calls: "
        f"`python benchmarks/quality_at_speed.py parent search`, ...); step times: {steps}  ",
        f"Parent: {records['parent']['metrics']['parameters'] / 1e6:.1f}M parameters, "
        f"{work.scale.parent.num_hidden_layers} layers, held-out loss {records['parent']['metrics']['held_out_loss']:.3f} "
        f"nats/token (unigram {records['parent']['metrics']['unigram_loss']:.3f}), "
        f"{records['parent']['corpus']['files']} files of {records['parent']['corpus']['source']}  ",
        f"Operating point: decode batch {point['batch_size']}, context {point['context_len']}, "
        f"{'bf16, CUDA graphs' if measure['environment']['cuda'] else 'fp32, CPU'}; "
        f"FFN at half width costs {point['ratio']:.2f} of full width"
        + (" (the 0.75 asked for was not reached at the largest batch tried)" if point["ratio"] > 0.75 else "") + "  ",
        f"GKD for every child: {work.scale.gkd}  ",
        f"Quality on {measure['report_positions']:,} held-out positions after the {measure['scoring_positions_excluded']:,} "
        "tokens scoring used", "",
        "| target | model | measured speed-up | within 3% of puzzle | predicted | params | KV B/token | KL | top-1 | "
        "LM loss | quality retained | KL before GKD | tasks |",
        "|---|---|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, m in sorted(models.items(), key=lambda kv: (kv[1]["target"], kv[1]["method"] != "puzzle", kv[0])):
        retained = parent["lm_loss"] / m["lm_loss"]
        tasks = ", ".join(f"{k.split(':')[0].removeprefix('puzzle_stdlib_')} {v:.3f}" for k, v in (m.get("tasks") or {}).items())
        predicted = f"{m['predicted_speedup']:.3f}x" if "predicted_speedup" in m else "-"
        before = f"{m['before_kd']['kl']:.4f}" if m.get("before_kd") else "-"
        puzzle = models.get(f"puzzle-{m['target']}")
        matched = "-" if puzzle is None or m is puzzle else \
            ("yes" if abs(m["measured_speedup"] / puzzle["measured_speedup"] - 1) <= work.scale.tolerance else "**no**")
        lines.append(f"| {m['target']} | {key} | {m['measured_speedup']:.3f}x | {matched} | {predicted} | {m['params'] / 1e6:.2f}M | "
                     f"{m['kv_bytes_per_token']} | {m['kl']:.4f} | {m['top1']:.3f} | {m['lm_loss']:.4f} | "
                     f"{retained:.3f} | {before} | {tasks} |")
    if "**no**" in "\n".join(lines):
        lines += ["", "**no**: no configuration of that method measured within "
                  f"{work.scale.tolerance:.0%} of puzzle's speed; the row is the nearest one found (its settings are in "
                  f"{name}.json). Uniform width pruning moves the speed in steps of one attention head per layer, "
                  "and where the KV cache dominates decode time the steps are coarse."]
    ranking = records["search"]["ranking"]
    fidelity = records.get("fidelity")
    if fidelity:
        lines += ["", "Profiler against a lean decode step (benchmarks/lean_decode.py), same operating point:", "",
                  "| sub-block | variant | puzzle (us) | lean (us) | puzzle / lean |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['kind']} | {r['name']} | {r['puzzle_s'] * 1e6:.1f} | {r['lean_s'] * 1e6:.1f} | "
                  f"{r['ratio']:.2f} |" for r in fidelity["variants"] if r["ratio"]]
    lines += ["", f"Quality retained = parent LM loss / model LM loss. Rank correlation (Spearman) of summed "
              f"replace-one-block KL vs measured KL over {len(ranking['rows'])} diverse MIP solutions: "
              f"{ranking['spearman'] if ranking['spearman'] is None else round(ranking['spearman'], 3)} "
              f"({ranking['note']}).", "",
              "| target | solutions | Spearman within target | KL of the MIP optimum | best measured KL | best |",
              "|---|---:|---:|---:|---:|---|"]
    for target, r in ranking["by_target"].items():
        n = sum(1 for row in ranking["rows"] if row["target"] == target)
        rho = "-" if r["spearman"] is None else f"{r['spearman']:.2f}"
        lines.append(f"| {target} | {n} | {rho} | {r['mip_optimum_kl']:.4f} | {r['best_measured_kl']:.4f} | {r['best']} |")
    png = plot(work, models, name)
    data = {"records": records, "argv": argv, "plot": png.name if png else None,
            "environment": measure["environment"]}  # where it was measured, not where the table is written
    write_results(name, data, "\n".join(lines))


def plot(work: Work, models: dict[str, Any], name: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({m["method"] for m in models.values()} - {"parent"})
    for method in methods:
        points = sorted((m["measured_speedup"], m["kl"]) for m in models.values() if m["method"] == method)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.set_xlabel("measured decode speed-up vs parent")
    ax.set_ylabel("KL to parent (held-out, after GKD)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="*", help=f"steps to run, of {', '.join(STEPS)} (default: every step not done)")
    parser.add_argument("--tiny", action="store_true", help="a tiny parent on the CPU: checks the code path")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default benchmarks/work/quality_at_speed[-tiny])")
    parser.add_argument("--redo", action="store_true", help="run the given steps even if they are done")
    args = parser.parse_args(argv)
    scale = TINY if args.tiny else GPU
    work = Work(args.work or ROOT / "benchmarks" / "work" / f"quality_at_speed{'-tiny' if args.tiny else ''}", scale)
    os.environ.setdefault("PUZZLE_QUIET", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    steps = args.steps or list(STEPS)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown step {unknown[0]!r}; choose from {', '.join(STEPS)}")
    for step in steps:
        record = work.record(step)
        if record is not None and not record.get("partial") and not args.redo:
            log(f"{step}: done ({work.root / 'steps' / (step + '.json')})")
            continue
        t0 = time.perf_counter()
        log(f"{step}: start")
        result = globals()[f"step_{step}"](work)
        work.done(step, {**result, "seconds": time.perf_counter() - t0, "environment": environment()})
        log(f"{step}: done in {time.perf_counter() - t0:.0f} s")
    if work.record("measure") is not None:
        write_benchmark_results(work, argv)


if __name__ == "__main__":
    main()
