"""The `puzzle` command: registers the commands and turns user errors into one red line.

Each command lives in its own module under puzzle/cli/ and stays thin: parse options, build the config,
call one library function, print through puzzle.cli.output.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

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
from puzzle.cli.status import run_task_command, status_command
from puzzle.errors import Interrupted, PuzzleError

# click's UsageError (bad options, missing arguments), whichever click typer uses (its own copy in typer >= 0.2x).
_USAGE_ERROR = typer.BadParameter.__mro__[1]

app = typer.Typer(
    name="puzzle",
    help="Turn a trained Hugging Face LLM into a faster, smaller, deployable derivative.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        import puzzle

        typer.echo(f"puzzle {puzzle.__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", metavar="", is_eager=True, callback=_version,
                                                help="Print puzzle's version and exit.")] = False) -> None:
    """Turn a trained Hugging Face LLM into a faster, smaller, deployable derivative."""


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
app.command("status")(status_command)
app.command("run-task", hidden=True)(run_task_command)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` and return the exit code; user errors become one red line, not a traceback."""
    from puzzle.jobs import set_threads_from_env

    set_threads_from_env()
    _quiet_third_parties()
    try:
        # Not standalone: click's usage errors come back here and are printed like every other error.
        code = app(args=argv, prog_name="puzzle", standalone_mode=False)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except _USAGE_ERROR as err:
        command = f"puzzle {err.ctx.command_path.split(' ', 1)[1]}" if err.ctx and " " in err.ctx.command_path else "puzzle"
        code = _error_line(f"{err.format_message()} (see `{command} --help`)", err.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        code = _error_line("interrupted; what finished is kept, and the same command resumes it", 130)
    except PuzzleError as err:
        if os.environ.get("PUZZLE_DEBUG", "") not in ("", "0"):
            _close_distributed()
            raise
        hint = "" if isinstance(err, Interrupted) else " (PUZZLE_DEBUG=1 shows the traceback)"
        code = _error_line(f"{err}{hint}", err.exit_code)
    _close_distributed()
    return code if isinstance(code, int) else 0


def _quiet_third_parties() -> None:
    """Our commands show their own progress (rich bars, or lines when redirected): silence the libraries'
    tqdm bars ("Loading weights", "Writing model shards", lm-eval's) and their advisory warnings. Set before
    they are imported; a user's own setting of these variables wins. PUZZLE_DEBUG=1 keeps everything."""
    if os.environ.get("PUZZLE_DEBUG", "") not in ("", "0"):
        return
    for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                        ("TRANSFORMERS_VERBOSITY", "error"), ("TQDM_DISABLE", "1")):
        os.environ.setdefault(name, value)
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # e.g. one "Truncating ..." warning per long request
    # torch imports tqdm before this runs, so TQDM_DISABLE is read too late, and lm-eval passes disable=False
    # explicitly: every tqdm bar is made disabled instead.
    import tqdm.std

    init = tqdm.std.tqdm.__init__
    if not getattr(init, "puzzle_quiet", False):
        def quiet_init(self, *args, **kwargs):
            kwargs["disable"] = True
            init(self, *args, **kwargs)

        quiet_init.puzzle_quiet = True
        tqdm.std.tqdm.__init__ = quiet_init


def _error_line(message: str, code: int) -> int:
    """A user error: one red line on stderr; returns the exit code."""
    from puzzle.cli.output import err_console

    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    return code


def _close_distributed() -> None:
    """Under torchrun, end the process group (else PyTorch warns at exit)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> None:
    """Entry point of the console script and `python -m puzzle`."""
    sys.exit(run())
