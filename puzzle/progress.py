"""Progress bars for long library work.

Library code reports progress through `track(...)`; the bar is drawn by rich on stderr. Set
`PUZZLE_QUIET=1` (the tests do) to silence every bar. Keeping this in one place means the library never
prints directly and the CLI decides how progress looks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console = Console(stderr=True)


def reset_consoles() -> None:
    """A forked worker writes to a log file: look at its new stderr again (terminal or not, width)."""
    global _console
    _console = Console(stderr=True)


def quiet() -> bool:
    return os.environ.get("PUZZLE_QUIET", "") not in ("", "0")


@dataclass
class Tracker:
    """Handle yielded by `track`: `advance(n, **metrics)` moves the bar and shows the metrics."""

    _progress: Progress | None
    _task: int | None
    metrics: dict[str, object] = field(default_factory=dict)

    def advance(self, n: float = 1, **metrics: object) -> None:
        self.metrics.update(metrics)
        if self._progress is not None:
            self._progress.update(self._task, advance=n, metrics=_format_metrics(self.metrics))

    def update(self, **metrics: object) -> None:
        self.advance(0, **metrics)


def _format_metrics(metrics: dict[str, object]) -> str:
    parts = []
    for key, value in metrics.items():
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


class _LineTracker(Tracker):
    """Progress as plain lines when stderr is not a terminal (a log file, a pipe): a line every 10 % of the
    work or every 30 s, and one at the end, so a redirected log shows progress as it happens."""

    def __init__(self, description: str, total: float | None):
        super().__init__(None, None)
        self.description, self.total, self.done, self.shown = description, total, 0.0, 0.0
        self.started = self.last = time.monotonic()
        self.next_tenth = 1

    def advance(self, n: float = 1, **metrics: object) -> None:
        self.metrics.update(metrics)
        self.done += n
        crossed = False
        while self.total and self.done * 10 >= self.next_tenth * self.total and self.next_tenth <= 10:
            self.next_tenth, crossed = self.next_tenth + 1, True
        if crossed or time.monotonic() - self.last >= 30:
            self.line()

    def line(self) -> None:
        self.last, self.shown = time.monotonic(), self.done
        of = f"/{self.total:g}" if self.total else ""
        metrics = _format_metrics(self.metrics)
        _console.print(f"{self.description}: {self.done:g}{of} ({self.last - self.started:.0f} s)"
                       + (f" {metrics}" if metrics else ""), highlight=False, markup=False)


@contextmanager
def track(description: str, total: float | None) -> Iterator[Tracker]:
    """A progress bar for `total` steps (None: unknown total); plain lines when stderr is not a terminal;
    silent when PUZZLE_QUIET is set."""
    if quiet():
        yield Tracker(None, None)
        return
    if not _console.is_terminal:
        tracker = _LineTracker(description, total)
        yield tracker
        if tracker.done != tracker.shown:
            tracker.line()  # where it ended, if the last line did not say so
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=_console,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, metrics="")
        yield Tracker(progress, task)


def log(message: str) -> None:
    """One status line for the user (stderr), silent when PUZZLE_QUIET is set."""
    if not quiet():
        _console.print(message)
