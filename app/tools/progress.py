"""The progress bars of the command-line tools (pregenerate, export, verify, the demo slide).

One look everywhere: a label, the bar, ``done/total``, a rate, elapsed time and ETA, drawn by
rich on stderr so that stdout keeps the results.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressBars:
    """Progress bars, one per label, drawn from the first :meth:`report` on: work that never
    reports (a file that was there already, a check that stopped first) draws nothing.

    Use as a context manager; the bars stop (and stay on a terminal) when it exits.

    Args:
        unit: what is counted, shown in the rate column (``tiles/s``).
        console: where to draw (default: stderr).
    """

    def __init__(self, unit: str = "tiles", console: Console | None = None):
        self.unit = unit
        self.console = console
        self._bar: Progress | None = None
        self._tasks: dict[str, tuple[TaskID, float]] = {}

    def report(self, label: str, completed: int, total: int | None,
               counted: int | None = None) -> None:
        """Set the bar of ``label`` (created on first use) to ``completed`` of ``total``; its
        rate is ``counted`` (default ``completed``) per second since its first report."""
        if self._bar is None:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn(f"{{task.fields[rate]:>8,.0f}} {self.unit}/s"),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            self._bar = Progress(*columns, console=self.console or Console(stderr=True))
            self._bar.start()
        if label not in self._tasks:
            self._tasks[label] = (self._bar.add_task(label, total=total, rate=0.0),
                                  time.monotonic())
        task, started = self._tasks[label]
        elapsed = time.monotonic() - started
        count = completed if counted is None else counted
        self._bar.update(task, completed=completed, total=total,
                         rate=count / elapsed if elapsed > 0 else 0.0)

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
