"""`puzzle search PARENT --out RUN`: the whole pipeline over a run directory, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from puzzle.cli.options import Device, Exclude, Launcher, Workers
from puzzle.cli.output import done, print_run_summary


def _Slurm(flag: str, text: str):  # noqa: N802 (an annotation, like typer's)
    return Annotated[Optional[str], typer.Option(flag, help=text, show_default=False, rich_help_panel="Slurm")]


def search_command(
    parent: Annotated[Optional[Path], typer.Argument(help="Parent model folder (HF Llama/Mistral/Qwen2/Qwen3/Qwen3-MoE/Mixtral/gpt-oss or DeciLM). Not needed to resume.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", help="Run directory (created, or resumed when it exists).", show_default=False)] = ...,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML run config; flags override it.")] = None,
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="Text / JSONL / datasets folder for calibration, BLD and scoring (repeatable).")] = None,
    stage: Annotated[Optional[str], typer.Option("--stage", help="Run only this stage: convert, library, bld, score, profile, solve, realize, fuse, prune, distill, report.")] = None,
    target_throughput: Annotated[Optional[str], typer.Option("--target-throughput", help="One target instead of the config's: e.g. 2x or tokens/s.")] = None,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Parameters + KV cache of the child, e.g. 40GiB or 0.6x.")] = None,
    vllm_native: Annotated[bool, typer.Option("--vllm-native", metavar="", help="With --target-throughput / --max-memory: only variants vLLM serves natively.")] = False,
    vllm_transformers: Annotated[bool, typer.Option("--vllm-transformers", metavar="", help="With --target-throughput / --max-memory: only children vLLM's Transformers backend serves.")] = False,
    workers: Workers = 1,
    launcher: Launcher = "local",
    wait: Annotated[bool, typer.Option("--wait", metavar="", help="With --launcher slurm: wait for the jobs, showing their state, and print the children.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", metavar="", help="With --launcher slurm: only write the jobs' sbatch scripts and a submit.sh into RUN/slurm-scripts/.")] = False,
    device: Device = None,
    exclude: Exclude = None,
    partition: _Slurm("--partition", "Slurm partition of every job (slurm.partition).") = None,
    account: _Slurm("--account", "Slurm account (slurm.account).") = None,
    qos: _Slurm("--qos", "Slurm QoS (slurm.qos).") = None,
    time_limit: _Slurm("--time", "Time limit of each task, e.g. 08:00:00; a task that runs out is requeued (slurm.time).") = None,
    cpus_per_task: Annotated[Optional[int], typer.Option("--cpus-per-task", min=1, help="CPUs of each task (slurm.cpus_per_task).", show_default=False, rich_help_panel="Slurm")] = None,
    gpus_per_task: Annotated[Optional[int], typer.Option("--gpus-per-task", min=0, help="GPUs of each task (slurm.gpus_per_task).", show_default=False, rich_help_panel="Slurm")] = None,
    mem: _Slurm("--mem", "Memory of each task, e.g. 200G (slurm.mem).") = None,
    nodes: Annotated[Optional[int], typer.Option("--nodes", min=1, help="Nodes of the distill job; the other jobs' tasks use one node each (slurm.nodes).", show_default=False, rich_help_panel="Slurm")] = None,
    distill_tasks_per_node: Annotated[Optional[int], typer.Option("--distill-tasks-per-node", min=1, help="GKD processes per node of the distill job, one per GPU (slurm.distill_tasks_per_node).", show_default=False, rich_help_panel="Slurm")] = None,
) -> None:
    """Run the Puzzle search: convert, library, bld, score, profile, solve, realize, (fuse, prune, distill,) report.

    Stages that are done are skipped, so rerunning the same command resumes an interrupted search.

    Examples:
      puzzle search ~/models/Llama-3.1-8B --out runs/llama8b --config search.yaml --data ~/data/fineweb
      puzzle search --out runs/llama8b --stage bld --workers 8 --launcher torchrun
      puzzle search ~/models/Llama-3.1-8B --out runs/llama8b-slurm --config search.yaml --data ~/data/fineweb --workers 4 --launcher slurm --wait
      puzzle search ~/models/Llama-3.1-8B --out runs/llama8b-sbatch --config search.yaml --data ~/data/fineweb --workers 4 --launcher slurm --dry-run

    With --launcher slurm the search is a chain of Slurm jobs (prepare, bld array, score array, finish; with a
    `gkd:` section finish is select, distill on --nodes x --distill-tasks-per-node processes, report; the
    config's `slurm:` section sets their resources); without --wait the command returns once they are
    submitted, and `puzzle status RUN` follows them.
    """
    from puzzle.config import dotted
    from puzzle.errors import Interrupted
    from puzzle.mip.stage import target_from_flags
    from puzzle.pipeline import run_search

    target = target_from_flags(throughput=target_throughput, memory=max_memory, vllm_native=vllm_native,
                               vllm_transformers=vllm_transformers)
    overrides = dotted({"device": device, "data.paths": [str(p) for p in data] if data else None,
                        "slurm.partition": partition, "slurm.account": account, "slurm.qos": qos,
                        "slurm.time": time_limit, "slurm.cpus_per_task": cpus_per_task,
                        "slurm.gpus_per_task": gpus_per_task, "slurm.mem": mem, "slurm.nodes": nodes,
                        "slurm.distill_tasks_per_node": distill_tasks_per_node,
                        "data.exclude": exclude or None,
                        "solve.targets": [target] if target else None})
    try:
        search = run_search(out, parent=parent, config=config, overrides=overrides, stage=stage, workers=workers,
                            launcher=launcher, wait=wait, dry_run=dry_run)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: the stages and BLD units that finished are kept in {out}; resume with "
                          f"`puzzle search --out {out}`") from None
    if search.scripts:
        done(f"sbatch scripts: {search.scripts.parent}; submit them with: {search.scripts}")
        return
    if search.jobs and not wait and search.cfg.slurm.executor != "local":
        done(f"submitted {len(search.jobs)} jobs ({', '.join(f'{j.stage} {j.job_id}' for j in search.jobs)}); "
             f"follow them with: puzzle status {out}")
        return
    if stage is None:
        print_run_summary(out)
    done(f"run directory: {out}")
