"""Rich output shared by the commands: one console, number formatting, error lines."""

from __future__ import annotations

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def reset_consoles() -> None:
    """A forked worker writes to a log file: look at its new stdout/stderr again (commands that imported
    `console` by name are not worker commands)."""
    global console, err_console
    console, err_console = Console(), Console(stderr=True)


def human_count(n: float) -> str:
    """12_345_678 -> '12.3M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def done(message: str) -> None:
    console.print(f"[bold green]✓[/] {message}")
