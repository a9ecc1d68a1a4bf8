"""`puzzle status RUN`: where a search stands (stages, BLD units, Slurm jobs, failed tasks), and the hidden
`puzzle run-task` that the sbatch scripts of `puzzle search --launcher slurm --dry-run` run."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from puzzle.cli.output import console
from puzzle.cli.stages import RunDir


def status_command(run: RunDir) -> None:
    """Each stage done or not, the BLD units trained, and the Slurm jobs of a `--launcher slurm` search with
    their state; a failed task is named with its last error line and its log.

    Example:  puzzle status runs/demo
    """
    from puzzle.pipeline import run_status
    from puzzle.slurm import describe

    status = run_status(run)
    table = Table(title=f"{run}", title_justify="left")
    for column in ("stage", "state", "detail"):
        table.add_column(column)
    for stage, done in status.stages.items():
        detail = f"{status.units[0]} of {status.units[1]} units trained" if stage == "bld" and status.units else ""
        table.add_row(stage, "[green]done[/]" if done else "not done", detail)
    console.print(table)
    if status.jobs:
        jobs = Table(title="Slurm jobs (RUN/jobs.json)", title_justify="left")
        for column in ("job", "id", "tasks", "state"):
            jobs.add_column(column)
        for job, state in status.jobs:
            jobs.add_row(job.stage, job.job_id, describe(job), state)
        console.print(jobs)
    for failure in status.failures:
        console.print(f"[red]failed[/]: {failure}")


def run_task_command(
    run: RunDir,
    stage: Annotated[str, typer.Argument(help="prepare, bld, score, finish, select, distill or report.", show_default=False)],
    rank: Annotated[int, typer.Option("--rank", min=0, help="This task's index in the job (SLURM_ARRAY_TASK_ID).")] = 0,
    world: Annotated[int, typer.Option("--world", min=1, help="Tasks in the job.")] = 1,
    score_world: Annotated[int, typer.Option("--score-world", min=1, help="Tasks of the score job (for finish).")] = 1,
    parent: Annotated[Optional[str], typer.Option("--parent", help="The parent model folder (for prepare).")] = None,
) -> None:
    """One task of one job of a Slurm search (what the --dry-run scripts run)."""
    from puzzle.pipeline import run_task

    run_task(str(run), stage, rank, world, parent, score_world)
