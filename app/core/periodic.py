"""A coroutine run again and again on the event loop: the background checks of a server process
(cache eviction, readiness probes)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


class Periodic:
    """Call ``check()`` every ``seconds`` seconds from the event loop, from :meth:`start` until
    :meth:`stop`. A check that raises is logged (with ``what``) and the next one runs as planned:
    a bug in one round must not end the checks of a serving process.

    Args:
        seconds: the pause between the end of one check and the start of the next.
        check: the coroutine function called each round.
        what: what the checks do, for the log ("tile cache eviction").
    """

    def __init__(self, seconds: float, check: Callable[[], Awaitable[Any]], what: str):
        self.seconds = seconds
        self.check = check
        self.what = what
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the rounds (the first after ``seconds``). Call from the event loop."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        """Stop the rounds (a running check is cancelled)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.seconds)
            try:
                await self.check()
            except Exception:
                log.exception("%s failed", self.what)
