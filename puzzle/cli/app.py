"""The `puzzle` command: registers the commands and turns user errors into one red line.

Each command lives in its own module under puzzle/cli/ and stays thin: parse options, build the config,
call one library function, print through puzzle.cli.output.
"""

from __future__ import annotations

import os
import sys

import typer

from puzzle.cli.convert import convert_command
from puzzle.cli.demo import demo_command
from puzzle.cli.distill import distill_command
from puzzle.cli.eval import eval_command
from puzzle.cli.fuse_ffn import fuse_ffn_command
from puzzle.cli.inspect import inspect_command
from puzzle.cli.prune import prune_command
from puzzle.cli.search import search_command
from puzzle.cli.stages import bld_command, profile_command, realize_command, score_command, solve_command
from puzzle.errors import PuzzleError

app = typer.Typer(
    name="puzzle",
    help="Turn a trained Hugging Face LLM into a faster, smaller, deployable derivative.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.command("convert")(convert_command)
app.command("inspect")(inspect_command)
app.command("demo")(demo_command)
app.command("search")(search_command)
app.command("bld")(bld_command)
app.command("score")(score_command)
app.command("profile")(profile_command)
app.command("solve")(solve_command)
app.command("realize")(realize_command)
app.command("fuse-ffn")(fuse_ffn_command)
app.command("distill")(distill_command)
app.command("prune")(prune_command)
app.command("eval")(eval_command)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` and return the exit code; user errors become one red line, not a traceback."""
    from puzzle.jobs import set_threads_from_env

    set_threads_from_env()
    try:
        app(args=argv, prog_name="puzzle")  # standalone mode: typer prints usage errors and raises SystemExit
    except SystemExit as stop:
        _close_distributed()
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except PuzzleError as err:
        _close_distributed()
        if os.environ.get("PUZZLE_DEBUG", "") not in ("", "0"):
            raise
        from puzzle.cli.output import err_console

        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        err_console.print("[dim](set PUZZLE_DEBUG=1 for the traceback)[/]")
        return err.exit_code
    _close_distributed()
    return 0


def _close_distributed() -> None:
    """Under torchrun, end the process group (else PyTorch warns at exit)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> None:
    """Entry point of the console script and `python -m puzzle`."""
    sys.exit(run())
