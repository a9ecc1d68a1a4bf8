"""The `report` stage: quality and speed of the parent and every child, predicted vs measured, with plots.

Quality is measured on the held-out split (KL to the parent, LM loss, top-1 agreement); speed by
`profiling.measure_model`, the same method and device as the profile the MIP used, so predicted and
measured speed-ups are comparable. The report also shows what BLD bought (normalised MSE and replace-one-
block KL before/after, per variant family) and checks how additive the scores are (summed candidate KL
vs the child's measured KL). Writes report.md, report.json and PNG plots into the run directory.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

import puzzle
from puzzle.arch import Architecture, AttentionConfig, attention_params, ffn_params
from puzzle.blocks.library import Manifest
from puzzle.config import check_int
from puzzle.distill.bld import read_unit_result, unit_path
from puzzle.evaluation import EvalConfig, evaluate_many
from puzzle.files import write_json_atomic
from puzzle.mip.stage import ChildPlan
from puzzle.profiling import MEASURE_ATTEMPTS, NOISY, Profile, ProfileConfig, eager_variants, measure_model
from puzzle.run import RunPaths
from puzzle.scoring import Scores, model_quality


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    eval_tokens: int = 1 << 16  # held-out tokens for each model's quality
    batch_size: int = 8
    measure_speed: bool = True  # time parent and children end to end (same method as the profile)
    tasks: tuple[str, ...] = ()  # lm-eval tasks (shipped names or task folders) for the parent and every child
    task_batch_size: int = 32
    task_limit: int | None = None  # documents per task (None: all)

    def __post_init__(self) -> None:
        for name in ("eval_tokens", "batch_size", "task_batch_size"):
            check_int(f"report.{name}", getattr(self, name))
        check_int("report.task_limit", self.task_limit, optional=True)


@dataclass(frozen=True, kw_only=True)
class ModelReport:
    name: str
    path: str
    params: int
    kv_bytes_per_token: int
    kl: float
    lm_loss: float
    top1: float
    measured_decode_s: float | None
    measured_prefill_s: float | None
    predicted_decode_s: float | None  # None: a derived child (e.g. fused) with variants the profile lacks
    measured_speedup: float | None = None
    # the decode timing (of this model or of the parent it is compared with) spread more than NOISY over repeats
    measured_noisy: bool = False
    predicted_speedup: float | None = 1.0
    summed_score: float | None = 0.0  # the MIP objective; None for derived children
    vllm_native: bool = True
    vllm_serving: str = "native"  # Architecture.vllm_serving: native, transformers (its Transformers backend), none
    layers: list[str] = field(default_factory=list)


# How the report names Architecture.vllm_serving; the note under the table says what "Transformers backend" takes.
VLLM_SERVING = {"native": "native", "nemotron_h": "Nemotron-H (NAME-nemotron-h)", "transformers": "Transformers backend",
                "none": "no"}


def family(name: str, kind: str, parent_width: int | None) -> str:
    """Variant family for the BLD table: kv2, window128, linear, ffn 50%."""
    if kind == "ffn" and name.startswith("ffn") and parent_width:
        return f"ffn {round(100 * int(name[3:]) / parent_width)}%"
    if "_w" in name:
        return "window" + name.split("_w")[1]
    return name


def bld_table(manifest: Manifest, paths: RunPaths, arch: Architecture, scores: Scores, scores_init: Scores | None) -> list[dict]:
    """Per variant family: mean normalised MSE init -> BLD, mean replace-one-block KL init -> BLD."""
    rows: dict[str, dict[str, list[float]]] = {}
    for c in manifest.units:
        width = arch.blocks[c.layer].ffn.intermediate_size
        key = f"{c.kind}: {family(c.name, c.kind, width)}"
        row = rows.setdefault(key, {"mse_init": [], "mse_bld": [], "kl_init": [], "kl_bld": [], "kept_init": []})
        result = read_unit_result(unit_path(paths, c))
        row["mse_init"].append(result.loss_init)
        # what the unit file holds: a unit that BLD made worse keeps its initialisation (UnitResult.kept)
        row["mse_bld"].append(result.loss_init if result.kept == "init" else result.loss_final)
        row["kept_init"].append(result.kept == "init")
        row["kl_bld"].append(scores.get(c.layer, c.kind, c.name).kl)
        if scores_init is not None:
            row["kl_init"].append(scores_init.get(c.layer, c.kind, c.name).kl)
    out = []
    for key, r in sorted(rows.items()):
        kept_init = sum(r.pop("kept_init"))
        mean = {k: (sum(v) / len(v) if v else None) for k, v in r.items()}
        better_mse = sum(b < a for a, b in zip(r["mse_init"], r["mse_bld"]))
        better_kl = sum(b < a for a, b in zip(r["kl_init"], r["kl_bld"])) if r["kl_init"] else None
        out.append({"family": key, "units": len(r["mse_init"]), **mean, "mse_improved": better_mse, "kl_improved": better_kl,
                    "kept_init": kept_init})
    return out


def _plots(out_dir: Path, parent_arch: Architecture, children: list[ModelReport], sweep: list[dict],
           plans: list[ChildPlan]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [p for p in sweep if p["feasible"]]
    if points:
        ax.plot([p["throughput"] / plans[0].parent_throughput for p in points], [p["score"] for p in points], "o-",
                color="tab:blue", label="Pareto front (MIP, summed KL)")
    for c in children:
        if c.summed_score is None:
            continue
        ax.scatter([c.predicted_speedup], [c.summed_score], marker="*", s=160, color="tab:red", zorder=3)
        ax.scatter([c.predicted_speedup], [c.kl], marker="x", s=80, color="tab:green", zorder=3)
        ax.annotate(c.name, (c.predicted_speedup, c.summed_score), textcoords="offset points", xytext=(5, 5))
    ax.scatter([], [], marker="*", color="tab:red", label="chosen child (summed KL)")
    ax.scatter([], [], marker="x", color="tab:green", label="chosen child (measured KL)")
    ax.set_xlabel("predicted throughput (x parent)")
    ax.set_ylabel("KL to parent (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "pareto.png", dpi=120)
    plt.close(fig)
    files.append("pareto.png")

    planned = {p.name: p for p in plans}
    mapped = [c for c in children if c.name in planned]
    if mapped:
        import numpy as np

        fig, axes = plt.subplots(len(mapped), 1, figsize=(max(6, 0.6 * len(mapped[0].layers)), 1.6 * len(mapped) + 0.6),
                                 squeeze=False)
        for ax, child in zip(axes[:, 0], mapped):
            plan = planned[child.name]
            grid = np.zeros((2, len(plan.blocks)))
            labels = [["", ""] for _ in plan.blocks]
            for i, b in enumerate(plan.blocks):
                grid[0, i] = _keep(b.attention, parent_arch.blocks[i].attention, parent_arch.shape)
                grid[1, i] = _keep(b.ffn, parent_arch.blocks[i].ffn, parent_arch.shape)
                labels[i] = [child.layers[i].split(" | ")[0], child.layers[i].split(" | ")[1]]
            ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
            for i in range(len(plan.blocks)):
                for r in range(2):
                    ax.text(i, r, labels[i][r], ha="center", va="center", fontsize=6, color="white")
            ax.set_yticks([0, 1], ["attention", "FFN"])
            ax.set_xticks(range(len(plan.blocks)))
            ax.set_title(f"{child.name}: predicted {child.predicted_speedup:.2f}x (colour: parameters kept)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "layers.png", dpi=120)
        plt.close(fig)
        files.append("layers.png")

    measured = [c for c in children if c.measured_speedup is not None and c.predicted_speedup is not None]
    if measured:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        xs = [c.predicted_speedup for c in measured]
        ys = [c.measured_speedup for c in measured]
        hi = max(xs + ys) * 1.1
        ax.plot([1, hi], [1, hi], "--", color="gray", label="measured = predicted")
        ax.scatter(xs, ys, color="tab:red")
        for c in measured:
            ax.annotate(c.name, (c.predicted_speedup, c.measured_speedup), textcoords="offset points", xytext=(5, -10))
        ax.set_xlabel("predicted speed-up (decode)")
        ax.set_ylabel("measured speed-up (decode)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "speed.png", dpi=120)
        plt.close(fig)
        files.append("speed.png")
    return files


def _keep(variant, parent_variant, shape) -> float:
    """Colour of a sub-block in the layer map: its parameters as a fraction of the parent's (0 = removed)."""
    count = attention_params if isinstance(variant, AttentionConfig) else ffn_params
    full = count(shape, parent_variant)
    return count(shape, variant) / full if full else 0.0


