"""`puzzle eval CKPT --tasks TASKS` and `puzzle eval --make-tasks [DIR]`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from puzzle.cli.options import Device, JsonOutput, TrustRemoteCode
from puzzle.cli.output import console, done

# The shipped tasks (puzzle/tasks/*.yaml; a test keeps this list complete): what --help names.
SHIPPED = {
    "puzzle_stdlib_next_line": "pick the true next line of held-out stdlib code among 4 (accuracy; chance 25%)",
    "puzzle_stdlib_word_order": "the true line vs 3 copies with shuffled words (accuracy; chance 25%)",
    "puzzle_stdlib_ppl": "perplexity of held-out stdlib code (read bits_per_byte: lower is better)",
}
Tasks = Annotated[Optional[str], typer.Option("--tasks", "-t", help="Task names, comma-separated, or a folder / YAML file of your own lm-eval tasks. Shipped: " + "; ".join(f"{name}: {what}" for name, what in SHIPPED.items()) + ".", show_default=False)]
MakeTasks = Annotated[bool, typer.Option("--make-tasks", metavar="", help="Regenerate the demo tasks from held-out standard library files (seed 0) into PATH, default the shipped puzzle/tasks/.")]


def eval_command(
    path: Annotated[Optional[Path], typer.Argument(metavar="CKPT", help="Model folder (puzzle checkpoint or HF model); with --make-tasks, the task folder to write.", show_default=False)] = None,
    tasks: Tasks = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per forward pass.")] = 8,
    limit: Annotated[Optional[float], typer.Option("--limit", help="Documents per task: a count, or a fraction below 1.", show_default=False)] = None,
    device: Device = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (as stored), float32, bfloat16 or float16.")] = "auto",
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Context window; default the model's.", show_default=False)] = None,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", help="Few-shot examples; default the task's.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Results file; default CKPT/eval/results.json.", show_default=False)] = None,
    no_write: Annotated[bool, typer.Option("--no-write", metavar="", help="Do not write a results file.")] = False,
    make_tasks: MakeTasks = False,
    as_json: JsonOutput = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Evaluate a checkpoint with lm-evaluation-harness on local task files, fully offline.

    Prints a table and writes CKPT/eval/results.json (tasks of earlier runs on the same weights are kept).

    Example:  puzzle eval ./runs/demo/children/2x --tasks puzzle_stdlib_next_line,puzzle_stdlib_ppl

    Example:  puzzle eval ./llama-8b-decilm --tasks ./my_tasks/ --limit 200

    Example:  puzzle eval --make-tasks ./my_tasks
    """
    # Everything is local (nothing is downloaded); set before datasets / huggingface_hub read them at import.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if make_tasks:
        from puzzle.eval_tasks import SHIPPED_TASKS_DIR
        from puzzle.eval_tasks import make_tasks as make

        manifest = make(path or SHIPPED_TASKS_DIR)
        done(f"wrote {', '.join(f'{name} ({n} documents)' for name, n in manifest.tasks.items())} to {path or SHIPPED_TASKS_DIR}")
        return
    if path is None or tasks is None:
        raise typer.BadParameter("give a model folder and --tasks (or --make-tasks to regenerate the demo tasks)")
    from puzzle.evaluation import EvalConfig, evaluate, results_path

    count = int(limit) if limit is not None and limit >= 1 else limit
    cfg = EvalConfig(batch_size=batch_size, limit=count, device=device or "auto", dtype=dtype, max_length=max_length,
                     num_fewshot=num_fewshot, write=not no_write, trust_remote_code=trust_remote_code)
    result = evaluate(path, tasks, cfg, out=out)
    if as_json:
        console.print_json(json.dumps(result.to_dict()))
        return
    _print_table(result)
    if cfg.write:
        done(f"results: {out or results_path(path)}")


def _print_table(result) -> None:
    table = Table(title=f"{result.model}  ({result.device}, {result.seconds:.0f}s)")
    for column in ("task", "metric", "value", "± stderr", "documents"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task in result.tasks.values():
        main = task.main_metric
        for i, (metric, value) in enumerate(task.metrics.items()):
            err = task.stderr.get(metric)
            arrow = "↑" if task.higher_is_better.get(metric, True) else "↓"
            table.add_row(task.task if i == 0 else "", f"{metric} {arrow}" + (" ◀" if metric == main else ""),
                          f"{value:.4g}", "-" if err is None else f"{err:.2g}", str(task.samples) if i == 0 else "")
    console.print(table)
    console.print("◀: the number to compare models by (accuracy, or bits per byte for perplexity tasks: word and "
                  "byte perplexities are the same quantity on other scales)")
