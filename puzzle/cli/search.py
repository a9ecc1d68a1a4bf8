"""`puzzle search PARENT --out RUN`: the whole pipeline over a run directory, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from puzzle.cli.options import Device, Exclude, Launcher, Workers
from puzzle.cli.output import done, print_run_summary


def search_command(
    parent: Annotated[Optional[Path], typer.Argument(help="Parent model folder (HF Llama/Mistral/Qwen2/Qwen3 or DeciLM). Not needed to resume.", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", help="Run directory (created, or resumed when it exists).", show_default=False)] = ...,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML run config; flags override it.")] = None,
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="Text / JSONL / datasets folder for calibration, BLD and scoring (repeatable).")] = None,
    stage: Annotated[Optional[str], typer.Option("--stage", help="Run only this stage: convert, library, bld, score, profile, solve, realize, fuse, prune, distill, report.")] = None,
    target_throughput: Annotated[Optional[str], typer.Option("--target-throughput", help="One target instead of the config's: e.g. 2x or tokens/s.")] = None,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Parameters + KV cache of the child, e.g. 40GiB or 0.6x.")] = None,
    vllm_native: Annotated[bool, typer.Option("--vllm-native", metavar="", help="With --target-throughput / --max-memory: only variants vLLM serves natively.")] = False,
    workers: Workers = 1,
    launcher: Launcher = "local",
    wait: Annotated[bool, typer.Option("--wait", metavar="", help="With --launcher slurm: wait for the jobs, showing their state, and print the children.")] = False,
    device: Device = None,
    exclude: Exclude = None,
) -> None:
    """Run the Puzzle search: convert, library, bld, score, profile, solve, realize, [fuse, prune, distill,] report.

    Stages that are done are skipped, so rerunning the same command resumes an interrupted search.

    Examples:
      puzzle search ~/models/Llama-3.1-8B --out runs/llama8b --config search.yaml --data ~/data/fineweb
      puzzle search --out runs/llama8b --stage bld --workers 8 --launcher torchrun
      puzzle search ~/models/Llama-3.1-8B --out runs/llama8b-slurm --config search.yaml --data ~/data/fineweb --workers 4 --launcher slurm --wait

    With --launcher slurm the search is a chain of Slurm jobs (prepare, bld array, score array, finish; the
    config's `slurm:` section sets their resources); without --wait the command returns once they are
    submitted, and `puzzle status RUN` follows them.
    """
    from puzzle.config import dotted
    from puzzle.errors import Interrupted
    from puzzle.mip.stage import target_from_flags
    from puzzle.pipeline import run_search

    target = target_from_flags(throughput=target_throughput, memory=max_memory, vllm_native=vllm_native)
    overrides = dotted({"device": device, "data.paths": [str(p) for p in data] if data else None,
                        "data.exclude": exclude or None,
                        "solve.targets": [target] if target else None})
    try:
        search = run_search(out, parent=parent, config=config, overrides=overrides, stage=stage, workers=workers,
                            launcher=launcher, wait=wait)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: the stages and BLD units that finished are kept in {out}; resume with "
                          f"`puzzle search --out {out}`") from None
    if search.jobs and not wait and search.cfg.slurm.executor != "local":
        done(f"submitted {len(search.jobs)} jobs ({', '.join(f'{j.stage} {j.job_id}' for j in search.jobs)}); "
             f"follow them with: puzzle status {out}")
        return
    if stage is None:
        print_run_summary(out)
    done(f"run directory: {out}")
