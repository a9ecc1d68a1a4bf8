"""Single stages of a search run: `puzzle bld`, `score`, `profile`, `solve` and `realize`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from puzzle.cli.options import Device, Launcher, Workers
from puzzle.cli.output import console, done, human_bytes

RunDir = Annotated[Path, typer.Argument(help="Run directory made by `puzzle search`.", show_default=False)]


def bld_command(
    run: RunDir,
    workers: Workers = 1,
    launcher: Launcher = "local",
    worker: Annotated[bool, typer.Option("--worker", metavar="", hidden=True, help="Run this process's share (RANK/WORLD_SIZE).")] = False,
) -> None:
    """Blockwise local distillation of every candidate in the library (resumable, parallel).

    Finished units are skipped; a killed run resumes from its last checkpoint. With --workers N the units
    are split between N processes (local), `torchrun --nproc-per-node N`, or a Slurm array of N tasks.

    Examples:
      puzzle bld runs/demo --workers 2
      torchrun --nproc-per-node 8 -m puzzle bld runs/llama8b --worker
    """
    from puzzle.pipeline import run_bld

    run_bld(run, workers=workers, launcher=launcher, as_worker=worker)
    if not worker:
        done(f"bld finished: {run / 'library'}")


def score_command(
    run: RunDir,
    init: Annotated[bool, typer.Option("--init", metavar="", help="Score the initialised candidates (before BLD) into scores_init.json.")] = False,
) -> None:
    """Replace-one-block scores of every candidate: KL to the parent, LM loss, top-1 agreement.

    Example:  puzzle score runs/demo
    """
    from puzzle.pipeline import run_score

    path = run_score(run, weights="init" if init else "bld")
    done(f"scores: {path}")


def profile_command(
    run: RunDir,
    analytic: Annotated[bool, typer.Option("--analytic", metavar="", help="Roofline estimate (bytes / bandwidth, flops / peak) instead of measuring.")] = False,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Decode batch.")] = None,
    context_len: Annotated[Optional[int], typer.Option("--context-len", help="Cached tokens per sequence during decode.")] = None,
    device: Device = None,
) -> None:
    """Decode / prefill time, parameter and KV bytes of every variant in the library on this device.

    On a GPU steps are captured in CUDA graphs; on a CPU the numbers are labelled as CPU numbers.

    Example:  puzzle profile runs/llama8b --batch-size 64 --context-len 1024
    """
    from puzzle.config import dotted
    from puzzle.pipeline import run_stage

    overrides = dotted({"profile.analytic": analytic or None, "profile.batch_size": batch_size,
                        "profile.context_len": context_len, "profile.device": device})
    search = run_stage(run, "profile", overrides)
    done(f"profile: {search.paths.profile}")


def solve_command(
    run: RunDir,
    target_throughput: Annotated[Optional[str], typer.Option("--target-throughput", help="e.g. 2x (of the parent) or tokens/s.")] = None,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Parameters + KV cache, e.g. 40GiB or 0.6x.")] = None,
    max_latency: Annotated[Optional[str], typer.Option("--max-latency", help="Prefill + generation time, e.g. 0.5x or seconds.")] = None,
    max_kv_bytes_per_token: Annotated[Optional[str], typer.Option("--max-kv-bytes-per-token", help="e.g. 0.5x or bytes.")] = None,
    min_attention_layers: Annotated[Optional[int], typer.Option("--min-attention-layers", min=0, help="At least this many layers keep softmax attention.")] = None,
    max_attention_layers: Annotated[Optional[int], typer.Option("--max-attention-layers", min=0, help="At most this many layers keep softmax attention (the others: linear or no-op).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Name of the child (default: from the target); an existing target of that name is replaced.")] = None,
    solver: Annotated[Optional[str], typer.Option("--solver", help="pulp (CBC, default) or ortools.")] = None,
    vllm_native: Annotated[bool, typer.Option("--vllm-native", metavar="", help="Only variants vLLM's native DeciLM model serves.")] = False,
    vllm_transformers: Annotated[bool, typer.Option("--vllm-transformers", metavar="", help="Only children vLLM's Transformers backend serves (the parent's attention in every layer; for MoE parents).")] = False,
    realize: Annotated[bool, typer.Option("--realize", metavar="", help="Also build the children (children/{name}/).")] = False,
    rerank: Annotated[Optional[int], typer.Option("--rerank", min=1, help="Assemble this many diverse solutions per target and keep the child with the lowest measured KL (solve.rerank; 1: the MIP optimum).", show_default=False)] = None,
) -> None:
    """Choose one attention and one FFN variant per layer (MIP) for each target of the run; writes solutions/*.json.

    A target given by flags is added to the run's targets (or replaces the one of the same name); the others
    are solved again and their children stay. Without target flags the run's targets are solved.

    Example:  puzzle solve runs/demo --target-throughput 1.8x
    Example:  puzzle solve runs/demo --name small --max-memory 0.6x --vllm-native --realize
    Example:  puzzle solve runs/demo --rerank 4
    """
    from puzzle.mip.stage import target_from_flags
    from puzzle.pipeline import run_solve

    target = target_from_flags(name, throughput=target_throughput, memory=max_memory, latency=max_latency,
                               kv_bytes_per_token=max_kv_bytes_per_token, min_attention_layers=min_attention_layers,
                               max_attention_layers=max_attention_layers, vllm_native=vllm_native,
                               vllm_transformers=vllm_transformers)
    plans = run_solve(run, target, solver=solver, realize=realize, rerank=rerank)
    shown = [p for p in plans if target is None or p.name == target["name"]]
    for plan in shown:
        print_plan(plan)
    if realize:
        done(f"children: {', '.join(str(run / 'children' / p.name) for p in plans)}")
    else:
        done(f"solutions: {run / 'solutions'}; build the children with: puzzle realize {run}")


def print_plan(plan) -> None:
    """The chosen layers of one solution and what the profile predicts for it."""
    sol = plan.solution
    table = Table(title=f"{plan.name}: predicted {plan.predicted_speedup:.2f}x decode throughput, summed score "
                        f"{sol.score:.4f}", title_justify="left")
    for column in ("layer", "attention", "FFN"):
        table.add_column(column, justify="right" if column == "layer" else "left")
    for i, (attention, ffn) in enumerate(zip(sol.attention_names, sol.ffn_names)):
        table.add_row(str(i), attention, ffn)
    console.print(table)
    memory = f", memory {human_bytes(sol.memory_bytes)} (parameters {human_bytes(sol.param_bytes)} + KV cache)" \
        if sol.memory_bytes is not None else ""
    console.print(f"{sol.throughput:,.0f} tokens/s predicted{memory}, KV {sol.kv_bytes_per_token:,} B/token, "
                  f"{sol.attention_layers} attention layers")
    if plan.reranked:
        optimum, chosen = plan.rerank_choice
        console.print(f"re-ranked {len(plan.reranked)} solutions by measured KL: kept solution {chosen['solution']} "
                      f"(KL {chosen['kl']:.4f}; the MIP optimum's {optimum['kl']:.4f})")


def realize_command(run: RunDir) -> None:
    """Assemble each solved child from the parent and the trained library into children/{name}/.

    Example:  puzzle realize runs/llama8b
    """
    from puzzle.pipeline import run_stage

    search = run_stage(run, "realize")
    done(f"children: {search.paths.children}")
