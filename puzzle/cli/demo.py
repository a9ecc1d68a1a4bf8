"""`puzzle demo`: build the embedded demo parent (a small Llama trained on the Python standard library)."""

from __future__ import annotations

from typing import Annotated

import typer

from puzzle.cli.output import console, done


def demo_command(
    parent_only: Annotated[bool, typer.Option("--parent-only", help="Only build (or reuse) the demo parent.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Retrain the demo parent even if a cached one exists.")] = False,
) -> None:
    """Build the demo parent (cached under ~/.cache/puzzle/demo, or $PUZZLE_DEMO_DIR) and show it.

    Example:  puzzle demo --parent-only
    """
    from puzzle.demo import DemoConfig, build_demo_parent

    parent = build_demo_parent(DemoConfig(), force=force)
    m = parent.metrics
    done(f"demo parent: {parent.path}")
    console.print(
        f"held-out loss {m['held_out_loss']:.3f} nats/token vs unigram baseline {m['unigram_loss']:.3f} "
        f"({m['train_tokens']:,} training tokens)"
    )
