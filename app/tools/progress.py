"""The progress bar of the command-line tools (pregenerate, export, verify, the demo slide).

One look everywhere: a label, the bar, ``done/total``, a rate, elapsed time and ETA, drawn by
rich on stderr so that stdout keeps the results.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

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


def progress_bar(unit: str = "tiles", console: Console | None = None,
                 transient: bool = False) -> Progress:
    """A rich progress bar whose tasks carry a ``rate`` field (``unit`` per second).

    Use as a context manager; update tasks with :func:`rate_updater` or ``bar.update``.

    Args:
        unit: what is counted, shown in the rate column (``tiles/s``).
        console: where to draw (default: stderr).
        transient: erase the bar when it stops (a terminal only).
    """
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(f"{{task.fields[rate]:>8,.0f}} {unit}/s"), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    return Progress(*columns, console=console or Console(stderr=True), transient=transient)


def rate_updater(bar: Progress, task: TaskID) -> Callable[[int, int | None, int | None], None]:
    """``update(completed, total, counted)`` for one task of a :func:`progress_bar`: sets its
    position and total, and its rate as ``counted`` (default ``completed``) per second since
    this call."""
    started = time.monotonic()

    def update(completed: int, total: int | None, counted: int | None = None) -> None:
        elapsed = time.monotonic() - started
        count = completed if counted is None else counted
        bar.update(task, completed=completed, total=total,
                   rate=count / elapsed if elapsed > 0 else 0.0)

    return update


@contextlib.contextmanager
def bar_on_first_report(label: str, unit: str, console: Console | None = None
                        ) -> Iterator[Callable[[int, int | None], None]]:
    """A ``report(completed, total)`` callback that draws a :func:`progress_bar` labelled
    ``label`` from its first call on; nothing is drawn if it is never called (work that turned
    out to be done already)."""
    bar: Progress | None = None
    update: Callable[[int, int | None, int | None], None] | None = None

    def report(completed: int, total: int | None) -> None:
        nonlocal bar, update
        if bar is None or update is None:
            bar = progress_bar(unit, console)
            bar.start()
            update = rate_updater(bar, bar.add_task(label, total=total, rate=0.0))
        update(completed, total, None)

    try:
        yield report
    finally:
        if bar is not None:
            bar.stop()
