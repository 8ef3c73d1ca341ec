"""Single-flight: concurrent requests for one uncached tile render it once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Runs one computation per key at a time; concurrent callers share its result.

    Used so that concurrent requests for one uncached tile render it once. The computation runs
    as its own task, so a client that disconnects does not cancel it for the others (and a
    tile being written to the cache is always finished). Event-loop only. ``T`` is the result
    type of the computations.
    """

    def __init__(self) -> None:
        self._running: dict[object, asyncio.Task[T]] = {}

    async def run(self, key: object, compute: Callable[[], Awaitable[T]]) -> T:
        """Await ``compute()``, or the run already in flight for ``key``; errors propagate
        to every waiter."""
        task = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(compute())
            self._running[key] = task
            task.add_done_callback(lambda t: self._finished(key, t))
        return await asyncio.shield(task)

    def _finished(self, key: object, task: asyncio.Task[T]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so an error nobody awaits is not reported twice

    @property
    def in_flight(self) -> int:
        """How many computations are running."""
        return len(self._running)
