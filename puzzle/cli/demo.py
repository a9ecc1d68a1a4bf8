"""`puzzle demo`: build the embedded demo parent and run a small search on it, end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from puzzle.cli.options import Workers
from puzzle.cli.output import console, done, print_run_summary


def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Run directory of the demo search.")] = Path("runs/demo"),
    parent_only: Annotated[bool, typer.Option("--parent-only", metavar="", help="Only build (or reuse) the demo parent.")] = False,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Retrain the demo parent even if a cached one exists.")] = False,
    moe: Annotated[bool, typer.Option("--moe", metavar="", help="A small Mixtral (4 layers, 8 experts, 2 per token) "
                                      "searched with expert pruning; run directory runs/demo-moe unless --out says.")] = False,
    workers: Workers = 1,  # 2 are only ~1.05x faster on 2 cores and cache 1.2 GiB of activations (bld_workers.md)
) -> None:
    """Train (or reuse) the demo parent, a small Llama trained on the Python standard library, and run
    `puzzle search` on it: library, BLD, scoring, profiling, MIP, realize, report — all on this CPU.

    The parent is cached under ~/.cache/puzzle/demo (or $PUZZLE_DEMO_DIR); the search resumes if
    interrupted. `--moe` does the same with a mixture-of-experts parent (puzzle/configs/demo_moe.yaml).

    Example:  puzzle demo --out runs/demo --workers 2
    """
    from puzzle.demo import DemoConfig, build_demo_parent
    from puzzle.demo_search import moe_demo_parent

    if moe and out == Path("runs/demo"):
        out = Path("runs/demo-moe")
    parent = moe_demo_parent(force) if moe else build_demo_parent(DemoConfig(), force=force)
    m = parent.metrics
    done(f"demo parent: {parent.path}{' (cached)' if parent.cached else ''}")
    console.print(f"  held-out loss {m.held_out_loss:.3f} nats/token vs unigram baseline {m.unigram_loss:.3f} "
                  f"({m.train_tokens:,} training tokens)")
    if parent_only:
        return
    from puzzle.demo_search import run_demo, run_moe_demo

    search = run_moe_demo(out, workers=workers) if moe else run_demo(out, workers=workers)
    print_run_summary(search.paths.root, title="demo children")
