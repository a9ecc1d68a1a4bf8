"""`puzzle status RUN`: where a search stands: stages, BLD units, Slurm jobs and failed tasks."""

from __future__ import annotations

from rich.table import Table

from puzzle.cli.output import console
from puzzle.cli.stages import RunDir


def status_command(run: RunDir) -> None:
    """Each stage done or not, the BLD units trained, and the Slurm jobs of a `--launcher slurm` search with
    their state; a failed task is named with its last error line and its log.

    Example:  puzzle status runs/demo
    """
    from puzzle.pipeline import run_status

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
            jobs.add_row(job.stage, job.job_id, str(job.tasks), state)
        console.print(jobs)
    for failure in status.failures:
        console.print(f"[red]failed[/]: {failure}")
