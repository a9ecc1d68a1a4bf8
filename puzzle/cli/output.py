"""Rich output shared by the commands: one console, number formatting, error lines."""

from __future__ import annotations

from pathlib import Path

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


_VLLM = {"native": "yes", "transformers": "backend", "none": "no"}  # short: the table fits 80 columns


def print_run_summary(run: Path, title: str = "children") -> None:
    """The children table of a finished search (from its report.json) and where the children and report are."""
    import json

    from rich.table import Table

    report_path = Path(run) / "report.json"
    if not report_path.exists():  # a search stopped before its report (e.g. --stage)
        return
    report = json.loads(report_path.read_text())
    device = report["profile"]["device"]
    table = Table(title=f"{title}, measured on {'this CPU' if device.startswith('cpu') else device}")
    # Short headers and no path column: the table must fit an 80-column terminal or log.
    for column in ("model", "params", "speed-up pred.", "speed-up meas.", "KL", "LM loss", "top-1", "vLLM"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in [report["parent"], *report["children"]]:
        measured = f"{row['measured_speedup']:.2f}x" + (" ~" if row.get("measured_noisy") else "") \
            if row["measured_speedup"] else "-"
        predicted = f"{row['predicted_speedup']:.2f}x" if row["predicted_speedup"] else "-"
        table.add_row(row["name"], f"{row['params'] / 1e6:.2f}M", predicted, measured, f"{row['kl']:.4f}",
                      f"{row['lm_loss']:.3f}", f"{row['top1']:.3f}", _VLLM.get(row.get("vllm_serving"), "yes" if row["vllm_native"] else "no"))
    console.print(table)
    if any(row.get("measured_noisy") for row in [report["parent"], *report["children"]]):
        from puzzle.profiling import NOISY

        console.print(f"[yellow]~[/]: the timing spread by more than {NOISY:.0%} over repeats (a loaded machine?): "
                      "not to be trusted")
    done(f"children: {Path(run) / 'children'}/{{{','.join(c['name'] for c in report['children'])}}}")
    done(f"report: {Path(run) / 'report.md'} (plots next to it)")


def done(message: str) -> None:
    console.print(f"[bold green]✓[/] {message}")
