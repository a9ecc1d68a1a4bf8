"""`puzzle bld RUN` and `puzzle score RUN`: single stages of a search run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from puzzle.cli.options import Launcher, Workers
from puzzle.cli.output import done

RunDir = Annotated[Path, typer.Argument(help="Run directory made by `puzzle search`.", show_default=False)]


def bld_command(
    run: RunDir,
    workers: Workers = 1,
    launcher: Launcher = "local",
    worker: Annotated[bool, typer.Option("--worker", hidden=True, help="Run this process's share (RANK/WORLD_SIZE).")] = False,
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
    init: Annotated[bool, typer.Option("--init", help="Score the initialised candidates (before BLD) into scores_init.json.")] = False,
) -> None:
    """Replace-one-block scores of every candidate: KL to the parent, LM loss, top-1 agreement.

    Example:  puzzle score runs/demo
    """
    from puzzle.pipeline import run_score

    path = run_score(run, weights="init" if init else "bld")
    done(f"scores: {path}")