def machine_load() -> str:
    """The 1-minute load average against the cores (on CPUs, other work makes timings noisy)."""
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def measure(name: str, path: Path, model, parent, batches, profile_cfg: ProfileConfig | None, arch: Architecture,
            kv_dtype: str) -> tuple[ModelReport, Any]:
    quality = model_quality(parent, model, batches)
    timing = measure_model(model, profile_cfg) if profile_cfg is not None else None
    heads = arch.shape.num_attention_heads
    return ModelReport(
        name=name, path=str(path), params=arch.total_params(), kv_bytes_per_token=arch.kv_bytes_per_token(kv_dtype),
        kl=quality.kl, lm_loss=quality.lm_loss, top1=quality.top1,
        measured_decode_s=timing.decode_time_s if timing else None, measured_prefill_s=timing.prefill_time_s if timing else None,
        predicted_decode_s=0.0, vllm_native=not arch.vllm_unsupported(), vllm_serving=arch.vllm_serving(), measured_noisy=bool(timing and timing.noisy),
        layers=[f"{b.attention.label(heads)} | {b.ffn.label()}" for b in arch.blocks],
    ), timing


def task_scores(models: dict[str, Path], tasks: tuple[str, ...], cfg: ReportConfig, device: str) -> dict[str, dict[str, float]]:
    """lm-eval scores per model: accuracy for multiple choice, bits per byte for perplexity tasks."""
    results = evaluate_many(models, list(tasks), EvalConfig(batch_size=cfg.task_batch_size, limit=cfg.task_limit,
                                                             device=device, write=False))
    out: dict[str, dict[str, float]] = {}
    for name, result in results.items():
        out[name] = {}
        for task, task_result in result.tasks.items():
            metric = task_result.main_metric
            out[name][f"{task} ({metric})"] = result.score(task, metric)
    return out


def write_report(paths: RunPaths, *, parent: ModelReport, parent_arch: Architecture, children: list[ModelReport],
                 plans: list[ChildPlan], bld_rows: list[dict], sweep: list[dict], profile: Profile, failures: list[str],
                 held_out: dict[str, int], tasks: dict[str, dict[str, float]] | None = None) -> Path:
    """report.md + report.json + plots. `held_out`: the predicting positions the quality columns were measured on
    (`report_positions`) and those scoring used to choose the children (`scoring_positions`), disjoint."""
    plots = _plots(paths.root, parent_arch, children, sweep, plans)
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    env = {"puzzle": puzzle.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "date": when}
    eager = eager_variants(profile)
    data = {"environment": env, "profile": {"device": profile.device, "method": profile.method, "dtype": profile.dtype,
                                             "eager_variants": eager, "kv_dtype": profile.config["kv_dtype"],
                                             **{k: profile.config[k] for k in ("batch_size", "context_len", "prompt_len")}},
            "parent": asdict(parent), "children": [asdict(c) for c in children], "bld": bld_rows, "sweep": sweep,
            "infeasible": failures, "plots": plots, "tasks": tasks or {}, "held_out": held_out}
    write_json_atomic(paths.root / "report.json", data)
    cpu_note = " (CPU numbers: a small model on this machine's cores, not a GPU prediction)" if profile.method == "cpu" else ""
    # Profiles before the grouped-GEMM expert timing (puzzle.grouped_moe) timed experts without CUDA graphs.
    eager_note = (f"; without CUDA graphs (per-expert dispatch): {', '.join(eager)} and whole models "
                  "with experts") if eager else ""
    lines = [
        "# puzzle search report", "",
        f"Parent: `{paths.parent}`  ", f"Device: {profile.device}, method {profile.method}, {profile.dtype}{cpu_note}{eager_note}; "
        f"KV cache at {profile.config['kv_dtype']}  ",
        f"Decode at batch {profile.config['batch_size']}, context {profile.config['context_len']}; "
        f"prefill {profile.config['prefill_batch']} x {profile.config['prompt_len']} tokens  ",
        f"Versions: puzzle {env['puzzle']}, torch {env['torch']}, transformers {env['transformers']}; {when}", "",
        "## Children", "",
        f"KL, LM loss and top-1 on {held_out['report_positions']:,} held-out positions, disjoint from the "
        f"{held_out['scoring_positions']:,} that scoring used to choose the children.", "",
        "| model | params | KV B/token | predicted speed-up | measured speed-up | error | KL to parent | LM loss | top-1 | summed KL | vLLM |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for m in [parent, *children]:
        measured = f"{m.measured_speedup:.2f}x" + (" ~" if m.measured_noisy else "") if m.measured_speedup else "-"
        predicted = f"{m.predicted_speedup:.2f}x" if m.predicted_speedup else "-"
        err = f"{100 * (m.predicted_speedup / m.measured_speedup - 1):+.1f}%" \
            if m.measured_speedup and m.predicted_speedup and m is not parent else "-"
        summed = f"{m.summed_score:.4f}" if m.summed_score is not None else "-"
        lines.append(f"| {m.name} | {m.params / 1e6:.2f}M | {m.kv_bytes_per_token} | {predicted} | {measured} | "
                     f"{err} | {m.kl:.4f} | {m.lm_loss:.4f} | {m.top1:.3f} | {summed} | {VLLM_SERVING[m.vllm_serving]} |")
    if any(m.vllm_serving == "transformers" for m in children):
        lines += ["", "vLLM: \"native\" children run in vLLM's DeciLMForCausalLM; \"Transformers backend\" ones (experts, "
                  "sinks or q/k norms it lacks) run their own modeling code in vLLM: `LLM(path, model_impl=\"transformers\", "
                  "trust_remote_code=True, enforce_eager=True)`; \"no\": transformers only (`puzzle inspect` says why)."]
    if failures:
        lines += ["", "Infeasible targets:", *[f"- {f}" for f in failures]]
    if tasks:
        columns = list(next(iter(tasks.values())))
        lines += ["", "### lm-eval", "", "| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        lines += [f"| {name} | " + " | ".join(f"{scores[c]:.4f}" for c in columns) + " |" for name, scores in tasks.items()]
    if any(m.measured_noisy for m in [parent, *children]):
        lines += ["", f"~: not to be trusted: the decode timings spread by more than {NOISY:.0%} over repeats even after "
                      f"{MEASURE_ATTEMPTS} attempts (load average {machine_load()}); measure again on an idle machine."]
    lines += ["", "Speed-up = decode throughput relative to the parent, same device and method. Error = predicted / "
              "measured - 1. Summed KL = the MIP objective (sum of replace-one-block KLs); compare it with the child's "
              "measured KL to see how additive the scores are.", ""]
    reranked = [p for p in plans if p.reranked]
    if reranked:
        lines += ["## Re-ranking", "",
                  "Per target, diverse MIP solutions were assembled and the one with the lowest KL to the parent kept "
                  "(KL on the tokens scoring used, not the report's).", "",
                  "| target | solutions | summed KL: MIP optimum / kept | KL: MIP optimum | KL: kept | kept solution |",
                  "|---|---:|---:|---:|---:|---:|"]
        for p in reranked:
            optimum, kept = p.rerank_choice
            lines.append(f"| {p.name} | {len(p.reranked)} | {optimum['summed_score']:.4f} / {kept['summed_score']:.4f} | "
                         f"{optimum['kl']:.4f} | {kept['kl']:.4f} | {kept['solution']} |")
        lines.append("")
    for c in children:
        lines += [f"### {c.name}", "", "| layer | attention | FFN |", "|---:|---|---|"]
        lines += [f"| {i} | {l.split(' | ')[0]} | {l.split(' | ')[1]} |" for i, l in enumerate(c.layers)]
        lines.append("")
    lines += ["## What BLD bought", "", "| family | units | MSE init | MSE after BLD | improved | init kept | KL init | KL after BLD | improved |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in bld_rows:
        kl_init = f"{r['kl_init']:.5f}" if r["kl_init"] is not None else "-"
        kl_better = f"{r['kl_improved']}/{r['units']}" if r["kl_improved"] is not None else "-"
        lines.append(f"| {r['family']} | {r['units']} | {r['mse_init']:.4f} | {r['mse_bld']:.4f} | {r['mse_improved']}/{r['units']} | "
                     f"{r.get('kept_init', 0)} | {kl_init} | {r['kl_bld']:.5f} | {kl_better} |")
    if any(r.get("kept_init") for r in bld_rows):
        lines += ["", "Init kept: units whose trained weights were worse on BLD's held-out batches than their initialisation "
                  "keep the initialisation (their MSE after BLD is the init's)."]
    if bld_rows and all(r["kl_init"] is None for r in bld_rows):
        lines += ["", "KL init: not measured; the initialised candidates are scored only when asked for, since it doubles "
                  "the score stage (`score.compare_init: true` in the config, or `puzzle score RUN --init`, then "
                  "`puzzle search --out RUN --stage report`)."]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    (paths.root / "report.md").write_text("\n".join(lines))
    return paths.root / "report.md"
